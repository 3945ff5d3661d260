"""The sans-I/O DTLS engine used by both layers.

One interface (:class:`DtlsSession`), three backends:

* :mod:`~coaplayers.dtls.tinydtls`: PSK clients, TLS_PSK_WITH_AES_128_CCM_8 (RFC 7925's PSK
  profile);
* :mod:`~coaplayers.dtls.openssl`: X.509 (ECDSA P-256, ECDHE, CCM-8/GCM), cookies, resumption
  and the TLS exporter; also the server side of PSK handshakes on both layers
  (:class:`OpenSslPskListener`: tinydtls' shared server context is not safe, docs/SECURITY.md);
* :mod:`~coaplayers.dtls.gnutls`: raw public keys (RFC 7250, RFC 7925's certificate profile
  without certificates) with pinning, cookies and the TLS exporter.

Servers accept sessions through a listener (:class:`TinyDtlsListener`,
:class:`OpenSslListener`, :class:`GnuTlsListener`) that stays stateless until a ClientHello
returns a valid cookie; :class:`OpenSslPskListener` can answer PSK ClientHellos at once
(Layer 0). :class:`TinyDtlsListener` serves the engine's tests only.
"""

from typing import TYPE_CHECKING, Any, TypeAlias

from .alerts import AlertDescription, AlertLevel
from .errors import (
    AuthenticationFailed,
    ConfigurationError,
    DtlsError,
    HandshakeTimeout,
    IdleTimeout,
    NetworkUnreachable,
    PeerAlert,
    ProtocolViolation,
    SessionClosed,
)

# The backends pull in OpenSSL, cryptography and GnuTLS (through cffi): most of a program's
# start-up. They load on first use, so a plain coap:// run of coap-client never pays for
# them (PEP 562); the error types above are cheap and always there.
_LAZY = {
    "credentials": ("CertificateCredentials", "KeyFilePermissionWarning",
                    "PskClientCredentials", "PskStore", "RawPublicKeyCredentials",
                    "certificate_matches", "check_identities", "check_key_file_permissions",
                    "parse_key_text", "spki_fingerprint"),
    "dual": ("KindListener",),
    "events": ("AlertReceived", "ApplicationData", "ConnectionClosed", "Event",
               "HandshakeComplete"),
    "gnutls": ("GnuTlsListener", "GnuTlsSession", "RawPublicKeyContext"),
    "openssl": ("OpenSslListener", "OpenSslPskClientSession", "OpenSslPskListener",
                "OpenSslPskSession", "OpenSslSession", "TicketStore", "build_context"),
    "session": ("DtlsConfig", "DtlsSession", "State"),
    "tinydtls": ("TinyDtlsListener", "TinyDtlsSession"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    import importlib

    if name == "Listener":
        from .gnutls import GnuTlsListener
        from .openssl import OpenSslListener
        from .tinydtls import TinyDtlsListener

        value: Any = TinyDtlsListener | OpenSslListener | GnuTlsListener
    elif name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .credentials import (
        CertificateCredentials,
        KeyFilePermissionWarning,
        PskClientCredentials,
        PskStore,
        RawPublicKeyCredentials,
        certificate_matches,
        check_identities,
        check_key_file_permissions,
        parse_key_text,
        spki_fingerprint,
    )
    from .dual import KindListener
    from .events import (
        AlertReceived,
        ApplicationData,
        ConnectionClosed,
        Event,
        HandshakeComplete,
    )
    from .gnutls import GnuTlsListener, GnuTlsSession, RawPublicKeyContext
    from .openssl import (
        OpenSslListener,
        OpenSslPskClientSession,
        OpenSslPskListener,
        OpenSslPskSession,
        OpenSslSession,
        TicketStore,
        build_context,
    )
    from .session import DtlsConfig, DtlsSession, State
    from .tinydtls import TinyDtlsListener, TinyDtlsSession

    Listener: TypeAlias = TinyDtlsListener | OpenSslListener | GnuTlsListener  # PSK: a subclass

__all__ = [
    "AlertDescription",
    "AlertLevel",
    "AlertReceived",
    "ApplicationData",
    "AuthenticationFailed",
    "CertificateCredentials",
    "ConfigurationError",
    "ConnectionClosed",
    "DtlsConfig",
    "DtlsError",
    "DtlsSession",
    "Event",
    "GnuTlsListener",
    "GnuTlsSession",
    "HandshakeComplete",
    "HandshakeTimeout",
    "IdleTimeout",
    "KeyFilePermissionWarning",
    "KindListener",
    "Listener",
    "NetworkUnreachable",
    "OpenSslListener",
    "OpenSslPskClientSession",
    "OpenSslPskListener",
    "OpenSslPskSession",
    "OpenSslSession",
    "PeerAlert",
    "ProtocolViolation",
    "PskClientCredentials",
    "PskStore",
    "RawPublicKeyContext",
    "RawPublicKeyCredentials",
    "SessionClosed",
    "State",
    "TicketStore",
    "TinyDtlsListener",
    "TinyDtlsSession",
    "build_context",
    "certificate_matches",
    "check_identities",
    "check_key_file_permissions",
    "parse_key_text",
    "spki_fingerprint",
]

