"""Routing to replica sets: the replica that holds a request's state, from outer options alone.

A route may name a replica set (``replicas:URI,URI`` or a TOML list): several coap-server
processes, each started with its own ``--replica N``, serving one origin. Each writes N into
the Layer 0 session names and OSCORE kids it hands out (:mod:`coaplayers.replica`), so:

- a request on a session, or under an OSCORE kid, goes to the member that answered N to the
  last health probe;
- anything else (a new handshake, a plain request), and a session whose replica is down,
  goes to a healthy member chosen by rendezvous hashing of the client's address over the
  healthy replicas' numbers. Hashing rather than least-loaded: every proxy (two of them, or
  one after a restart) makes the same choice with no shared state, a client's retransmitted
  ClientHello and its plain block-wise transfers stay on one replica, and only the clients
  of a replica that goes down move. A session that reaches a replica that does not hold it
  gets that replica's unknown-session answer (Layer 0 4.04, OSCORE 4.01), so its client
  handshakes again there: nothing runs twice, nothing is answered with another's keys.

No table of sessions anywhere: the proxy's state is one row per member address (its number,
up or down, when it last answered), learned from the probes.

:class:`ReplicaSet` is sans-I/O (the clock and the probe answers are handed in);
:class:`HealthMonitor` is the asyncio shell that probes (``GET /.well-known/replica``, NON,
every ``health_interval``) and re-resolves member host names (a DNS name with several
addresses, as Docker Compose ``--scale`` or a Kubernetes headless service give, is one member
per address).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiocoap import GET, Message
from aiocoap.message import UndecidedRemote
from aiocoap.numbers.types import Type

from ..replica import MAX_REPLICA, REPLICA_PATH
from .config import Route, Upstream
from .routing import is_ip_literal

log = logging.getLogger("coaplayers.proxy.replicas")


@dataclass(slots=True)
class Member:
    """One address of a replica set and what its probes told."""

    upstream: Upstream  # the address probed and forwarded to (host as resolved)
    name: str | None = None  # the configured host name it was resolved from, if any
    replica: int | None = None
    up: bool = False
    last_answer: float = -math.inf

    @property
    def key(self) -> str:
        return f"{self.upstream.scheme}://{self.upstream.hostinfo}"


def _weight(client: str, replica: int) -> bytes:
    return hashlib.blake2b(f"{replica}|{client}".encode(), digest_size=8).digest()


class ReplicaSet:
    """The members of one route's replica set, their health, and the choice per request."""

    def __init__(self, route: Route, timeout: float) -> None:
        self.route = route
        self.timeout = timeout  # no answer for this long: down
        self.members: dict[str, Member] = {}
        self.names: list[Upstream] = []  # members given by host name, resolved by the monitor
        for up in route.members:
            if is_ip_literal(up.host):
                self._add(Member(up))
            else:
                self.names.append(up)
        self._by_replica: dict[int, Member] = {}
        self._healthy: list[int] = []
        # Recent choices by hash key (a client's address): valid until the healthy set changes.
        self._picks: dict[str, Member] = {}
        # (set, member, "up" or "down", reason): the monitor logs and counts transitions.
        self.changed: Callable[[ReplicaSet, Member, str, str], None] | None = None

    def _add(self, member: Member) -> None:
        self.members.setdefault(member.key, member)

    def set_addresses(self, name: Upstream, hosts: list[str]) -> None:
        """The addresses ``name`` resolves to now: members are added and dropped to match."""
        want = {Upstream(name.scheme, h, name.port, name.path, name.mount) for h in hosts}
        for key, m in list(self.members.items()):
            if m.name == name.host and m.upstream not in want:
                del self.members[key]
        for up in want:
            self._add(Member(up, name=name.host))
        self._reindex()

    # -- health ------------------------------------------------------------------------------

    def answered(self, member: Member, replica: int | None, now: float) -> str | None:
        """A probe answer (``replica`` None: not a replica's answer). Returns "up" when the
        member came up."""
        member.last_answer = now
        if replica is None:
            return self.lost(member, "bad answer")
        changed = member.replica != replica or not member.up
        member.replica = replica
        member.up = True
        if changed:
            self._reindex()
            return "up"
        return None

    def lost(self, member: Member, reason: str) -> str | None:
        if not member.up:
            return None
        member.up = False
        self._reindex()
        return "down"

    def fail(self, key: str, reason: str) -> bool:
        """A forwarded request showed the member ``key`` down (an ICMP error: nothing took
        the datagram); mark it so at once. Whether it was up."""
        member = self.members.get(key)
        if member is None or self.lost(member, reason) is None:
            return False
        if self.changed is not None:
            self.changed(self, member, "down", reason)
        return True

    def expire(self, now: float) -> list[Member]:
        """Members that have not answered for ``timeout``: marked down, returned."""
        gone = [m for m in self.members.values()
                if m.up and now - m.last_answer > self.timeout]
        for m in gone:
            m.up = False
        if gone:
            self._reindex()
        return gone

    def _reindex(self) -> None:
        by_replica: dict[int, Member] = {}
        for m in sorted(self.members.values(), key=lambda m: m.key):
            if m.up and m.replica is not None and m.replica not in by_replica:
                by_replica[m.replica] = m
        self._by_replica = by_replica
        self._healthy = sorted(by_replica)
        self._picks = {}

    # -- routing -----------------------------------------------------------------------------

    @property
    def healthy(self) -> list[int]:
        return list(self._healthy)

    def pick(self, replica: int | None, client: str) -> Member | None:
        """The member for a request naming ``replica`` (None: any), from ``client``'s
        address; None when no member is up."""
        if replica is not None:
            member = self._by_replica.get(replica)
            if member is not None:
                return member
        member = self._picks.get(client)
        if member is not None:
            return member
        if not self._healthy:
            return None
        best = max(self._healthy, key=lambda r: _weight(client, r))
        member = self._by_replica[best]
        if len(self._picks) >= 4096:  # keys come from the network: bounded
            self._picks.clear()
        self._picks[client] = member
        return member


def parse_probe_answer(response: Message) -> int | None:
    """The replica number in a probe's answer, None if it is not a replica's 2.05."""
    if not response.code.is_successful():
        return None
    text = bytes(response.payload)
    if not text.isdigit() or len(text) > 2:
        return None
    value = int(text)
    return value if value <= MAX_REPLICA else None


class HealthMonitor:
    """Probes every member of every replica set; marks members up and down (log, metrics).

    A member that stops answering is down at most ``timeout`` plus one ``interval`` after
    its last answer; it is up again with its first answer.
    """

    def __init__(
        self, sets: list[ReplicaSet], send: Callable[[Message, str], Any], *,
        interval: float, events: Callable[..., None], metrics: Any = None,
        resolve_every: float = 30.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sets = sets
        self.send = send  # (message, "scheme://hostinfo") -> awaitable response
        self.interval = interval
        self.events = events
        self.clock = clock
        self.resolve_every = resolve_every
        self._resolved_at = -math.inf
        self._task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        if metrics is not None:
            self.up_gauge = metrics.gauge(
                "coap_proxy_replica_up", "1 while a replica set member answers its probes",
                ("route", "member", "replica"))
            self.changes = metrics.counter(
                "coap_proxy_replica_changes_total", "Replica set members marked up or down",
                ("route", "state"))
        else:
            self.up_gauge = self.changes = None
        for s in sets:
            s.changed = self._changed

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="replica health")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._probes) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def first_round(self, timeout: float) -> None:
        """Resolve and probe once, waiting (bounded) for the answers: routes work at once."""
        await self._resolve()
        probes = [asyncio.ensure_future(self._probe(s, m)) for s in self.sets
                  for m in list(s.members.values())]
        if probes:
            await asyncio.wait(probes, timeout=timeout)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = self.clock()
            # Again every resolve_every, and on every round while a named set has no healthy
            # member (its replicas may not have been in the DNS yet when we started).
            if now - self._resolved_at >= self.resolve_every or any(
                    s.names and not s.healthy for s in self.sets):
                await self._resolve()
            for s in self.sets:
                for m in s.expire(now):
                    self._changed(s, m, "down", "no answer")
                for m in list(s.members.values()):
                    task = asyncio.ensure_future(self._probe(s, m))
                    self._probes.add(task)
                    task.add_done_callback(self._probes.discard)

    async def _resolve(self) -> None:
        self._resolved_at = self.clock()
        loop = asyncio.get_running_loop()
        for s in self.sets:
            for name in s.names:
                try:
                    infos = await loop.getaddrinfo(name.host, name.port, type=socket.SOCK_DGRAM)
                except OSError as exc:
                    self.events("replica_resolve_failed", route=s.route.match, name=name.host,
                                error=str(exc))
                    continue
                hosts = sorted({str(i[4][0]) for i in infos})
                s.set_addresses(name, hosts)

    async def _probe(self, s: ReplicaSet, m: Member) -> None:
        msg = Message(code=GET, mtype=Type.NON, uri_path=REPLICA_PATH)
        if m.name is not None:
            # The name the set was given by: coaps:// credentials are looked up by it.
            msg.opt.uri_host = m.name
        msg.remote = UndecidedRemote(m.upstream.scheme, m.upstream.hostinfo)
        try:
            response = await asyncio.wait_for(self.send(msg, m.key), self.interval + s.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure is "no answer"; expiry decides
            log.debug("probe of %s failed: %s", m.key, exc)
            return
        if m.key not in s.members:
            return
        state = s.answered(m, parse_probe_answer(response), self.clock())
        if state is not None:
            self._changed(s, m, state, "answered" if state == "up" else "not a replica")

    def _changed(self, s: ReplicaSet, m: Member, state: str, reason: str) -> None:
        self.events(f"replica_{state}", route=s.route.match, member=m.key, replica=m.replica,
                    reason=reason, healthy=s.healthy)
        if self.changes is not None:
            self.changes.inc(route=s.route.match, state=state)
            self.up_gauge.set(1.0 if state == "up" else 0.0, route=s.route.match,
                              member=m.key, replica=str(m.replica))
