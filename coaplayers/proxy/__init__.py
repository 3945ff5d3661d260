"""The proxy node (``coap-proxy``): forward and reverse CoAP proxying on outer options only.

``config`` holds what an operator sets, ``routing`` the pure routing decision (RFC 7252 5.7,
RFC 8768 Hop-Limit), ``site`` the aiocoap serversite that relays exchanges, ``transport`` the one
function that builds listeners and upstream transports (where Layer 1 plugs in), ``node`` the
running instance with graceful shutdown, ``cli`` the command.
"""

from typing import TYPE_CHECKING, Any

from .config import ConfigError, ProxyConfig, RateLimit, Route, Upstream, load_config_file

# The running parts pull in aiocoap, the Layer 1 transport and the DTLS engines: they load on
# first use (PEP 562), so that ``coap-proxy --help`` and configuration checks start quickly.
_LAZY = {
    "metrics": ("MetricsRegistry",),
    "node": ("ProxyNode",),
    "routing": ("Decision", "Refusal", "Router"),
    "site": ("ProxySite", "client_identity"),
    "transport": ("ProxyContext", "build_context"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    import importlib

    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .metrics import MetricsRegistry
    from .node import ProxyNode
    from .routing import Decision, Refusal, Router
    from .site import ProxySite, client_identity
    from .transport import ProxyContext, build_context

__all__ = [
    "ConfigError",
    "Decision",
    "MetricsRegistry",
    "ProxyConfig",
    "ProxyContext",
    "ProxyNode",
    "ProxySite",
    "RateLimit",
    "Refusal",
    "Route",
    "Router",
    "Upstream",
    "build_context",
    "client_identity",
    "load_config_file",
]
