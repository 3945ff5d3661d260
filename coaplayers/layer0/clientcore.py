"""The Layer 0 client's state machine, without sockets, event loop or clock (sans-I/O).

:class:`Layer0ClientCore` is the client-side counterpart of :class:`~.core.Layer0ServerCore`.
Like the DTLS engine under it, it is driven by exactly three things:

* application calls: :meth:`Layer0ClientCore.request`, :meth:`Layer0ClientCore.connect`,
  :meth:`Layer0ClientCore.cancel_observation`, :meth:`Layer0ClientCore.close`;
* the outcome of the outer exchanges it asked for: :meth:`Layer0ClientCore.outer_answer` (a CoAP
  answer, reduced to code, payload and Location-Path) or :meth:`Layer0ClientCore.outer_failed`;
* time: every input takes ``now``; :meth:`Layer0ClientCore.get_timer` says when
  :meth:`Layer0ClientCore.handle_timer` must run next.

After each input the owner collects :meth:`Layer0ClientCore.outer_requests_to_send` (each to be sent
as one outer CoAP request, its outcome reported under its ``xid``),
:meth:`Layer0ClientCore.exchanges_to_cancel` (exchanges nobody waits for any more) and
:meth:`Layer0ClientCore.next_event` until it returns ``None``. The asyncio shell around it is
:class:`~.client.Layer0Client`; tests drive it against a :class:`~.core.Layer0ServerCore` in memory.

Every bound is the core's: the handshake timeout, the bound on one outer exchange, the pauses
between polls and after a refused exchange, the wait for an answer that a middle box swapped
into another exchange, the bound on closing. The shell only moves bytes and sleeps until the
next timer.

Why operations are generators: a request is a sequence of steps (wait for the session, one outer
exchange, perhaps a Ping to tell a refused record from a lost session, a new handshake, a
resend, the next inner block), and several run at once (requests, the Observe poller,
re-registrations, the handshake they share). Each operation is written as a generator that
yields what it waits for (an outer exchange, a deadline, the session, a routed answer) and is
resumed with the outcome, so the steps read in protocol order; the core resumes it only from
its inputs, so a test decides every interleaving and every instant.

Why the engine's own retransmission timer is not used: every client flight rides an outer
confirmable exchange, which CoAP repeats on each hop; a whole exchange that fails makes the
core send the flight again in a new one, and the server answers a repeat from its cache.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.optiontypes import BlockOption
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
    ProtocolViolation,
    PskClientCredentials,
    RawPublicKeyContext,
    RawPublicKeyCredentials,
    TicketStore,
    TinyDtlsSession,
    build_context,
    records,
)
from ..dtls.openssl import build_psk_context
from ..message import copy_request
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
    IDEMPOTENT_METHODS,
    INNER_BLOCK_SIZE,
    INNER_BLOCK_SZX,
    MAX_INNER,
    MAX_LOCATION_SEGMENTS,
    OUTER_ONLY_OPTIONS,
    WELL_KNOWN_PATH,
    handshake_tag,
    layer0_config,
    pull_message,
)

__all__ = [
    "ClientCredentials",
    "Closed",
    "Connected",
    "Event",
    "HandshakeDone",
    "Layer0ClientCore",
    "Layer0Config",
    "Notification",
    "ObservationEnded",
    "OuterAnswer",
    "OuterRequest",
    "RequestFailed",
    "ResponseReceived",
]

log = logging.getLogger(__name__)

ClientCredentials = PskClientCredentials | CertificateCredentials | RawPublicKeyCredentials

REFUSED_PAUSE = 0.1
"""Seconds before the first repeat of a flight whose exchange was refused (doubling after)."""

FINAL_FLIGHT_WINDOW = 10.0
"""Seconds after its ClientHello within which a resumed handshake's last flight may wait for
the first request. Later (answers were lost and retransmitted), the server's half-open session
may be near its handshake timeout (30 s by default): the flight then goes alone, so that a 4.04
restarts the handshake instead of failing a request that travelled with it."""

_RETRYABLE_GATEWAY = (Code.BAD_GATEWAY, Code.GATEWAY_TIMEOUT)


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
    handshake_attempts: int = 3
    """How often one handshake may start from the beginning with a fresh ClientHello: after
    the server dropped its half-open session (4.04), or answered our cookie-bearing
    ClientHello with a new HelloVerifyRequest (our requests reached it from another address,
    docs/PROTOCOL.md 3.1). All within ``handshake_timeout``."""
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
    """The client's last handshake flight goes out with the first protected request, in one
    outer exchange (docs/PROTOCOL.md 3.3), saving a round trip: after a resumed handshake (the
    client is established once it has sent its Finished), and after a full one with
    certificates or raw public keys (RFC 7918 False Start: ECDHE and an AEAD suite, the
    server's certificate or key checked first; a PSK handshake has no forward secrecy and
    sends its flight alone)."""
    resend_non_idempotent: bool = False
    """Resend POST/PATCH automatically after the server forgot the session (:mod:`.client`
    says why)."""
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
        if self.max_attempts < 1 or self.handshake_attempts < 1 or self.max_flight_repeats < 0:
            raise ValueError("max_attempts and handshake_attempts must be >= 1 and"
                             " max_flight_repeats >= 0")
        if not 0 <= self.pad_hello_to <= 1024 or not 0 <= self.pad_rpk_hello_to <= 1024:
            raise ValueError("ClientHello padding must be within 0..1024 bytes")
        for name in ("handshake_timeout", "exchange_timeout", "close_timeout", "misrouted_wait"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


# ----------------------------------------------------------------------- outer side


@dataclass(frozen=True)
class OuterRequest:
    """One outer CoAP request for the shell to send: POST (or DELETE) ``payload`` to the
    origin's ``path``; a certificate client's cookie-bearing ClientHello asks for padding up
    to ``pad_to`` bytes (0: none). Its outcome goes back under ``xid``."""

    xid: int
    code: Code
    path: tuple[str, ...]
    payload: bytes
    pad_to: int = 0


@dataclass(frozen=True)
class OuterAnswer:
    """An outer CoAP answer as the core needs it (the shell refuses one that came in blocks)."""

    code: Code
    payload: bytes = b""
    location: tuple[str, ...] = ()


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class ResponseReceived:
    """The authentic inner response to application request ``request``."""

    request: int
    response: Message


@dataclass(frozen=True)
class RequestFailed:
    """Request ``request`` (or :meth:`Layer0ClientCore.connect`) failed with ``error``."""

    request: int
    error: Exception


@dataclass(frozen=True)
class Connected:
    """:meth:`Layer0ClientCore.connect` ``request`` is done: the session is established."""

    request: int
    handshake: HandshakeComplete


@dataclass(frozen=True)
class Notification:
    """A fresh notification of the observation that request ``request`` registered."""

    request: int
    message: Message


@dataclass(frozen=True)
class ObservationEnded:
    """The observation of request ``request`` ended: ``error`` is ``None`` after a cancel or a
    final notification, else the Layer 0 error that ended it."""

    request: int
    error: Exception | None


@dataclass(frozen=True)
class HandshakeDone:
    """A handshake (full or resumed) completed; the OSCORE mode keys from such a session."""

    handshake: HandshakeComplete


@dataclass(frozen=True)
class Closed:
    """:meth:`Layer0ClientCore.close` is done (close_notify sent or given up)."""


Event: TypeAlias = (ResponseReceived | RequestFailed | Connected | Notification
                    | ObservationEnded | HandshakeDone | Closed)


# ------------------------------------------------------------ what operations wait for


@dataclass(frozen=True)
class _Post:
    code: Code
    path: tuple[str, ...]
    payload: bytes
    pad_to: int = 0
    until: float | None = None  # a tighter bound than the exchange timeout


@dataclass(frozen=True)
class _Failed:
    error: OuterError
    refused: bool


@dataclass(frozen=True)
class _Sleep:
    until: float


@dataclass(frozen=True)
class _AwaitSession:
    carry: bool = True  # a request waits to travel with our last flight (False Start)


@dataclass(frozen=True)
class _AwaitFinal:
    """Another request carries our held last flight: wait for its answer."""

    until: float


@dataclass(eq=False)
class _Slot:
    """Where the inner answer carrying one token lands, and who waits for it."""

    message: Message | None = None
    waiter: _Op | None = None


@dataclass(frozen=True)
class _AwaitAnswer:
    slot: _Slot
    until: float


_Need: TypeAlias = _Post | _Sleep | _AwaitSession | _AwaitAnswer | _AwaitFinal
T = TypeVar("T")
_Gen: TypeAlias = Generator[_Need, object, T]


class _Restart(Exception):
    """Start the handshake from the beginning with a fresh engine; the message is the error
    should every attempt end so."""


@dataclass(eq=False)
class _Op:
    """One running operation: its generator, what it waits for, and how it reports."""

    gen: _Gen[object]
    done: Callable[[object, Exception | None], None]
    name: str
    need: _Need | None = None
    xid: int | None = None
    wait_until: float | None = None
    deadline: float | None = None  # of the whole operation: TimeoutError is thrown in


@dataclass(eq=False)
class _Observation:
    rid: int
    request: Message | None = None
    token: bytes | None = None
    cancelled: bool = False
    ended: bool = False
    last: tuple[int, float] | None = None  # Observe number and time of the newest notification


def _kind(credentials: ClientCredentials) -> str:
    if isinstance(credentials, PskClientCredentials):
        return "psk"
    if isinstance(credentials, RawPublicKeyCredentials):
        return "rpk"
    return "certificate"


class Layer0ClientCore:
    """The Layer 0 client of one origin, sans-I/O (see the module docstring).

    ``origin`` names the server for resumption tickets and messages; ``first_hop`` (the proxy's
    URI, or the origin) only for messages. ``new_engine`` replaces the engine factory (tests).
    """

    def __init__(
        self,
        origin: str,
        credentials: ClientCredentials,
        config: Layer0Config | None = None,
        *,
        first_hop: str | None = None,
        tickets: TicketStore | None = None,
        ssl_context: SSL.Context | None = None,
        exporter: bool = False,
        new_engine: Callable[[], DtlsSession] | None = None,
    ) -> None:
        self.origin = origin
        self.config = config or Layer0Config()
        self._first_hop = first_hop or origin
        self._credentials = credentials
        self._ssl_context = ssl_context
        self._rpk_context: RawPublicKeyContext | None = None
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
        self.kind = _kind(credentials)
        """The credential kind of the end-to-end sessions: ``psk``, ``certificate`` or ``rpk``."""
        self._new_engine_hook = new_engine
        self._tickets = tickets if tickets is not None else TicketStore()
        self._now = 0.0
        # session state
        self._session: DtlsSession | None = None
        self._final_flight = b""  # handshake tag + our last flight, held for the first request
        self._carrying = False  # a request's exchange carries it now
        self._final_waiters: list[_Op] = []  # requests waiting for that exchange to end
        self._path: tuple[str, ...] = WELL_KNOWN_PATH
        self._acked = -1  # highest record sequence number of the session's pull answers
        self._generation = 0
        self._outer_answers = 0  # CoAP answers in the current handshake attempt
        self._pending: dict[bytes, _Slot] = {}
        self._observations: dict[bytes, _Observation] = {}
        self._obs_by_rid: dict[int, _Observation] = {}
        # Inner tokens: 1-byte ones from this pool, each back in it once its request had its
        # one answer; longer counted ones only while all 256 are taken (docs/PROTOCOL.md 4.1).
        self._free_tokens: deque[bytes] = deque(bytes([i]) for i in range(256))
        self._long_tokens = itertools.count(256)
        self._closed = False
        # operations and their I/O
        self._ops: set[_Op] = set()
        self._ready: deque[tuple[_Op, object, BaseException | None]] = deque()
        self._exchanges: dict[int, _Op] = {}
        self._xids = itertools.count(1)
        self._rids = itertools.count(1)
        self._outbox: list[OuterRequest] = []
        self._cancelled: list[int] = []
        self._events: deque[Event] = deque()
        self._handshake_op: _Op | None = None
        self._session_waiters: list[_Op] = []
        self._poller: _Op | None = None
        self.handshakes = 0
        """Completed handshakes (full or resumed) over the client's life."""
        self.reregistrations = 0
        """Observations registered again after the server lost their session."""
        self.last_handshake: HandshakeComplete | None = None
        self.alpn: bytes | None = None
        """An ALPN protocol (RFC 7301) to offer in the next handshakes (every backend but
        tinydtls). A server that agrees answers the request it stands for with its last flight and
        ends the session (Layer0Site.fold): the OSCORE mode's keying (docs/OSCORE-KEYING.md 9.1)."""
        self.folded: Message | None = None
        """That answer (the server's inner message with the empty token), from the last
        handshake; ``None`` if it carried none."""
        self._early: list[bytes] = []  # application data that came with the server's Finished
        self.false_start: str | None = None
        """How the last full handshake ended: ``yes`` (our first request went with our
        Finished, RFC 7918), or why not (the engine's reason, e.g. a suite without forward
        secrecy); ``None`` after a resumption or before any handshake."""

    # ------------------------------------------------------------------ application

    def request(self, message: Message, now: float) -> int:
        """Start an inner request (a copy of ``message`` is sent); returns its id, which its
        :class:`ResponseReceived` or :class:`RequestFailed` and, for an Observe registration,
        its :class:`Notification` and :class:`ObservationEnded` events carry."""
        if self._closed:
            raise Layer0Closed("the Layer 0 client is closed")
        self._now = now
        rid = next(self._rids)
        message = copy_request(message)
        obs = _Observation(rid) if message.opt.observe == 0 else None
        if obs is not None:
            self._obs_by_rid[rid] = obs

        def done(result: object, error: Exception | None) -> None:
            if error is None:
                self._events.append(ResponseReceived(rid, result))
                return
            self._events.append(RequestFailed(rid, error))
            if obs is not None and not obs.cancelled:
                self._end(obs, error)

        self._start(self._blockwise(message, obs), done, "request")
        self._run_ready()
        return rid

    def connect(self, now: float) -> int:
        """Handshake now rather than on the first request: :class:`Connected` or
        :class:`RequestFailed` follows with the returned id."""
        if self._closed:
            raise Layer0Closed("the Layer 0 client is closed")
        self._now = now
        rid = next(self._rids)

        def run() -> _Gen[HandshakeComplete]:
            yield from self._ensure(carry=False)
            yield from self._flush_final_flight()
            if self._carrying:  # a request carries our last flight (False Start): its answer
                yield _AwaitFinal(self._now + self.config.exchange_timeout)
            if not self.established or self.last_handshake is None:
                raise HandshakeFailed("the server did not complete the handshake")
            return self.last_handshake

        def done(result: object, error: Exception | None) -> None:
            if error is not None:
                self._events.append(RequestFailed(rid, error))
            else:
                assert isinstance(result, HandshakeComplete)
                self._events.append(Connected(rid, result))

        self._start(run(), done, "connect")
        self._run_ready()
        return rid

    def cancel_observation(self, request: int, now: float) -> None:
        """Stop observing; the server is told with an Observe: 1 request (best effort)."""
        obs = self._obs_by_rid.get(request)
        if obs is None or obs.cancelled:
            return
        self._now = now
        obs.cancelled = True
        token = obs.token
        self._end(obs, None)
        if token is not None and self._session is not None and not self._closed:
            original = obs.request
            message = original.copy(observe=1) if original else Message(code=Code.GET, observe=1)

            def run() -> _Gen[None]:
                try:
                    yield from self._exchange(message, token=token)
                except Layer0Error:
                    pass

            self._start(run(), _ignore, "deregistration")
        self._run_ready()

    def forget_session(self) -> None:
        """Drop the session locally without telling the server (tests, key rollover)."""
        self._invalidate(self._generation, SessionLost("session dropped by the application"))
        self._run_ready()

    def close(self, now: float) -> None:
        """End the session with close_notify (DELETE), stop polling and fail what is pending;
        :class:`Closed` follows."""
        if self._closed:
            return
        self._now = now
        self._closed = True
        if self._poller is not None:
            self._cancel(self._poller)

        def run() -> _Gen[None]:
            until = self._now + self.config.close_timeout
            yield from self._flush_final_flight(until)
            session, path = self._session, self._path
            datagram = b""
            if session is not None and session.is_established:
                session.close()
                datagram = b"".join(session.datagrams_to_send())
            self._invalidate(self._generation, Layer0Closed("the Layer 0 client was closed"))
            for op in list(self._ops):
                if op is not this:
                    self._cancel(op)
            if datagram:
                yield from self._post(Code.DELETE, path, datagram,
                                      until=self._now + self.config.close_timeout)

        def done(result: object, error: Exception | None) -> None:
            if error is not None:
                log.debug("closing the Layer 0 client: %s", error)
            self._events.append(Closed())

        this = self._start(run(), done, "close")
        self._run_ready()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def established(self) -> bool:
        return self._session is not None and self._session.is_established

    @property
    def agreed_alpn(self) -> bytes | None:
        """The ALPN protocol the current session's handshake agreed on (see :attr:`alpn`)."""
        alpn = getattr(self._session, "alpn", None)
        return alpn if isinstance(alpn, bytes) else None

    @property
    def session_path(self) -> tuple[str, ...] | None:
        return self._path if self.established else None

    def export_keying_material(
        self, label: bytes, length: int, context: bytes | None = None
    ) -> bytes:
        """RFC 5705 exporter of the current session (OpenSSL and GnuTLS backends)."""
        if self._session is None or not self._session.is_established:
            raise SessionLost("no established session")
        return self._session.export_keying_material(label, length, context)

    # -------------------------------------------------------------- outer exchanges

    def outer_requests_to_send(self) -> list[OuterRequest]:
        out, self._outbox = self._outbox, []
        return out

    def exchanges_to_cancel(self) -> list[int]:
        """Exchanges whose outcome nobody waits for any more (timed out, or their operation
        ended): the shell may stop them; an outcome reported later is ignored."""
        out, self._cancelled = self._cancelled, []
        return out

    def outer_answer(self, xid: int, answer: OuterAnswer, now: float) -> None:
        self._now = now
        op = self._exchanges.pop(xid, None)  # answered: nothing to cancel
        if op is not None:
            self._resume(op, answer)
            self._run_ready()

    def outer_failed(self, xid: int, error: OuterError, now: float, *,
                     refused: bool = False) -> None:
        """The exchange failed; ``refused``: at once (an ICMP error), not by a timeout."""
        self._now = now
        op = self._exchanges.pop(xid, None)
        if op is not None:
            self._resume(op, _Failed(error, refused))
            self._run_ready()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------------ time

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next, or ``None``."""
        soonest: float | None = None
        for op in self._ops:
            for t in (op.wait_until, op.deadline):
                if t is not None and (soonest is None or t < soonest):
                    soonest = t
        return soonest

    def handle_timer(self, now: float) -> None:
        self._now = now
        for op in list(self._ops):
            if op.need is None:
                continue  # ready to run already
            if op.deadline is not None and now >= op.deadline:
                op.deadline = None
                self._resume(op, error=TimeoutError())
            elif op.wait_until is not None and now >= op.wait_until:
                need = op.need
                if isinstance(need, _Post):
                    bound = self.config.exchange_timeout
                    self._resume(op, _Failed(
                        OuterError(f"outer exchange failed: no answer within {bound:g} s"),
                        refused=False))
                else:
                    self._resume(op, None)
        self._run_ready()

    # ------------------------------------------------------------ operation runner

    def _start(self, gen: _Gen[Any], done: Callable[[object, Exception | None], None],
               name: str, deadline: float | None = None) -> _Op:
        op = _Op(gen, done, name, deadline=deadline)
        self._ops.add(op)
        self._ready.append((op, None, None))
        return op

    def _park(self, op: _Op, need: _Need) -> None:
        op.need = need
        if isinstance(need, _Post):
            xid = next(self._xids)
            op.xid = xid
            self._exchanges[xid] = op
            until = self._now + self.config.exchange_timeout
            op.wait_until = until if need.until is None else min(until, need.until)
            self._outbox.append(OuterRequest(xid, need.code, need.path, need.payload,
                                             need.pad_to))
        elif isinstance(need, _Sleep):
            op.wait_until = need.until
        elif isinstance(need, _AwaitSession):
            if self._closed:
                self._resume(op, error=Layer0Closed("the Layer 0 client is closed"))
            elif self._usable():
                self._resume(op, self._generation)
            else:
                self._session_waiters.append(op)
                if self._handshake_op is None:
                    self._handshake_op = self._start(
                        self._handshake(need.carry), self._handshake_done, "handshake",
                        deadline=self._now + self.config.handshake_timeout)
        elif isinstance(need, _AwaitFinal):
            if not self._carrying:
                self._resume(op, None)
            else:
                self._final_waiters.append(op)
                op.wait_until = need.until
        else:
            if need.slot.message is not None:
                self._resume(op, None)
            else:
                need.slot.waiter = op
                op.wait_until = need.until

    def _unpark(self, op: _Op) -> None:
        need, op.need = op.need, None
        op.wait_until = None
        if op.xid is not None:
            xid, op.xid = op.xid, None
            if self._exchanges.pop(xid, None) is not None:  # still out: nobody waits for it
                self._cancelled.append(xid)
        if isinstance(need, _AwaitSession) and op in self._session_waiters:
            self._session_waiters.remove(op)
        if isinstance(need, _AwaitFinal) and op in self._final_waiters:
            self._final_waiters.remove(op)
        if isinstance(need, _AwaitAnswer) and need.slot.waiter is op:
            need.slot.waiter = None

    def _resume(self, op: _Op, value: object = None, error: BaseException | None = None) -> None:
        """Make ``op`` continue with ``value`` (or ``error`` thrown in) at the next run."""
        if op.need is None:
            return  # already resumed
        self._unpark(op)
        self._ready.append((op, value, error))

    def _run_ready(self) -> None:
        while self._ready:
            op, value, error = self._ready.popleft()
            if op not in self._ops:
                continue
            try:
                need = op.gen.throw(error) if error is not None else op.gen.send(value)
            except StopIteration as stop:
                self._finish(op, stop.value, None)
            except Exception as exc:
                self._finish(op, None, exc)
            else:
                self._park(op, need)

    def _finish(self, op: _Op, result: object, error: Exception | None) -> None:
        self._ops.discard(op)
        try:
            op.done(result, error)
        except Exception:  # a bug here must not leave the other operations waiting forever
            log.exception("Layer 0 client: reporting the end of %s failed", op.name)

    def _cancel(self, op: _Op) -> None:
        """End ``op`` where it waits (its ``finally`` blocks run); it reports Layer0Closed."""
        if op not in self._ops:
            return
        self._unpark(op)
        try:
            op.gen.close()  # runs its finally blocks (frees a half-done engine)
        except Exception:
            log.exception("Layer 0 client: ending %s failed", op.name)
        self._finish(op, None, Layer0Closed("the Layer 0 client was closed"))

    # ------------------------------------------------------------ steps operations use

    def _post(self, code: Code, path: tuple[str, ...], payload: bytes, pad_to: int = 0,
              until: float | None = None) -> _Gen[OuterAnswer | _Failed]:
        result = yield _Post(code, path, payload, pad_to, until)
        assert isinstance(result, OuterAnswer | _Failed)
        return result

    def _sleep(self, seconds: float) -> _Gen[None]:
        yield _Sleep(self._now + seconds)

    def _usable(self) -> bool:
        """Our session may carry requests: established, or false-started (RFC 7918)."""
        session = self._session
        return session is not None and (session.is_established or session.false_started)

    def _ensure(self, *, carry: bool = True) -> _Gen[int]:
        """The generation of a session to send on, after a handshake if needed (one at a
        time: every operation that needs the session waits for the same one). ``carry``: a
        request waits to travel with our last flight, so the handshake may false-start (it is
        then completed by the answer to that request, :meth:`_completed`)."""
        if self._closed:
            raise Layer0Closed("the Layer 0 client is closed")
        if self._usable():
            return self._generation
        generation = yield _AwaitSession(carry)
        assert isinstance(generation, int)
        return generation

    def _flush_final_flight(self, until: float | None = None) -> _Gen[None]:
        """Send a held final flight on its own (no request came to carry it); if that fails,
        the next request repeats it (the server answers a repeat alike)."""
        final, self._final_flight = self._final_flight, b""
        if final:
            generation = self._generation
            result = yield from self._post(Code.POST, self._path, final, until=until)
            if isinstance(result, _Failed):
                if generation == self._generation and self._session is not None:
                    self._final_flight = final
                return
            if result.code == Code.CHANGED:  # a folded answer (see alpn), or after a False
                self._receive(result.payload, generation)  # Start the server's Finished
            session = self._session
            if generation == self._generation and session is not None and session.false_started:
                # The server's Finished did not come: without it nothing can be trusted.
                self._invalidate(generation, SessionLost(
                    "the server did not complete the handshake"))

    def _final_ended(self) -> None:
        """The exchange that carried our last flight ended: who waited for it looks again."""
        self._carrying = False
        waiters, self._final_waiters = self._final_waiters, []
        for op in waiters:
            self._resume(op, None)

    # ------------------------------------------------------------------ handshake

    def _new_engine(self) -> DtlsSession:
        if self._new_engine_hook is not None:
            return self._new_engine_hook()
        config = layer0_config(self.config.handshake_timeout, client=True)
        if isinstance(self._credentials, PskClientCredentials):
            if self._ssl_context is not None:
                return OpenSslPskClientSession.psk_client(
                    self._ssl_context, self._credentials, config, alpn=self.alpn)
            return TinyDtlsSession.client(self._credentials, config)
        if isinstance(self._credentials, RawPublicKeyCredentials):
            assert self._rpk_context is not None
            return GnuTlsSession.client(self._rpk_context, config, alpn=self.alpn)
        assert self._ssl_context is not None
        return OpenSslSession.client(
            self._ssl_context,
            self._credentials,
            config,
            resume=self._tickets.get(self.origin),
            alpn=self.alpn,
        )

    def _handshake_done(self, result: object, error: Exception | None) -> None:
        self._handshake_op = None
        waiters, self._session_waiters = self._session_waiters, []
        if error is not None:
            if not isinstance(error, NoAnswer | Layer0Closed):
                # A session that did not lead to a handshake is not offered again (a kept
                # one, coaplayers.layer0.resumption, included).
                self._tickets.forget(self.origin)
            for op in waiters:
                self._resume(op, error=error)
            return
        assert isinstance(result, tuple)
        session, path, event = result
        self._session, self._path = session, path
        self._acked = -1
        self._generation += 1
        if event is None:
            log.info("Layer 0 handshake: our first request goes with our Finished"
                     " (False Start, RFC 7918)")
        else:
            self._completed(session, event)
        for op in waiters:
            self._resume(op, self._generation)

    def _completed(self, session: DtlsSession, event: HandshakeComplete) -> None:
        """The handshake of the current session completed (at once, or with the answer to
        the request that carried our Finished after a False Start)."""
        self.handshakes += 1
        self.last_handshake = event
        if not event.resumed and self.false_start is None:
            self.false_start = session.false_start_refused or (
                f"{event.cipher_suite} has no forward-secret key exchange (RFC 7918 section 3)"
                if isinstance(session, TinyDtlsSession) else "no request waited for it")
        if isinstance(session, OpenSslSession) and session.resumption_state is not None:
            self._tickets.put(self.origin, session.resumption_state)
        log.info("Layer 0 session established (resumed=%s)", event.resumed)
        early, self._early = self._early, []
        for data in early:  # the server's answers that rode its last flight
            self._route(data)
        self._events.append(HandshakeDone(event))

    def _handshake(self, carry: bool = False
                   ) -> _Gen[tuple[DtlsSession, tuple[str, ...], HandshakeComplete | None]]:
        """One handshake (up to ``handshake_attempts`` if the server drops it or asks for a
        new cookie) within the timeout (the operation's deadline throws TimeoutError in);
        ``None``: false-started (see :meth:`_ensure`)."""
        self._outer_answers = 0
        self.folded, self._early = None, []
        self.false_start = None
        try:
            reason = ""
            for _ in range(self.config.handshake_attempts):
                try:
                    return (yield from self._handshake_once(carry))
                except _Restart as restart:
                    reason = str(restart)
                    log.info("Layer 0 handshake starts over: %s", reason)
            raise HandshakeFailed(reason)
        except TimeoutError as exc:
            if not self._outer_answers:
                # Not one CoAP answer (a CON's ACK alone does not count): nothing is
                # listening there, or everything is lost; not a key problem.
                raise NoAnswer(
                    f"no answer from {self._first_hop} within"
                    f" {self.config.handshake_timeout:g} s"
                ) from exc
            raise HandshakeFailed(
                f"no Layer 0 handshake within {self.config.handshake_timeout:g} s: the path"
                " loses too much, or (with PSK) the key is wrong, which looks the same"
            ) from exc

    def _handshake_once(self, carry: bool = False
                        ) -> _Gen[tuple[DtlsSession, tuple[str, ...], HandshakeComplete | None]]:
        dtls = self._new_engine()
        self._early = []
        try:
            return (yield from self._drive_handshake(dtls, carry))
        except BaseException:
            # Free the engine now, also when cancelled (timeout): a tinydtls session left to
            # the garbage collector in mid-handshake has crashed DTLSSocket at exit.
            dtls.abort()
            raise

    def _drive_handshake(
        self, dtls: DtlsSession, carry: bool = False
    ) -> _Gen[tuple[DtlsSession, tuple[str, ...], HandshakeComplete | None]]:
        dtls.connect(self._now)
        path: tuple[str, ...] = WELL_KNOWN_PATH
        tag = b""  # the handshake tag, from the 2.01: it starts every request to the session
        queue = dtls.datagrams_to_send()
        flight = list(queue)
        started = self._now  # the server cannot have made the session before this
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
            result = yield from self._post(Code.POST, path, tag + datagram, pad)
            if isinstance(result, _Failed):
                if done is not None or datagram:
                    queue.insert(0, datagram)
                repeats += 1
                if repeats > self.config.max_flight_repeats:
                    raise result.error
                if result.refused:
                    # Refused at once (an ICMP error, possibly one queued on the shared socket
                    # for another destination): repeat after a growing pause, not at once.
                    yield from self._sleep(REFUSED_PAUSE * 2 ** (repeats - 1))
                continue
            self._outer_answers += 1
            code = result.code
            log.debug(
                "handshake %x: sent %d bytes to %s, got %s with %d bytes",
                id(dtls) & 0xFFFF, len(datagram), "/".join(path), code, len(result.payload),
            )
            if code == Code.CREATED:
                location = result.location
                if (
                    not 1 <= len(location) <= MAX_LOCATION_SEGMENTS
                    or location == WELL_KNOWN_PATH
                    or not all(0 < len(seg.encode()) <= 255 for seg in location)
                ):
                    raise HandshakeFailed(f"server named the session oddly: {location!r}")
                created_tag = handshake_tag(result.payload)
                if created_tag is None:
                    raise HandshakeFailed("the server created the session without a ServerHello")
                path, tag = location, created_tag
            elif code == Code.SERVICE_UNAVAILABLE:
                raise ServerBusy(_busy(result.payload))
            elif code == Code.NOT_FOUND and path != WELL_KNOWN_PATH:
                raise _Restart("the server kept dropping our handshake")
            elif code == Code.FORBIDDEN:
                if not _holds_alert(result.payload):
                    raise HandshakeFailed(_refused_on_the_way(result.payload))
                dtls.receive_datagram(result.payload, self._now)
                raise HandshakeFailed("the server refused the handshake") from _closing_error(dtls)
            elif code != Code.CHANGED:
                raise HandshakeFailed(f"unexpected outer answer {code} during the handshake")
            if result.payload:
                heard_server = True
                dtls.receive_datagram(result.payload, self._now)
            while (event := dtls.next_event()) is not None:
                if isinstance(event, HandshakeComplete):
                    done = event
                elif isinstance(event, ApplicationData) and done is not None:
                    self._early.append(event.data)  # routed once the session is ours
                elif isinstance(event, ConnectionClosed):
                    yield from self._send_alert(dtls, path, tag)
                    raise HandshakeFailed(f"Layer 0 handshake failed: {event.error}") from (
                        event.error
                    )
            new = dtls.datagrams_to_send()
            if path == WELL_KNOWN_PATH and _new_cookie_asked(datagram, result.payload, new):
                # Our cookie no longer matched (the request came from another outer address
                # than the first ClientHello: a middle box sending from several sockets, a NAT
                # rebinding; or the server changed its secret). No engine takes a second
                # HelloVerifyRequest (its message_seq is that of the first), and the cookie is
                # bound to this ClientHello's random: start over with a fresh one (3.1).
                raise _Restart(
                    "the server asked for a new cookie on every attempt: our requests reach it"
                    " from changing addresses (a middle box that sends from several sockets or"
                    " rebinds), or it keeps changing its cookie secret")
            if new:
                queue.extend(new)
                flight = list(new)
            if done is not None and not queue:
                return dtls, path, done
            if (done is not None and done.resumed and self.config.request_with_final_flight
                    and path != WELL_KNOWN_PATH
                    and self._now - started < FINAL_FLIGHT_WINDOW):
                # Established once our Finished is sent: it goes with the first request.
                self._final_flight = tag + b"".join(queue)
                return dtls, path, done
            if (done is None and carry and dtls.false_started and len(queue) == 1
                    and self.config.request_with_final_flight and path != WELL_KNOWN_PATH
                    and self._now - started < FINAL_FLIGHT_WINDOW):
                # False Start (RFC 7918; the engine checked its conditions): the last datagram
                # of our last flight goes with the first request, whose answer brings the
                # server's Finished (3.3).
                self._final_flight = tag + queue[0]
                self.false_start = "yes"
                return dtls, path, None
            if done is None and dtls.false_start_refused and len(queue) == 1:
                self.false_start = dtls.false_start_refused
                log.info("Layer 0: no False Start: %s", dtls.false_start_refused)
            if queue or (result.payload and done is None):
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

    def _send_alert(self, dtls: DtlsSession, path: tuple[str, ...], tag: bytes) -> _Gen[None]:
        """Tell the server (best effort) that we abandon the handshake, so it frees the slot."""
        out = b"".join(dtls.datagrams_to_send())
        if out and path != WELL_KNOWN_PATH:
            yield from self._post(Code.POST, path, tag + out,
                                  until=self._now + self.config.close_timeout)

    # ------------------------------------------------------------------ inner side

    def _invalidate(self, generation: int, error: Exception) -> None:
        if generation != self._generation or self._session is None:
            return
        session, self._session = self._session, None
        self._final_flight = b""
        self._path = WELL_KNOWN_PATH
        if self._carrying:
            self._final_ended()
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
                self._end(obs, error)

    def _reregister(self, obs: _Observation, lost: SessionLost) -> None:
        """Register ``obs`` again on a new session; its next item is the fresh representation.
        Ends it with the error if that fails or the server no longer lets it be observed."""
        log.info("Layer 0 session lost (%s); registering an observation again", lost)
        obs.token = None
        request = obs.request
        assert request is not None

        def done(result: object, error: Exception | None) -> None:
            if obs.cancelled:
                return
            if error is not None:
                self._end(obs, lost if isinstance(error, Layer0Closed) and not self._closed
                          else error)
                return
            response: Message = result
            obs.last = None  # a new session: the server counts Observe numbers afresh
            self._push(obs, response)  # without Observe this ends the observation
            if response.opt.observe is not None:
                if response.code.is_successful():
                    self.reregistrations += 1
                    self._start_poller()
                else:
                    self._end(obs, None)

        self._start(self._exchange(request, obs), done, "re-registration")

    def _push(self, obs: _Observation, message: Message) -> None:
        if obs.ended:
            return
        number = message.opt.observe
        if number is not None:
            now = self._now
            if obs.last is not None:
                v1, t1 = obs.last
                fresh = (v1 < number < v1 + 2**23) or (number < v1 - 2**23) or now > t1 + 128
                if not fresh:
                    return  # an older notification overtaken by a newer one
            obs.last = (number, now)
        self._events.append(Notification(obs.rid, message))
        if number is None:  # a notification without Observe ends the observation
            self._end(obs, None)

    def _end(self, obs: _Observation, error: Exception | None) -> None:
        if obs.token is not None:
            self._observations.pop(obs.token, None)
        if not obs.ended:
            obs.ended = True
            self._obs_by_rid.pop(obs.rid, None)
            self._events.append(ObservationEnded(obs.rid, error))

    def _receive(self, payload: bytes, generation: int) -> int:
        """Feed an answer to the session and route each inner message by its token; returns
        how many authentic inner messages it carried."""
        session = self._session
        if generation != self._generation or session is None or not payload:
            return 0
        now = self._now
        fast = session.receive_application_data(payload, now)  # the usual answer: one record
        if fast is None:
            session.receive_datagram(payload, now)
        delivered = sum(self._route(data) for data in fast or ())
        closed: ConnectionClosed | None = None
        while (event := session.next_event()) is not None:
            if isinstance(event, ApplicationData):
                delivered += self._route(event.data)
            elif isinstance(event, HandshakeComplete):  # the server's Finished, after a False
                self._completed(session, event)  # Start: only now is its answer handed over
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
        slot = self._pending.get(msg.token)
        if not msg.token and slot is None:
            self.folded = msg.message  # the answer to the request our ALPN offer stood for
        elif slot is not None and slot.message is None:
            slot.message = msg.message
            if slot.waiter is not None:
                self._resume(slot.waiter, None)
        elif msg.token in self._observations:
            self._push(self._observations[msg.token], msg.message)
        else:
            log.debug("answer for a token no longer awaited")
        return True

    def _alive(self, generation: int) -> _Gen[bool]:
        """Whether the server still holds the session, asked with an inner 7.02 Ping.

        The server answers every request that does not authenticate with 4.04, as it answers
        a name it does not know (docs/PROTOCOL.md 6), so after a 4.04 only an authentic 7.03
        Pong tells "our record was refused" from "the session is gone"."""
        session = self._session
        if generation != self._generation or session is None or not session.is_established:
            return False
        token = self._new_token()
        slot = _Slot()
        self._pending[token] = slot
        try:
            session.send(inner.encode(token, Message(code=Code.PING)))
            result = yield from self._post(Code.POST, self._path,
                                           b"".join(session.datagrams_to_send()))
            if isinstance(result, _Failed):
                return False
            if result.code == Code.CHANGED:
                self._receive(result.payload, generation)
        except DtlsError:
            return False
        finally:
            self._pending.pop(token, None)
        if slot.message is None:
            return False
        if len(token) == 1:  # answered once: no other answer can carry it
            self._free_tokens.append(token)
        return bool(slot.message.code == Code.PONG)

    def _new_token(self) -> bytes:
        if self._free_tokens:
            return self._free_tokens.popleft()
        n = next(self._long_tokens)
        return n.to_bytes((n.bit_length() + 7) // 8, "big")

    def _exchange(
        self,
        message: Message,
        observation: _Observation | None = None,
        token: bytes | None = None,
    ) -> _Gen[Message]:
        """One inner request, one inner response, with new handshakes and resends as needed."""
        idempotent = message.code in IDEMPOTENT_METHODS or self.config.resend_non_idempotent
        attempt = 0
        while True:
            attempt += 1
            may_retry = idempotent and attempt < self.config.max_attempts
            generation = yield from self._ensure()
            if self._carrying and self._final_flight and generation == self._generation:
                # Another request carries our last flight: the server would take the flight
                # once and drop a second request beside it. Its answer decides the session.
                yield _AwaitFinal(self._now + self.config.exchange_timeout)
                attempt -= 1
                continue
            session, path = self._session, self._path
            assert session is not None
            this_token = token or self._new_token()
            slot = _Slot()
            self._pending[this_token] = slot
            if observation is not None:
                observation.token = this_token
                self._observations[this_token] = observation
            final = b""
            try:
                plaintext = inner.encode(this_token, message)
                if len(plaintext) > MAX_INNER:
                    raise Layer0Error(f"inner message of {len(plaintext)} bytes is too large")
                session.send(plaintext)
                datagram = b"".join(session.datagrams_to_send())
                final = self._final_flight if generation == self._generation else b""
                if final and len(final) + len(datagram) > profile.MAX_DATAGRAM:
                    final = b""
                    yield from self._flush_final_flight()  # too large together: flight first
                    if not self._usable() or generation != self._generation:
                        continue
                if final:
                    self._carrying = True
                resp = yield from self._post(Code.POST, path, final + datagram)
                if isinstance(resp, _Failed):
                    if may_retry:
                        continue
                    raise resp.error
                code = resp.code
                if code == Code.CHANGED:
                    delivered = self._receive(resp.payload, generation)
                    if final and self._final_flight is final:
                        if not session.is_established or (not delivered
                                                          and slot.message is None):
                            # No authentic answer to our Finished and request (or, after a
                            # False Start, no authentic Finished of the server's): the server
                            # did not take the flight (altered or lost), so its half of the
                            # session never completed. Nothing of the answer was handed over.
                            self._invalidate(generation, SessionLost(
                                "the server did not complete the handshake"))
                            if may_retry:
                                continue
                            raise SessionLost(
                                "the server did not complete the handshake that carried this"
                                " request (altered in transit); not resent")
                        self._final_flight = b""  # the server has our Finished
                    if delivered and slot.message is None:
                        # Authentic, but another request's answer: ours is on its way in
                        # another exchange (answers swapped in transit). Wait for it a little.
                        yield _AwaitAnswer(slot, self._now + self.config.misrouted_wait)
                    if slot.message is not None:
                        if (
                            len(this_token) == 1 and token is None and observation is None
                            and message.opt.observe is None
                        ):  # sent once, answered once: no other answer can carry this token
                            self._free_tokens.append(this_token)
                        return slot.message
                    if resp.payload:
                        raise ResponseRejected(
                            "the answer did not authenticate or was not ours: altered or"
                            " replayed in transit"
                        )
                    raise ResponseRejected("the server's answer carried no record")
                if code == Code.NOT_FOUND:
                    if (yield from self._alive(generation)):
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
                if code == Code.FORBIDDEN and final and not session.is_established:
                    # The server refused our last flight (after a False Start): a handshake
                    # failure, with the reason its alert gives (e.g. our key not trusted).
                    session.receive_datagram(resp.payload, self._now)
                    error = _closing_error(session)
                    self._invalidate(generation, SessionLost("the server refused the handshake"))
                    raise HandshakeFailed("the server refused the handshake") from error
                if code == Code.FORBIDDEN:
                    self._receive(resp.payload, generation)
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
                if final and self._carrying:
                    self._final_ended()

    def _blockwise(self, message: Message, observation: _Observation | None) -> _Gen[Message]:
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
                response = yield from self._exchange(block)
                if not more or response.code != Code.CONTINUE:
                    break
                b1 = response.opt.block1
                if b1 is None or b1.block_number != number:
                    raise Layer0Error("the server answered the wrong inner block")
                number += 1
        else:
            if observation is not None:
                observation.request = message
            response = yield from self._exchange(message, observation)
            if observation is not None:
                if response.opt.observe is None or not response.code.is_successful():
                    self._end(observation, None)
                else:
                    self._start_poller()
        return (yield from self._complete_block2(message, response))

    def _complete_block2(self, request: Message, response: Message) -> _Gen[Message]:
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
            part = yield from self._exchange(follow)
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
        if self._poller is None or self._poller not in self._ops:
            self._poller = self._start(self._poll_loop(), _ignore, "poller")

    def _poll_loop(self) -> _Gen[None]:
        """Long-poll with pulls while observations are active (:mod:`.client` says why)."""
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
            resp = yield from self._post(Code.POST, self._path, pull)
            if isinstance(resp, _Failed):
                failures += 1
                if failures >= self.config.max_attempts:
                    for obs in list(self._observations.values()):
                        self._end(obs, resp.error)
                    break
                # A refusal (ICMP port unreachable: a server restarting) fails at once; without
                # a pause the attempts would be spent before the server is back.
                yield from self._sleep(self.config.poll_pause)
                continue
            failures = 0
            if resp.code == Code.CHANGED:
                if resp.payload:
                    self._receive_pulled(resp.payload, generation)
                else:
                    yield from self._sleep(self.config.poll_pause)
            elif resp.code == Code.NOT_FOUND:
                if not (yield from self._alive(generation)):
                    self._invalidate(generation, SessionLost("the server forgot the session"))
            else:
                failures += 1
                yield from self._sleep(self.config.poll_pause)


def _ignore(result: object, error: Exception | None) -> None:
    if error is not None and not isinstance(error, Layer0Closed):
        log.debug("Layer 0 background operation ended: %s", error)


def _new_cookie_asked(sent: bytes, answer: bytes, produced: list[bytes]) -> bool:
    """Whether ``answer`` to our cookie-bearing ClientHello ``sent`` is a HelloVerifyRequest
    that the engine did not answer with a ClientHello carrying another cookie."""
    cookie = records.client_hello_cookie(sent)
    if not cookie or len(answer) <= records.HEADER_LEN:
        return False
    if records.handshake_type(answer) != records.HANDSHAKE_HELLO_VERIFY_REQUEST:
        return False
    again = records.client_hello_cookie(produced[0]) if produced else None
    return again is None or again == cookie


def _holds_alert(payload: bytes) -> bool:
    """Whether a 4.03 carries DTLS records with an alert (the server's refusal), as opposed
    to an intermediary's own 4.03 (a proxy's diagnostic text, or nothing)."""
    try:
        found = records.split_records(payload)
    except ProtocolViolation:
        return False
    return any(records.content_type(r) == records.CONTENT_ALERT for r in found)


def _busy(payload: bytes) -> str:
    """A 5.03 to a handshake: the origin or a proxy on the way has no room now (a proxy says
    why in its diagnostic payload: "proxy busy", "proxy starting", ...)."""
    text = payload[:120].decode("utf-8", "replace")
    said = f" {text!r}" if text.isprintable() and text else ""
    return f"5.03 Service Unavailable{said}: the server or a proxy on the way is busy; retry"


def _refused_on_the_way(payload: bytes) -> str:
    """A 4.03 without the server's alert: an intermediary refused to forward (coap-client's
    failure report reads "unexpected outer answer" as the path answering, not the server)."""
    text = payload[:120].decode("utf-8", "replace")
    said = f" {text!r}" if text.isprintable() and text else ""
    return f"unexpected outer answer 4.03{said}, without a DTLS alert: a proxy refused"


def _closing_error(dtls: DtlsSession) -> DtlsError | None:
    while (event := dtls.next_event()) is not None:
        if isinstance(event, ConnectionClosed):
            return event.error
    return dtls.close_error
