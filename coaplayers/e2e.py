"""End-to-end protection for programs: Layer 0 DTLS and the OSCORE mode, wired together.

The programs call :func:`wrap_site` (server) to put an application resource tree behind the
Layer 0 tunnel (and OSCORE, whose keys come from a Layer 0 handshake).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import dtls


@dataclass(frozen=True)
class E2EServerOptions:
    """Layer 0 credentials of a server; separate objects from its Layer 1 credentials."""

    psk_store: dtls.PskStore | None = None
    certificate: dtls.CertificateCredentials | None = None
    required: bool = False
    """Application resources answer only inside Layer 0 or OSCORE (others get 4.01)."""

    @property
    def enabled(self) -> bool:
        return self.psk_store is not None or self.certificate is not None


def wrap_site(site: Any, options: E2EServerOptions) -> Any:
    """The site as served: behind the Layer 0 tunnel when end-to-end credentials are given."""
    if not options.enabled:
        if options.required:
            raise dtls.ConfigurationError(
                "--e2e-required needs end-to-end credentials (--e2e-psk or --e2e-cert/--e2e-key)"
            )
        return site
    from .layer0.policy import Policy
    from .layer0.server import Layer0Site

    policy = Policy.build(protected=("/",) if options.required else ())
    credentials: Any = options.certificate or options.psk_store
    return Layer0Site(site, credentials, policy=policy)


@dataclass(frozen=True)
class E2EClientOptions:
    """A client's end-to-end mode and credentials (separate from its Layer 1 credentials)."""

    mode: str  # "dtls" or "oscore"
    psk: dtls.PskClientCredentials | None = None
    certificate: dtls.CertificateCredentials | None = None


class PlainRequester:
    """Requests as aiocoap sends them (Layer 1 on coaps:// hops), optionally via a proxy."""

    def __init__(self, context: Any, proxy: str | None) -> None:
        from aiocoap.proxy.client import ProxyForwarder

        self._context = context
        self._via = ProxyForwarder(proxy, context.context) if proxy else context.context

    def request(self, message: Any) -> Any:
        return self._via.request(message)

    def describe(self, response: Any) -> dict[str, Any]:
        return {"layer 1": layer1_details(response)}


def layer1_details(response: Any) -> dict[str, Any] | None:
    """What the first hop's DTLS session says about itself, for ``coap-client -v``."""
    remote = getattr(response, "remote", None)
    peer = getattr(remote, "peer", None)
    if peer is None or getattr(peer, "session", None) is None:
        return {"mode": "none (plain CoAP on the first hop)"}
    ident = peer.identity
    return {
        "peer": ident.decode(errors="replace") if isinstance(ident, bytes) else ident,
        "mode": "psk" if isinstance(peer.session, dtls.TinyDtlsSession) else "certificate",
        "cipher": peer.session.cipher_suite,
    }


async def open_requester(
    context: Any, *, proxy: str | None, e2e: E2EClientOptions | None, target: str
) -> Any:
    """Something with ``request(message)`` and ``describe(response)`` for the chosen mode."""
    if e2e is None:
        return PlainRequester(context, proxy)
    raise dtls.ConfigurationError(f"end-to-end mode {e2e.mode!r} is not wired in yet")
