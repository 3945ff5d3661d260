"""The relay's fault model, without sockets or an event loop.

Three things drive a :class:`FaultModel`, the way they drive a sans-I/O protocol engine:

- :meth:`FaultModel.submit`: a datagram arrived, going in one :class:`Direction`, at time ``now``;
- :meth:`FaultModel.expire`: the clock reached :meth:`FaultModel.next_expiry`, so a datagram that
  was held back for reordering and never overtaken must go out now;
- API calls: :meth:`FaultModel.blackhole` and :meth:`FaultModel.update`.

Each returns the :class:`Delivery` list that the caller must carry out (which packet, at which
time, in this order). The model never looks at the bytes: a packet is any object the caller
chooses, so the asyncio shell can pass its own bookkeeping through, and tests can pass integers.

Why a separate model: the fault suite of the project must be reproducible. With the clock and the
random numbers both handed in, a test can drive thousands of datagrams through the model in
milliseconds with no sleeping, and the same seed gives the same losses in the shell as well.

Randomness: each direction draws from its own generator (both derived from the one given), and
every submitted datagram consumes exactly four numbers whatever the settings are. So with a given
seed the N-th datagram upstream is lost or not independently of the traffic downstream and of
the delay settings, which keeps a failing run reproducible while the other knobs are changed.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Hashable
from dataclasses import dataclass, field, fields, replace
from typing import Generic, TypeVar

__all__ = [
    "Delivery",
    "Direction",
    "DirectionStats",
    "Fate",
    "FaultModel",
    "Faults",
    "LinkFaults",
    "Verdict",
]

P = TypeVar("P")


class Direction(enum.Enum):
    """Which way a datagram crosses the relay."""

    UP = "up"
    """From a client (the relay's listening side) towards the upstream address."""
    DOWN = "down"
    """From the upstream address back towards a client."""


@dataclass(frozen=True, slots=True)
class LinkFaults:
    """The faults applied in one direction (resolved from :class:`Faults`).

    Times are in seconds. ``jitter`` spreads the delay uniformly over
    ``[delay - jitter, delay + jitter]`` (never below zero), like netem; with jitter, datagrams can
    overtake each other, as they do on a real path.
    """

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        for name in ("delay", "jitter"):
            value = getattr(self, name)
            if value < 0.0:
                raise ValueError(f"{name} must not be negative, got {value!r}")


@dataclass(frozen=True, slots=True)
class Faults:
    """Everything the relay does to traffic, as one value (the CLI flags map onto it one to one).

    ``loss``, ``duplicate``, ``reorder``, ``delay`` and ``jitter`` apply in both directions; the
    ``*_up`` and ``*_down`` fields, when not ``None``, override them for one direction. Times are
    in seconds (the CLI takes milliseconds for delay and jitter).

    - ``blackholes``: ``(start, duration)`` pairs, seconds after the relay starts, during which
      every datagram in both directions is dropped;
    - ``rebind_every``: give every client a new upstream source port this often (NAT rebinding);
    - ``reorder_hold``: how long a datagram held back for reordering waits for a successor before
      it goes out anyway (so a held datagram is late, never lost);
    - ``seed``: seeds the random generator when the relay creates it; ``None`` for a random seed.
    """

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    loss_up: float | None = None
    loss_down: float | None = None
    duplicate_up: float | None = None
    duplicate_down: float | None = None
    reorder_up: float | None = None
    reorder_down: float | None = None
    delay_up: float | None = None
    delay_down: float | None = None
    jitter_up: float | None = None
    jitter_down: float | None = None
    blackholes: tuple[tuple[float, float], ...] = ()
    rebind_every: float | None = None
    reorder_hold: float = 0.05
    seed: int | None = None

    def __post_init__(self) -> None:
        # Resolving both directions validates every probability and time once, up front.
        self.link(Direction.UP)
        self.link(Direction.DOWN)
        for start, duration in self.blackholes:
            if start < 0 or duration < 0:
                raise ValueError(
                    f"blackhole start and duration must not be negative: {start}, {duration}"
                )
        if self.rebind_every is not None and self.rebind_every <= 0:
            raise ValueError(f"rebind_every must be positive, got {self.rebind_every!r}")
        if self.reorder_hold < 0:
            raise ValueError(f"reorder_hold must not be negative, got {self.reorder_hold!r}")

    def link(self, direction: Direction) -> LinkFaults:
        """The faults for one direction, with that direction's overrides applied."""
        suffix = "_up" if direction is Direction.UP else "_down"
        values: dict[str, float] = {}
        for f in fields(LinkFaults):
            override = getattr(self, f.name + suffix)
            values[f.name] = getattr(self, f.name) if override is None else override
        return LinkFaults(**values)

    def with_blackhole(self, start: float, duration: float) -> Faults:
        """A copy with one more blackhole window (seconds after the relay's start)."""
        return replace(self, blackholes=(*self.blackholes, (start, duration)))


class Fate(enum.Enum):
    """What happened to the datagram that was just submitted."""

    LOST = "lost"
    """Dropped by random loss."""
    BLACKHOLED = "blackholed"
    """Dropped because a blackhole window is open."""
    DELIVERED = "delivered"
    """Goes out once (now or, with delay, later)."""
    DUPLICATED = "duplicated"
    """Goes out twice."""
    HELD = "held"
    """Held back for reordering: it goes out right after the next datagram of its flow, or at
    the hold bound (see :meth:`FaultModel.expire`), whichever is first."""


@dataclass(frozen=True, slots=True)
class Delivery(Generic[P]):
    """One datagram to send: ``packet`` at time ``at``.

    Deliveries come in the order they must be sent; two with the same ``at`` must go out in list
    order (that is how a reordering is expressed when there is no delay).
    """

    packet: P
    at: float
    duplicate: bool = False
    """This is the second copy of a duplicated datagram."""
    reordered: bool = False
    """This datagram was held back and overtaken by a later one."""


@dataclass(frozen=True, slots=True)
class Verdict(Generic[P]):
    """The answer to :meth:`FaultModel.submit`.

    ``deliveries`` may include a previously held datagram of the same flow, released after the one
    just submitted; it is empty when the new datagram was dropped or held.
    """

    fate: Fate
    deliveries: tuple[Delivery[P], ...]


@dataclass(slots=True)
class DirectionStats:
    """Counters for one direction. ``dropped`` is the sum of every reason a datagram died."""

    received: int = 0
    """Datagrams that came in (submitted to the model)."""
    sent: int = 0
    """Datagrams that went out, duplicates included (counted by the shell)."""
    dropped: int = 0
    lost: int = 0
    blackholed: int = 0
    send_failed: int = 0
    """Dropped by the shell: the socket refused it, or the client mapping was gone by then."""
    duplicated: int = 0
    reordered: int = 0
    """Datagrams that were held back and overtaken by a later one."""
    delayed: int = 0
    """Datagrams that went out later than they came in (delay, jitter or a reorder hold)."""

    def copy(self) -> DirectionStats:
        return replace(self)


@dataclass(slots=True)
class _Held(Generic[P]):
    packet: P
    at: float
    deadline: float
    duplicate: bool


@dataclass(slots=True)
class _Window:
    start: float
    end: float


@dataclass(slots=True)
class _DirectionState(Generic[P]):
    rng: random.Random
    link: LinkFaults
    stats: DirectionStats = field(default_factory=DirectionStats)
    held: dict[Hashable, _Held[P]] = field(default_factory=dict)


class FaultModel(Generic[P]):
    """Decides the fate of each datagram crossing one relay, given the time and a seeded RNG.

    ``start`` is the time that blackhole windows in ``faults`` are relative to (the relay's start).
    The clock is whatever the caller uses consistently (the shell uses the event loop's clock).

    A *flow* (the ``flow`` argument of :meth:`submit`, e.g. the client's address) scopes
    reordering: a held datagram is overtaken by the next datagram of the same flow and direction,
    as on a real path, not by another client's traffic.
    """

    def __init__(self, faults: Faults, rng: random.Random, start: float) -> None:
        self._faults = faults
        self._start = start
        self._windows: list[_Window] = [
            _Window(start + s, start + s + d) for s, d in faults.blackholes
        ]
        # One generator per direction, so the traffic in one direction does not change the fate
        # of datagrams in the other (see the module docstring).
        self._dirs: dict[Direction, _DirectionState[P]] = {
            d: _DirectionState(rng=random.Random(rng.getrandbits(64)), link=faults.link(d))
            for d in Direction
        }

    @property
    def faults(self) -> Faults:
        return self._faults

    def update(self, faults: Faults) -> None:
        """Change the faults from now on (e.g. clean handshakes first, then loss).

        Blackhole windows already scheduled stay; new ones in ``faults`` are added relative to the
        original start. Held datagrams stay held until their successor or their bound.
        """
        known = set(self._faults.blackholes)
        for s, d in faults.blackholes:
            if (s, d) not in known:
                self._windows.append(_Window(self._start + s, self._start + s + d))
        self._faults = faults
        for direction, state in self._dirs.items():
            state.link = faults.link(direction)

    def blackhole(self, now: float, duration: float) -> None:
        """Drop everything, both ways, from ``now`` for ``duration`` seconds."""
        if duration < 0:
            raise ValueError(f"duration must not be negative, got {duration!r}")
        self._windows.append(_Window(now, now + duration))

    def end_blackholes(self, now: float) -> None:
        """Close every blackhole window open at ``now`` and cancel the ones not yet begun."""
        kept = []
        for w in self._windows:
            if w.end <= now:
                continue
            if w.start < now:
                kept.append(_Window(w.start, now))
        self._windows = kept

    def in_blackhole(self, now: float) -> bool:
        return any(w.start <= now < w.end for w in self._windows)

    def stats(self, direction: Direction) -> DirectionStats:
        """The live counters of one direction (the shell adds ``sent`` and ``send_failed``)."""
        return self._dirs[direction].stats

    def submit(
        self, packet: P, direction: Direction, now: float, flow: Hashable = None
    ) -> Verdict[P]:
        """Decide what happens to ``packet``, which arrived at ``now`` going ``direction``."""
        state = self._dirs[direction]
        link = state.link
        stats = state.stats
        stats.received += 1
        # Always four draws per datagram, whatever the settings (see the module docstring).
        rng = state.rng
        u_loss, u_dup, u_reorder, u_jitter = rng.random(), rng.random(), rng.random(), rng.random()

        if self.in_blackhole(now):
            stats.blackholed += 1
            stats.dropped += 1
            return Verdict(Fate.BLACKHOLED, ())
        if u_loss < link.loss:
            stats.lost += 1
            stats.dropped += 1
            return Verdict(Fate.LOST, ())

        at = now + max(0.0, link.delay + (2.0 * u_jitter - 1.0) * link.jitter)
        duplicate = u_dup < link.duplicate
        if duplicate:
            stats.duplicated += 1

        held = state.held.pop(flow, None)
        if held is None and u_reorder < link.reorder:
            # Hold it; the next datagram of this flow releases it (and is not held itself, so a
            # flow is never starved by a chain of holds).
            state.held[flow] = _Held(packet, at, now + self._faults.reorder_hold, duplicate)
            return Verdict(Fate.HELD, ())

        deliveries = self._copies(packet, at, duplicate, reordered=False, stats=stats, now=now)
        if held is not None:
            stats.reordered += 1
            released_at = max(at, held.at)
            deliveries += self._copies(
                held.packet, released_at, held.duplicate, reordered=True, stats=stats, now=None
            )
        return Verdict(Fate.DUPLICATED if duplicate else Fate.DELIVERED, tuple(deliveries))

    def next_expiry(self) -> float | None:
        """When :meth:`expire` must next be called (``None``: nothing is held)."""
        deadlines = [h.deadline for s in self._dirs.values() for h in s.held.values()]
        return min(deadlines, default=None)

    def expire(self, now: float) -> list[Delivery[P]]:
        """Release held datagrams whose hold bound has passed (in the order they were held)."""
        out: list[Delivery[P]] = []
        for state in self._dirs.values():
            due = [flow for flow, h in state.held.items() if h.deadline <= now]
            for flow in due:
                h = state.held.pop(flow)
                out += self._copies(
                    h.packet,
                    max(h.at, now),
                    h.duplicate,
                    reordered=False,
                    stats=state.stats,
                    now=None,
                )
        return out

    def release_all(self, now: float) -> list[Delivery[P]]:
        """Release every held datagram now (used when the relay shuts down or faults change)."""
        out: list[Delivery[P]] = []
        for state in self._dirs.values():
            for h in state.held.values():
                out += self._copies(
                    h.packet,
                    max(h.at, now),
                    h.duplicate,
                    reordered=False,
                    stats=state.stats,
                    now=None,
                )
            state.held.clear()
        return out

    @staticmethod
    def _copies(
        packet: P,
        at: float,
        duplicate: bool,
        *,
        reordered: bool,
        stats: DirectionStats,
        now: float | None,
    ) -> list[Delivery[P]]:
        # A datagram counts as delayed when it leaves later than it arrived; released holds
        # always do (``now`` is None for them).
        if now is None or at > now:
            stats.delayed += 1
        first = Delivery(packet, at, duplicate=False, reordered=reordered)
        if not duplicate:
            return [first]
        return [first, Delivery(packet, at, duplicate=True, reordered=reordered)]
