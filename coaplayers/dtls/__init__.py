"""The sans-I/O DTLS engine used by both layers.

One interface (:class:`DtlsSession`), three backends:

* :mod:`~coaplayers.dtls.tinydtls`: PSK, TLS_PSK_WITH_AES_128_CCM_8 (RFC 7925's PSK profile);
* :mod:`~coaplayers.dtls.openssl`: X.509 (ECDSA P-256, ECDHE, CCM-8/GCM), cookies, resumption
  and the TLS exporter; also the server side of PSK handshakes without a cookie exchange
  (:class:`OpenSslPskListener`, Layer 0's PSK endpoint);
* :mod:`~coaplayers.dtls.gnutls`: raw public keys (RFC 7250, RFC 7925's certificate profile
  without certificates) with pinning, cookies and the TLS exporter.

Servers accept sessions through a listener (:class:`TinyDtlsListener`,
:class:`OpenSslListener`, :class:`GnuTlsListener`) that stays stateless until a ClientHello
returns a valid cookie; :class:`OpenSslPskListener` answers PSK ClientHellos at once.
"""

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
from .events import AlertReceived, ApplicationData, ConnectionClosed, Event, HandshakeComplete
from .gnutls import GnuTlsListener, GnuTlsSession, RawPublicKeyContext
from .openssl import (
    OpenSslListener,
    OpenSslPskListener,
    OpenSslPskSession,
    OpenSslSession,
    TicketStore,
    build_context,
)
from .session import DtlsConfig, DtlsSession, State
from .tinydtls import TinyDtlsListener, TinyDtlsSession

Listener = TinyDtlsListener | OpenSslListener | GnuTlsListener  # OpenSslPskListener is one

__all__ = [
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

