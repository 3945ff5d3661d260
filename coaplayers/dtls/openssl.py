"""OpenSSL backend (through pyOpenSSL): X.509 with ECDSA P-256, ECDHE, AES-CCM-8 and AES-GCM;
and the server side of PSK handshakes on both layers (:class:`OpenSslPskListener`).

The only backend with a TLS exporter (RFC 5705), so the one that keys OSCORE. It runs over
memory BIOs: OpenSSL's memory BIO joins the datagrams it writes, so the output is split on
record boundaries again (:mod:`coaplayers.dtls.records`) and repacked to the configured MTU.

Server sessions come from an :class:`OpenSslListener`, which follows OpenSSL's own pattern for
stateless cookies: one listening SSL object answers ClientHellos with a HelloVerifyRequest
(``DTLSv1_listen``); when a ClientHello returns a valid cookie, that object becomes the
session and a fresh one listens. The PSK listener answers a ClientHello at once instead (see
:class:`OpenSslPskListener` for why).

Once a handshake is complete, the session frees OpenSSL's SSL object and protects records
itself (:class:`RecordLayer`: the AEAD suites, their keys from the master secret, the replay
window), since OpenSSL keeps ~90 KiB per established DTLS connection that nothing frees. The
server's session cache (resumption) and the client's session object stay in OpenSSL.
"""

from __future__ import annotations

import hmac
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from .. import _openssl
from . import records
from .alerts import AlertDescription, AlertLevel
from .cookieless import CookieBudget, budget
from .credentials import CertificateCredentials, PskClientCredentials, PskStore
from .errors import AuthenticationFailed, ConfigurationError, DtlsError, PeerAlert, alert_error
from .recordlayer import SUITES, RecordLayer
from .session import DtlsConfig, DtlsSession, State

DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"
    ":@SECLEVEL=0"  # CCM_8's 64-bit tag is below OpenSSL's default security level
)
PSK_CIPHERS = "PSK-AES128-CCM8:@SECLEVEL=0"  # TLS_PSK_WITH_AES_128_CCM_8 (RFC 7925's PSK suite)
_COOKIE_LEN = 16
# Offered and accepted in hellos and in the CertificateRequest: only what the stack uses, since
# OpenSSL's default lists cost ~60 bytes in every ClientHello (twice per handshake, with the
# cookie) and ~45 in the CertificateRequest. Certificates are ECDSA P-256 signing with SHA-256
# (RFC 7925's profile), so ecdsa_secp256r1_sha256 is the one signature scheme; X25519 (32-byte
# shares) is preferred for ECDHE, P-256 kept for peers that have only it (RFC 7925 mandates it).
DEFAULT_SIGALGS = "ECDSA+SHA256"
DEFAULT_GROUPS = "X25519:P-256"
_SSL_OP_NO_ENCRYPT_THEN_MAC = 0x80000  # SSL_OP_BIT(19): no CBC suite is offered, so it is moot
_SSL_MODE_NO_AUTO_CHAIN = 0x8  # SSL_MODE_NO_AUTO_CHAIN (ssl.h); pyOpenSSL has no name for it
_MAX_HELD = 8  # early application data records kept until the handshake ends
_ISSUED_LIMIT = 20480  # session IDs a listener remembers (OpenSSL's default cache size)


class TicketStore:
    """Resumption state a client keeps per server (OpenSSL session objects, in memory)."""

    def __init__(self, limit: int = 256) -> None:
        self._limit = limit
        self._sessions: dict[Hashable, SSL.Session] = {}

    def get(self, key: Hashable) -> SSL.Session | None:
        return self._sessions.get(key)

    def put(self, key: Hashable, session: SSL.Session) -> None:
        self._sessions.pop(key, None)
        self._sessions[key] = session
        while len(self._sessions) > self._limit:
            self._sessions.pop(next(iter(self._sessions)))

    def forget(self, key: Hashable) -> None:
        self._sessions.pop(key, None)


def build_context(
    credentials: CertificateCredentials, *, server: bool, ciphers: str = DEFAULT_CIPHERS
) -> SSL.Context:
    """An OpenSSL context for DTLS 1.2 with these credentials; build once per endpoint."""
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_options(
        SSL.OP_NO_QUERY_MTU | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_TICKET | _SSL_OP_NO_ENCRYPT_THEN_MAC
    )
    # Send only the configured chain, not the CA the peer must already trust (OpenSSL would
    # add it from the store: ~400 bytes per side in every certificate handshake), and free
    # idle record buffers (~14 KiB per established session).
    ctx.set_mode(_SSL_MODE_NO_AUTO_CHAIN | SSL.MODE_RELEASE_BUFFERS)
    try:
        ctx.set_cipher_list(ciphers.encode())
    except SSL.Error as exc:
        raise ConfigurationError(f"no usable cipher in {ciphers!r}") from exc
    refused = _openssl.set_sigalgs_and_groups(ctx, DEFAULT_SIGALGS, DEFAULT_GROUPS)
    if refused is not None:
        raise ConfigurationError(f"OpenSSL refused the signature algorithms or groups {refused}")
    if credentials.certificate_chain:
        try:
            ctx.use_certificate(credentials.certificate_chain[0])
            for extra in credentials.certificate_chain[1:]:
                ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
            ctx.use_privatekey(credentials.private_key)  # type: ignore[arg-type]
            ctx.check_privatekey()
        except (SSL.Error, TypeError, ValueError) as exc:
            raise ConfigurationError(
                "certificate and private key do not match or are unusable"
            ) from exc
    elif server:
        raise ConfigurationError("a server needs a certificate (certificate_chain is empty)")
    # else: a client that authenticates the server only, and presents no certificate itself
    store = ctx.get_cert_store()
    assert store is not None
    for ca in credentials.trusted:
        store.add_cert(crypto.X509.from_cryptography(ca))
    mode = SSL.VERIFY_NONE
    if credentials.trusted or credentials.require_peer:
        mode = SSL.VERIFY_PEER
        if server and credentials.require_peer:
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx.set_verify(mode, None)
    # Resumption by session ID (no tickets: a ticket would add ~200 bytes to every handshake).
    ctx.set_session_id(b"coaplayers")
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER if server else SSL.SESS_CACHE_CLIENT)
    return ctx


class OpenSslSession(DtlsSession):
    """A certificate-mode session; create with :meth:`client` or through a listener."""

    def __init__(
        self,
        connection: SSL.Connection,
        credentials: CertificateCredentials | None,
        *,
        is_client: bool,
        config: DtlsConfig | None,
    ) -> None:
        """``credentials`` is ``None`` only for a PSK server session (OpenSslPskSession)."""
        super().__init__(is_client=is_client, config=config)
        self._conn: SSL.Connection | None = connection
        self._records: RecordLayer | None = None  # epoch 1, once the SSL object is freed
        self._session: SSL.Session | None = None  # for resumption (and to forget it on alert)
        self._held: list[bytes] = []  # application data that came before our handshake ended
        self._epoch1_top = -1  # highest epoch 1 sequence number OpenSSL wrote
        self._epoch1_nonces: list[bytes] = []  # the explicit nonces of those records
        self._issued: OrderedDict[bytes, None] | None = None  # the listener's, for servers
        self._session_id = b""  # from our ServerHello (a server's session)
        self._credentials = credentials
        connection.set_ciphertext_mtu(self.config.mtu)
        self._rejected: list[AuthenticationFailed] = []
        self._peer_leaf: list[x509.Certificate] = []  # what the peer presented, even if refused
        self.alpn: bytes | None = None
        """The ALPN protocol both ends agreed on in the handshake (RFC 7301), or ``None``."""
        # The server name and the local policy are checked inside OpenSSL's verification
        # rather than after the handshake, so that OpenSSL sends the peer a fatal alert:
        # otherwise the peer would consider the session established and keep it until it
        # idles out.
        if credentials is None:
            return
        if is_client and credentials.server_name:
            _require_peer_name(connection, credentials.server_name)
        if credentials.verify_peer is not None or is_client:
            connection.set_verify(
                connection.get_context().get_verify_mode(),
                _local_verifier(credentials, self._rejected, self._peer_leaf),
            )

    @classmethod
    def client(
        cls,
        context: SSL.Context,
        credentials: CertificateCredentials,
        config: DtlsConfig | None = None,
        *,
        resume: SSL.Session | None = None,
        alpn: bytes | None = None,
    ) -> OpenSslSession:
        """``alpn``: one ALPN protocol to offer (RFC 7301); the server's choice is ``alpn``
        on the established session."""
        conn = SSL.Connection(context, None)
        conn.set_connect_state()
        if alpn:
            conn.set_alpn_protos([alpn])
        if credentials.server_name and not _is_ip(credentials.server_name):
            conn.set_tlsext_host_name(credentials.server_name.encode())
        if resume is not None:
            conn.set_session(resume)
        return cls(conn, credentials, is_client=True, config=config)

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The leaf the peer presented in a full handshake (None after a resumed one)."""
        return self._peer_leaf[0] if self._peer_leaf else None

    @property
    def resumption_state(self) -> SSL.Session | None:
        """What a later :meth:`client` call passes as ``resume`` to skip the full handshake."""
        if self.state is not State.ESTABLISHED:
            return None
        if self._records is not None:
            return self._session
        return self._conn.get_session() if self._conn is not None else None

    def export_keying_material(
        self, label: bytes, length: int, context: bytes | None = None
    ) -> bytes:
        if self.state is not State.ESTABLISHED:
            raise DtlsError("the exporter needs an established session")
        if self._records is not None:
            return self._records.export(label, length, context)
        return bytes(self._require().export_keying_material(label, length, context))

    # DtlsSession hooks

    def _backend_start(self) -> None:
        self._handshake_step()

    def _backend_receive(self, recs: list[bytes]) -> None:
        if self._records is not None:
            self._receive_protected(recs)
            return
        conn = self._require()
        if self.state is State.HANDSHAKING:
            self._drop_backend_retransmission(conn)
            # Application data before our handshake has ended (reordered, or behind the peer's
            # Finished) waits for the record layer that will take over: OpenSSL must not
            # consume records whose sequence numbers that layer's replay window would not know.
            early = [r for r in recs if records.epoch(r) == 1
                     and records.content_type(r) == records.CONTENT_APPLICATION_DATA]
            if early:
                self._held = (self._held + early)[:_MAX_HELD]
                recs = [r for r in recs if r not in early]
        if recs:
            conn.bio_write(b"".join(recs))
        if self.state is State.HANDSHAKING:
            self._handshake_step()
        elif self.state is State.ESTABLISHED and self._records is None:
            self._read_application_data()

    def _backend_max_plaintext(self) -> int:
        if self._records is not None:
            return self._records.max_plaintext(self.config.mtu)
        # OpenSSL derives its cleartext MTU from the datagram MTU but does not cap it at the
        # 2^14 bytes a record may carry; above that, SSL_write fails and ends the session.
        return min(int(self._require().get_cleartext_mtu()), 16384)

    def _backend_send(self, data: bytes) -> None:
        if self._records is not None:
            self._emit(self._records.protect(records.CONTENT_APPLICATION_DATA, data))
            return
        conn = self._require()
        try:
            conn.send(data)
        except SSL.Error as exc:
            raise _map_error(exc, self.is_client) from exc
        self._pump()

    def _backend_close_notify(self) -> None:
        if self._records is not None:
            self._emit(self._records.protect(records.CONTENT_ALERT, b"\x01\x00"))
            return
        conn = self._require()
        try:
            conn.shutdown()
        except SSL.Error:
            pass
        self._pump()

    def _backend_free(self) -> None:
        self._records = None
        self._held = []
        conn, self._conn = self._conn, None
        if conn is not None and self.cipher_suite is not None:
            # OpenSSL treats a session freed without a two-way shutdown as bad and marks it
            # not resumable (ssl_clear_bad_session): an evicted, idle or aborted session, and
            # even one ended by close_notify from the peer, could then never be resumed, on
            # either side. Sessions that ended in a fatal alert were already removed from the
            # cache by OpenSSL itself.
            conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)

    # internals

    def _require(self) -> SSL.Connection:
        if self._conn is None:
            raise DtlsError("session is closed")
        return self._conn

    def _pump(self) -> None:
        conn = self._require()
        while True:
            try:
                chunk = conn.bio_read(65536)
            except SSL.WantReadError:
                return
            if not chunk:
                return
            for record in records.split_records(chunk):
                self._note_written(record)
                self._emit(record)

    def _note_written(self, record: bytes) -> None:
        if records.epoch(record) == 1:
            self._epoch1_top = max(self._epoch1_top, records.sequence_number(record))
            # OpenSSL's GCM nonces are not the sequence number: the record layer that takes
            # over must know which ones are spent (it takes over when the handshake ends).
            if self.state is State.HANDSHAKING:
                self._epoch1_nonces.append(
                    record[records.HEADER_LEN : records.HEADER_LEN + 8]
                )
        elif self._issued is not None:
            offered = records.server_hello_session_id(record)
            if offered is not None:
                self._session_id = offered

    def _drop_backend_retransmission(self, conn: SSL.Connection) -> None:
        """Run and discard OpenSSL's own retransmission before it reads new records.

        OpenSSL keeps a wall-clock timer (it cannot be turned off through pyOpenSSL) and, once
        it has expired, repeats its last flight at the start of the next read. The engine does
        retransmission itself (session.py), so those copies are redundant; worse, at the end of
        a handshake they came out together with the step that completed it and were taken for
        the final flight: each side then answered the other's copy with its own, forever (seen
        as Layer 0 certificate handshakes that never finished under loss). Running the timer
        here, before the new records are written, separates them from the real answer.
        """
        try:
            expired = conn.DTLSv1_handle_timeout()
        except SSL.Error:
            expired = False  # the next read reports what is wrong
        if expired:
            while True:
                try:
                    chunk = conn.bio_read(65536)
                except SSL.WantReadError:
                    break
                if not chunk:
                    break
                try:  # discarded, but its sequence numbers are spent
                    for record in records.split_records(chunk):
                        self._note_written(record)
                except DtlsError:
                    pass

    def _handshake_step(self) -> None:
        conn = self._require()
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            self._pump()
            if self.is_client and self._early is None and self._epoch1_top >= 0:
                self._try_false_start(conn)
            return
        except SSL.Error as exc:
            self._pump()  # our fatal alert, if OpenSSL queued one
            if self._rejected:
                raise self._rejected[0] from exc
            if _openssl.verify_result(conn) in _openssl.NAME_MISMATCH:
                raise self._name_mismatch(conn) from exc
            presented = self._credentials is None or bool(self._credentials.certificate_chain)
            raise _map_error(exc, self.is_client, presented_certificate=presented) from exc
        self._pump()
        identity = self._verify_peer(conn)
        cipher = conn.get_cipher_name() or "unknown"
        self.alpn = conn.get_alpn_proto_negotiated() or None  # before the SSL object goes
        self._established(identity, cipher, _openssl.session_reused(conn))
        if self._issued is not None and self._session_id:
            self._issued.pop(self._session_id, None)
            self._issued[self._session_id] = None
            while len(self._issued) > _ISSUED_LIMIT:
                self._issued.popitem(last=False)
        if cipher in SUITES:
            self._release_openssl(conn, cipher)
        held, self._held = self._held, []
        if held:
            if self._records is not None:
                self._receive_protected(held)
            else:
                conn.bio_write(b"".join(held))

    def _try_false_start(self, conn: SSL.Connection) -> None:
        """Our Finished of a full handshake is written (an epoch 1 record while handshaking:
        a resumed client is established as it writes its Finished). OpenSSL has checked the
        server's chain and its ServerKeyExchange signature before it wrote our key exchange;
        the name and local policy are checked here as after the handshake."""
        cipher = conn.get_cipher_name() or "unknown"
        if self._credentials is not None and not self._credentials.trusted:
            self.false_start_refused = "no trusted CA: the server's certificate is not checked"
            return
        try:
            self._verify_peer(conn)
        except DtlsError:
            self.false_start_refused = "the server's certificate is not accepted yet"
            return
        master = conn.master_key()
        client_random, server_random = conn.client_random(), conn.server_random()
        if master is None or client_random is None or server_random is None:
            self.false_start_refused = "OpenSSL gave no master secret"
            return
        self._false_start(cipher, master, client_random, server_random,
                          self._epoch1_top + 1, self._epoch1_nonces)

    def _release_openssl(self, conn: SSL.Connection, cipher: str) -> None:
        """Hand epoch 1 to :class:`RecordLayer` and free the SSL object (see module doc)."""
        session = conn.get_session()
        master = conn.master_key()
        client_random, server_random = conn.client_random(), conn.server_random()
        if self._early is not None:
            # False Start: the same keys, and its sequence numbers go on (OpenSSL, which
            # has not seen them, must never seal another record under these keys).
            self._records, self._early = self._early, None
        elif (session is None or master is None or len(master) != 48
                or client_random is None or server_random is None):
            return
        else:
            self._records = RecordLayer(cipher, master, client_random, server_random,
                                        is_client=self.is_client,
                                        next_seq=self._epoch1_top + 1,
                                        spent=self._epoch1_nonces)
        self._epoch1_nonces = []
        self._session = session
        # As in _backend_free: an SSL object freed without a two-way shutdown would make the
        # session unresumable.
        conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        self._conn = None

    def _receive_protected(self, recs: list[bytes]) -> None:
        if self._records is not None:
            self._receive_epoch1(self._records, recs)

    def _fatal_alert_received(self) -> None:
        self._forget_session()

    def _forget_session(self) -> None:
        """A session that ended in a fatal alert must not be resumed (RFC 5246 7.2.2): OpenSSL
        would drop it from the cache; without its SSL object, overwrite its master secret."""
        if self._session is not None:
            _openssl.scrub_master_key(self._session, os.urandom(48))
            self._session = None
        if self._issued is not None:
            self._issued.pop(self._session_id, None)

    def _name_mismatch(self, conn: SSL.Connection) -> AuthenticationFailed:
        names = _cert_names(self._peer_leaf[0]) if self._peer_leaf else []
        server_name = self._credentials.server_name if self._credentials is not None else None
        return AuthenticationFailed(
            f"the server's certificate is not for {server_name!r}"
            f" (it names {', '.join(dict.fromkeys(names)) or 'nothing'})"
        )

    def _verify_peer(self, conn: SSL.Connection) -> bytes | str | None:
        assert self._credentials is not None  # overridden by the PSK session
        peer = conn.get_peer_certificate()
        if peer is None:
            if self.is_client or self._credentials.require_peer:
                raise AuthenticationFailed("the peer presented no certificate")
            return None
        cert = peer.to_cryptography()
        creds = self._credentials
        if self.is_client and creds.server_name and not _name_matches(cert, creds.server_name):
            raise AuthenticationFailed(
                f"the server's certificate is not for {creds.server_name!r}"
                f" (it names {', '.join(_cert_names(cert)) or 'nothing'})"
            )
        if creds.verify_peer is not None and not creds.verify_peer(cert):
            raise AuthenticationFailed("the peer's certificate was refused by local policy")
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(cns[0].value) if cns else cert.subject.rfc4514_string()

    def _read_application_data(self) -> None:
        conn = self._require()
        while True:
            try:
                data = conn.recv(65536)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self._alert(AlertLevel.warning, AlertDescription.close_notify)
                self._pump()
                self._fail(None)
                return
            except SSL.Error as exc:
                self._pump()
                raise _map_error(exc, self.is_client) from exc
            self._app_data(bytes(data))


class OpenSslListener:
    """Accepts certificate-mode handshakes; stateless until a ClientHello returns our cookie,
    except for resumptions and, while ``without_cookie`` has room, full handshakes
    (:mod:`.cookieless`; 0, the default: always the cookie, as Layer 1 needs where nothing
    else bounds what an unverified address gets back)."""

    def __init__(
        self,
        credentials: CertificateCredentials,
        config: DtlsConfig | None = None,
        *,
        ciphers: str = DEFAULT_CIPHERS,
        resume_without_cookie: bool = True,
        without_cookie: int | CookieBudget = 0,
    ) -> None:
        self.credentials = credentials
        self.resume_without_cookie = resume_without_cookie
        self.budget = budget(without_cookie)
        self._setup(build_context(credentials, server=True, ciphers=ciphers), config)

    def _setup(self, context: SSL.Context, config: DtlsConfig | None) -> None:
        self.config = config or DtlsConfig()
        self.context = context
        self.alpn: frozenset[bytes] = frozenset()
        """ALPN protocols (RFC 7301) this listener agrees to: the first a client offers."""
        self._secret = os.urandom(32)
        # IDs of sessions established here, most recent last: only an offer of one of these
        # is tried without a cookie, so that other offers cost no more than the cookie check.
        self._issued: OrderedDict[bytes, None] = OrderedDict()
        self.context.set_cookie_generate_callback(self._cookie)
        self.context.set_cookie_verify_callback(
            lambda _conn, cookie: hmac.compare_digest(cookie, self._cookie(_conn))
        )
        self.context.set_alpn_select_callback(self._choose_alpn)
        self._listening = self._new_listener()

    def _choose_alpn(
        self, _conn: SSL.Connection, offered: list[bytes]
    ) -> bytes | _openssl.NoOverlappingProtocols:
        for proto in offered:
            if proto in self.alpn:
                return proto
        return SSL.NO_OVERLAPPING_PROTOCOLS  # go on without ALPN, as without the offer

    def _cookie(self, conn: SSL.Connection) -> bytes:
        msg = repr(conn.get_app_data()).encode()
        return hmac.digest(self._secret, msg, "sha256")[:_COOKIE_LEN]

    def _new_listener(self) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        conn.set_accept_state()
        conn.set_ciphertext_mtu(self.config.mtu)
        return conn

    def accept(
        self, peer_key: Hashable, datagram: bytes, now: float
    ) -> tuple[list[bytes], OpenSslSession | None]:
        """As :meth:`coaplayers.dtls.tinydtls.TinyDtlsListener.accept`.

        A ClientHello without a cookie that offers a session we can resume is answered at once
        (ServerHello, ChangeCipherSpec, Finished: about as many bytes as the ClientHello, and no
        public-key operation), as RFC 6347 section 4.2.1 allows; any other goes through the
        cookie exchange.
        """
        if records.client_hello_random(datagram) is None:
            return [], None
        offered = records.session_id_without_cookie(datagram)
        if self.resume_without_cookie and offered in self._issued:
            conn = self._resume_at_once(peer_key, datagram)
            if conn is not None:
                return [], self._session_from(conn, now)
        # A ClientHello with a cookie answers our HelloVerifyRequest: OpenSSL must check it
        # (and only the listening object expects its message sequence number, 1).
        if not records.has_cookie(datagram) and self.budget.has_room():
            return self._at_once(peer_key, datagram, now)
        return self._cookie_exchange(peer_key, datagram, now)

    def _at_once(self, peer_key: Hashable, datagram: bytes, now: float
                 ) -> tuple[list[bytes], OpenSslSession | None]:
        """A session from a ClientHello without the cookie exchange (it counts against the
        budget while it handshakes); made even when refused (it then ends at once, our alert
        in its datagrams)."""
        conn = self._new_listener()
        conn.set_app_data(peer_key)
        try:
            conn.bio_write(datagram)
        except (SSL.Error, ValueError):
            return [], None
        session = self._session_from(conn, now)
        self.budget.add(session)
        return [], session

    def _cookie_exchange(
        self, peer_key: Hashable, datagram: bytes, now: float
    ) -> tuple[list[bytes], OpenSslSession | None]:
        conn = self._listening
        conn.set_app_data(peer_key)  # what the cookie binds to, read by _cookie()
        try:
            conn.bio_write(datagram)
            conn.DTLSv1_listen()
        except SSL.WantReadError:
            out: list[bytes] = []
            while True:
                try:
                    out.append(conn.bio_read(65536))
                except SSL.WantReadError:
                    break
            if out:  # a HelloVerifyRequest
                hvr = records.split_records(b"".join(out))
                return records.pack_datagrams(hvr, self.config.mtu), None
            return [], None
        except (SSL.Error, ValueError, DtlsError):
            self._listening = self._new_listener()
            return [], None
        # The cookie was valid: this SSL object is now the session.
        self._listening = self._new_listener()
        return [], self._session_from(conn, now)

    def _resume_at_once(self, peer_key: Hashable, hello: bytes) -> SSL.Connection | None:
        """An SSL object that has resumed a cached session from ``hello``, or ``None``.

        A fresh accept-state object reads the ClientHello without DTLSv1_listen. Should the
        session not be cached (expired, evicted, forgotten, or never ours), OpenSSL would go on
        to a full handshake; the certificate callback, which it calls only then and before any
        key exchange or signature, stops it, and the ClientHello gets the cookie exchange.
        """
        conn = self._new_listener()
        conn.set_app_data(peer_key)
        _openssl.refuse_full_handshake(conn)
        try:
            conn.bio_write(hello)
            conn.do_handshake()
        except SSL.WantReadError:
            pass
        except (SSL.Error, ValueError):
            return None
        if not _openssl.session_reused(conn):
            return None
        return conn

    def _new_session(self, conn: SSL.Connection) -> OpenSslSession:
        return OpenSslSession(conn, self.credentials, is_client=False, config=self.config)

    def _session_from(self, conn: SSL.Connection, now: float) -> OpenSslSession:
        session = self._new_session(conn)
        session._issued = self._issued
        session._now = now
        session.state = State.HANDSHAKING
        session._handshake_deadline = now + self.config.handshake_timeout
        session._received_any = True
        session._guard(session._handshake_step)
        session._after_step(progressed=True)
        return session


# ---------------------------------------------------------------- PSK (server side)


def build_psk_context(ciphers: str = PSK_CIPHERS, *, server: bool = True) -> SSL.Context:
    """A context for PSK handshakes: no certificate, and no session cache (resuming saves no
    public-key operation here, and without a cache the ServerHello carries no 32-byte
    session ID)."""
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_options(
        SSL.OP_NO_QUERY_MTU | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_TICKET | _SSL_OP_NO_ENCRYPT_THEN_MAC
    )
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        ctx.set_cipher_list(ciphers.encode())
    except SSL.Error as exc:
        raise ConfigurationError(f"no usable cipher in {ciphers!r}") from exc
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if server:
        _openssl.use_psk_server(ctx)
    else:
        _openssl.use_psk_client(ctx)
    return ctx


class OpenSslPskSession(OpenSslSession):
    """The server side of a PSK handshake (TLS_PSK_WITH_AES_128_CCM_8); the peer identity is
    the PSK identity (bytes), as with tinydtls. Made by :class:`OpenSslPskListener`."""

    def __init__(self, connection: SSL.Connection, store: PskStore, *,
                 config: DtlsConfig | None) -> None:
        super().__init__(connection, None, is_client=False, config=config)
        self._store = store
        self._psk_identity: bytes | None = None
        self._unknown_identity: bytes | None = None
        _openssl.bind_psk(connection, self._psk_for)

    def _psk_for(self, identity: bytes) -> bytes | None:
        key = self._store.get(identity)
        if key is None:
            self._unknown_identity = identity
        else:
            self._psk_identity = identity
        return key

    def _handshake_step(self) -> None:
        try:
            super()._handshake_step()
        except DtlsError as exc:
            if self._unknown_identity is not None:
                raise AuthenticationFailed(
                    f"client offered unknown PSK identity {self._unknown_identity!r}"
                ) from exc
            raise

    def _verify_peer(self, conn: SSL.Connection) -> bytes | str | None:
        return self._psk_identity


class OpenSslPskClientSession(OpenSslSession):
    """The client side of a PSK handshake on OpenSSL (TLS_PSK_WITH_AES_128_CCM_8, as
    tinydtls offers): what a PSK client uses when it needs the TLS exporter, i.e. to key the
    OSCORE mode (tinydtls has none). ``peer_identity`` is the PSK identity sent, as with
    tinydtls; the server's identity hint is ignored, as tinydtls does."""

    def __init__(self, connection: SSL.Connection, credentials: PskClientCredentials, *,
                 config: DtlsConfig | None) -> None:
        super().__init__(connection, None, is_client=True, config=config)
        self._psk = credentials
        _openssl.bind_psk(connection, self._offer)

    @classmethod
    def psk_client(
        cls, context: SSL.Context, credentials: PskClientCredentials,
        config: DtlsConfig | None = None, *, alpn: bytes | None = None,
    ) -> OpenSslPskClientSession:
        """A session from a context of :func:`build_psk_context` (``server=False``); ``alpn``
        as in :meth:`OpenSslSession.client`."""
        conn = SSL.Connection(context, None)
        conn.set_connect_state()
        if alpn:
            conn.set_alpn_protos([alpn])
        return cls(conn, credentials, config=config)

    def _offer(self, _hint: bytes | None) -> tuple[bytes, bytes]:
        return self._psk.identity, self._psk.key

    def _verify_peer(self, conn: SSL.Connection) -> bytes | str | None:
        return self._psk.identity


class OpenSslPskListener(OpenSslListener):
    """Accepts PSK handshakes: the server side of PSK on both layers (Layer 1 with
    ``without_cookie=0``).

    Why OpenSSL: tinydtls cannot skip its cookie exchange; OpenSSL can. A PSK server's first
    flight (ServerHello, ServerHelloDone: 99 bytes) is hardly larger than the ClientHello (77
    bytes from tinydtls), so there is nothing to amplify; what is left is the state each
    ClientHello creates, which ``without_cookie`` bounds (:mod:`.cookieless`; one round trip
    and 137 bytes fewer per handshake). ``without_cookie=0`` always asks for the cookie.
    """

    def __init__(self, store: PskStore, config: DtlsConfig | None = None, *,
                 ciphers: str = PSK_CIPHERS, without_cookie: int | CookieBudget = 8) -> None:
        self.store = store
        self.resume_without_cookie = False  # no session cache (build_psk_context)
        self.budget = budget(without_cookie)
        self._setup(build_psk_context(ciphers), config)

    @property
    def in_progress(self) -> int:
        """Handshakes started without a cookie that have not ended yet."""
        return self.budget.in_progress

    def _new_session(self, conn: SSL.Connection) -> OpenSslSession:
        return OpenSslPskSession(conn, self.store, config=self.config)


# ------------------------------------------------------------------------- helpers


_ALERT_RE = re.compile(r"alert (.+)$")


def _alert_from_text(text: str) -> AlertDescription | None:
    """The alert OpenSSL's reason text names ("sslv3 alert bad certificate": bad certificate)."""
    return AlertDescription.__members__.get(text.strip().replace(" ", "_"))


def _require_peer_name(conn: SSL.Connection, name: str) -> None:
    """Have OpenSSL check the server's DNS name or IP address (RFC 6125) as part of the chain."""
    if not _openssl.require_peer_name(conn, name):
        raise ConfigurationError(f"cannot check the server name {name!r}")


def _local_verifier(
    credentials: CertificateCredentials,
    rejected: list[AuthenticationFailed],
    leaf_seen: list[x509.Certificate],
) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:
    """An OpenSSL verify callback: adds local policy to the chain check, notes the leaf."""

    def verify(
        _conn: SSL.Connection, cert: crypto.X509, _errno: int, depth: int, ok: int
    ) -> bool:
        if depth != 0:
            return bool(ok)
        leaf = cert.to_cryptography()
        leaf_seen[:] = [leaf]
        if not ok:
            return False
        if credentials.verify_peer is not None and not credentials.verify_peer(leaf):
            rejected.append(
                AuthenticationFailed("the peer's certificate was refused by local policy")
            )
            return False
        return True

    return verify


def _map_error(
    exc: SSL.Error, we_are_client: bool, *, presented_certificate: bool = True
) -> DtlsError:
    details = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [str(r[2]) for r in details]
    text = "; ".join(reasons) or str(exc)
    for reason in reasons:
        m = _ALERT_RE.search(reason)
        if m:
            number = _alert_from_text(m.group(1))
            if (number is AlertDescription.handshake_failure and we_are_client
                    and not presented_certificate):
                return AuthenticationFailed(
                    "the server refused the handshake (handshake_failure): it likely requires a"
                    " client certificate, and we presented none"
                )
            if number is not None:
                return alert_error(number, we_are_client=we_are_client)
            return PeerAlert(0, f"peer sent fatal alert: {m.group(1)}")
    if "certificate verify failed" in text:
        who = "server" if we_are_client else "client"
        return AuthenticationFailed(
            f"the {who}'s certificate is not trusted (certificate verify failed): is our CA file"
            " the one that signed it?"
        )
    if "peer did not return a certificate" in text:
        return AuthenticationFailed("the client presented no certificate, and one is required")
    if "no shared cipher" in text or "no suitable" in text:
        return AuthenticationFailed(f"no cipher suite in common with the peer ({text})")
    return DtlsError(f"DTLS error: {text}")


def _cert_names(cert: x509.Certificate) -> list[str]:
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += san.get_values_for_type(x509.DNSName)
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    names += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return names


def _name_matches(cert: x509.Certificate, name: str) -> bool:
    name = name.strip("[]").lower()
    for candidate in _cert_names(cert):
        candidate = candidate.lower()
        if candidate == name:
            return True
        if candidate.startswith("*.") and "." in name and name.split(".", 1)[1] == candidate[2:]:
            return True
    return False


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def generate_p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())
