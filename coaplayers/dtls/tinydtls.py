"""tinydtls backend (through DTLSSocket's ``dtls`` module): PSK with TLS_PSK_WITH_AES_128_CCM_8.

tinydtls is callback based and keyed by peer address. Server sessions of one listener share one
tinydtls context, because tinydtls' stateless cookie check (RFC 6347 section 4.2.1) uses a
per-context secret: only a shared context lets a second ClientHello carry the cookie of the
first without any state kept in between. Each session gets a synthetic IPv6 address inside that
context, derived from the caller's peer key and the ClientHello random (which the client keeps
across the cookie exchange), so the real address can change without tinydtls noticing.

tinydtls reads the wall clock for its own retransmissions; we never call its timer, the
:class:`~coaplayers.dtls.session.DtlsSession` base retransmits instead.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Hashable
from typing import cast

from DTLSSocket import dtls

from . import records
from .alerts import AlertDescription, AlertLevel, alert_name
from .credentials import PskClientCredentials, PskStore
from .errors import AuthenticationFailed, DtlsError, alert_error
from .events import ApplicationData
from .session import DtlsConfig, DtlsSession, State

CIPHER_SUITE = "TLS_PSK_WITH_AES_128_CCM_8"
# Record header 13 + explicit nonce 8 + CCM_8 tag 8. tinydtls itself refuses (and then ends
# the session) beyond 1379 bytes of plaintext, measured with DTLSSocket 0.2.3.
_RECORD_OVERHEAD = 29
_TINYDTLS_MAX_PLAINTEXT = 1379
_EVENT_CONNECTED = 0x1DE

dtls.setLogLevel(dtls.DTLS_LOG_EMERG)  # tinydtls logs key material at debug level


_Lookup = Callable[[bytes], bytes | None]  # a PSK identity's key, None if unknown


# What tinydtls and libcoap servers abort a handshake with when the PSK identity is not in
# their store.
_IDENTITY_REFUSED = frozenset({
    AlertDescription.handshake_failure, AlertDescription.access_denied,
    AlertDescription.internal_error, AlertDescription.unknown_psk_identity,
})


class _KeyView:
    """The ``pskStore`` tinydtls consults; records which identity a handshake used.

    tinydtls copies the key out of the returned ``bytes`` by pointer, so values must stay
    referenced: they are the objects held by the underlying dict.
    """

    def __init__(self, context: _TinyContext, lookup: _Lookup) -> None:
        self._context = context
        self._lookup = lookup

    def keys(self) -> _KeyView:
        return self

    def __contains__(self, identity: object) -> bool:
        if not isinstance(identity, bytes):
            return False
        found = self._lookup(identity) is not None
        current = self._context.current
        if current is not None:
            current._psk_identity_seen(identity, found)
        return found

    def __getitem__(self, identity: bytes) -> bytes:
        key = self._lookup(identity)
        if key is None:
            raise KeyError(identity)
        return key


class _TinyContext:
    """A tinydtls context and the sessions living in it, by (synthetic) address."""

    def __init__(self, own_identity: bytes, lookup: _Lookup) -> None:
        self.sessions: dict[tuple[str, int], TinyDtlsSession] = {}
        self.current: TinyDtlsSession | None = None
        self._own_identity = own_identity  # referenced: tinydtls keeps a char* into it
        self._view = _KeyView(self, lookup)
        self.d = dtls.DTLS(
            read=self._on_read,
            write=self._on_write,
            event=self._on_event,
            pskId=self._own_identity,
            pskStore=self._view,
        )

    def _on_write(self, addr: tuple[str, int], data: bytes) -> int:
        session = self.sessions.get(addr) or self.current
        if session is not None:
            session._emit(bytes(data))
        return len(data)

    def _on_read(self, addr: tuple[str, int], data: bytes) -> int:
        session = self.sessions.get(addr)
        if session is not None:
            session._app_data(bytes(data))
        return len(data)

    def _on_event(self, level: int, code: int) -> None:
        session = self.current
        if session is not None:
            session._tiny_event(level, code)

    def handle(self, session: TinyDtlsSession, data: bytes) -> int:
        self.current = session
        try:
            return int(self.d.handleMessageAddr(session.address[0], session.address[1], data))
        finally:
            self.current = None


class TinyDtlsSession(DtlsSession):
    """A PSK session on tinydtls; create through :meth:`client` or a :class:`TinyDtlsListener`."""

    def __init__(
        self,
        context: _TinyContext,
        address: tuple[str, int],
        *,
        is_client: bool,
        config: DtlsConfig | None,
        client_identity: bytes | None = None,
    ) -> None:
        super().__init__(is_client=is_client, config=config)
        self._context = context
        self.address = address
        self._tsession = dtls.Session(address[0], address[1])
        self._connection: object | None = None
        self._client_identity = client_identity
        self._identity_seen: bytes | None = None
        self._unknown_identity: bytes | None = None
        self._freed = False
        self._client_hello_random: bytes | None = None  # server: the one that created us

    @classmethod
    def client(
        cls, credentials: PskClientCredentials, config: DtlsConfig | None = None
    ) -> TinyDtlsSession:
        keys = {credentials.identity: credentials.key}
        context = _TinyContext(credentials.identity, keys.get)
        context._keys = keys  # type: ignore[attr-defined]  # keep the key bytes referenced
        session = cls(
            context, ("::1", 5684), is_client=True, config=config,
            client_identity=credentials.identity,
        )
        context.sessions[session.address] = session
        return session

    # hooks called from the context's callbacks

    def _psk_identity_seen(self, identity: bytes, found: bool) -> None:
        if found:
            self._identity_seen = identity
        else:
            self._unknown_identity = identity

    def _tiny_event(self, level: int, code: int) -> None:
        if level == 0 and code == _EVENT_CONNECTED:
            identity = self._client_identity if self.is_client else self._identity_seen
            self._established(identity, CIPHER_SUITE, False)
        elif level in (AlertLevel.warning, AlertLevel.fatal):
            self._alert(level, code)
            if code == AlertDescription.close_notify:
                self._pending_close = None
                self._peer_gone = True
            elif level == AlertLevel.fatal:
                if self.is_client and self.state is State.HANDSHAKING and code in _IDENTITY_REFUSED:
                    # tinydtls and libcoap servers abort with internal_error or
                    # handshake_failure when the identity is not in their store.
                    self._pending_close = AuthenticationFailed(
                        f"the server aborted the PSK handshake ({alert_name(code)}): likely an"
                        " unknown PSK identity"
                    )
                else:
                    self._pending_close = alert_error(code, we_are_client=self.is_client)
                self._peer_gone = True

    _peer_gone = False
    _pending_close: DtlsError | None = None

    # DtlsSession hooks

    def _backend_start(self) -> None:
        self._context.current = self
        try:
            self._connection = self._context.d.connect(self.address[0], self.address[1])
        finally:
            self._context.current = None
        if self._connection is None:
            raise DtlsError("tinydtls could not start the handshake")

    def _backend_receive(self, recs: list[bytes]) -> None:
        if self.is_client:
            # A client never receives a ClientHello; tinydtls would take one as a reason to
            # reset the handshake in progress.
            recs = [r for r in recs if records.client_hello_random(r) is None]
            if not recs:
                return
        elif self._client_hello_random is not None:
            # No ClientHello belongs in an existing server session. A repeat of the one that
            # created it (duplicated or retransmitted) would make tinydtls start over with a
            # new ServerHello random, which the client, holding the first one, can never
            # finish; any other one is forged, because a client that starts over picks a new
            # random, which the listener maps to a new session. Our own timer repeats our
            # flight if the first one was lost.
            recs = [r for r in recs if records.client_hello_random(r) is None]
            if not recs:
                return
        self._context.handle(self, b"".join(recs))
        if self._unknown_identity is not None and not self.is_client:
            ident = self._unknown_identity
            self._unknown_identity = None
            self._fail(AuthenticationFailed(f"client offered unknown PSK identity {ident!r}"))
            return
        if self._peer_gone:
            self._fail(self._pending_close)

    def _backend_receive_application(self, record: bytes) -> list[bytes] | None:
        # tinydtls decrypts and checks replay itself and hands the plaintext to _on_read,
        # which queues it as an event: take it back from the queue (empty before the call).
        self._context.handle(self, record)
        events = self._events
        out = []
        while events and type(events[0]) is ApplicationData:
            out.append(cast(ApplicationData, events.popleft()).data)
        if self._peer_gone:
            self._fail(self._pending_close)
        return out

    def _backend_max_plaintext(self) -> int:
        return min(self.config.mtu - _RECORD_OVERHEAD, _TINYDTLS_MAX_PLAINTEXT)

    def _backend_send(self, data: bytes) -> None:
        self._context.current = self
        try:
            ret = self._context.d.write(self._tsession, data)
        finally:
            self._context.current = None
        if ret < 0:
            raise DtlsError("tinydtls refused to send application data")

    def _backend_close_notify(self) -> None:
        self._context.current = self
        try:
            self._context.d.close(self._tsession)
        except Exception as exc:  # DTLSSocket raises a bare Exception
            raise DtlsError("tinydtls could not send close_notify") from exc
        finally:
            self._context.current = None

    def _backend_free(self) -> None:
        if self._freed:
            return
        self._freed = True
        self._context.d.resetPeer(self._tsession)
        self._context.sessions.pop(self.address, None)
        self._connection = None

    def __del__(self) -> None:
        # A session never freed (a process exiting with its Layer 1 session up) is collected
        # with its context as one reference cycle. DTLSSocket's Connection resets its peer in
        # its C-level dealloc through its DTLS object; if the collector clears the Connection
        # first, that DTLS reference is already None and the dealloc dereferences a NULL
        # context (a segfault seen in coap-client at exit). Finalizers run before the
        # collector clears anything, so dropping the Connection here lets it reset its peer
        # while its DTLS context is intact.
        self._connection = None


class TinyDtlsListener:
    """Accepts PSK handshakes for a server: stateless until the client returns our cookie.

    Not for untrusted clients: tinydtls removes a peer from its context's table twice when the
    peer sends close_notify or a fatal alert, which with other sessions in the shared context
    corrupts the table until it divides by zero (docs/SECURITY.md 6). Servers use
    :class:`~coaplayers.dtls.openssl.OpenSslPskListener`.
    """

    # What tinydtls negotiates (TLS_PSK_WITH_AES_128_CCM_8); KindListener answers a hello
    # offering none of these with an alert, as tinydtls drops it silently.
    cipher_suites = frozenset({0xC0A8})

    def __init__(self, store: PskStore, config: DtlsConfig | None = None) -> None:
        self.store = store
        self.config = config or DtlsConfig()
        self._context = _TinyContext(b"server", store.get)

    def accept(
        self, peer_key: Hashable, datagram: bytes, now: float
    ) -> tuple[list[bytes], TinyDtlsSession | None]:
        """Handle a datagram from a peer without a session.

        Returns datagrams to answer statelessly (a HelloVerifyRequest) and, once the ClientHello
        carries a valid cookie, the new session (whose first flight is waiting in
        :meth:`~DtlsSession.datagrams_to_send`).
        """
        random = records.client_hello_random(datagram)
        if random is None:
            return [], None
        address = _synthetic_address(peer_key, random)
        existing = self._context.sessions.get(address)
        if existing is not None:
            existing.receive_datagram(datagram, now)
            return [], existing
        session = TinyDtlsSession(self._context, address, is_client=False, config=self.config)
        session._now = now
        self._context.handle(session, datagram)
        produced = session._out
        first = records.handshake_type(produced[0]) if produced else None
        if first != records.HANDSHAKE_SERVER_HELLO:
            # A HelloVerifyRequest (stateless: send it), or tinydtls refused the ClientHello
            # (an alert: drop it, an unknown peer gets nothing from us); no state either way.
            session._out = []
            self._context.d.resetPeer(session._tsession)
            if first != records.HANDSHAKE_HELLO_VERIFY_REQUEST:
                return [], None
            return records.pack_datagrams(produced, self.config.mtu), None
        self._context.sessions[address] = session
        session._client_hello_random = random
        session.state = State.HANDSHAKING
        session._handshake_deadline = now + self.config.handshake_timeout
        session._received_any = True
        session._after_step()
        return [], session

    @property
    def session_count(self) -> int:
        return len(self._context.sessions)


def _synthetic_address(peer_key: Hashable, random: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(repr(peer_key).encode() + random).digest()
    return socket.inet_ntop(socket.AF_INET6, digest[:16]), 1 + int.from_bytes(digest[16:18]) % 65535
