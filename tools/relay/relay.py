"""The asyncio shell around :class:`~coaplayers_tools.relay.faults.FaultModel`: real UDP sockets.

The relay listens on one address and forwards to one upstream address. Like a NAT, it gives every
client (downstream source address) its own upstream socket, so the upstream sees one source port
per client and its replies can be told apart and sent back to the right client. The table of
these mappings is bounded (least recently used first out) and idle mappings expire, so a flood of
source ports cannot exhaust the relay's file descriptors.

Why raw non-blocking sockets with ``loop.add_reader`` rather than asyncio datagram transports: a
new client's upstream socket must exist before its first datagram is forwarded, inside the
receive callback, and creating a transport is a coroutine. A non-blocking ``socket.send`` also
behaves like a router when the kernel buffer is full: the datagram is dropped and counted, rather
than queued without bound in user space.

Time is the event loop's clock. Delayed datagrams go into one heap served by one timer, so
datagrams due at the same time leave in the order the fault model gave (asyncio's own timers do
not promise that for equal times).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import random
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import Any

from .capture import CaptureWriter
from .faults import Delivery, Direction, DirectionStats, FaultModel, Faults

__all__ = ["Address", "FaultRelay", "RelayStats"]

log = logging.getLogger(__name__)

Address = tuple[str, int]

_MAX_DATAGRAM = 65535
# How many datagrams one readiness callback reads before yielding to the loop, so that one busy
# socket cannot starve the timers (delays) and the other sockets.
_READ_BATCH = 64
# asyncio may run a timer up to its clock resolution early; anything due within this slack counts
# as due, so an early wake-up does not spin.
_SLACK = 0.001


@dataclass(frozen=True, slots=True)
class RelayStats:
    """A snapshot of the relay's counters (see :class:`DirectionStats` for each direction)."""

    up: DirectionStats
    down: DirectionStats
    clients: int
    """Client mappings open now."""
    mappings_created: int
    evicted: int
    """Mappings closed to make room for a new client (the table was full)."""
    expired: int
    """Mappings closed because they were idle."""
    rebinds: int
    """Upstream sockets replaced by a new one (NAT rebinding), counted per client."""
    upstream_unreachable: int
    """ICMP port-unreachable reports from the upstream (nothing listening there)."""

    def as_dict(self) -> dict[str, Any]:
        def direction(s: DirectionStats) -> dict[str, int]:
            return {f.name: getattr(s, f.name) for f in fields(DirectionStats)}

        return {
            "up": direction(self.up),
            "down": direction(self.down),
            "clients": self.clients,
            "mappings_created": self.mappings_created,
            "evicted": self.evicted,
            "expired": self.expired,
            "rebinds": self.rebinds,
            "upstream_unreachable": self.upstream_unreachable,
        }

    def format(self) -> str:
        """A few human-readable lines, as printed by ``coap-relay -v`` on exit."""
        lines = []
        for name, s in (("up", self.up), ("down", self.down)):
            lines.append(
                f"{name:>4}: in {s.received} out {s.sent} dropped {s.dropped} "
                f"(lost {s.lost}, blackholed {s.blackholed}, send failed {s.send_failed}) "
                f"duplicated {s.duplicated} reordered {s.reordered} delayed {s.delayed}"
            )
        lines.append(
            f"clients: {self.clients} open, {self.mappings_created} created, {self.evicted} "
            f"evicted, {self.expired} expired, {self.rebinds} rebinds, "
            f"{self.upstream_unreachable} upstream unreachable"
        )
        return "\n".join(lines)


@dataclass(eq=False, slots=True)
class _Mapping:
    """One client's NAT-like mapping: its address and the upstream socket it is forwarded from."""

    key: Address
    client: tuple[Any, ...]  # the full sockaddr as received (IPv6 carries flowinfo and scope)
    sock: socket.socket
    last_active: float
    closed: bool = False


@dataclass(frozen=True, slots=True)
class _Packet:
    mapping: _Mapping
    direction: Direction
    data: bytes


@dataclass(order=True, slots=True)
class _Scheduled:
    at: float
    seq: int
    delivery: Delivery[_Packet] = field(compare=False)


def _key(addr: tuple[Any, ...]) -> Address:
    return (addr[0], addr[1])


class FaultRelay:
    """A UDP relay on one hop that applies :class:`Faults` both ways; an async context manager.

    ``listen`` is the address to bind (port 0: an ephemeral port, see :attr:`address`);
    ``upstream`` the address every datagram is forwarded to. Host names are resolved once, at
    start. ``rng`` overrides the generator made from ``faults.seed``.

    ``max_clients`` bounds the mapping table (least recently used mappings are evicted);
    ``idle_timeout`` closes a mapping that has seen no datagram either way for that long.
    ``record`` is a capture file path (see :mod:`coaplayers_tools.relay.capture`). ``upstream_bind``
    is the local host the upstream sockets bind to (default: the wildcard address).
    """

    def __init__(
        self,
        *,
        upstream: Address,
        listen: Address = ("127.0.0.1", 0),
        faults: Faults | None = None,
        max_clients: int = 256,
        idle_timeout: float = 120.0,
        record: str | os.PathLike[str] | None = None,
        rng: random.Random | None = None,
        upstream_bind: str | None = None,
    ) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        self._listen_spec = listen
        self._upstream_spec = upstream
        self._faults = faults or Faults()
        self._rng = rng if rng is not None else random.Random(self._faults.seed)
        self._max_clients = max_clients
        self._idle_timeout = idle_timeout
        self._record_path = record
        self._upstream_bind = upstream_bind

        self._loop: asyncio.AbstractEventLoop | None = None
        self._model: FaultModel[_Packet] | None = None
        self._listen_sock: socket.socket | None = None
        self._upstream_family = socket.AF_INET
        self._upstream_addr: tuple[Any, ...] = ()
        self._address: Address | None = None
        self._mappings: OrderedDict[Address, _Mapping] = OrderedDict()
        self._capture: CaptureWriter | None = None
        self._start = 0.0

        self._heap: list[_Scheduled] = []
        self._seq = itertools.count()
        self._send_timer: asyncio.TimerHandle | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._rebind_timer: asyncio.TimerHandle | None = None
        self._waiters: list[tuple[Callable[[RelayStats], bool], asyncio.Future[RelayStats]]] = []

        self._mappings_created = 0
        self._evicted = 0
        self._expired = 0
        self._rebinds = 0
        self._upstream_unreachable = 0
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> FaultRelay:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def start(self) -> None:
        """Resolve both addresses, bind the listening socket and start the timers."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        up_infos = await loop.getaddrinfo(
            self._upstream_spec[0], self._upstream_spec[1], type=socket.SOCK_DGRAM
        )
        if not up_infos:
            raise OSError(f"cannot resolve upstream {self._upstream_spec!r}")
        self._upstream_family, _, _, _, self._upstream_addr = up_infos[0]

        listen_infos = await loop.getaddrinfo(
            self._listen_spec[0],
            self._listen_spec[1],
            type=socket.SOCK_DGRAM,
            flags=socket.AI_PASSIVE,
        )
        if not listen_infos:
            raise OSError(f"cannot resolve listen address {self._listen_spec!r}")
        family, _, _, _, sockaddr = listen_infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(sockaddr)
        except OSError:
            sock.close()
            raise
        self._listen_sock = sock
        self._address = _key(sock.getsockname())

        self._start = loop.time()
        self._model = FaultModel(self._faults, self._rng, start=self._start)
        if self._record_path is not None:
            self._capture = CaptureWriter(self._record_path)
        loop.add_reader(sock.fileno(), self._on_listen_readable)
        self._arm_sweep()
        self._arm_rebind()
        log.info(
            "relay listening on %s, forwarding to %s",
            _fmt(self._address),
            _fmt(self._upstream_addr),
        )

    def close(self) -> None:
        """Stop: close every socket; datagrams still delayed or held are dropped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for timer in (self._send_timer, self._hold_timer, self._sweep_timer, self._rebind_timer):
            if timer is not None:
                timer.cancel()
        self._heap.clear()
        for mapping in list(self._mappings.values()):
            self._close_mapping(mapping)
        self._mappings.clear()
        if self._listen_sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._listen_sock.fileno())
            self._listen_sock.close()
        if self._capture is not None:
            self._capture.close()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(RuntimeError("relay closed"))
        self._waiters.clear()

    # -- API ----------------------------------------------------------------------------------

    @property
    def address(self) -> Address:
        """The bound listening address ``(host, port)``: what clients should send to."""
        if self._address is None:
            raise RuntimeError("relay not started")
        return self._address

    @property
    def started_at(self) -> float:
        """The event loop's time at start: capture times are seconds after it."""
        if self._address is None:
            raise RuntimeError("relay not started")
        return self._start

    @property
    def faults(self) -> Faults:
        return self._faults

    def update_faults(self, faults: Faults) -> None:
        """Change the faults from now on (e.g. let the handshakes through cleanly, then add loss).

        ``faults.seed`` is ignored here: the generator keeps running. A changed ``rebind_every``
        takes effect at once.
        """
        self._faults = faults
        self._require_model().update(faults)
        if self._rebind_timer is not None:
            self._rebind_timer.cancel()
            self._rebind_timer = None
        self._arm_rebind()

    @property
    def stats(self) -> RelayStats:
        """A snapshot of the counters."""
        model = self._require_model()
        return RelayStats(
            up=model.stats(Direction.UP).copy(),
            down=model.stats(Direction.DOWN).copy(),
            clients=len(self._mappings),
            mappings_created=self._mappings_created,
            evicted=self._evicted,
            expired=self._expired,
            rebinds=self._rebinds,
            upstream_unreachable=self._upstream_unreachable,
        )

    def clients(self) -> dict[Address, Address]:
        """Each client's address, mapped to the local address its upstream socket uses (the
        source address the upstream sees for that client)."""
        return {key: _key(m.sock.getsockname()) for key, m in self._mappings.items()}

    def rebind(self, client: Address | None = None) -> dict[Address, Address]:
        """NAT rebinding: give one client (or every client) a new upstream socket, so the upstream
        sees it from a new source port while the client keeps sending to the same relay address.

        The old socket is closed at once, as a NAT drops its old mapping: replies already on their
        way to the old port are lost. Returns each rebound client's new upstream-side address.
        Raises ``KeyError`` for a client that has no mapping.
        """
        if client is not None:
            targets = [self._mappings[_key(client)]]
        else:
            targets = list(self._mappings.values())
        out: dict[Address, Address] = {}
        for mapping in targets:
            new_sock = self._open_upstream()
            old = mapping.sock
            # The new socket is bound before the old one closes, so the port is sure to differ.
            self._require_loop().remove_reader(old.fileno())
            old.close()
            mapping.sock = new_sock
            self._watch(mapping)
            self._rebinds += 1
            out[mapping.key] = _key(new_sock.getsockname())
            log.info(
                "rebound client %s to upstream-side %s", _fmt(mapping.key), _fmt(out[mapping.key])
            )
        self._notify()
        return out

    def blackhole(self, duration: float, start_in: float = 0.0) -> None:
        """Drop every datagram, both ways, for ``duration`` seconds from ``start_in`` from now."""
        self._require_model().blackhole(self._require_loop().time() + start_in, duration)

    def end_blackhole(self) -> None:
        """End every blackhole now, and cancel those scheduled for later (from flags too)."""
        self._require_model().end_blackholes(self._require_loop().time())

    def expire_idle(self, now: float | None = None) -> int:
        """Close the mappings idle for ``idle_timeout``; returns how many were closed.

        Runs by itself periodically; ``now`` (event loop time) lets a test look into the future
        instead of sleeping.
        """
        if now is None:
            now = self._require_loop().time()
        stale = [m for m in self._mappings.values() if now - m.last_active >= self._idle_timeout]
        for mapping in stale:
            del self._mappings[mapping.key]
            self._close_mapping(mapping)
            self._expired += 1
        if stale:
            log.debug("expired %d idle client mappings", len(stale))
            self._notify()
        return len(stale)

    async def wait_until(
        self, predicate: Callable[[RelayStats], bool], timeout: float | None = None
    ) -> RelayStats:
        """Wait until ``predicate(stats)`` holds (checked after every datagram and API change),
        so that tests await what the relay did instead of sleeping. Raises ``TimeoutError``, or
        ``RuntimeError`` if the relay closes first."""
        current = self.stats
        if predicate(current):
            return current
        fut: asyncio.Future[RelayStats] = self._require_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    # -- datagrams in ----------------------------------------------------------------------------

    def _on_listen_readable(self) -> None:
        sock = self._listen_sock
        assert sock is not None
        for _ in range(_READ_BATCH):
            try:
                data, addr = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                # An unconnected socket can still see an error queued by an earlier send.
                log.debug("listening socket error: %s", e)
                continue
            self._from_client(data, addr)

    def _on_upstream_readable(self, mapping: _Mapping, sock: socket.socket) -> None:
        for _ in range(_READ_BATCH):
            if mapping.closed or sock is not mapping.sock:
                return
            try:
                data = sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                # ICMP port unreachable for an earlier send: the upstream is not listening (yet).
                self._upstream_unreachable += 1
                self._notify()
                continue
            except OSError as e:
                log.debug("upstream socket error for client %s: %s", _fmt(mapping.key), e)
                continue
            self._from_upstream(mapping, data)

    def _from_client(self, data: bytes, addr: tuple[Any, ...]) -> None:
        loop = self._require_loop()
        model = self._require_model()
        now = loop.time()
        self._record(now, Direction.UP, data)
        key = _key(addr)
        mapping = self._mappings.get(key)
        if mapping is None:
            try:
                mapping = self._new_mapping(key, addr, now)
            except OSError as e:
                log.warning("cannot open an upstream socket for client %s: %s", _fmt(key), e)
                stats = model.stats(Direction.UP)
                stats.received += 1
                stats.dropped += 1
                stats.send_failed += 1
                self._notify()
                return
        else:
            self._mappings.move_to_end(key)
        mapping.last_active = now
        verdict = model.submit(_Packet(mapping, Direction.UP, data), Direction.UP, now, flow=key)
        self._dispatch(verdict.deliveries, now)
        self._notify()

    def _from_upstream(self, mapping: _Mapping, data: bytes) -> None:
        loop = self._require_loop()
        now = loop.time()
        self._record(now, Direction.DOWN, data)
        mapping.last_active = now
        self._mappings.move_to_end(mapping.key)
        verdict = self._require_model().submit(
            _Packet(mapping, Direction.DOWN, data), Direction.DOWN, now, flow=mapping.key
        )
        self._dispatch(verdict.deliveries, now)
        self._notify()

    def _record(self, now: float, direction: Direction, data: bytes) -> None:
        if self._capture is not None:
            self._capture.write(now - self._start, direction, data)

    # -- mappings ------------------------------------------------------------------------------

    def _new_mapping(self, key: Address, addr: tuple[Any, ...], now: float) -> _Mapping:
        while len(self._mappings) >= self._max_clients:
            _, victim = self._mappings.popitem(last=False)
            self._close_mapping(victim)
            self._evicted += 1
            log.debug("evicted client mapping %s (table full)", _fmt(victim.key))
        mapping = _Mapping(key=key, client=addr, sock=self._open_upstream(), last_active=now)
        self._watch(mapping)
        self._mappings[key] = mapping
        self._mappings_created += 1
        log.debug("new client %s, upstream-side %s", _fmt(key), _fmt(mapping.sock.getsockname()))
        return mapping

    def _watch(self, mapping: _Mapping) -> None:
        self._require_loop().add_reader(
            mapping.sock.fileno(), self._on_upstream_readable, mapping, mapping.sock
        )

    def _open_upstream(self) -> socket.socket:
        sock = socket.socket(self._upstream_family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            wildcard = "::" if self._upstream_family == socket.AF_INET6 else "0.0.0.0"
            sock.bind((self._upstream_bind or wildcard, 0))
            # Connected: the kernel delivers only the upstream's datagrams to this socket, and
            # reports ICMP errors on it.
            sock.connect(self._upstream_addr)
        except OSError:
            sock.close()
            raise
        return sock

    def _close_mapping(self, mapping: _Mapping) -> None:
        if mapping.closed:
            return
        mapping.closed = True
        if self._loop is not None:
            self._loop.remove_reader(mapping.sock.fileno())
        mapping.sock.close()

    # -- datagrams out -------------------------------------------------------------------------

    def _dispatch(
        self, deliveries: tuple[Delivery[_Packet], ...] | list[Delivery[_Packet]], now: float
    ) -> None:
        for delivery in deliveries:
            if delivery.at <= now + _SLACK and not self._heap:
                self._send(delivery)
            else:
                # Anything already queued goes first, so equal-time deliveries keep their order.
                heapq.heappush(self._heap, _Scheduled(delivery.at, next(self._seq), delivery))
        self._arm_send()
        self._arm_hold()

    def _arm_send(self) -> None:
        if not self._heap or self._closed:
            return
        due = self._heap[0].at
        if self._send_timer is not None:
            if self._send_timer.when() <= due:
                return
            self._send_timer.cancel()
        self._send_timer = self._require_loop().call_at(due, self._on_send_timer)

    def _on_send_timer(self) -> None:
        self._send_timer = None
        now = self._require_loop().time()
        while self._heap and self._heap[0].at <= now + _SLACK:
            self._send(heapq.heappop(self._heap).delivery)
        self._arm_send()
        self._notify()

    def _arm_hold(self) -> None:
        if self._closed:
            return
        due = self._require_model().next_expiry()
        if due is None:
            return
        if self._hold_timer is not None:
            if self._hold_timer.when() <= due:
                return
            self._hold_timer.cancel()
        self._hold_timer = self._require_loop().call_at(due, self._on_hold_timer)

    def _on_hold_timer(self) -> None:
        self._hold_timer = None
        now = self._require_loop().time()
        released = self._require_model().expire(now + _SLACK)
        self._dispatch(released, now)
        self._notify()

    def _send(self, delivery: Delivery[_Packet]) -> None:
        packet = delivery.packet
        mapping = packet.mapping
        stats = self._require_model().stats(packet.direction)
        try:
            if packet.direction is Direction.UP:
                if mapping.closed:
                    raise ConnectionAbortedError("client mapping closed")
                mapping.sock.send(packet.data)
            else:
                assert self._listen_sock is not None
                self._listen_sock.sendto(packet.data, mapping.client)
        except ConnectionRefusedError:
            # Reported for an earlier datagram; this one was not sent. Count it as a failure.
            self._upstream_unreachable += 1
            stats.send_failed += 1
            stats.dropped += 1
        except OSError as e:
            log.debug(
                "send %s for client %s failed: %s", packet.direction.value, _fmt(mapping.key), e
            )
            stats.send_failed += 1
            stats.dropped += 1
        else:
            stats.sent += 1

    # -- timers --------------------------------------------------------------------------------

    def _arm_sweep(self) -> None:
        if self._closed:
            return
        interval = min(max(self._idle_timeout / 2, 0.05), 10.0)
        self._sweep_timer = self._require_loop().call_later(interval, self._on_sweep)

    def _on_sweep(self) -> None:
        self.expire_idle()
        self._arm_sweep()

    def _arm_rebind(self) -> None:
        if self._closed or self._faults.rebind_every is None:
            return
        self._rebind_timer = self._require_loop().call_later(
            self._faults.rebind_every, self._on_rebind
        )

    def _on_rebind(self) -> None:
        self._rebind_timer = None
        try:
            self.rebind()
        except OSError as e:
            log.warning("periodic rebind failed: %s", e)
        self._arm_rebind()

    # -- helpers -------------------------------------------------------------------------------

    def _notify(self) -> None:
        if not self._waiters:
            return
        current = self.stats
        for predicate, fut in list(self._waiters):
            if not fut.done() and predicate(current):
                fut.set_result(current)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("relay not started")
        return self._loop

    def _require_model(self) -> FaultModel[_Packet]:
        if self._model is None:
            raise RuntimeError("relay not started")
        return self._model


def _fmt(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
