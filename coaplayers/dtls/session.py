"""The sans-I/O DTLS session that both layers drive.

A :class:`DtlsSession` is one DTLS 1.2 association. Like aioquic's ``QuicConnection`` it is driven
by exactly three things, and owns no socket, no event loop and no clock:

* API calls: :meth:`DtlsSession.connect`, :meth:`DtlsSession.send`, :meth:`DtlsSession.close`;
* received datagrams: :meth:`DtlsSession.receive_datagram`;
* a timer: :meth:`DtlsSession.get_timer` says when, :meth:`DtlsSession.handle_timer` runs it.

After each call, the owner collects :meth:`DtlsSession.datagrams_to_send` (already packed into
datagrams of at most ``mtu`` bytes) and :meth:`DtlsSession.next_event` until it returns ``None``.

Handshake retransmission lives here rather than in the backends: both OpenSSL and tinydtls read
the wall clock for their own timers, which would make the engine untestable with hand-driven
time. The session keeps the last flight it sent and repeats it when its timer expires (RFC 6347
section 4.2.4). The side that sends the final flight repeats it when the peer's previous flight
arrives again.

A repeat is not byte for byte: RFC 6347 gives every record a new sequence number, and a peer's
replay window drops a number it has seen even when its state machine ignored that record (an
OpenSSL server that got the ChangeCipherSpec before the last fragment of the client's
certificate never accepts the same record again, and the handshake stalls). Epoch 0 records are
unprotected, so the session numbers them itself, strictly increasing across fresh records and
repeats. Protected records (the Finished message) are repeated unchanged; the backends buffer
those by handshake message sequence, so a copy the peer has is all it needs.
"""

from __future__ import annotations

import abc
import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from . import records
from .alerts import AlertDescription, AlertLevel
from .errors import (
    DtlsError,
    HandshakeTimeout,
    ProtocolViolation,
    SessionClosed,
    alert_error,
)
from .events import (
    AlertReceived,
    ApplicationData,
    ConnectionClosed,
    Event,
    HandshakeComplete,
)
from .recordlayer import SUITES, RecordLayer


@dataclass(frozen=True, slots=True)
class DtlsConfig:
    """Timers and sizes of one session; the defaults suit CoAP over constrained links."""

    mtu: int = 1152
    """Largest datagram the session emits (ciphertext, DTLS headers included)."""
    initial_retransmit: float = 1.0
    """First handshake retransmission timeout (RFC 6347 recommends 1 s)."""
    max_retransmit: float = 8.0
    """Cap of the doubling retransmission timeout."""
    handshake_timeout: float = 30.0
    """A handshake not complete after this many seconds fails with :class:`HandshakeTimeout`."""
    false_start: bool = False
    """Client: RFC 7918 False Start. Once its Finished is written in a full handshake with a
    forward-secret (ECDHE) AEAD suite, and the server's certificate or key has been checked,
    :meth:`DtlsSession.send` seals application data under the new keys before the server's
    Finished has arrived (see :attr:`DtlsSession.false_started`). Off by default: only an
    owner that carries that data with its last flight gains a round trip."""

    def __post_init__(self) -> None:
        if not 256 <= self.mtu <= 65507:
            raise ValueError(f"mtu {self.mtu} outside 256..65507")
        if self.initial_retransmit <= 0 or self.max_retransmit < self.initial_retransmit:
            raise ValueError("retransmission timeouts must be positive and ordered")
        if self.handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")


class State(enum.Enum):
    IDLE = "idle"
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    CLOSED = "closed"


class DtlsSession(abc.ABC):
    """One DTLS association; backends implement the ``_backend_*`` hooks."""

    cipher_suite: str | None = None
    peer_identity: bytes | str | None = None
    resumed: bool = False
    false_start_refused: str | None = None
    """Why a client configured for False Start did not false-start (its suite has no
    forward secrecy, ...); ``None`` when it did or was not asked to."""

    def __init__(self, *, is_client: bool, config: DtlsConfig | None = None) -> None:
        self.is_client = is_client
        self.config = config or DtlsConfig()
        self.state = State.IDLE
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []  # records produced since the last datagrams_to_send()
        self._datagrams: list[bytes] = []
        self._flight: list[bytes] = []  # datagrams of the last flight we sent
        self._final_flight: list[bytes] = []
        self._rto = self.config.initial_retransmit
        self._retransmit_at: float | None = None
        self._handshake_deadline: float | None = None
        self._received_any = False
        self._epoch0_top: int | None = None  # highest epoch 0 sequence number we sent
        self._epoch0_shift = 0  # what we add to the backend's epoch 0 sequence numbers
        self._now = 0.0
        self.close_error: DtlsError | None = None

    # ----------------------------------------------------------------- public API

    def connect(self, now: float) -> None:
        """Start the handshake (client role)."""
        if not self.is_client:
            raise DtlsError("connect() is for client sessions")
        if self.state is not State.IDLE:
            raise DtlsError(f"connect() in state {self.state.value}")
        self._now = now
        self.state = State.HANDSHAKING
        self._handshake_deadline = now + self.config.handshake_timeout
        self._guard(self._backend_start)
        self._after_step()

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Feed one received datagram. Malformed input is dropped, as RFC 6347 asks."""
        self._now = now
        if self.state is State.CLOSED:
            return
        try:
            recs = records.split_records(data)
        except ProtocolViolation:
            return
        recs = [r for r in recs if records.plausible(r)]
        if not recs:
            return
        if self.state is State.IDLE:
            # A server session starts with the datagram the listener accepted.
            self.state = State.HANDSHAKING
            self._handshake_deadline = now + self.config.handshake_timeout
        if self.state is State.ESTABLISHED and self._final_flight:
            if any(records.content_type(r) != records.CONTENT_APPLICATION_DATA for r in recs):
                if any(
                    records.content_type(r)
                    in (records.CONTENT_HANDSHAKE, records.CONTENT_CHANGE_CIPHER_SPEC)
                    for r in recs
                ):
                    # The peer repeats its flight: our final flight was lost.
                    self._datagrams.extend(self._repeat(self._final_flight))
            else:
                self._final_flight = []  # the peer sends data, so it has our final flight
        self._received_any = True
        was_handshaking = self.state is State.HANDSHAKING
        self._guard(self._backend_receive, recs)
        self._after_step(progressed=was_handshaking)

    def receive_application_data(self, data: bytes, now: float) -> list[bytes] | None:
        """What :meth:`receive_datagram` does for the usual datagram of an established
        session, one application-data record, with the plaintexts returned at once instead
        of through the splitting, the event queue and the output step (the per-datagram
        cost of a Layer 1 transport). ``None``: not such a datagram, or the session needs
        the general path; nothing was consumed, call :meth:`receive_datagram`. A record that
        fails authentication or repeats one seen before gives ``[]`` (dropped, RFC 6347
        4.1.2.7). Anything else the record causes (an engine's alert, the end of the
        session) is queued as by :meth:`receive_datagram`."""
        if (
            self.state is not State.ESTABLISHED
            or self._final_flight  # its first application data tells us the peer has it
            or self._events
            or len(data) <= records.HEADER_LEN
            or data[0] != records.CONTENT_APPLICATION_DATA
            or data[1] != 0xFE
            or int.from_bytes(data[11:13], "big") != len(data) - records.HEADER_LEN
        ):
            return None
        self._now = now
        layer = self._records
        if layer is None:
            return self._backend_receive_application(data)
        if data[3:5] != b"\x00\x01":  # epoch 1 only: renegotiation is off
            return []
        plain = layer.unprotect(data)
        return [plain] if plain else []

    def send(self, data: bytes) -> None:
        """Send application data as one record; only once the handshake is complete, or
        once a client has false-started (:attr:`false_started`).

        Data larger than :attr:`max_send_size` raises :class:`DtlsError` and leaves the
        session open (it would not fit one datagram of the configured MTU). Empty data sends
        nothing: OpenSSL's SSL_write of zero bytes fails and would end the session.
        """
        early = self._early if self.state is State.HANDSHAKING else None
        if self.state is not State.ESTABLISHED and early is None:
            raise SessionClosed(f"cannot send application data in state {self.state.value}")
        if not data:
            return
        limit = (early.max_plaintext(self.config.mtu) if early is not None
                 else self._backend_max_plaintext())
        if len(data) > limit:
            raise DtlsError(
                f"{len(data)} bytes do not fit one DTLS record within the MTU of"
                f" {self.config.mtu} bytes (at most {limit})"
            )
        if early is not None:
            self._emit(early.protect(records.CONTENT_APPLICATION_DATA, data))
        else:
            self._guard(self._backend_send, data)
        self._flush_out(as_flight=False)

    def close(self) -> None:
        """Send close_notify (when established) and end the session."""
        if self.state is State.CLOSED:
            return
        if self.state is State.ESTABLISHED:
            try:
                self._backend_close_notify()
            except DtlsError:
                pass
            self._flush_out(as_flight=False)
        self._terminate(None)

    def abort(self, error: DtlsError | None = None) -> None:
        """Drop the session without telling the peer (eviction, shutdown).

        Owners end every session with :meth:`close` or :meth:`abort` before dropping it: an
        OpenSSL session that is merely garbage-collected can no longer be resumed.
        """
        if self.state is not State.CLOSED:
            self._terminate(error)

    def datagrams_to_send(self) -> list[bytes]:
        out, self._datagrams = self._datagrams, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next, or ``None``: an idle session costs nothing."""
        if self.state is not State.HANDSHAKING:
            return None
        times = [t for t in (self._retransmit_at, self._handshake_deadline) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self._now = now
        if self.state is not State.HANDSHAKING:
            return
        if self._handshake_deadline is not None and now >= self._handshake_deadline:
            self._terminate(self._timeout_error())
            return
        if self._retransmit_at is not None and now >= self._retransmit_at and self._flight:
            self._datagrams.extend(self._repeat(self._flight))
            self._rto = min(self._rto * 2, self.config.max_retransmit)
            self._retransmit_at = now + self._rto

    @property
    def max_send_size(self) -> int | None:
        """Most plaintext bytes one :meth:`send` takes (``None`` before the handshake, or
        before a False Start)."""
        if self.false_started:
            assert self._early is not None
            return self._early.max_plaintext(self.config.mtu)
        if self.state is not State.ESTABLISHED:
            return None
        return self._backend_max_plaintext()

    @property
    def has_pending(self) -> bool:
        """Events or datagrams wait for the owner (:meth:`next_event`,
        :meth:`datagrams_to_send`)."""
        return bool(self._events or self._datagrams)

    @property
    def is_established(self) -> bool:
        return self.state is State.ESTABLISHED

    @property
    def false_started(self) -> bool:
        """A client whose Finished is written may send before the server's Finished arrives
        (RFC 7918; :attr:`DtlsConfig.false_start`). What it sends authenticates at the server
        only once our Finished has, and the server's answer only once its Finished has."""
        return self.state is State.HANDSHAKING and self._early is not None

    @property
    def is_closed(self) -> bool:
        return self.state is State.CLOSED

    def export_keying_material(
        self, label: bytes, length: int, context: bytes | None = None
    ) -> bytes:
        """RFC 5705 exporter; only backends that have one implement it."""
        raise DtlsError(f"{type(self).__name__} has no TLS exporter")

    # ------------------------------------------------------------ backend hooks

    @abc.abstractmethod
    def _backend_start(self) -> None:
        """Client: emit the first flight via :meth:`_emit`."""

    @abc.abstractmethod
    def _backend_receive(self, recs: list[bytes]) -> None:
        """Process received records; call :meth:`_emit`, :meth:`_established`, ..."""

    @abc.abstractmethod
    def _backend_send(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def _backend_close_notify(self) -> None: ...

    @abc.abstractmethod
    def _backend_max_plaintext(self) -> int:
        """Largest plaintext of one application-data record that fits the MTU."""

    def _backend_free(self) -> None:  # noqa: B027 - optional hook
        """Release backend state once the session is over."""

    _records: RecordLayer | None = None
    """The engine's own epoch 1 record layer (``protect``/``unprotect``), once a backend has
    handed the established session's records to it."""
    _early: RecordLayer | None = None
    """False Start: the epoch 1 keys a client seals with before the server's Finished (the
    backend hands the same layer over once established, so sequence numbers continue)."""
    _raw_public_key = False  # authenticates with a raw public key (wording of alert errors)

    def _backend_receive_application(self, record: bytes) -> list[bytes] | None:
        """One application-data record of an established session whose backend still
        protects its records: its plaintexts (see :meth:`receive_application_data`), or
        ``None`` for the general path."""
        return None

    # ---------------------------------------------------- helpers for backends

    def _emit(self, record_bytes: bytes) -> None:
        self._out.append(record_bytes)

    def _established(self, peer_identity: bytes | str | None, cipher: str, resumed: bool) -> None:
        self.peer_identity = peer_identity
        self.cipher_suite = cipher
        self.resumed = resumed
        self.state = State.ESTABLISHED
        self._flight = []  # only the handshake retransmits it (_final_flight answers repeats)
        self._retransmit_at = None
        self._handshake_deadline = None
        self._events.append(HandshakeComplete(peer_identity, cipher, resumed))

    def _app_data(self, data: bytes) -> None:
        self._events.append(ApplicationData(data))

    def _alert(self, level: int, description: int) -> None:
        self._events.append(AlertReceived(level, description))

    def _fail(self, error: DtlsError | None) -> None:
        """End the session after flushing what the backend queued (e.g. our fatal alert)."""
        self._flush_out(as_flight=False)
        self._terminate(error)

    def _receive_epoch1(self, layer: RecordLayer, recs: list[bytes]) -> None:
        """Records of an established session whose epoch 1 a backend handed to the engine's
        own record layer (``layer.unprotect``: the plaintext, or ``None`` for a forged,
        altered or replayed record). Epoch 0 and epoch 1 handshake records are the peer's
        flight again (the engine answers with our final flight); renegotiation is off, so
        nothing but application data and alerts is valid."""
        for record in recs:
            if self.state is not State.ESTABLISHED:
                return
            ctype = records.content_type(record)
            if records.epoch(record) != 1 or ctype not in (
                records.CONTENT_APPLICATION_DATA, records.CONTENT_ALERT
            ):
                continue
            plain = layer.unprotect(record)
            if plain is None:  # dropped, RFC 6347 4.1.2.7
                continue
            if ctype == records.CONTENT_APPLICATION_DATA:
                if plain:
                    self._app_data(plain)
                continue
            if len(plain) != 2:
                continue
            level, description = plain
            if description == AlertDescription.close_notify:
                self._alert(AlertLevel.warning, AlertDescription.close_notify)
                self._fail(None)
                return
            if level == AlertLevel.fatal:
                self._fatal_alert_received()
                raise alert_error(description, we_are_client=self.is_client,
                                  raw_public_key=self._raw_public_key)

    def _false_start(self, cipher: str, master: bytes, client_random: bytes,
                     server_random: bytes, next_seq: int, spent: list[bytes]) -> None:
        """Called by a backend once a client's Finished of a full handshake is written and
        the server's certificate or key has been checked: seal application data under
        epoch 1 from now on if RFC 7918's conditions hold (section 3: a forward-secret key
        exchange, ECDHE here, and an AEAD suite; our suites are all AEAD)."""
        if not self.is_client or not self.config.false_start or self._early is not None:
            return
        if cipher not in SUITES or not cipher.startswith("ECDHE-"):
            self.false_start_refused = (
                f"{cipher} has no forward-secret key exchange: no False Start (RFC 7918"
                " section 3), the first request waits for the server's Finished"
            )
            return
        if len(master) != 48 or len(client_random) != 32 or len(server_random) != 32:
            self.false_start_refused = "the backend gave no usable master secret"
            return
        self._early = RecordLayer(cipher, master, client_random, server_random,
                                  is_client=True, next_seq=next_seq, spent=spent)

    def _fatal_alert_received(self) -> None:  # noqa: B027 - optional hook
        """Called before a fatal alert from the peer ends a session (see _receive_epoch1)."""

    # ---------------------------------------------------------------- internals

    def _guard(self, step: Callable[..., None], *args: object) -> None:
        try:
            step(*args)
        except DtlsError as exc:
            self._fail(exc)

    def _after_step(self, progressed: bool = False) -> None:
        if self.state is State.CLOSED:
            return
        if self.state is State.HANDSHAKING:
            self._flush_out(as_flight=True)
        elif self._out:
            # The step completed the handshake and produced our final flight.
            final = self._flush_out(as_flight=False)
            if progressed:
                self._final_flight = final

    def _flush_out(self, *, as_flight: bool) -> list[bytes]:
        if not self._out:
            return []
        out = self._out
        if len(out) == 1 and records.epoch(out[0]) != 0:
            datagrams = out  # one protected record (the usual send): nothing to renumber
        else:
            fresh = [self._number(r, fresh=True) for r in out]
            datagrams = records.pack_datagrams(fresh, self.config.mtu)
        self._out = []
        self._datagrams.extend(datagrams)
        if as_flight:
            self._flight = datagrams
            self._rto = self.config.initial_retransmit
            self._retransmit_at = self._now + self._rto
        return datagrams

    def _number(self, record: bytes, *, fresh: bool) -> bytes:
        """Give an epoch 0 record a sequence number above every one we sent before."""
        if records.epoch(record) != 0:
            return record
        seq = records.sequence_number(record)
        top = self._epoch0_top
        new = seq + self._epoch0_shift if fresh else (top or 0) + 1
        if top is not None and new <= top:
            new = top + 1
        if fresh:
            self._epoch0_shift = new - seq
        self._epoch0_top = new
        return record if new == seq else records.with_sequence_number(record, new)

    def _repeat(self, datagrams: list[bytes]) -> list[bytes]:
        """A flight again, with new epoch 0 sequence numbers (same datagram boundaries)."""
        out = []
        for datagram in datagrams:
            recs = records.split_records(datagram)
            out.append(b"".join(self._number(r, fresh=False) for r in recs))
        return out

    def _timeout_error(self) -> DtlsError:
        t = self.config.handshake_timeout
        if not self._received_any:
            return HandshakeTimeout(
                f"no DTLS answer within {t:g} s: the peer is unreachable, is not a DTLS server"
                " on that port, or dropped our ClientHello"
            )
        return HandshakeTimeout(
            f"DTLS handshake did not complete within {t:g} s although the peer answered: with"
            " PSK this is how a wrong key looks (the peer silently drops what it cannot"
            " decrypt); otherwise the path loses too much"
        )

    def _terminate(self, error: DtlsError | None) -> None:
        self.state = State.CLOSED
        self._early = None
        self.close_error = error
        self._flight = []
        self._final_flight = []
        self._retransmit_at = None
        self._handshake_deadline = None
        self._events.append(ConnectionClosed(error))
        self._backend_free()
