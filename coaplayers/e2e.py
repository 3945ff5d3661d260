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
