"""The proxy node (``coap-proxy``): forward and reverse CoAP proxying on outer options only.

``config`` holds what an operator sets, ``routing`` the pure routing decision (RFC 7252 5.7,
RFC 8768 Hop-Limit), ``site`` the aiocoap serversite that relays exchanges, ``transport`` the one
function that builds listeners and upstream transports (where Layer 1 plugs in), ``node`` the
running instance with graceful shutdown, ``cli`` the command.
"""

from .config import ConfigError, ProxyConfig, RateLimit, Route, Upstream, load_config_file
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
