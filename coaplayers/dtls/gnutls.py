"""GnuTLS backend (through cffi's ABI mode): raw public keys, RFC 7250 / RFC 7925.

The certificate mode without certificates: each side presents its ECDSA P-256 key as a bare
SubjectPublicKeyInfo (91 bytes) and pins the peer's, with TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8
and X25519 (P-256 kept for peers that have only it). A full handshake with the cookie exchange
is about 1,170 bytes, against ~1,630 with two P-256 certificates. OpenSSL cannot do this here
(pyOpenSSL's OpenSSL hides its RPK API, the system OpenSSL 3.0 has none), GnuTLS 3.6.6+ can,
and ``libgnutls.so.30`` is on every Debian system (apt depends on it). It is loaded at the
first session, so importing this module costs nothing where it is missing.

GnuTLS runs over push/pull callbacks in nonblocking mode. Its own retransmission timer is set
beyond any handshake: the :class:`~coaplayers.dtls.session.DtlsSession` base retransmits
instead, with hand-driven time. GnuTLS also repeats its last flight when it sees the peer's
previous flight again; a step that consumed no new handshake message therefore drops what
GnuTLS wrote (the base class's timer covers that loss), and, once established, handshake
records never reach GnuTLS (the base class answers them with our final flight).

Peer authentication is pinning, checked in GnuTLS's verify callback, so an untrusted key ends
the handshake with a fatal alert to the peer instead of a session it would keep.
"""

from __future__ import annotations

import errno
import hmac
import os
from collections import deque
from collections.abc import Collection, Hashable
from typing import Any

from cffi import FFI
from cryptography.hazmat.primitives import serialization

from . import records
from .alerts import AlertDescription, AlertLevel
from .cookieless import CookieBudget, budget
from .credentials import RawPublicKeyCredentials, spki_fingerprint
from .errors import AuthenticationFailed, ConfigurationError, DtlsError, alert_error
from .recordlayer import RecordLayer
from .session import DtlsConfig, DtlsSession, State

CIPHER_SUITE = "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8"
_SUITE_NAME = "ECDHE-ECDSA-AES128-CCM8"  # the same suite, as recordlayer.RecordLayer names it
PRIORITY = (
    "NONE:+VERS-DTLS1.2:+ECDHE-ECDSA:+AES-128-CCM-8:+AEAD:+SIGN-ECDSA-SHA256"
    ":+GROUP-X25519:+GROUP-SECP256R1:+COMP-NULL:+CTYPE-CLI-RAWPK:+CTYPE-SRV-RAWPK"
)
"""What we offer and accept: one suite, one signature scheme, X25519 then P-256, raw public
keys only. Each extra name costs bytes in every ClientHello (twice, with the cookie)."""

_MAX_HELD = 8  # early application data records kept until the handshake ends

_ffi = FFI()
_ffi.cdef("""
typedef struct { unsigned char *data; unsigned int size; } gnutls_datum_t;
typedef struct { unsigned int record_seq; unsigned int hsk_read_seq;
                 unsigned int hsk_write_seq; } gnutls_dtls_prestate_st;
typedef void *gnutls_session_t;
typedef void *gnutls_certificate_credentials_t;
typedef void *gnutls_transport_ptr_t;
typedef ssize_t (*gnutls_pull_func)(gnutls_transport_ptr_t, void *, size_t);
typedef ssize_t (*gnutls_push_func)(gnutls_transport_ptr_t, const void *, size_t);
typedef int (*gnutls_pull_timeout_func)(gnutls_transport_ptr_t, unsigned int);
typedef int gnutls_certificate_verify_function(gnutls_session_t);

const char *gnutls_check_version(const char *req_version);
int gnutls_init(gnutls_session_t *session, unsigned int flags);
void gnutls_deinit(gnutls_session_t session);
int gnutls_priority_set_direct(gnutls_session_t session, const char *priorities,
                               const char **err_pos);
int gnutls_certificate_allocate_credentials(gnutls_certificate_credentials_t *res);
void gnutls_certificate_free_credentials(gnutls_certificate_credentials_t sc);
int gnutls_certificate_set_rawpk_key_mem(gnutls_certificate_credentials_t cred,
    const gnutls_datum_t *spki, const gnutls_datum_t *pkey, int format, const char *pass,
    unsigned int key_usage, const char **names, unsigned int names_length, unsigned int flags);
int gnutls_credentials_set(gnutls_session_t session, int type, void *cred);
void gnutls_certificate_server_set_request(gnutls_session_t session, int req);
void gnutls_session_set_verify_function(gnutls_session_t session,
                                        gnutls_certificate_verify_function *func);
const gnutls_datum_t *gnutls_certificate_get_peers(gnutls_session_t session,
                                                   unsigned int *list_size);
int gnutls_certificate_type_get2(gnutls_session_t session, int target);
void gnutls_transport_set_ptr(gnutls_session_t session, gnutls_transport_ptr_t ptr);
void gnutls_transport_set_push_function(gnutls_session_t session, gnutls_push_func f);
void gnutls_transport_set_pull_function(gnutls_session_t session, gnutls_pull_func f);
void gnutls_transport_set_pull_timeout_function(gnutls_session_t session,
                                                gnutls_pull_timeout_func f);
void gnutls_transport_set_errno(gnutls_session_t session, int err);
void gnutls_session_set_ptr(gnutls_session_t session, void *ptr);
void *gnutls_session_get_ptr(gnutls_session_t session);
void gnutls_dtls_set_timeouts(gnutls_session_t session, unsigned int retrans_timeout,
                              unsigned int total_timeout);
void gnutls_dtls_set_mtu(gnutls_session_t session, unsigned int mtu);
unsigned int gnutls_dtls_get_data_mtu(gnutls_session_t session);
int gnutls_dtls_cookie_send(gnutls_datum_t *key, void *client_data, size_t client_data_size,
    gnutls_dtls_prestate_st *prestate, gnutls_transport_ptr_t ptr, gnutls_push_func push_func);
int gnutls_dtls_cookie_verify(gnutls_datum_t *key, void *client_data, size_t client_data_size,
    void *_msg, size_t msg_size, gnutls_dtls_prestate_st *prestate);
void gnutls_dtls_prestate_set(gnutls_session_t session, gnutls_dtls_prestate_st *prestate);
int gnutls_handshake(gnutls_session_t session);
int gnutls_handshake_get_last_in(gnutls_session_t session);
int gnutls_prf_rfc5705(gnutls_session_t session, size_t label_size, const char *label,
    size_t context_size, const char *context, size_t outsize, char *out);
const char *gnutls_strerror(int error);
int gnutls_error_is_fatal(int error);
int gnutls_alert_get(gnutls_session_t session);
int gnutls_alert_send_appropriate(gnutls_session_t session, int err);
ssize_t gnutls_record_send(gnutls_session_t session, const void *data, size_t data_size);
ssize_t gnutls_record_recv(gnutls_session_t session, void *data, size_t data_size);
int gnutls_bye(gnutls_session_t session, int how);
void gnutls_session_get_random(gnutls_session_t session, gnutls_datum_t *client,
                               gnutls_datum_t *server);
void gnutls_session_get_master_secret(gnutls_session_t session, gnutls_datum_t *secret);
int gnutls_record_get_state(gnutls_session_t session, unsigned read, gnutls_datum_t *mac_key,
    gnutls_datum_t *IV, gnutls_datum_t *cipher_key, unsigned char seq_number[8]);
int gnutls_alpn_set_protocols(gnutls_session_t session, const gnutls_datum_t *protocols,
                              unsigned protocols_size, unsigned int flags);
int gnutls_alpn_get_selected_protocol(gnutls_session_t session, gnutls_datum_t *protocol);
""")

# gnutls.h
_GNUTLS_SERVER = 1
_GNUTLS_CLIENT = 1 << 1
_GNUTLS_DATAGRAM = 1 << 2
_GNUTLS_NONBLOCK = 1 << 3
_GNUTLS_NO_TICKETS = 1 << 10  # no session_ticket extension: ~4 bytes per hello, no tickets
_GNUTLS_ENABLE_RAWPK = 1 << 18
_GNUTLS_CRD_CERTIFICATE = 1
_GNUTLS_CERT_IGNORE, _GNUTLS_CERT_REQUEST, _GNUTLS_CERT_REQUIRE = 0, 1, 2
_GNUTLS_X509_FMT_PEM = 1
_GNUTLS_CRT_RAWPK = 3
_GNUTLS_CTYPE_PEERS = 3
_GNUTLS_SHUT_WR = 1
_E_AGAIN = -28
_E_INTERRUPTED = -52
_E_FATAL_ALERT_RECEIVED = -12
_E_WARNING_ALERT_RECEIVED = -16
_E_CERTIFICATE_ERROR = -43
_E_NO_CERTIFICATE_FOUND = -49
_E_CERTIFICATE_VERIFICATION_ERROR = -348
_E_INSUFFICIENT_CREDENTIALS = -32
_E_NO_CIPHER_SUITES = -87
_E_UNKNOWN_CIPHER_SUITE = -21
_E_UNSUPPORTED_CERTIFICATE_TYPE = -61
_E_NO_COMMON_KEY_SHARE = -423
_E_PREMATURE_TERMINATION = -110
MAX_ALPN_PROTOCOLS = 8  # GnuTLS keeps at most 8 protocols (MAX_ALPN_PROTOCOLS in its alpn.h)
MAX_ALPN_NAME = 32  # ... of at most 32 bytes each (MAX_ALPN_PROTOCOL_NAME); longer are refused
# GnuTLS must never retransmit on its own (the base class does, with hand-driven time), nor
# give up before the base class's handshake_timeout: both far beyond any handshake.
_NEVER_MS = 24 * 3600 * 1000

_lib: Any = None


def _gnutls() -> Any:
    """libgnutls.so.30, loaded on first use (RPK needs 3.6.6; tested with Debian 12's 3.7.9)."""
    global _lib
    if _lib is None:
        try:
            lib = _ffi.dlopen("libgnutls.so.30")
        except OSError as exc:
            raise ConfigurationError(
                "raw public keys need GnuTLS (libgnutls.so.30, Debian package libgnutls30)"
            ) from exc
        if lib.gnutls_check_version(b"3.6.6") == _ffi.NULL:
            raise ConfigurationError("raw public keys need GnuTLS 3.6.6 or newer")
        _lib = lib
    return _lib


def _strerror(rc: int) -> str:
    return str(_ffi.string(_gnutls().gnutls_strerror(rc)).decode(errors="replace"))


# Callbacks: module level, so they live as long as the module (cffi frees a callback that is
# garbage-collected, and GnuTLS would then call freed memory). The transport and session
# pointer is a cffi handle of the Python object, kept referenced by that object.


@_ffi.callback("ssize_t(void *, const void *, size_t)", error=-1)
def _push(ptr: Any, data: Any, size: int) -> int:
    _ffi.from_handle(ptr)._gnutls_push(bytes(_ffi.buffer(data, size)))
    return size


@_ffi.callback("ssize_t(void *, void *, size_t)", error=-1)
def _pull(ptr: Any, buf: Any, size: int) -> int:
    session: GnuTlsSession = _ffi.from_handle(ptr)
    if not session._inbox:
        _gnutls().gnutls_transport_set_errno(session._s, errno.EAGAIN)
        return -1
    datagram = session._inbox.popleft()[:size]
    _ffi.memmove(buf, datagram, len(datagram))
    return len(datagram)


@_ffi.callback("int(void *, unsigned int)", error=-1)
def _pull_timeout(ptr: Any, _ms: int) -> int:
    return 1 if _ffi.from_handle(ptr)._inbox else 0  # 0: nothing yet (never blocks)


@_ffi.callback("int(void *)", error=-1)
def _verify(gsession: Any) -> int:
    ptr = _gnutls().gnutls_session_get_ptr(gsession)
    if ptr == _ffi.NULL:
        return -1
    session: GnuTlsSession = _ffi.from_handle(ptr)
    return session._verify_peer()


class _Collector:
    """Where the listener's HelloVerifyRequest goes (gnutls_dtls_cookie_send pushes it)."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def _gnutls_push(self, data: bytes) -> None:
        self.out.append(data)


class RawPublicKeyContext:
    """GnuTLS certificate credentials holding our key; build once per endpoint and share."""

    def __init__(self, credentials: RawPublicKeyCredentials, *, server: bool) -> None:
        lib = _gnutls()
        self.credentials = credentials
        self.server = server
        self._cred: Any = None
        # Looked up now, not in __del__: cffi builds a library function on its first lookup
        # under a lock it does not re-enter, and a garbage collection that runs __del__ while
        # this thread holds that lock (inside another first lookup) waited for ever (until
        # pytest-timeout's alarm broke it, in tests/dtls).
        self._free_credentials = lib.gnutls_certificate_free_credentials
        holder = _ffi.new("gnutls_certificate_credentials_t *")
        rc = lib.gnutls_certificate_allocate_credentials(holder)
        if rc < 0:
            raise ConfigurationError(f"GnuTLS: {_strerror(rc)}")
        self._cred = holder[0]
        spki = credentials.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        key = credentials.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        spki_buf = _ffi.new("unsigned char[]", spki)
        key_buf = _ffi.new("unsigned char[]", key)
        try:
            rc = lib.gnutls_certificate_set_rawpk_key_mem(
                self._cred,
                _ffi.new("gnutls_datum_t *", [spki_buf, len(spki)]),
                _ffi.new("gnutls_datum_t *", [key_buf, len(key)]),
                _GNUTLS_X509_FMT_PEM, _ffi.NULL, 0, _ffi.NULL, 0, 0,
            )
        finally:
            _ffi.memmove(key_buf, b"\0" * len(key), len(key))  # GnuTLS has its own copy
        if rc < 0:
            raise ConfigurationError(f"GnuTLS refused our raw public key: {_strerror(rc)}")
        if server:
            if credentials.require_peer:
                self.request = _GNUTLS_CERT_REQUIRE
            elif credentials.trusted:
                self.request = _GNUTLS_CERT_REQUEST
            else:
                self.request = _GNUTLS_CERT_IGNORE
        else:
            self.request = _GNUTLS_CERT_IGNORE

    def __del__(self) -> None:
        cred, self._cred = getattr(self, "_cred", None), None
        if cred is not None:
            self._free_credentials(cred)


class GnuTlsSession(DtlsSession):
    """A raw-public-key session; create with :meth:`client` or through a listener."""

    _raw_public_key = True

    def __init__(
        self,
        context: RawPublicKeyContext,
        *,
        is_client: bool,
        config: DtlsConfig | None,
        prestate: Any = None,
        alpn: Collection[bytes] = (),
    ) -> None:
        """``alpn``: the ALPN protocols (RFC 7301) a client offers, or a server agrees to."""
        super().__init__(is_client=is_client, config=config)
        lib = _gnutls()
        self.alpn: bytes | None = None
        """The ALPN protocol both ends agreed on in the handshake (RFC 7301), or ``None``."""
        self._context = context  # keeps the GnuTLS credentials alive as long as we are
        self._credentials = context.credentials
        self._inbox: deque[bytes] = deque()
        self._held: list[bytes] = []
        self._rejected: DtlsError | None = None
        self._peer_spki: bytes | None = None
        self._max_in_seq = -1  # highest handshake message_seq received from the peer
        self._answered_seq = -1  # ... when we last sent a flight: what that flight answered
        self._s: Any = None
        self._records: RecordLayer | None = None  # epoch 1 once GnuTLS is freed
        holder = _ffi.new("gnutls_session_t *")
        flags = (_GNUTLS_CLIENT if is_client else _GNUTLS_SERVER) | _GNUTLS_DATAGRAM
        flags |= _GNUTLS_NONBLOCK | _GNUTLS_NO_TICKETS | _GNUTLS_ENABLE_RAWPK
        rc = lib.gnutls_init(holder, flags)
        if rc < 0:
            raise DtlsError(f"GnuTLS: {_strerror(rc)}")
        self._s = holder[0]
        self._handle = _ffi.new_handle(self)
        try:
            err = _ffi.new("char **")
            rc = lib.gnutls_priority_set_direct(
                self._s, PRIORITY.encode(), _ffi.cast("const char **", err)
            )
            if rc < 0:
                raise ConfigurationError(f"GnuTLS refused the priority string: {_strerror(rc)}")
            rc = lib.gnutls_credentials_set(self._s, _GNUTLS_CRD_CERTIFICATE, context._cred)
            if rc < 0:
                raise ConfigurationError(f"GnuTLS: {_strerror(rc)}")
            if not is_client:
                lib.gnutls_certificate_server_set_request(self._s, context.request)
            lib.gnutls_transport_set_ptr(self._s, self._handle)
            lib.gnutls_session_set_ptr(self._s, self._handle)
            lib.gnutls_transport_set_push_function(self._s, _push)
            lib.gnutls_transport_set_pull_function(self._s, _pull)
            lib.gnutls_transport_set_pull_timeout_function(self._s, _pull_timeout)
            lib.gnutls_session_set_verify_function(self._s, _verify)
            lib.gnutls_dtls_set_timeouts(self._s, _NEVER_MS + 1, _NEVER_MS)
            lib.gnutls_dtls_set_mtu(self._s, self.config.mtu)
            if prestate is not None:
                lib.gnutls_dtls_prestate_set(self._s, prestate)
            if alpn:
                _set_alpn(lib, self._s, alpn)
        except DtlsError:
            self._free()
            raise

    @classmethod
    def client(
        cls,
        credentials: RawPublicKeyCredentials | RawPublicKeyContext,
        config: DtlsConfig | None = None,
        *,
        alpn: bytes | None = None,
    ) -> GnuTlsSession:
        """A client session; pass a :class:`RawPublicKeyContext` to share one between many.
        ``alpn``: one ALPN protocol to offer (RFC 7301); the server's choice is ``alpn`` on the
        established session."""
        context = credentials if isinstance(credentials, RawPublicKeyContext) else (
            RawPublicKeyContext(credentials, server=False)
        )
        return cls(context, is_client=True, config=config, alpn=[alpn] if alpn else ())

    @property
    def peer_public_key(self) -> bytes | None:
        """The peer's DER SubjectPublicKeyInfo once it has been checked."""
        return self._peer_spki

    def export_keying_material(
        self, label: bytes, length: int, context: bytes | None = None
    ) -> bytes:
        if self.state is not State.ESTABLISHED:
            raise DtlsError("the exporter needs an established session")
        if self._records is not None:
            return self._records.export(label, length, context)
        if self._s is None:
            raise DtlsError("the exporter needs an established session")
        out = _ffi.new("char[]", length)
        ctx = _ffi.NULL if context is None else context
        rc = _gnutls().gnutls_prf_rfc5705(
            self._s, len(label), label, 0 if context is None else len(context), ctx, length, out
        )
        if rc < 0:
            raise DtlsError(f"GnuTLS exporter failed: {_strerror(rc)}")
        return bytes(_ffi.buffer(out, length))

    # callbacks from GnuTLS

    def _gnutls_push(self, data: bytes) -> None:
        for record in records.split_records(data):
            self._emit(record)

    def _verify_peer(self) -> int:
        """Pinning, inside the handshake: 0 accepts, anything else makes GnuTLS fail it."""
        lib = _gnutls()
        creds = self._credentials
        who = "server" if self.is_client else "client"
        if lib.gnutls_certificate_type_get2(self._s, _GNUTLS_CTYPE_PEERS) != _GNUTLS_CRT_RAWPK:
            self._rejected = AuthenticationFailed(f"the {who} presented no raw public key")
            return -1
        count = _ffi.new("unsigned int *")
        peers = lib.gnutls_certificate_get_peers(self._s, count)
        if peers == _ffi.NULL or count[0] == 0:
            if creds.require_peer:
                self._rejected = AuthenticationFailed(f"the {who} presented no public key")
                return -1
            return 0
        spki = bytes(_ffi.buffer(peers[0].data, peers[0].size))
        if creds.trusts(spki) or (not creds.trusted and not creds.require_peer):
            self._peer_spki = spki
            return 0
        self._rejected = AuthenticationFailed(
            f"the {who}'s public key {spki_fingerprint(spki)} is not one we trust"
        )
        return -1

    # DtlsSession hooks

    def _backend_start(self) -> None:
        self._handshake_step()

    def _backend_receive(self, recs: list[bytes]) -> None:
        if self._s is None and self._records is None:
            return
        if self.state is State.HANDSHAKING:
            # A ClientHello never belongs in a session: the client never receives one, and the
            # server's was taken by the listener (our timer repeats our flight if it was lost).
            recs = [r for r in recs if records.client_hello_random(r) is None
                    and not self._answered(r)]
            # Application data ahead of our handshake's end (reordered, or behind the peer's
            # Finished) waits until GnuTLS can read it.
            early = [r for r in recs if records.content_type(r)
                     == records.CONTENT_APPLICATION_DATA]
            if early:
                self._held = (self._held + early)[:_MAX_HELD]
                recs = [r for r in recs if records.content_type(r)
                        != records.CONTENT_APPLICATION_DATA]
            if recs:
                self._inbox.append(b"".join(recs))
                self._handshake_step()
            return
        if self._records is not None:  # the usual case after the handshake
            self._receive_epoch1(self._records, recs)
            return
        # Established: only protected application data and alerts count; the peer's
        # handshake records are its flight again, which the base class answers.
        recs = [r for r in recs if records.epoch(r) != 0 and records.content_type(r) in (
            records.CONTENT_APPLICATION_DATA, records.CONTENT_ALERT)]
        if recs:
            self._inbox.append(b"".join(recs))
            self._read_records()

    def _backend_send(self, data: bytes) -> None:
        if self._records is not None:
            self._emit(self._records.protect(records.CONTENT_APPLICATION_DATA, data))
            return
        rc = _gnutls().gnutls_record_send(self._require(), data, len(data))
        if rc < 0:
            raise DtlsError(f"GnuTLS could not send: {_strerror(rc)}")

    def _backend_close_notify(self) -> None:
        if self._records is not None:
            self._emit(self._records.protect(records.CONTENT_ALERT, b"\x01\x00"))
            return
        _gnutls().gnutls_bye(self._require(), _GNUTLS_SHUT_WR)

    def _backend_max_plaintext(self) -> int:
        if self._records is not None:
            return self._records.max_plaintext(self.config.mtu)
        return min(int(_gnutls().gnutls_dtls_get_data_mtu(self._require())), 16384)

    def _backend_free(self) -> None:
        self._records = None
        self._free()

    def _try_false_start(self) -> None:
        """Our Finished is written (an epoch 1 record while handshaking; every handshake here
        is a full one). GnuTLS has pinned the server's key (the verify callback, on its
        Certificate) and checked its ServerKeyExchange signature before it wrote ours."""
        if self._peer_spki is None or not self._credentials.trusted:
            self.false_start_refused = "the server's key was not checked against pinned keys"
            return
        state = self._state()
        if state is None:
            self.false_start_refused = "GnuTLS gave no master secret"
            return
        master, client_random, server_random, write_seq = state
        self._false_start(_SUITE_NAME, master, client_random, server_random,
                          write_seq & (1 << 48) - 1, [])

    def _state(self) -> tuple[bytes, bytes, bytes, int] | None:
        """Master secret, client and server random, and the next write sequence number of
        epoch 1 (with the epoch in its top 16 bits), or ``None`` if not as expected."""
        lib = _gnutls()
        s = self._s
        secret = _ffi.new("gnutls_datum_t *")
        client = _ffi.new("gnutls_datum_t *")
        server = _ffi.new("gnutls_datum_t *")
        lib.gnutls_session_get_master_secret(s, secret)
        lib.gnutls_session_get_random(s, client, server)
        seq = _ffi.new("unsigned char[8]")
        if lib.gnutls_record_get_state(s, 0, _ffi.NULL, _ffi.NULL, _ffi.NULL, seq) < 0:
            return None
        if secret.size != 48 or client.size != 32 or server.size != 32:
            return None
        write_seq = int.from_bytes(bytes(seq), "big")
        if write_seq >> 48 != 1:  # epoch 1, as the established session must be in
            return None
        return (bytes(_ffi.buffer(secret.data, 48)), bytes(_ffi.buffer(client.data, 32)),
                bytes(_ffi.buffer(server.data, 32)), write_seq)

    def _hand_over(self) -> None:
        """Give epoch 1 to the engine's own record layer and free GnuTLS's session.

        An established GnuTLS session holds ~12 KiB more than the keys need, and each record
        through it costs a round of cffi calls and callbacks; the X.509 backend does the same
        (``recordlayer.RecordLayer``, checked against OpenSSL's records in
        tests/dtls/test_record_layer.py, and against GnuTLS's in tests/dtls/test_gnutls_rpk.py).
        Keeps GnuTLS when anything is not as expected: it then protects the records itself.
        """
        lib = _gnutls()
        if self._early is not None:
            # False Start: the same keys, and its sequence numbers go on (GnuTLS, which has
            # not seen them, must never seal another record under these keys).
            self._records, self._early = self._early, None
        else:
            state = self._state()
            if state is None:
                return
            master, client_random, server_random, write_seq = state
            self._records = RecordLayer(
                _SUITE_NAME, master, client_random, server_random, is_client=self.is_client,
                next_seq=write_seq & (1 << 48) - 1,
            )
        self._inbox.clear()
        s, self._s = self._s, None
        lib.gnutls_deinit(s)
        self._handle = None

    def _receive_protected(self, recs: list[bytes]) -> None:
        if self._records is not None:
            self._receive_epoch1(self._records, recs)

    # internals

    def _free(self) -> None:
        s, self._s = self._s, None
        self._inbox.clear()
        self._held = []
        if s is not None:
            _gnutls().gnutls_deinit(s)
        # The handle goes last, after GnuTLS can no longer call back with it.
        self._handle = None

    def _require(self) -> Any:
        if self._s is None:
            raise DtlsError("session is closed")
        return self._s

    def _answered(self, record: bytes) -> bool:
        """Whether ``record`` belongs to a peer flight we have answered already (a repeat).

        GnuTLS must not see one: it takes it as the peer's retransmission and repeats its
        own flight, and afterwards, its timer wound down by that repeat (DTLS doubles it
        modulo 60 s), it kept failing to take the peer's next flight in (seen as 20 s
        handshakes after one lost datagram). A flight is only answered once complete, so a
        handshake message numbered at most what we had received then is a repeat.
        """
        if records.epoch(record) != 0 or records.content_type(record) != records.CONTENT_HANDSHAKE:
            return False
        at = records.HEADER_LEN + 4  # msg_type, length, then message_seq
        seq = int.from_bytes(record[at : at + 2], "big")
        if seq <= self._answered_seq:
            return True
        self._max_in_seq = max(self._max_in_seq, seq)
        return False

    def _handshake_step(self) -> None:
        lib = _gnutls()
        s = self._require()
        before_in = lib.gnutls_handshake_get_last_in(s)
        mark = len(self._out)
        while True:
            rc = lib.gnutls_handshake(s)
            if rc not in (_E_INTERRUPTED, _E_WARNING_ALERT_RECEIVED):
                break
        if rc == _E_AGAIN:
            if self._received_any and lib.gnutls_handshake_get_last_in(s) == before_in:
                # Nothing new came in: what GnuTLS wrote repeats its last flight (see module
                # doc), which is the base class's job, on its own timer.
                del self._out[mark:]
            if len(self._out) > mark:
                self._answered_seq = self._max_in_seq
                if (self.is_client and self._early is None
                        and any(records.epoch(r) == 1 for r in self._out[mark:])):
                    self._try_false_start()
            self._inbox.clear()
            return
        if rc < 0:
            self._inbox.clear()
            raise self._handshake_error(rc)
        self._inbox.clear()
        identity = spki_fingerprint(self._peer_spki) if self._peer_spki is not None else None
        if self._peer_spki is None and self._credentials.require_peer:
            raise AuthenticationFailed("the peer presented no public key")
        self.alpn = _selected_alpn(lib, s)  # before GnuTLS's session goes (_hand_over)
        self._established(identity, CIPHER_SUITE, False)
        self._hand_over()
        held, self._held = self._held, []
        if held:
            if self._records is not None:
                self._receive_protected(held)
            else:
                self._inbox.append(b"".join(held))
                self._read_records()

    def _handshake_error(self, rc: int) -> DtlsError:
        lib = _gnutls()
        if rc == _E_FATAL_ALERT_RECEIVED:
            description = int(lib.gnutls_alert_get(self._s))
            if description == AlertDescription.handshake_failure and not self.is_client:
                return AuthenticationFailed(
                    "the client refused the handshake (handshake_failure)"
                )
            return alert_error(description, we_are_client=self.is_client, raw_public_key=True)
        lib.gnutls_alert_send_appropriate(self._s, rc)  # our fatal alert, out via _push
        if self._rejected is not None:
            return self._rejected
        who = "server" if self.is_client else "client"
        if rc == _E_NO_CERTIFICATE_FOUND:
            return AuthenticationFailed(f"the {who} presented no public key, and one is required")
        if rc in (_E_CERTIFICATE_ERROR, _E_CERTIFICATE_VERIFICATION_ERROR):
            return AuthenticationFailed(f"the {who}'s public key was refused ({_strerror(rc)})")
        if rc in (_E_INSUFFICIENT_CREDENTIALS, _E_NO_CIPHER_SUITES, _E_UNKNOWN_CIPHER_SUITE,
                  _E_UNSUPPORTED_CERTIFICATE_TYPE, _E_NO_COMMON_KEY_SHARE):
            return AuthenticationFailed(
                f"nothing in common with the {who} ({_strerror(rc)}): raw public keys with"
                f" {CIPHER_SUITE} are needed on both sides"
            )
        return DtlsError(f"DTLS error: {_strerror(rc)}")

    def _read_records(self) -> None:
        lib = _gnutls()
        buf = _ffi.new("char[]", 16384)
        while self._s is not None and self.state is State.ESTABLISHED:
            rc = lib.gnutls_record_recv(self._s, buf, 16384)
            if rc > 0:
                self._app_data(bytes(_ffi.buffer(buf, rc)))
                continue
            if rc == 0:  # close_notify
                self._inbox.clear()
                self._alert(AlertLevel.warning, AlertDescription.close_notify)
                self._fail(None)
                return
            if rc in (_E_AGAIN, _E_INTERRUPTED):
                break
            if rc == _E_WARNING_ALERT_RECEIVED:
                continue
            if rc == _E_FATAL_ALERT_RECEIVED:
                self._inbox.clear()
                raise alert_error(int(lib.gnutls_alert_get(self._s)),
                                  we_are_client=self.is_client, raw_public_key=True)
            if lib.gnutls_error_is_fatal(rc):
                self._inbox.clear()
                raise DtlsError(f"DTLS error: {_strerror(rc)}")
            # Anything else (a forged, altered or replayed record) is dropped, RFC 6347 4.1.2.7
        self._inbox.clear()


class GnuTlsListener:
    """Accepts raw-public-key handshakes; stateless until a ClientHello returns our cookie.

    The cookie is GnuTLS's: an HMAC, under a per-listener secret, of the ClientHello's
    parameters and of ``peer_key`` (so a cookie earned from one address opens nothing from
    another). While ``without_cookie`` has room (:mod:`.cookieless`; 0, the default: never),
    a ClientHello without a cookie is answered at once instead.
    """

    def __init__(self, credentials: RawPublicKeyCredentials, config: DtlsConfig | None = None,
                 *, without_cookie: int | CookieBudget = 0) -> None:
        self.credentials = credentials
        self.config = config or DtlsConfig()
        self.budget = budget(without_cookie)
        self.context = RawPublicKeyContext(credentials, server=True)
        self._alpn: tuple[bytes, ...] = ()
        self._secret = _ffi.new("unsigned char[]", os.urandom(16))  # GNUTLS_COOKIE_KEY_SIZE
        self._key = _ffi.new("gnutls_datum_t *", [self._secret, 16])

    @property
    def alpn(self) -> frozenset[bytes]:
        """ALPN protocols (RFC 7301) this listener agrees to: the first a client offers. At
        most :data:`MAX_ALPN_PROTOCOLS` of at most :data:`MAX_ALPN_NAME` bytes, checked here
        (a ConfigurationError), not at each handshake."""
        return frozenset(self._alpn)

    @alpn.setter
    def alpn(self, protocols: Collection[bytes]) -> None:
        self._alpn = _checked_alpn(protocols)

    def accept(
        self, peer_key: Hashable, datagram: bytes, now: float
    ) -> tuple[list[bytes], GnuTlsSession | None]:
        """As :meth:`coaplayers.dtls.tinydtls.TinyDtlsListener.accept`."""
        if records.client_hello_random(datagram) is None:
            return [], None
        lib = _gnutls()
        client = _client_data(peer_key)
        prestate = _ffi.new("gnutls_dtls_prestate_st *")
        first = records.split_records(datagram)[0]
        rc = lib.gnutls_dtls_cookie_verify(
            self._key, client, len(client), first, len(first), prestate
        )
        at_once = rc < 0 and not records.has_cookie(first) and self.budget.has_room()
        if rc < 0 and not at_once:
            collector = _Collector()
            handle = _ffi.new_handle(collector)
            rc = lib.gnutls_dtls_cookie_send(self._key, client, len(client), prestate, handle,
                                             _push)
            if rc < 0 or not collector.out:
                return [], None
            hvr = [r for chunk in collector.out for r in records.split_records(chunk)]
            return records.pack_datagrams(hvr, self.config.mtu), None
        session = GnuTlsSession(self.context, is_client=False, config=self.config,
                                prestate=None if at_once else prestate,
                                alpn=self._alpn)
        session._now = now
        session.state = State.HANDSHAKING
        session._handshake_deadline = now + self.config.handshake_timeout
        session._received_any = True
        session._inbox.append(first)
        session._answered(first)  # its message_seq, so that a repeat of it is known
        session._guard(session._handshake_step)
        session._after_step(progressed=True)
        if at_once:
            self.budget.add(session)
        return [], session


def _set_alpn(lib: Any, s: Any, protocols: Collection[bytes]) -> None:
    """Offer (client) or agree to (server) ``protocols``. Without GNUTLS_ALPN_MANDATORY: a
    server with none of the client's protocols goes on without ALPN, as OpenSSL's listener
    does; the client's first offered protocol the server has wins (GnuTLS's default order)."""
    names = _checked_alpn(protocols)
    bufs = [_ffi.new("unsigned char[]", n) for n in names]  # GnuTLS copies them
    datums = _ffi.new("gnutls_datum_t[]", [[b, len(n)] for b, n in zip(bufs, names, strict=True)])
    rc = lib.gnutls_alpn_set_protocols(s, datums, len(names), 0)
    if rc < 0:
        raise ConfigurationError(f"GnuTLS refused the ALPN protocols: {_strerror(rc)}")


def _checked_alpn(protocols: Collection[bytes]) -> tuple[bytes, ...]:
    names = tuple(sorted(protocols)) if isinstance(protocols, set | frozenset) else tuple(
        protocols)
    if len(names) > MAX_ALPN_PROTOCOLS or any(not 0 < len(n) <= MAX_ALPN_NAME for n in names):
        raise ConfigurationError(
            f"ALPN: at most {MAX_ALPN_PROTOCOLS} protocols of 1 to {MAX_ALPN_NAME} bytes")
    return names


def _selected_alpn(lib: Any, s: Any) -> bytes | None:
    """The protocol the handshake agreed on; ``None`` without one (GnuTLS's error code)."""
    out = _ffi.new("gnutls_datum_t *")
    if lib.gnutls_alpn_get_selected_protocol(s, out) < 0 or out.size == 0:
        return None
    return bytes(_ffi.buffer(out.data, out.size))


def _client_data(peer_key: Hashable) -> bytes:
    """What the cookie binds to: the peer key, in a form that cannot collide across types."""
    return hmac.digest(b"coaplayers peer", repr(peer_key).encode(), "sha256")
