"""The client side of Layer 0: a client of one origin server, used like an aiocoap context.

``Layer0Client(context, "coap://server", credentials, proxy="coap://proxy")`` sends nothing
until the first request; then it runs the end-to-end DTLS handshake through whatever outer
transport and proxies ``context`` reaches, and carries each inner request in one record. Its
:meth:`Layer0Client.request` mirrors aiocoap's: it returns an object whose ``response`` is
awaited and whose ``observation`` (for Observe requests) is iterated.

What it does by itself, so applications need not:

* block-wise inside Layer 0 (512-byte inner blocks), in both directions;
* Observe inside Layer 0: notifications are fetched with long-polling pulls, each a small
  record that acknowledges what the previous pulls delivered (the server keeps a notification
  until then), because not every proxy forwards outer observations (aiocoap 0.4.17's forward
  proxy cannot);
* a new handshake when the server answers 4.04 (it forgot the session), and resending the
  request if its method is idempotent (the server never decrypted it, but a lost answer after
  a server crash cannot be told apart, so POST is only resent when the client allows it);
* registering active observations again after such a new handshake (the server lost them
  with the session), unless ``Layer0Config.reregister_observations`` is off;
* resumption with the OpenSSL backend (a :class:`~coaplayers.dtls.TicketStore`, shareable).

It never hands the application anything that did not authenticate: an altered or replayed
answer raises :class:`~coaplayers.layer0.errors.ResponseRejected`, a refused request
:class:`~coaplayers.layer0.errors.RecordRejected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiocoap
from aiocoap import Message
from aiocoap.message import UndecidedRemote
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.optiontypes import BlockOption, OpaqueOption
from OpenSSL import SSL

from ..dtls import (
    AlertReceived,
    ApplicationData,
    CertificateCredentials,
    ConnectionClosed,
    DtlsError,
    DtlsSession,
    GnuTlsSession,
    HandshakeComplete,
    OpenSslPskClientSession,
    OpenSslSession,
    PskClientCredentials,
    RawPublicKeyContext,
    RawPublicKeyCredentials,
    TicketStore,
    TinyDtlsSession,
    build_context,
    records,
)
from ..dtls.openssl import build_psk_context
from ..message import copy_request, echo_asked, request_through, with_echo
from . import inner, profile
from .errors import (
    HandshakeFailed,
    InnerMessageError,
    Layer0Closed,
    Layer0Error,
    NoAnswer,
    OuterError,
    RecordRejected,
    ResponseRejected,
    ServerBusy,
    SessionLost,
)
from .profile import (
    CONTENT_FORMAT,
    IDEMPOTENT_METHODS,
    INNER_BLOCK_SIZE,
    INNER_BLOCK_SZX,
    MAX_LOCATION_SEGMENTS,
    OUTER_ONLY_OPTIONS,
    WELL_KNOWN_PATH,
    handshake_tag,
    pull_message,
)
from .server import MAX_INNER, layer0_config

__all__ = ["Layer0Client", "Layer0Config", "Layer0Observation", "Layer0Request"]

log = logging.getLogger(__name__)
_REFUSED_PAUSE = 0.1  # seconds before the first repeat of a flight whose exchange was refused

ClientCredentials = PskClientCredentials | CertificateCredentials | RawPublicKeyCredentials
_RETRYABLE_GATEWAY = (Code.BAD_GATEWAY, Code.GATEWAY_TIMEOUT)


FINAL_FLIGHT_WINDOW = 10.0
"""Seconds after its ClientHello within which a resumed handshake's last flight may wait for
the first request. Later (answers were lost and retransmitted), the server's half-open session
may be near its handshake timeout (30 s by default): the flight then goes alone, so that a 4.04
restarts the handshake instead of failing a request that travelled with it."""


@dataclass(frozen=True)
class Layer0Config:
    """Every bound the Layer 0 client applies."""

    handshake_timeout: float = 60.0
    """A handshake (all its outer exchanges and repeats) not done by then fails."""
    exchange_timeout: float = 100.0
    """Bound on one outer exchange; aiocoap's own CON retransmission gives up sooner (~93 s)."""
    max_attempts: int = 3
    """Outer attempts for one inner request (new handshakes and resends included)."""
    max_flight_repeats: int = 4
    """How often one handshake flight is sent again after its outer exchange failed."""
    pad_hello_to: int = 360
    """Outer size on the wire a certificate client pads each ClientHello request to (the
    Padding option, docs/PROTOCOL.md 3.1), so that the server's answer, its certificate
    flight when it skips the cookie exchange or after it (up to a full datagram), stays
    within three times the request: no Echo round trip where a proxy or server has not
    verified our address. A ClientHello that offers a session to resume is not padded (its
    answer is small unless the server lost the session). 0: no padding."""
    pad_rpk_hello_to: int = 200
    """The same for raw public keys, whose first server flight is about 450 bytes."""
    request_with_final_flight: bool = True
    """A resumed handshake's last flight (the client's ChangeCipherSpec and Finished) goes out
    with the first protected request, in one outer exchange (docs/PROTOCOL.md 3.3): the client
    is established once it has sent its Finished, so this saves a round trip."""
    resend_non_idempotent: bool = False
    """Resend POST/PATCH automatically after the server forgot the session (see module doc)."""
    use_proxy_uri: bool = False
    """Name the origin with Proxy-Uri instead of Proxy-Scheme + Uri-Host + Uri-Port."""
    poll_pause: float = 0.5
    """Pause after an empty poll answer before the next poll (rate limit, not synchronisation)."""
    close_timeout: float = 5.0
    """Bound on the DELETE that carries close_notify when the Layer 0 client closes."""
    misrouted_wait: float = 5.0
    """How long a request waits for its own inner answer when its outer answer carried another
    request's (authentic) one: a middle box swapped answers, ours is in the other exchange."""
    transport_tuning: TransportTuning | None = None
    """aiocoap transmission parameters of the outer messages (``None``: aiocoap's defaults)."""
    reregister_observations: bool = True
    """When the server loses the session (restart, eviction, an ended session), register
    active observations again after a new handshake (RFC 7641 section 3.3.1) instead of ending
    them with :class:`~coaplayers.layer0.errors.SessionLost`."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_flight_repeats < 0:
            raise ValueError("max_attempts must be >= 1 and max_flight_repeats >= 0")
        if not 0 <= self.pad_hello_to <= 1024 or not 0 <= self.pad_rpk_hello_to <= 1024:
            raise ValueError("ClientHello padding must be within 0..1024 bytes")
        for name in ("handshake_timeout", "exchange_timeout", "close_timeout", "misrouted_wait"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


class _Restart(Exception):
    """The server dropped our half-open session: start the handshake from the beginning."""


class Layer0Observation:
    """Notifications of one inner observation; iterate with ``async for``.

    Ends with :class:`StopAsyncIteration` after :meth:`cancel` or a final notification, and raises
    the Layer 0 error that ended it otherwise (e.g. :class:`SessionLost`).
    """

    def __init__(self, channel: Layer0Client) -> None:
        self._channel = channel
        self._queue: asyncio.Queue[Message | BaseException | None] = asyncio.Queue()
        self.token: bytes | None = None
        self.request: Message | None = None
        self.cancelled = False
        self._last: tuple[int, float] | None = None

    def _push(self, message: Message) -> None:
        number = message.opt.observe
        if number is not None:
            now = time.monotonic()
            if self._last is not None:
                v1, t1 = self._last
                fresh = (v1 < number < v1 + 2**23) or (number < v1 - 2**23) or now > t1 + 128
                if not fresh:
                    return  # an older notification overtaken by a newer one
            self._last = (number, now)
        self._queue.put_nowait(message)
        if number is None:  # a notification without Observe ends the observation
            self._end(None)

    def _restarted(self) -> None:
        """Registered again (a new session): the server counts Observe numbers afresh."""
        self._last = None

    def _end(self, error: BaseException | None) -> None:
        if self.token is not None:
            self._channel._observations.pop(self.token, None)
        self._queue.put_nowait(error)

    def cancel(self) -> None:
        """Stop observing; the server is told with an Observe: 1 request (best effort)."""
        if self.cancelled:
            return
        self.cancelled = True
        token = self.token
        self._end(None)
        if token is not None:
            self._channel._deregister(token, self.request)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        return item


class Layer0Request:
    """One application request on a Layer 0 client: ``await req.response``; ``req.observation``."""

    def __init__(self, channel: Layer0Client, message: Message) -> None:
        self._channel = channel
        self.observation = Layer0Observation(channel) if message.opt.observe == 0 else None
        self.response: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        # A shallow copy (copy_request): aiocoap's Message.copy deep-copies every option.
        self._task = asyncio.create_task(self._run(copy_request(message)),
                                         name="Layer 0 request")
        channel._tasks.add(self._task)
        self._task.add_done_callback(channel._tasks.discard)

    async def _run(self, message: Message) -> None:
        try:
            response = await self._channel._blockwise(message, self.observation)
        except BaseException as exc:
            if not self.response.done():
                self.response.set_exception(exc)
            if self.observation is not None and not self.observation.cancelled:
                self.observation._end(exc if isinstance(exc, Exception) else None)
            if not isinstance(exc, Exception):
                raise
        else:
            if not self.response.done():
                self.response.set_result(response)


class Layer0Client:
    """A Layer 0 (end-to-end DTLS) client of ``origin`` (``coap://host[:port]`` or ``coaps://...``).

    ``context`` is any aiocoap client context; it carries the outer messages (plain CoAP, or
    Layer 1 when the origin or proxy URI is ``coaps://``). ``credentials`` are Layer 0's own:
    :class:`PskClientCredentials` (tinydtls), :class:`CertificateCredentials` (OpenSSL) or
    :class:`RawPublicKeyCredentials` (GnuTLS, RFC 7250: its ``trusted`` keys pin the server).
    ``proxy`` is a forward proxy's URI (``coap://proxy:5683``). ``tickets`` keeps resumption
    state (OpenSSL only); to resume across Layer 0 clients, share one store and one ``ssl_context``
    (from :func:`coaplayers.dtls.build_context`): OpenSSL resumes only within one context.
    ``exporter``: the sessions must offer the TLS exporter (the OSCORE mode keys from it), so
    PSK handshakes run on OpenSSL rather than tinydtls, which has none.
    """

    def __init__(
        self,
        context: aiocoap.Context,
        origin: str,
        credentials: ClientCredentials,
        *,
        proxy: str | None = None,
        config: Layer0Config | None = None,
        tickets: TicketStore | None = None,
        ssl_context: SSL.Context | None = None,
        exporter: bool = False,
    ) -> None:
        parsed = urllib.parse.urlsplit(origin)
        if parsed.scheme in ("http", "https") and parsed.hostname and proxy is None:
            # ATLS's HTTP binding: the outer exchanges cross a CoAP-to-HTTP proxy unread.
            raise ValueError(f"an {parsed.scheme}:// origin needs a CoAP-to-HTTP cross-proxy")
        if parsed.scheme not in ("coap", "coaps", "coap+tcp", "coaps+tcp", "http", "https") or (
                not parsed.hostname):
            raise ValueError(f"origin must be a coap:// or coaps:// URI with a host: {origin!r}")
        self._ctx = context
        self.origin = f"{parsed.scheme}://{parsed.netloc}"
        self._scheme = parsed.scheme
        self._host = parsed.hostname
        self._port = parsed.port
        self._proxy = UndecidedRemote.from_pathless_uri(proxy) if proxy else None
        self._proxy_uri = proxy
        self._outer_answers = 0  # CoAP answers in the current handshake attempt
        self.config = config or Layer0Config()
        self._credentials = credentials
        self._ssl_context = ssl_context
        if isinstance(credentials, CertificateCredentials):
            if ssl_context is None:
                self._ssl_context = build_context(
                    credentials, server=False, ciphers=profile.DTLS_CIPHERS)
        elif isinstance(credentials, RawPublicKeyCredentials):  # raw public keys: GnuTLS
            self._rpk_context = RawPublicKeyContext(credentials, server=False)
        elif isinstance(credentials, PskClientCredentials):
            if exporter and ssl_context is None:
                self._ssl_context = build_psk_context(server=False)
        else:
            raise TypeError(
                "Layer 0 client credentials must be PskClientCredentials, CertificateCredentials"
                f" or RawPublicKeyCredentials, not {type(credentials).__name__}"
            )
        self._tickets = tickets if tickets is not None else TicketStore()
        self._session: DtlsSession | None = None
        self._final_flight = b""  # handshake tag + a resumed handshake's last flight, held
        self._path: tuple[str, ...] = WELL_KNOWN_PATH
        self._acked = -1  # highest record sequence number of the session's pull answers
        self._generation = 0
        self._lock = asyncio.Lock()
        self._pending: dict[bytes, asyncio.Future[Message]] = {}
        self._observations: dict[bytes, Layer0Observation] = {}
        # Inner tokens: 1-byte ones from this pool, each back in it once its request had its
        # one answer; longer counted ones only while all 256 are taken (docs/PROTOCOL.md 4.1).
        self._free_tokens: deque[bytes] = deque(bytes([i]) for i in range(256))
        self._long_tokens = itertools.count(256)
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.handshakes = 0
        """Completed handshakes (full or resumed) over the client's life."""
        self.reregistrations = 0
        """Observations registered again after the server lost their session."""
        self.last_handshake: HandshakeComplete | None = None
        self.on_handshake: list[Callable[[Layer0Client, HandshakeComplete], None]] = []
        """Called after every completed handshake: the OSCORE mode's hook (see exporter)."""
        self.alpn: bytes | None = None
        """An ALPN protocol (RFC 7301) to offer in the next handshakes (OpenSSL backends). A
        server that agrees answers the request it stands for with its last flight and ends the
        session (Layer0Site.fold): the OSCORE mode's keying (docs/OSCORE-KEYING.md 9.1)."""
        self.folded: Message | None = None
        """That answer (the server's inner message with the empty token), from the last
        handshake; ``None`` if it carried none."""
        self._early: list[bytes] = []  # application data that came with the server's Finished

    # ------------------------------------------------------------------ public API

    def request(self, message: Message) -> Layer0Request:
        """Send ``message`` (code, Uri-Path, options, payload) to the origin inside Layer 0."""
        if self._closed:
            raise Layer0Closed("the Layer 0 client is closed")
        return Layer0Request(self, message)

    async def connect(self) -> HandshakeComplete:
        """Handshake now rather than on the first request."""
        await self._ensure()
        await self._flush_final_flight()
        assert self.last_handshake is not None
        return self.last_handshake

    async def _flush_final_flight(self) -> None:
        """Send a held final flight on its own (no request came to carry it)."""
        final, self._final_flight = self._final_flight, b""
        if final:
            try:
                resp = await self._post(Code.POST, self._path, final)
            except OuterError:
                return  # the next request repeats it (the server answers a repeat alike)
            if resp.code == Code.CHANGED:  # a folded answer (see alpn) rides it
                self._receive(bytes(resp.payload), self._generation)

    @property
    def agreed_alpn(self) -> bytes | None:
        """The ALPN protocol the current session's handshake agreed on (see :attr:`alpn`)."""
        return getattr(self._session, "alpn", None)

    @property
    def established(self) -> bool:
        return self._session is not None and self._session.is_established

    @property
    def session_path(self) -> tuple[str, ...] | None:
        return self._path if self.established else None

    def export_keying_material(
        self, label: bytes, length: int, context: bytes | None = None
    ) -> bytes:
        """RFC 5705 exporter of the current session (OpenSSL backend only)."""
        if self._session is None or not self._session.is_established:
            raise SessionLost("no established session")
        return self._session.export_keying_material(label, length, context)

    def forget_session(self) -> None:
        """Drop the session locally without telling the server (tests, key rollover)."""
        self._invalidate(self._generation, SessionLost("session dropped by the application"))

    async def close(self) -> None:
        """End the session with close_notify (DELETE), stop polling and fail what is pending."""
        if self._closed:
            return
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
        with contextlib.suppress(Layer0Error, TimeoutError):
            await asyncio.wait_for(self._flush_final_flight(), self.config.close_timeout)
        session, path = self._session, self._path
        datagram = b""
        if session is not None and session.is_established:
            session.close()
            datagram = b"".join(session.datagrams_to_send())
        self._invalidate(self._generation, Layer0Closed("the Layer 0 client was closed"))
        for task in list(self._tasks):
            task.cancel()
        if datagram:
            try:
                await asyncio.wait_for(
                    self._post(Code.DELETE, path, datagram), self.config.close_timeout
                )
            except (Layer0Error, TimeoutError):
                pass

    async def __aenter__(self) -> Layer0Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ outer side

    def _outer(self, code: Code, path: tuple[str, ...], payload: bytes) -> Message:
        kwargs = {}
        if self.config.transport_tuning is not None:
            kwargs["transport_tuning"] = self.config.transport_tuning
        msg = Message(code=code, payload=payload, **kwargs)
        if payload and path == WELL_KNOWN_PATH:
            # Only the entry resource takes other payloads than records (it refuses them);
            # the session resource's are records by definition: 3 bytes saved per request.
            msg.opt.content_format = CONTENT_FORMAT
        if self._proxy is None:
            msg.remote = UndecidedRemote.from_pathless_uri(self.origin)
            msg.opt.uri_path = path
        else:
            msg.remote = self._proxy
            msg.opt.uri_path = path
            if self.config.use_proxy_uri:
                quoted = "/".join(urllib.parse.quote(p, safe="") for p in path)
                msg.opt.proxy_uri = f"{self.origin}/{quoted}"
                msg.opt.uri_path = ()
            else:
                msg.opt.proxy_scheme = self._scheme
                msg.opt.uri_host = self._host
                if self._port is not None:
                    msg.opt.uri_port = self._port
        return msg

    async def _post(self, code: Code, path: tuple[str, ...], payload: bytes,
                    pad_to: int = 0) -> Message:
        msg = self._outer(code, path, payload)
        if pad_to:
            # The largest token the exchange may get (8 bytes) counts in the size.
            size = len(msg.copy(mtype=aiocoap.CON, mid=0, token=bytes(8)).encode())
            if size + 4 < pad_to:
                msg.opt.add_option(OpaqueOption(profile.PADDING_OPTION,
                                                bytes(pad_to - size - 4)))
        try:
            async with asyncio.timeout(self.config.exchange_timeout):
                response = await self._send_outer(msg)
        except (aiocoap.error.Error, OSError, TimeoutError) as exc:
            raise OuterError(f"outer exchange failed: {type(exc).__name__}: {exc}") from exc
        b2 = response.opt.block2
        if b2 is not None and b2.more:
            raise OuterError(
                "the outer answer came in blocks (a proxy split it): Layer 0 answers are at"
                f" most {profile.MAX_DATAGRAM} bytes and need no outer block-wise transfer"
            )
        return response

    async def _send_outer(self, msg: Message) -> Message:
        """One outer exchange: at most one block (MAX_DATAGRAM), so it needs neither
        aiocoap's block-wise runner nor its send task (see request_through)."""
        interface = await self._ctx.find_remote_and_interface(msg)
        response = await request_through(self._ctx, interface, msg).response
        echo = echo_asked(msg, response)
        if echo is not None:  # a proxy verifying our address first (RFC 9175, the 3x rule)
            response = await request_through(self._ctx, interface, with_echo(msg, echo)).response
        return response

    # ------------------------------------------------------------------ handshake

    def _new_engine(self) -> DtlsSession:
        config = layer0_config(self.config.handshake_timeout, client=True)
        if isinstance(self._credentials, PskClientCredentials):
            if self._ssl_context is not None:
                return OpenSslPskClientSession.psk_client(
                    self._ssl_context, self._credentials, config, alpn=self.alpn)
            return TinyDtlsSession.client(self._credentials, config)
        if isinstance(self._credentials, RawPublicKeyCredentials):
            return GnuTlsSession.client(self._rpk_context, config)
        assert self._ssl_context is not None
        return OpenSslSession.client(
            self._ssl_context,
            self._credentials,
            config,
            resume=self._tickets.get(self.origin),
            alpn=self.alpn,
        )

    async def _ensure(self) -> int:
        if self._closed:
            raise Layer0Closed("the Layer 0 client is closed")
        if self._session is not None and self._session.is_established:
            return self._generation
        async with self._lock:
            if self._session is not None and self._session.is_established:
                return self._generation
            self._outer_answers = 0
            self.folded, self._early = None, []
            try:
                session, path, event = await self._handshake_bounded()
            except (NoAnswer, asyncio.CancelledError):
                raise
            except BaseException:
                # A session that did not lead to a handshake is not offered again (a kept
                # one, coaplayers.layer0.resumption, included).
                self._tickets.forget(self.origin)
                raise
            self._session, self._path = session, path
            self._acked = -1
            self._generation += 1
            self.handshakes += 1
            self.last_handshake = event
            if isinstance(session, OpenSslSession) and session.resumption_state is not None:
                self._tickets.put(self.origin, session.resumption_state)
            log.info("Layer 0 session established (resumed=%s)", event.resumed)
            early, self._early = self._early, []
            for data in early:  # the server's answers that rode its last flight
                self._route(data)
            for callback in list(self.on_handshake):
                callback(self, event)
            return self._generation

    async def _handshake_bounded(
        self,
    ) -> tuple[DtlsSession, tuple[str, ...], HandshakeComplete]:
        """One handshake (up to three attempts if the server drops it) within the timeout."""
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                for _ in range(3):
                    try:
                        session, path, event = await self._handshake_once()
                        break
                    except _Restart:
                        continue
                else:
                    raise HandshakeFailed("the server kept dropping our handshake")
        except TimeoutError as exc:
            if not self._outer_answers:
                # Not one CoAP answer (a CON's ACK alone does not count): nothing is
                # listening there, or everything is lost; not a key problem.
                raise NoAnswer(
                    f"no answer from {self._first_hop()} within"
                    f" {self.config.handshake_timeout:g} s"
                ) from exc
            raise HandshakeFailed(
                f"no Layer 0 handshake within {self.config.handshake_timeout:g} s: the path"
                " loses too much, or (with PSK) the key is wrong, which looks the same"
            ) from exc
        return session, path, event

    def _first_hop(self) -> str:
        return f"the proxy {self._proxy_uri}" if self._proxy_uri else self.origin

    async def _handshake_once(self) -> tuple[DtlsSession, tuple[str, ...], HandshakeComplete]:
        dtls = self._new_engine()
        self._early = []
        try:
            return await self._drive_handshake(dtls)
        except BaseException:
            # Free the engine now, also when cancelled (timeout): a tinydtls session left to
            # the garbage collector in mid-handshake has crashed DTLSSocket at exit.
            dtls.abort()
            raise

    async def _drive_handshake(
        self, dtls: DtlsSession
    ) -> tuple[DtlsSession, tuple[str, ...], HandshakeComplete]:
        loop = asyncio.get_running_loop()
        dtls.connect(loop.time())
        path = WELL_KNOWN_PATH
        tag = b""  # the handshake tag, from the 2.01: it starts every request to the session
        queue = dtls.datagrams_to_send()
        flight = list(queue)
        started = loop.time()  # the server cannot have made the session before this
        repeats = 0
        heard_server = False
        done: HandshakeComplete | None = None
        pad_hello = self._hello_padding(dtls)

        def repeat_flight() -> None:
            nonlocal repeats, queue
            repeats += 1
            if repeats > self.config.max_flight_repeats:
                if heard_server and isinstance(self._credentials, PskClientCredentials):
                    raise HandshakeFailed(
                        "the server answered our ClientHello but not our last flight: with PSK"
                        " this is how a wrong key looks (the server drops what it cannot"
                        " decrypt)"
                    )
                raise HandshakeFailed("the server does not answer our handshake flight")
            queue = list(flight)

        while True:
            datagram = queue.pop(0) if queue else b""
            # A ClientHello may be answered by the server's first flight (3.1, padding).
            pad = pad_hello if path == WELL_KNOWN_PATH else 0
            try:
                resp = await self._post(Code.POST, path, tag + datagram, pad)
                self._outer_answers += 1
            except OuterError as exc:
                if done is not None or datagram:
                    queue.insert(0, datagram)
                repeats += 1
                if repeats > self.config.max_flight_repeats:
                    raise
                if _refused(exc):
                    # Refused at once (an ICMP error, possibly one queued on the shared socket
                    # for another destination): repeat after a growing pause, not at once.
                    await asyncio.sleep(_REFUSED_PAUSE * 2 ** (repeats - 1))
                continue
            code = resp.code
            log.debug(
                "handshake %x: sent %d bytes to %s, got %s with %d bytes",
                id(dtls) & 0xFFFF, len(datagram), "/".join(path), code, len(resp.payload),
            )
            if code == Code.CREATED:
                location = tuple(resp.opt.location_path)
                if (
                    not 1 <= len(location) <= MAX_LOCATION_SEGMENTS
                    or location == WELL_KNOWN_PATH
                    or not all(0 < len(seg.encode()) <= 255 for seg in location)
                ):
                    raise HandshakeFailed(f"server named the session oddly: {location!r}")
                created_tag = handshake_tag(bytes(resp.payload))
                if created_tag is None:
                    raise HandshakeFailed("the server created the session without a ServerHello")
                path, tag = location, created_tag
            elif code == Code.SERVICE_UNAVAILABLE:
                raise ServerBusy("the server has too many handshakes in progress (5.03)")
            elif code == Code.NOT_FOUND and path != WELL_KNOWN_PATH:
                raise _Restart()
            elif code == Code.FORBIDDEN:
                dtls.receive_datagram(bytes(resp.payload), loop.time())
                raise HandshakeFailed("the server refused the handshake") from _closing_error(dtls)
            elif code != Code.CHANGED:
                raise HandshakeFailed(f"unexpected outer answer {code} during the handshake")
            if resp.payload:
                heard_server = True
                dtls.receive_datagram(bytes(resp.payload), loop.time())
            while (event := dtls.next_event()) is not None:
                if isinstance(event, HandshakeComplete):
                    done = event
                elif isinstance(event, ApplicationData) and done is not None:
                    self._early.append(event.data)  # routed once the session is ours
                elif isinstance(event, ConnectionClosed):
                    await self._send_alert(dtls, path, tag)
                    raise HandshakeFailed(f"Layer 0 handshake failed: {event.error}") from (
                        event.error
                    )
            new = dtls.datagrams_to_send()
            if new:
                queue.extend(new)
                flight = list(new)
            if done is not None and not queue:
                return dtls, path, done
            if (done is not None and done.resumed and self.config.request_with_final_flight
                    and path != WELL_KNOWN_PATH
                    and loop.time() - started < FINAL_FLIGHT_WINDOW):
                # Established once our Finished is sent: it goes with the first request.
                self._final_flight = tag + b"".join(queue)
                return dtls, path, done
            if queue or (resp.payload and done is None):
                if not queue and path == WELL_KNOWN_PATH:
                    # Nothing can be pulled before the server names the session (the entry
                    # resource takes ClientHellos only): a stale or repeated answer gave the
                    # engine nothing to say, so repeat our flight; the server answers a
                    # repeat from its cache.
                    repeat_flight()
                continue  # send the rest of our flight, or pull the rest of the server's
            if not datagram:
                repeat_flight()  # we pulled and got nothing: our flight or its answer was lost

    def _hello_padding(self, dtls: DtlsSession) -> int:
        """The outer size our ClientHello requests are padded to (docs/PROTOCOL.md 3.1)."""
        if isinstance(self._credentials, RawPublicKeyCredentials):
            return self.config.pad_rpk_hello_to
        if isinstance(self._credentials, CertificateCredentials):
            if isinstance(dtls, OpenSslSession) and self._tickets.get(self.origin) is not None:
                return 0  # a resumption offer: answered in a few bytes
            return self.config.pad_hello_to
        return 0  # PSK: the server's first flight is about the ClientHello's size

    async def _send_alert(self, dtls: DtlsSession, path: tuple[str, ...], tag: bytes) -> None:
        """Tell the server (best effort) that we abandon the handshake, so it frees the slot."""
        out = b"".join(dtls.datagrams_to_send())
        if out and path != WELL_KNOWN_PATH:
            try:
                await asyncio.wait_for(self._post(Code.POST, path, tag + out),
                                       self.config.close_timeout)
            except (Layer0Error, TimeoutError):
                pass

    # ------------------------------------------------------------------ inner side

    def _invalidate(self, generation: int, error: Exception) -> None:
        if generation != self._generation or self._session is None:
            return
        session, self._session = self._session, None
        self._final_flight = b""
        self._path = WELL_KNOWN_PATH
        session.abort()
        observations = list(self._observations.values())
        self._observations.clear()
        for obs in observations:
            if obs.token in self._pending:
                continue  # its registration is in flight: that exchange resends it or fails it
            if (
                isinstance(error, SessionLost) and self.config.reregister_observations
                and obs.request is not None and not obs.cancelled and not self._closed
            ):
                self._reregister(obs, error)
            else:
                obs._end(error)

    def _reregister(self, obs: Layer0Observation, lost: SessionLost) -> None:
        """Register ``obs`` again on a new session; its next item is the fresh representation.
        Ends it with the error if that fails or the server no longer lets it be observed."""
        log.info("Layer 0 session lost (%s); registering an observation again", lost)
        obs.token = None

        async def run() -> None:
            request = obs.request
            assert request is not None
            try:
                response = await self._exchange(request, obs)
            except asyncio.CancelledError:  # the client closed meanwhile
                if not obs.cancelled:
                    obs._end(Layer0Closed("the Layer 0 client was closed") if self._closed
                             else lost)
                raise
            except Exception as exc:
                if not obs.cancelled:
                    obs._end(exc)
                return
            if obs.cancelled:
                return
            obs._restarted()
            obs._push(response)  # without Observe this ends the observation
            if response.opt.observe is not None:
                if response.code.is_successful():
                    self.reregistrations += 1
                    self._start_poller()
                else:
                    obs._end(None)

        task = asyncio.create_task(run(), name="Layer 0 re-registration")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _receive(self, payload: bytes, generation: int) -> int:
        """Feed an answer to the session and route each inner message by its token; returns
        how many authentic inner messages it carried."""
        session = self._session
        if generation != self._generation or session is None or not payload:
            return 0
        now = asyncio.get_running_loop().time()
        fast = session.receive_application_data(payload, now)  # the usual answer: one record
        if fast is None:
            session.receive_datagram(payload, now)
        delivered = sum(self._route(data) for data in fast or ())
        closed: ConnectionClosed | None = None
        while (event := session.next_event()) is not None:
            if isinstance(event, ApplicationData):
                delivered += self._route(event.data)
            elif isinstance(event, ConnectionClosed):
                closed = event
            elif isinstance(event, AlertReceived):
                log.info("Layer 0 alert from the server: %d/%d", event.level, event.description)
        if closed is not None:
            self._invalidate(generation, SessionLost(f"the server closed the session: {closed}"))
        return delivered

    def _receive_pulled(self, payload: bytes, generation: int) -> None:
        """Feed a pull's answer record by record, and remember the highest sequence number
        among the records that authenticated: the next pull acknowledges it."""
        try:
            recs = records.split_records(payload)
        except DtlsError:
            self._receive(payload, generation)  # the engine drops it
            return
        for record in recs:
            if self._receive(record, generation) and records.epoch(record):
                if generation == self._generation:
                    self._acked = max(self._acked, records.sequence_number(record))

    def _route(self, data: bytes) -> bool:
        """Hand one inner message to the request or observation its token names; False if
        it does not decode."""
        try:
            msg = inner.decode(data)
        except InnerMessageError as exc:
            log.warning("dropping an inner message the server sent: %s", exc)
            return False
        future = self._pending.get(msg.token)
        if not msg.token and future is None:
            self.folded = msg.message  # the answer to the request our ALPN offer stood for
        elif future is not None and not future.done():
            future.set_result(msg.message)
        elif msg.token in self._observations:
            self._observations[msg.token]._push(msg.message)
        else:
            log.debug("answer for a token no longer awaited")
        return True

    async def _alive(self, generation: int) -> bool:
        """Whether the server still holds the session, asked with an inner 7.02 Ping.

        The server answers every request that does not authenticate with 4.04, as it answers
        a name it does not know (docs/PROTOCOL.md 6), so after a 4.04 only an authentic 7.03
        Pong tells "our record was refused" from "the session is gone"."""
        session = self._session
        if generation != self._generation or session is None or not session.is_established:
            return False
        token = self._new_token()
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        try:
            session.send(inner.encode(token, Message(code=Code.PING)))
            resp = await self._post(Code.POST, self._path, b"".join(session.datagrams_to_send()))
            if resp.code == Code.CHANGED:
                self._receive(bytes(resp.payload), generation)
        except (OuterError, DtlsError):
            return False
        finally:
            self._pending.pop(token, None)
        if not future.done():
            return False
        if len(token) == 1:  # answered once: no other answer can carry it
            self._free_tokens.append(token)
        return future.result().code == Code.PONG

    def _new_token(self) -> bytes:
        if self._free_tokens:
            return self._free_tokens.popleft()
        n = next(self._long_tokens)
        return n.to_bytes((n.bit_length() + 7) // 8, "big")

    async def _exchange(
        self,
        message: Message,
        observation: Layer0Observation | None = None,
        token: bytes | None = None,
    ) -> Message:
        """One inner request, one inner response, with new handshakes and resends as needed."""
        idempotent = message.code in IDEMPOTENT_METHODS or self.config.resend_non_idempotent
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            may_retry = idempotent and attempt < self.config.max_attempts
            generation = await self._ensure()
            session, path = self._session, self._path
            assert session is not None
            this_token = token or self._new_token()
            future: asyncio.Future[Message] = loop.create_future()
            self._pending[this_token] = future
            if observation is not None:
                observation.token = this_token
                self._observations[this_token] = observation
            try:
                plaintext = inner.encode(this_token, message)
                if len(plaintext) > MAX_INNER:
                    raise Layer0Error(f"inner message of {len(plaintext)} bytes is too large")
                session.send(plaintext)
                datagram = b"".join(session.datagrams_to_send())
                final = self._final_flight if generation == self._generation else b""
                try:
                    resp = await self._post(Code.POST, path, final + datagram)
                except OuterError:
                    if may_retry:
                        continue
                    raise
                code = resp.code
                if code == Code.CHANGED:
                    delivered = self._receive(bytes(resp.payload), generation)
                    if final and self._final_flight is final:
                        if not delivered and not future.done():
                            # No authentic answer to our Finished and request: the server
                            # did not take the flight (altered or lost), so its half of the
                            # session never completed.
                            self._invalidate(generation, SessionLost(
                                "the server did not complete the resumed handshake"))
                            if may_retry:
                                continue
                            raise SessionLost(
                                "the server did not complete the resumed handshake that"
                                " carried this request (altered in transit); not resent")
                        self._final_flight = b""  # the server has our Finished
                    if delivered and not future.done():
                        # Authentic, but another request's answer: ours is on its way in
                        # another exchange (answers swapped in transit). Wait for it a little.
                        try:
                            await asyncio.wait_for(
                                asyncio.shield(future), self.config.misrouted_wait
                            )
                        except TimeoutError:
                            pass
                    if future.done():
                        if (
                            len(this_token) == 1 and token is None and observation is None
                            and message.opt.observe is None
                        ):  # sent once, answered once: no other answer can carry this token
                            self._free_tokens.append(this_token)
                        return future.result()
                    if resp.payload:
                        raise ResponseRejected(
                            "the answer did not authenticate or was not ours: altered or"
                            " replayed in transit"
                        )
                    raise ResponseRejected("the server's answer carried no record")
                if code == Code.NOT_FOUND:
                    if await self._alive(generation):
                        raise RecordRejected(
                            "the server did not accept our record (altered or replayed in"
                            " transit); the session is still alive"
                        )
                    self._invalidate(generation, SessionLost("the server forgot the session"))
                    if may_retry:
                        continue
                    raise SessionLost(
                        "the server does not know the session (restarted or evicted) or did not"
                        " accept our record (altered or replayed in transit); a new"
                        " handshake follows on the next request, this one was not resent"
                    )
                if code in (Code.UNAUTHORIZED, Code.BAD_REQUEST):
                    raise RecordRejected(
                        f"the server refused our record ({code}): altered or replayed in transit"
                    )
                if code == Code.FORBIDDEN:
                    self._receive(bytes(resp.payload), generation)
                    self._invalidate(generation, SessionLost("the server ended the session"))
                    raise SessionLost("the server ended the session with an alert")
                if code in _RETRYABLE_GATEWAY and may_retry:
                    continue
                raise OuterError(f"unexpected outer answer {code}")
            except BaseException:
                if observation is not None:
                    self._observations.pop(this_token, None)
                raise
            finally:
                self._pending.pop(this_token, None)

    async def _blockwise(self, message: Message, observation: Layer0Observation | None) -> Message:
        for number in OUTER_ONLY_OPTIONS:
            message.opt.delete_option(number)
        payload = bytes(message.payload)
        if len(payload) > INNER_BLOCK_SIZE:
            number = 0
            while True:
                chunk = payload[number * INNER_BLOCK_SIZE : (number + 1) * INNER_BLOCK_SIZE]
                more = (number + 1) * INNER_BLOCK_SIZE < len(payload)
                block = message.copy(
                    payload=chunk,
                    block1=BlockOption.BlockwiseTuple(number, more, INNER_BLOCK_SZX),
                    observe=None,
                )
                if number == 0:
                    block.opt.size1 = len(payload)
                response = await self._exchange(block)
                if not more or response.code != Code.CONTINUE:
                    break
                b1 = response.opt.block1
                if b1 is None or b1.block_number != number:
                    raise Layer0Error("the server answered the wrong inner block")
                number += 1
        else:
            if observation is not None:
                observation.request = message
            response = await self._exchange(message, observation)
            if observation is not None:
                if response.opt.observe is None or not response.code.is_successful():
                    observation._end(None)
                else:
                    self._start_poller()
        return await self._complete_block2(message, response)

    async def _complete_block2(self, request: Message, response: Message) -> Message:
        b2 = response.opt.block2
        if b2 is None or not b2.more:
            return response
        if b2.block_number != 0:
            raise Layer0Error("inner block-wise answer did not start with block 0")
        body = bytearray(response.payload)
        number, szx = 0, b2.size_exponent
        while True:
            follow = request.copy(
                payload=b"",
                observe=None,
                block1=None,
                block2=BlockOption.BlockwiseTuple(number + 1, False, szx),
            )
            part = await self._exchange(follow)
            p2 = part.opt.block2
            if not part.code.is_successful() or p2 is None or p2.block_number != number + 1:
                raise Layer0Error(f"inner block-wise transfer broke off ({part.code})")
            body += part.payload
            number += 1
            if not p2.more:
                break
        response.payload = bytes(body)
        response.opt.block2 = None
        return response

    # ------------------------------------------------------------------ Observe

    def _start_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_loop(), name="Layer 0 poller")

    async def _poll_loop(self) -> None:
        """Long-poll with pulls while observations are active (see module doc)."""
        failures = 0
        while self._observations and not self._closed:
            generation, session = self._generation, self._session
            if session is None or not session.is_established:
                break
            try:
                session.send(pull_message(self._acked))
            except DtlsError:  # the session ended meanwhile
                break
            pull = b"".join(session.datagrams_to_send())
            try:
                resp = await self._post(Code.POST, self._path, pull)
            except OuterError as exc:
                failures += 1
                if failures >= self.config.max_attempts:
                    for obs in list(self._observations.values()):
                        obs._end(exc)
                    break
                # A refusal (ICMP port unreachable: a server restarting) fails at once; without
                # a pause the attempts would be spent before the server is back.
                await asyncio.sleep(self.config.poll_pause)
                continue
            failures = 0
            if resp.code == Code.CHANGED:
                if resp.payload:
                    self._receive_pulled(bytes(resp.payload), generation)
                else:
                    await asyncio.sleep(self.config.poll_pause)
            elif resp.code == Code.NOT_FOUND:
                if not await self._alive(generation):
                    self._invalidate(generation, SessionLost("the server forgot the session"))
            else:
                failures += 1
                await asyncio.sleep(self.config.poll_pause)

    def _deregister(self, token: bytes, original: Message | None) -> None:
        """Tell the server an observation ended (RFC 7641 Observe: 1 with the same token)."""

        async def send() -> None:
            message = original.copy(observe=1) if original else Message(code=Code.GET, observe=1)
            try:
                await self._exchange(message, token=token)
            except Layer0Error:
                pass

        if self._session is not None and not self._closed:
            task = asyncio.create_task(send(), name="Layer 0 deregistration")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _refused(exc: OuterError) -> bool:
    """An outer exchange that failed at once (an ICMP error), not by a timeout."""
    cause = exc.__cause__
    if isinstance(cause, TimeoutError | aiocoap.error.TimeoutError):
        return False
    return isinstance(cause, OSError | aiocoap.error.NetworkError)


def _closing_error(dtls: DtlsSession) -> DtlsError | None:
    while (event := dtls.next_event()) is not None:
        if isinstance(event, ConnectionClosed):
            return event.error
    return dtls.close_error
