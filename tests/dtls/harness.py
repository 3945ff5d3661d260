"""In-memory network for engine tests: one client session against one server listener.

No sockets and no sleeping: datagrams sit in a list until :meth:`Network.step` delivers them,
and time is a float that only moves when nothing is in flight, straight to the earliest timer
of either side. A seeded RNG drops, duplicates and reorders datagrams, so a failing seed can be
replayed exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from coaplayers.dtls import (
    ApplicationData,
    ConnectionClosed,
    DtlsSession,
    Event,
    HandshakeComplete,
    Listener,
    State,
)

CLIENT = "client"
SERVER = "server"

DropRule = Callable[[str, bytes], bool]
"""``(sender, datagram) -> True`` to lose that datagram (applied before random loss)."""


@dataclass
class Sent:
    """One datagram as it left its sender (before the network had its way with it)."""

    sender: str
    time: float
    data: bytes
    stateless: bool = False  # a listener's reply (HelloVerifyRequest), no session behind it


@dataclass
class Network:
    client: DtlsSession
    listener: Listener
    peer_key: Hashable = ("2001:db8::7", 61616)
    seed: int = 0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    drop: DropRule | None = None
    drop_final_flight: bool = False
    """Lose the datagrams a side sends as its handshake completes (its last flight), once."""
    now: float = 0.0

    server: DtlsSession | None = None
    servers: list[DtlsSession] = field(default_factory=list)
    in_flight: list[tuple[str, bytes]] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    events: dict[str, list[tuple[float, Event]]] = field(
        default_factory=lambda: {CLIENT: [], SERVER: []}
    )
    timer_wakeups: dict[str, int] = field(default_factory=lambda: {CLIENT: 0, SERVER: 0})
    lost: int = 0
    final_flight: tuple[str, list[bytes]] | None = None
    """Who finished the handshake first, and the datagrams it sent in that step."""

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._was_established = {CLIENT: False, SERVER: False}

    # ------------------------------------------------------------------ driving

    def start(self) -> None:
        self.client.connect(self.now)
        self._collect()

    def step(self) -> bool:
        """Deliver one datagram, or (nothing in flight) fire the next timer; False when idle."""
        if self.in_flight:
            self._deliver_one()
            return True
        sides = [s for s in (self.client, self.server) if s is not None]
        timers = [t for s in sides if (t := s.get_timer()) is not None]
        if not timers:
            return False
        self.now = max(self.now, min(timers))
        for name, session in ((CLIENT, self.client), (SERVER, self.server)):
            if session is None:
                continue
            due = session.get_timer()
            if due is not None and due <= self.now:
                self.timer_wakeups[name] += 1
                session.handle_timer(self.now)
                after = session.get_timer()
                assert after is None or after > self.now, f"{name} timer spins at {self.now}"
        self._collect()
        return True

    def run(self, until: Callable[[], bool] | None = None, max_steps: int = 5000) -> None:
        """Step until ``until()`` holds (checked when nothing is in flight) or all is quiet."""
        for _ in range(max_steps):
            if not self.in_flight and until is not None and until():
                return
            if not self.step():
                return
        raise AssertionError(f"no quiescence after {max_steps} steps (a timer or packet loop?)")

    def handshake(self, max_steps: int = 5000) -> None:
        self.start()
        self.run(until=self.both_established, max_steps=max_steps)

    def both_established(self) -> bool:
        return (
            self.client.state is State.ESTABLISHED
            and self.server is not None
            and self.server.state is State.ESTABLISHED
        )

    def settle(self) -> None:
        """Deliver everything in flight without moving time."""
        while self.in_flight:
            self._deliver_one()

    def client_send(self, data: bytes) -> None:
        self.client.send(data)
        self._collect()

    def server_send(self, data: bytes) -> None:
        assert self.server is not None
        self.server.send(data)
        self._collect()

    def inject(self, sender: str, datagram: bytes) -> None:
        """Put a datagram on the wire as if ``sender`` had sent it (an attacker, a replay)."""
        self.in_flight.append((sender, datagram))

    # ------------------------------------------------------------------ queries

    def events_of(self, side: str, kind: type[Event] = Event) -> list[Event]:
        return [e for _, e in self.events[side] if isinstance(e, kind)]

    def closed_event(self, side: str) -> ConnectionClosed | None:
        closed = self.events_of(side, ConnectionClosed)
        assert len(closed) <= 1, f"{side} reported ConnectionClosed twice: {closed}"
        return closed[0] if closed else None  # type: ignore[return-value]

    def handshake_complete(self, side: str) -> HandshakeComplete:
        done = self.events_of(side, HandshakeComplete)
        assert len(done) == 1, f"{side}: expected one HandshakeComplete, got {done}"
        return done[0]  # type: ignore[return-value]

    def received(self, side: str) -> list[bytes]:
        return [e.data for e in self.events_of(side, ApplicationData)]  # type: ignore[attr-defined]

    def bytes_sent(self, sender: str | None = None) -> int:
        return sum(len(s.data) for s in self.sent if sender in (None, s.sender))

    # ---------------------------------------------------------------- internals

    def _deliver_one(self) -> None:
        if len(self.in_flight) > 1 and self.rng.random() < self.reorder:
            sender, data = self.in_flight.pop(self.rng.randrange(len(self.in_flight)))
        else:
            sender, data = self.in_flight.pop(0)
        if sender == SERVER:
            self.client.receive_datagram(data, self.now)
        elif self.server is None or self.server.is_closed:
            replies, session = self.listener.accept(self.peer_key, data, self.now)
            for reply in replies:
                self._transmit(SERVER, reply, stateless=True)
            if session is not None:
                self.server = session
                self.servers.append(session)
        else:
            self.server.receive_datagram(data, self.now)
        self._collect()

    def _collect(self) -> None:
        for name, session in ((CLIENT, self.client), (SERVER, self.server)):
            if session is None:
                continue
            datagrams = session.datagrams_to_send()
            finishing = session.is_established and not self._was_established[name]
            self._was_established[name] = session.is_established
            if finishing and datagrams and self.final_flight is None:
                self.final_flight = (name, datagrams)
                if self.drop_final_flight:
                    for datagram in datagrams:
                        self.sent.append(Sent(name, self.now, datagram))
                        self.lost += 1
                    datagrams = []
            for datagram in datagrams:
                self._transmit(name, datagram)
            while (event := session.next_event()) is not None:
                self.events[name].append((self.now, event))

    def _transmit(self, sender: str, datagram: bytes, *, stateless: bool = False) -> None:
        self.sent.append(Sent(sender, self.now, datagram, stateless))
        if self.drop is not None and self.drop(sender, datagram):
            self.lost += 1
            return
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return
        self.in_flight.append((sender, datagram))
        if self.duplicate and self.rng.random() < self.duplicate:
            self.in_flight.append((sender, datagram))
