"""The relay with real UDP sockets on loopback: a UDP echo server behind it, clients in front.

Every wait is on an event (a datagram arriving, or the relay's counters reaching a value through
``FaultRelay.wait_until``) and bounded by ``asyncio.wait_for``; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from coaplayers_tools.relay import Direction, FaultRelay, Faults, RelayStats, read_capture

TIMEOUT = 3.0


class Endpoint(asyncio.DatagramProtocol):
    """A UDP socket whose received datagrams (and their source) land in a queue."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.queue: asyncio.Queue[tuple[bytes, tuple[Any, ...]]] = asyncio.Queue()
        self.seen: list[tuple[bytes, tuple[Any, ...]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.seen.append((data, addr))
        self.queue.put_nowait((data, addr))
        if self.echo:
            assert self.transport is not None
            self.transport.sendto(data, addr)

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        sockname = self.transport.get_extra_info("sockname")
        return (sockname[0], sockname[1])

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    async def recv(self, timeout: float = TIMEOUT) -> tuple[bytes, tuple[Any, ...]]:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def endpoint(host: str = "127.0.0.1", echo: bool = False) -> Endpoint:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(lambda: Endpoint(echo), local_addr=(host, 0))
    return proto


@pytest.fixture
async def echo() -> AsyncIterator[Endpoint]:
    server = await endpoint(echo=True)
    yield server
    server.close()


@pytest.fixture
async def client() -> AsyncIterator[Endpoint]:
    c = await endpoint()
    yield c
    c.close()


async def roundtrip(c: Endpoint, relay: FaultRelay, data: bytes) -> bytes:
    c.send(data, relay.address)
    reply, source = await c.recv()
    assert source[:2] == relay.address
    return reply


async def test_forwards_both_ways(echo: Endpoint, client: Endpoint) -> None:
    async with FaultRelay(listen=("127.0.0.1", 0), upstream=echo.address) as relay:
        assert relay.address[0] == "127.0.0.1" and relay.address[1] != 0
        for i in range(5):
            assert await roundtrip(client, relay, b"ping %d" % i) == b"ping %d" % i
        # The upstream saw the relay's per-client socket, not the client.
        (upstream_side,) = relay.clients().values()
        assert {addr[1] for _, addr in echo.seen} == {upstream_side[1]}
        assert relay.clients() == {client.address: upstream_side}
        s = relay.stats
        assert (s.up.received, s.up.sent, s.down.received, s.down.sent) == (5, 5, 5, 5)
        assert s.up.dropped == s.down.dropped == 0 and s.clients == 1


async def test_each_client_gets_its_own_upstream_port(echo: Endpoint) -> None:
    clients = [await endpoint() for _ in range(3)]
    try:
        async with FaultRelay(upstream=echo.address) as relay:
            for i, c in enumerate(clients):
                assert await roundtrip(c, relay, b"client %d" % i) == b"client %d" % i
            ports = {addr[1] for _, addr in echo.seen}
            assert len(ports) == 3
            assert set(relay.clients()) == {c.address for c in clients}
            # Replies go back to the right client, also when they interleave.
            for i, c in enumerate(clients):
                c.send(b"again %d" % i, relay.address)
            for i, c in enumerate(clients):
                assert (await c.recv())[0] == b"again %d" % i
    finally:
        for c in clients:
            c.close()


async def test_rebind_changes_the_source_port_seen_upstream(
    echo: Endpoint, client: Endpoint
) -> None:
    async with FaultRelay(upstream=echo.address) as relay:
        await roundtrip(client, relay, b"before")
        old_port = echo.seen[-1][1][1]
        new = relay.rebind()
        assert list(new) == [client.address]
        assert new[client.address][1] != old_port
        # The client keeps sending to the same relay address; upstream sees the new port.
        assert await roundtrip(client, relay, b"after") == b"after"
        assert echo.seen[-1][1][1] == new[client.address][1] != old_port
        # Rebinding one client by address.
        again = relay.rebind(client.address)
        assert await roundtrip(client, relay, b"third") == b"third"
        assert echo.seen[-1][1][1] == again[client.address][1]
        assert len({addr[1] for _, addr in echo.seen}) == 3
        assert relay.stats.rebinds == 2
        with pytest.raises(KeyError):
            relay.rebind(("127.0.0.1", 1))


async def test_rebind_every_n_seconds(echo: Endpoint, client: Endpoint) -> None:
    async with FaultRelay(upstream=echo.address, faults=Faults(rebind_every=0.05)) as relay:
        await roundtrip(client, relay, b"one")
        first_port = echo.seen[-1][1][1]
        await relay.wait_until(lambda s: s.rebinds >= 1, timeout=TIMEOUT)
        await roundtrip(client, relay, b"two")
        assert echo.seen[-1][1][1] != first_port


async def test_mapping_table_is_bounded_lru(echo: Endpoint) -> None:
    clients = [await endpoint() for _ in range(4)]
    try:
        async with FaultRelay(upstream=echo.address, max_clients=2) as relay:
            a, b, c, d = clients
            await roundtrip(a, relay, b"a")
            await roundtrip(b, relay, b"b")
            await roundtrip(a, relay, b"a2")  # a is now the most recently used
            await roundtrip(c, relay, b"c")  # evicts b
            assert set(relay.clients()) == {a.address, c.address}
            await roundtrip(d, relay, b"d")  # evicts a
            assert set(relay.clients()) == {c.address, d.address}
            s = relay.stats
            assert (s.clients, s.evicted, s.mappings_created) == (2, 2, 4)
            # An evicted client that comes back gets a fresh mapping (a new upstream port).
            old_b_port = next(addr[1] for data, addr in echo.seen if data == b"b")
            await roundtrip(b, relay, b"b2")
            assert echo.seen[-1][1][1] != old_b_port
            assert relay.stats.clients == 2
    finally:
        for c in clients:
            c.close()


async def test_idle_mappings_expire(echo: Endpoint, client: Endpoint) -> None:
    async with FaultRelay(upstream=echo.address, idle_timeout=30.0) as relay:
        await roundtrip(client, relay, b"x")
        loop = asyncio.get_running_loop()
        assert relay.expire_idle(loop.time() + 10) == 0
        assert relay.expire_idle(loop.time() + 31) == 1
        assert relay.clients() == {} and relay.stats.expired == 1
        # Traffic after expiry opens a new mapping.
        assert await roundtrip(client, relay, b"y") == b"y"
        assert relay.stats.mappings_created == 2


async def test_blackhole_on_command_then_ended(echo: Endpoint, client: Endpoint) -> None:
    async with FaultRelay(upstream=echo.address) as relay:
        await roundtrip(client, relay, b"before")
        relay.blackhole(60.0)
        client.send(b"into the void", relay.address)
        await relay.wait_until(lambda s: s.up.blackholed == 1, timeout=TIMEOUT)
        assert [d for d, _ in echo.seen] == [b"before"]
        relay.end_blackhole()
        assert await roundtrip(client, relay, b"after") == b"after"
        s = relay.stats
        assert s.up.dropped == 1 and s.down.dropped == 0


async def test_blackhole_from_faults_drops_replies_too(echo: Endpoint, client: Endpoint) -> None:
    # Only the downstream direction is open at the start: the echo's reply arrives inside the
    # window, which starts at once (start 0).
    async with FaultRelay(upstream=echo.address, faults=Faults(blackholes=((0.0, 60.0),))) as relay:
        client.send(b"x", relay.address)
        await relay.wait_until(lambda s: s.up.blackholed == 1, timeout=TIMEOUT)
        assert echo.seen == []


async def test_loss_both_ways_counts_add_up(echo: Endpoint, client: Endpoint) -> None:
    n = 200
    async with FaultRelay(upstream=echo.address, faults=Faults(loss=0.3, seed=11)) as relay:
        for i in range(n):
            client.send(b"%d" % i, relay.address)
            # The fate is decided when the relay reads the datagram: wait for that.
            await relay.wait_until(lambda s, i=i: s.up.received > i, timeout=TIMEOUT)

        def settled(s: RelayStats) -> bool:
            return s.down.received == s.up.sent and s.down.sent + s.down.dropped == s.down.received

        s = await relay.wait_until(settled, timeout=TIMEOUT)
        got = [await client.recv() for _ in range(s.down.sent)]
        assert client.queue.empty()
        assert len(got) == n - s.up.lost - s.down.lost
        assert 30 <= s.up.lost <= 90 and 15 <= s.down.lost <= 70
        assert len(echo.seen) == n - s.up.lost


async def test_duplicate_upstream(echo: Endpoint, client: Endpoint) -> None:
    async with FaultRelay(upstream=echo.address, faults=Faults(duplicate_up=1.0)) as relay:
        client.send(b"twice", relay.address)
        assert (await client.recv())[0] == b"twice"
        assert (await client.recv())[0] == b"twice"
        assert [d for d, _ in echo.seen] == [b"twice", b"twice"]
        s = relay.stats
        assert (s.up.duplicated, s.up.sent, s.down.duplicated, s.down.sent) == (1, 2, 0, 2)


async def test_reorder_upstream(echo: Endpoint, client: Endpoint) -> None:
    async with FaultRelay(upstream=echo.address, faults=Faults(reorder_up=1.0)) as relay:
        for m in (b"a", b"b", b"c", b"d"):
            client.send(m, relay.address)
        got = [(await client.recv())[0] for _ in range(4)]
        assert got == [b"b", b"a", b"d", b"c"]
        assert relay.stats.up.reordered == 2


async def test_reorder_hold_bound_releases_a_lone_datagram(
    echo: Endpoint, client: Endpoint
) -> None:
    faults = Faults(reorder=1.0, reorder_hold=0.02)
    async with FaultRelay(upstream=echo.address, faults=faults) as relay:
        client.send(b"alone", relay.address)
        assert (await client.recv())[0] == b"alone"
        assert relay.stats.up.reordered == 0


async def test_delay_applies_each_way(echo: Endpoint, client: Endpoint) -> None:
    loop = asyncio.get_running_loop()
    faults = Faults(delay_up=0.05, delay_down=0.03)
    async with FaultRelay(upstream=echo.address, faults=faults) as relay:
        for i in range(5):
            client.send(b"%d" % i, relay.address)
        t0 = loop.time()
        got = [(await client.recv())[0] for _ in range(5)]
        elapsed = loop.time() - t0
        assert got == [b"%d" % i for i in range(5)]  # fixed delay keeps order
        assert elapsed >= 0.075  # both delays, less the timer slack
        s = relay.stats
        assert s.up.delayed == 5 and s.down.delayed == 5


async def test_record_captures_every_datagram(
    echo: Endpoint, client: Endpoint, tmp_path: Path
) -> None:
    path = tmp_path / "hop.capture"
    faults = Faults(loss_down=1.0)
    async with FaultRelay(upstream=echo.address, faults=faults, record=path) as relay:
        client.send(b"PLAINTEXT-MARKER", relay.address)
        await relay.wait_until(lambda s: s.down.lost == 1, timeout=TIMEOUT)
    records = read_capture(path)
    # Recorded as seen on the wire, before faults: the lost reply is there too.
    assert [(r.direction, r.data) for r in records] == [
        (Direction.UP, b"PLAINTEXT-MARKER"),
        (Direction.DOWN, b"PLAINTEXT-MARKER"),
    ]
    assert records[0].time <= records[1].time
    assert b"PLAINTEXT-MARKER".hex() in path.read_text()


async def test_upstream_not_listening_is_counted(client: Endpoint) -> None:
    # A port that was just free: bind, note it, close.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    dead = probe.getsockname()
    probe.close()
    async with FaultRelay(upstream=dead) as relay:
        client.send(b"anyone?", relay.address)
        s = await relay.wait_until(lambda s: s.upstream_unreachable >= 1, timeout=TIMEOUT)
        assert s.up.sent == 1


async def test_wait_until_times_out(echo: Endpoint) -> None:
    async with FaultRelay(upstream=echo.address) as relay:
        with pytest.raises(TimeoutError):
            await relay.wait_until(lambda s: s.up.received > 0, timeout=0.01)


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6() -> None:
    server = await endpoint("::1", echo=True)
    c = await endpoint("::1")
    try:
        async with FaultRelay(listen=("::1", 0), upstream=server.address) as relay:
            assert relay.address[0] == "::1"
            assert await roundtrip(c, relay, b"v6") == b"v6"
            relay.rebind()
            assert await roundtrip(c, relay, b"v6 again") == b"v6 again"
            assert len({addr[1] for _, addr in server.seen}) == 2
    finally:
        server.close()
        c.close()


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv4_clients_to_ipv6_upstream() -> None:
    server = await endpoint("::1", echo=True)
    c = await endpoint("127.0.0.1")
    try:
        async with FaultRelay(listen=("127.0.0.1", 0), upstream=server.address) as relay:
            assert await roundtrip(c, relay, b"mixed") == b"mixed"
    finally:
        server.close()
        c.close()
