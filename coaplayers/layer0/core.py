"""The Layer 0 server's state machine, without sockets, CoAP stack or clock (sans-I/O).

:class:`Layer0ServerCore` is driven by exactly three things, like the DTLS engine under it:

* outer requests, already reduced to (resource, payload, now): :meth:`Layer0ServerCore.entry`
  for the entry resource, :meth:`Layer0ServerCore.datagram` for a session resource
  (:meth:`Layer0ServerCore.queued` is what a held pull waits for);
* the shell sealing inner responses and notifications: :meth:`Layer0ServerCore.seal`,
  :meth:`Layer0ServerCore.enqueue`;
* time: every call takes ``now``, and :meth:`Layer0ServerCore.expire` drops idle and stale sessions.

Each call returns an :class:`Answer` (the outer CoAP code and payload) that the shell sends back
unchanged, so every outer answer the profile defines can be tested here without a network.

Why the server never retransmits by timer: every server flight rides the response to a client
request, and CoAP's confirmable exchange already repeats that on each hop. When a whole outer
exchange fails, the client repeats its flight in a new one; the server recognises the repeat by
its digest and answers it again from a cache, which does not depend on how the DTLS backend
treats duplicate handshake messages.

Why a session name changes nothing by itself: it is a routing key every proxy sees. A session's
state (queue, timers, order of eviction, handshake caches) changes only on a request that
authenticates: one of its records does (established), or it starts with the handshake tag that
only the receiver of the server's first datagram knows (half-open, docs/PROTOCOL.md 3.3).
Everything else gets the answer an unknown name gets, :data:`UNKNOWN`, and changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import logging
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiocoap.numbers.codes import Code

from .. import replica as replica_ids
from .. import steering
from ..dtls import (
    ApplicationData,
    ConnectionClosed,
    DtlsError,
    DtlsSession,
    GnuTlsSession,
    HandshakeComplete,
    records,
)
from .policy import identity_text
from .profile import (
    BAD_REQUEST,
    CHANGED,
    CREATED,
    DELETED,
    FORBIDDEN,
    HANDSHAKE_TAG_LEN,
    MAX_DATAGRAM,
    NOT_FOUND,
    REQUEST_ENTITY_TOO_LARGE,
    SESSION_ID_CHARS,
    SESSION_PREFIX,
    UNKNOWN_SESSION,
    handshake_tag,
    parse_pull,
)

if TYPE_CHECKING:
    from ..dtls.dual import SessionListener

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """Every bound the Layer 0 server applies; the defaults suit a small gateway."""

    max_sessions: int = 256
    """Established sessions; beyond it the least recently used one is evicted (its client gets
    4.04 next time and handshakes again)."""
    max_half_open: int = 32
    """Sessions past the cookie exchange but not yet established; a new one beyond it evicts
    the least recently active one (its client gets 4.04 next time and starts over)."""
    without_cookie: int = 8
    """Handshakes (every kind together) that may be in progress without a cookie exchange:
    below it a ClientHello is answered at once (what an unverified address gets back is
    bounded by the outer 3x rule, and the client pads where its answer needs it,
    docs/PROTOCOL.md 3.1), at it every new one needs a cookie, so forged ClientHellos hold
    at most this many slots. 0: always the cookie exchange."""
    idle_timeout: float = 600.0
    """An established session unused for this long is dropped."""
    handshake_timeout: float = 30.0
    """A half-open session older than this is dropped."""
    max_queued: int = 32
    """Datagrams waiting for the client to pull them and acknowledge them, per session (oldest
    dropped first)."""
    max_observations: int = 8
    """Concurrent inner observations per session; more are served as plain requests."""
    poll_hold: float = 20.0
    """How long an authenticated pull waits for a notification before it is answered empty."""
    inner_timeout: float = 60.0
    """How long a resource may take for its first response before the client gets 5.03."""

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_half_open", "max_queued", "max_observations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.without_cookie < 0:
            raise ValueError("without_cookie must be at least 0")
        for name in ("idle_timeout", "handshake_timeout", "poll_hold", "inner_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True)
class Answer:
    """An outer response: code, payload (DTLS records, or a diagnostic for errors), and the
    Location-Path of a new session."""

    code: Code
    payload: bytes = b""
    location: tuple[str, ...] | None = None
    pull: bool = False
    """An authenticated pull found nothing queued: the shell may hold it (docs/PROTOCOL.md 3.4)."""

    @property
    def carries_records(self) -> bool:
        return self.code in (CREATED, CHANGED, DELETED, FORBIDDEN) and bool(self.payload)


@dataclass(frozen=True)
class Layer0Peer:
    """The authenticated peer of one Layer 0 session, as resources see it (an authenticated claim).

    ``identity`` is the PSK identity (as text), the certificate's common name, or the raw public
    key's SPKI fingerprint (32 hex digits); ``mode`` says which (``psk``, ``x509``, ``rpk``).
    :meth:`export_keying_material` is the RFC 5705 exporter of the session (OpenSSL and GnuTLS
    backends): the hook the OSCORE mode keys from.
    """

    identity: str | None
    raw_identity: bytes | str | None
    mode: str
    cipher_suite: str
    resumed: bool
    session_id: str
    _session: DtlsSession = field(repr=False, compare=False)
    _claimed: set[str] = field(default_factory=set, repr=False, compare=False)

    def export_keying_material(
        self, label: bytes, length: int, context: bytes | None = None
    ) -> bytes:
        return self._session.export_keying_material(label, length, context)

    def claim(self, purpose: str) -> bool:
        """True the first time ``purpose`` is claimed on this session, False after: for what
        a session may do once only (the OSCORE mode keys one context per handshake, since a
        second one from the same exporter would repeat the first one's nonces)."""
        if purpose in self._claimed:
            return False
        self._claimed.add(purpose)
        return True


UNKNOWN = Answer(NOT_FOUND, UNKNOWN_SESSION)
"""The answer to every session request that does not authenticate, live name or not."""


@dataclass(eq=False)
class Layer0ServerSession:
    """One Layer 0 session: its engine session, name, handshake tag, queue and handshake-repeat
    cache.

    ``outbox`` holds the rest of a handshake flight (taken by tagged pulls) and, once
    established, notifications and other queued datagrams, each kept until a pull acknowledges
    its records."""

    sid: str
    dtls: DtlsSession
    created: float
    last_active: float
    entry_digest: bytes
    entry_answer: list[bytes]
    outbox: deque[bytes] = field(default_factory=deque)
    tag: bytes = b""
    peer: Layer0Peer | None = None
    hs_last_in: bytes | None = None
    hs_last_out: list[bytes] = field(default_factory=list)
    observations: dict[bytes, Callable[[], None]] = field(default_factory=dict)
    dropped: int = 0
    one_shot: bool = False
    """The handshake agreed on a folded request (:attr:`Layer0ServerCore.folded`): the session ends
    once that request is answered."""

    @property
    def established(self) -> bool:
        return self.dtls.is_established

    @property
    def location(self) -> tuple[str, ...]:
        return (self.sid,)


@dataclass
class CoreStats:
    handshakes: int = 0
    resumed: int = 0
    evicted: int = 0
    expired: int = 0
    half_open_evicted: int = 0
    unauthenticated: int = 0
    """Session requests answered :data:`UNKNOWN` although the name was live."""


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _handshake_remnant(datagram: bytes) -> bool:
    """Whether a queued datagram holds an unprotected (epoch 0) record: part of a flight."""
    try:
        return any(records.epoch(r) == 0 for r in records.split_records(datagram))
    except DtlsError:
        return False


def _source(peer_key: Hashable) -> Hashable:
    """The client host of an entry request's peer key (scheme, host:port): its port dropped."""
    if isinstance(peer_key, tuple) and peer_key and isinstance(peer_key[-1], str):
        host, sep, port = peer_key[-1].rpartition(":")
        if sep and port.isdigit() and (host.endswith("]") or ":" not in host):
            return (*peer_key[:-1], host)
    return peer_key


class Layer0ServerCore:
    """Session table and outer-answer logic of the Layer 0 resources (see module docstring)."""

    def __init__(
        self,
        listener: SessionListener,
        limits: ServerLimits | None = None,
        *,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.listener = listener
        self.limits = limits or ServerLimits()
        self._random = random
        #: coap-server --replica: its number goes into every session name (coaplayers.replica).
        self.replica: int | None = None
        #: coap-server --workers: (index, count); names steer to this worker (steering.py).
        self.worker: tuple[int, int] | None = None
        self.sessions: OrderedDict[str, Layer0ServerSession] = OrderedDict()  # LRU order
        self._half_open: set[str] = set()
        self._half_open_source: dict[str, Hashable] = {}  # sid -> client host (pruned in entry)
        self._by_entry: dict[bytes, str] = {}
        self._by_engine: dict[int, str] = {}
        self.stats = CoreStats()
        self.on_close: Callable[[Layer0ServerSession], None] | None = None
        self.on_established: Callable[[Layer0Peer], None] | None = None
        #: ALPN protocol -> the inner request (plaintext, empty token) that a handshake which
        #: agreed on it stands for: it is handed to the shell with the client's last flight, as
        #: if it had travelled there, so its answer rides the server's Finished; the session
        #: then ends (:attr:`Layer0ServerSession.one_shot`). The ALPN choice is part of the
        #: handshake's transcript, so no middle box can add or remove the request.
        self.folded: dict[bytes, bytes] = {}

    # ------------------------------------------------------------------ entry resource

    def entry(self, peer_key: Hashable, payload: bytes, now: float) -> Answer:
        """A POST to ``/.well-known/atls``: stateless cookie exchange, then a new session."""
        self.expire(now)
        if len(payload) > MAX_DATAGRAM:
            return Answer(REQUEST_ENTITY_TOO_LARGE, b"datagram larger than 1024 bytes")
        digest = _digest(payload)
        sid = self._by_entry.get(digest)
        if sid is not None and sid in self.sessions:
            s = self.sessions[sid]
            if not s.established:  # our 2.01 was lost: answer the repeat the same way
                # (the outbox is left alone: a replayed ClientHello must not change it)
                first = s.entry_answer[0] if s.entry_answer else b""
                return Answer(CREATED, first, s.location)
        if records.client_hello_random(payload) is None:
            return Answer(BAD_REQUEST, b"not a DTLS ClientHello")
        try:
            replies, dtls = self.listener.accept(peer_key, payload, now)
        except DtlsError:
            return Answer(BAD_REQUEST, b"ClientHello refused")
        if dtls is None:
            if replies:
                return Answer(CHANGED, replies[0])  # HelloVerifyRequest: no state kept
            return Answer(BAD_REQUEST, b"ClientHello refused")
        if id(dtls) in self._by_engine:  # a backend that recognised the repeat by itself
            s = self.sessions[self._by_engine[id(dtls)]]
            out = dtls.datagrams_to_send() or s.entry_answer
            return Answer(CREATED, out[0] if out else b"", s.location)
        out = dtls.datagrams_to_send()
        closed = self._drain_closed(dtls)
        tag = handshake_tag(out[0]) if out else None
        if closed or tag is None:
            dtls.abort()
            return Answer(FORBIDDEN, out[0] if out and closed else b"")
        if len(self._half_open) >= self.limits.max_half_open:
            self._evict_half_open()
        sid = self._new_sid()
        s = Layer0ServerSession(sid, dtls, now, now, digest, list(out), deque(out[1:]), tag)
        self.sessions[sid] = s
        self._half_open.add(sid)
        self._half_open_source[sid] = _source(peer_key)
        if len(self._half_open_source) > 2 * self.limits.max_half_open:
            for gone in [k for k in self._half_open_source if k not in self._half_open]:
                del self._half_open_source[gone]
        self._by_entry[digest] = sid
        self._by_engine[id(dtls)] = sid
        log.debug("session %s created (half-open %d)", sid, len(self._half_open))
        return Answer(CREATED, out[0] if out else b"", s.location)

    # ---------------------------------------------------------------- session resource

    def datagram(
        self, sid: str, payload: bytes, now: float, *, delete: bool = False
    ) -> tuple[Answer, list[bytes]]:
        """A POST (or DELETE) to a session: returns the answer so far and the decrypted inner
        messages, whose responses the shell seals into the answer.

        Pulls (docs/PROTOCOL.md 3.4) are handled here: their acknowledgements drop what the
        client has, and their answer is what is still queued (``Answer.pull`` when nothing is).
        A request that does not authenticate gets :data:`UNKNOWN` and changes nothing.
        """
        if len(payload) > MAX_DATAGRAM:  # checked first: a live name must not answer otherwise
            return Answer(REQUEST_ENTITY_TOO_LARGE, b"datagram larger than 1024 bytes"), []
        s = self.sessions.get(sid)
        if s is None:
            return UNKNOWN, []
        if hmac.compare_digest(payload[:HANDSHAKE_TAG_LEN], s.tag) and not delete:
            answer, early = self._handshake_datagram(s, payload[HANDSHAKE_TAG_LEN:], now)
            if early:  # requests sent with the client's last flight (3.3)
                return self._pulls(s, answer.code, answer.payload, early)
            return answer, []
        if not s.established:
            return self._unauthenticated(s)
        # The usual protected request, one application-data record, takes the engine's
        # shortcut; if that leaves an event (the session ended), the events are read below.
        fast = s.dtls.receive_application_data(payload, now) if not delete else None
        if fast is not None and not s.dtls.has_pending:
            if not fast:
                return self._unauthenticated(s)
            self._touch(s, now)
            return self._pulls(s, CHANGED, b"", fast)
        if fast is None:
            try:
                recs = records.split_records(payload)
            except DtlsError:
                return self._unauthenticated(s)
            # Handshake records are taken only with the tag: an established engine repeats its
            # final flight for any, which would tell the live name and change the session.
            if not recs or any(
                records.epoch(r) == 0
                or records.content_type(r) in (records.CONTENT_HANDSHAKE,
                                               records.CONTENT_CHANGE_CIPHER_SPEC)
                for r in recs
            ):
                return self._unauthenticated(s)
            s.dtls.receive_datagram(payload, now)
        out = s.dtls.datagrams_to_send()
        plaintexts: list[bytes] = list(fast or ())
        closed = False
        error: DtlsError | None = None
        while (event := s.dtls.next_event()) is not None:
            if isinstance(event, ApplicationData):
                plaintexts.append(event.data)
            elif isinstance(event, ConnectionClosed):
                closed, error = True, event.error
        if closed:
            return self._ended(sid, error, out), []
        if delete or not plaintexts:
            # Ending a session needs its authenticated close_notify: a bare DELETE from
            # anyone who saw the session name must not end it.
            return self._unauthenticated(s)
        self._touch(s, now)
        for extra in out[1:]:
            self.enqueue(sid, extra)
        return self._pulls(s, CHANGED, out[0] if out else b"", plaintexts)

    def queued(self, sid: str) -> Answer | None:
        """What a pull is answered with: the oldest queued datagrams that fit one payload,
        left queued until a later pull acknowledges them; ``None`` when nothing is queued."""
        s = self.sessions.get(sid)
        if s is None or not s.outbox:
            return None
        batch = [s.outbox[0]]
        size = len(batch[0])
        for more in itertools.islice(s.outbox, 1, None):
            if size + len(more) > MAX_DATAGRAM:
                break
            size += len(more)
            batch.append(more)
        return Answer(CHANGED, b"".join(batch))

    def seal(self, sid: str, plaintext: bytes) -> bytes:
        """Encrypt one inner message for the session's client; raises if the session is gone."""
        s = self.sessions.get(sid)
        if s is None or not s.established:
            raise KeyError(sid)
        s.dtls.send(plaintext)
        return b"".join(s.dtls.datagrams_to_send())

    def enqueue(self, sid: str, datagram: bytes) -> bool:
        """Queue a datagram for the next pull; the oldest goes when the queue is full."""
        s = self.sessions.get(sid)
        if s is None:
            return False
        if len(s.outbox) >= self.limits.max_queued:
            s.outbox.popleft()
            s.dropped += 1
        s.outbox.append(datagram)
        return True

    # ----------------------------------------------------------------------- lifecycle

    def expire(self, now: float) -> list[str]:
        """Drop half-open sessions older than the handshake timeout and idle established ones.

        Runs on every ClientHello, so it must not walk the whole table: half-open sessions are
        at most ``max_half_open``, and ``sessions`` is in order of last activity, so the walk
        over established ones stops at the first that is not idle.
        """
        stale = [
            sid
            for sid in self._half_open
            if now - self.sessions[sid].created >= self.limits.handshake_timeout
        ]
        for sid, s in self.sessions.items():
            if not s.established:
                continue
            if now - s.last_active < self.limits.idle_timeout:
                break
            stale.append(sid)
        for sid in stale:
            self.stats.expired += 1
            self.remove(sid)
        return stale

    def _ended(self, sid: str, error: DtlsError | None, out: list[bytes]) -> Answer:
        """The session closed (close_notify, or a fatal alert): drop it, answer with its last
        datagram (2.02 for a close, 4.03 for an alert)."""
        self.remove(sid)
        log.info("session %s ended (%s)", sid, type(error).__name__ if error else "close")
        return Answer(DELETED if error is None else FORBIDDEN, out[0] if out else b"")

    def remove(self, sid: str) -> None:
        s = self.sessions.pop(sid, None)
        if s is None:
            return
        self._half_open.discard(sid)
        if self._by_entry.get(s.entry_digest) == sid:
            del self._by_entry[s.entry_digest]
        self._by_engine.pop(id(s.dtls), None)
        s.dtls.abort()
        if self.on_close is not None:
            self.on_close(s)

    def answered(self, sid: str) -> None:
        """The shell sealed the answers to a request's inner messages: a one-shot session
        (a folded request's, :attr:`folded`) ends here, unannounced (its client expects that)."""
        s = self.sessions.get(sid)
        if s is not None and s.one_shot:
            log.debug("session %s: folded request answered, session ends", sid)
            self.remove(sid)

    def close_all(self) -> None:
        for sid in list(self.sessions):
            self.remove(sid)

    @property
    def half_open_count(self) -> int:
        return len(self._half_open)

    @property
    def established_count(self) -> int:
        return len(self.sessions) - len(self._half_open)

    # ------------------------------------------------------------------------ internals

    def _unauthenticated(self, s: Layer0ServerSession) -> tuple[Answer, list[bytes]]:
        self.stats.unauthenticated += 1
        log.debug("session %s: request did not authenticate", s.sid)
        return UNKNOWN, []

    def _handshake_datagram(self, s: Layer0ServerSession, data: bytes, now: float
                            ) -> tuple[Answer, list[bytes]]:
        """A request that carried the session's handshake tag: a flight datagram, the repeat
        of one, a pull of the rest of the server's flight (no records), or an alert. The
        client's last flight may carry protected requests after its Finished (records that
        authenticate only once the handshake has): they are returned for the shell."""
        sid = s.sid
        self._touch(s, now)
        if not data:  # a handshake pull: the rest of our flight, taken as it is sent
            batch: list[bytes] = []
            size = 0
            # Once established, only what is left of a handshake flight (epoch 0 records):
            # notifications wait for a pull that acknowledges them.
            while (s.outbox and (not batch or size + len(s.outbox[0]) <= MAX_DATAGRAM)
                   and (not s.established or _handshake_remnant(s.outbox[0]))):
                size += len(s.outbox[0])
                batch.append(s.outbox.popleft())
            return Answer(CHANGED, b"".join(batch)), []
        try:
            records.split_records(data)
        except DtlsError:
            return Answer(BAD_REQUEST, b"not DTLS records"), []
        was_established = s.established
        digest = _digest(data)
        if not was_established and digest == s.hs_last_in:
            s.outbox = deque(s.hs_last_out[1:])
            return Answer(CHANGED, s.hs_last_out[0] if s.hs_last_out else b""), []
        s.dtls.receive_datagram(data, now)
        out = s.dtls.datagrams_to_send()
        closed = False
        error: DtlsError | None = None
        plaintexts: list[bytes] = []
        while (event := s.dtls.next_event()) is not None:
            if isinstance(event, HandshakeComplete):
                self._established(s, event)
            elif isinstance(event, ApplicationData) and not was_established and s.established:
                plaintexts.append(event.data)
            elif isinstance(event, ConnectionClosed):
                closed, error = True, event.error
        if closed:
            return self._ended(sid, error, out), []
        if not was_established and s.established:
            folded = self.folded.get(getattr(s.dtls, "alpn", None) or b"")
            if folded is not None:  # the request the agreed ALPN protocol stands for
                plaintexts.insert(0, folded)
                s.one_shot = True
        if was_established:  # the client repeats its final flight: ours was lost
            for extra in out[1:]:
                self.enqueue(sid, extra)
            return Answer(CHANGED, out[0] if out else b""), []
        if not s.established:  # once established, repeats go to the engine (final flight)
            s.hs_last_in, s.hs_last_out = digest, list(out)
        s.outbox = deque(out[1:])
        return Answer(CHANGED, out[0] if out else b""), plaintexts

    def _pulls(
        self, s: Layer0ServerSession, code: Code, payload: bytes, plaintexts: list[bytes]
    ) -> tuple[Answer, list[bytes]]:
        """Take the pulls out of authenticated inner messages: apply their acknowledgements,
        and answer a request that was only a pull with what is queued."""
        acks = [a for p in plaintexts if len(p) <= 10 and (a := parse_pull(p)) is not None]
        if not acks:
            return Answer(code, payload), plaintexts
        self._acknowledge(s, max(acks))
        rest = [p for p in plaintexts if len(p) > 10 or parse_pull(p) is None]
        if rest or payload:
            return Answer(code, payload), rest
        return self.queued(s.sid) or Answer(code, pull=True), []

    def _acknowledge(self, s: Layer0ServerSession, ack: int) -> None:
        """Drop the queued datagrams whose records all have sequence numbers up to ``ack``:
        pull answers hand out the queue from its head, so those are what the client has."""
        while s.outbox:
            try:
                recs = records.split_records(s.outbox[0])
            except DtlsError:
                recs = []
            seqs = [records.sequence_number(r) for r in recs if records.epoch(r)]
            if max(seqs, default=-1) > ack:
                break
            s.outbox.popleft()

    def _touch(self, s: Layer0ServerSession, now: float) -> None:
        s.last_active = now
        self.sessions.move_to_end(s.sid)

    def _established(self, s: Layer0ServerSession, event: HandshakeComplete) -> None:
        self._half_open.discard(s.sid)
        self._by_entry.pop(s.entry_digest, None)
        s.hs_last_in, s.hs_last_out, s.entry_answer = None, [], []  # handshake-only caches
        # PSK identities are bytes; a raw-public-key session (GnuTLS) names its peer by SPKI
        # fingerprint, a certificate session by common name.
        mode = ("psk" if isinstance(event.peer_identity, bytes)
                else "rpk" if isinstance(s.dtls, GnuTlsSession) else "x509")
        s.peer = Layer0Peer(
            identity_text(event.peer_identity),
            event.peer_identity,
            mode,
            event.cipher_suite,
            event.resumed,
            s.sid,
            s.dtls,
        )
        self.stats.handshakes += 1
        self.stats.resumed += int(event.resumed)
        log.info("session %s established (%s, resumed=%s)", s.sid, mode, event.resumed)
        while self.established_count > self.limits.max_sessions:
            victim = next(sid for sid, v in self.sessions.items() if v.established and v is not s)
            self.stats.evicted += 1
            log.info("session limit %d: evicting %s", self.limits.max_sessions, victim)
            self.remove(victim)
        if self.on_established is not None:
            self.on_established(s.peer)

    def _evict_half_open(self) -> None:
        """Make room for one handshake: evict rather than refuse, so that a flood echoing our
        cookies cannot lock legitimate clients out. The victim is the least recently active
        handshake of the client host holding the most, so such an attacker (from a few hosts,
        any number of ports) displaces its own handshakes first."""
        by_source: dict[Hashable, list[str]] = {}
        for sid in self._half_open:
            by_source.setdefault(self._half_open_source.get(sid), []).append(sid)
        while len(self._half_open) >= self.limits.max_half_open:
            group = max(by_source.values(), key=len)
            victim = min(group, key=self._last_active)
            group.remove(victim)
            self.stats.half_open_evicted += 1
            log.info("half-open limit %d: evicting %s", self.limits.max_half_open, victim)
            self._half_open.discard(victim)
            self.remove(victim)

    def _last_active(self, sid: str) -> float:
        s = self.sessions.get(sid)
        return s.last_active if s is not None else float("-inf")

    def _drain_closed(self, dtls: DtlsSession) -> bool:
        closed = False
        while (event := dtls.next_event()) is not None:
            if isinstance(event, ConnectionClosed):
                closed = True
        return closed

    def _new_sid(self) -> str:
        while True:
            name = base64.urlsafe_b64encode(self._random(4)).decode()[:SESSION_ID_CHARS]
            if self.replica is not None:
                name = replica_ids.session_name(self.replica, name)
            if self.worker is not None and not steering.session_name_for(name, *self.worker):
                continue
            sid = SESSION_PREFIX + name
            if sid not in self.sessions:
                return sid
