"""Replica sets: coap-server --replica N behind coap-proxy routing on outer options alone.

Two real coap-server processes serve one origin; a real coap-proxy routes to them. Layer 0
sessions and OSCORE contexts must stay on the replica that holds them (no second handshake),
new ones spread over the replicas, and when one replica dies its clients handshake again
with the other, every request answered right.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiocoap
import pytest

from coaplayers import dtls, layer1
from coaplayers.layer0 import Layer0Client
from coaplayers.layer0_modes import OscoreModeRequester
from coaplayers.programs.server.resources import Temperature
from coaplayers.replica import replica_of_kid, replica_of_session
from tests.conftest import free_udp_port

from .conftest import Keys, Running, client, start_proxy, start_server

pytestmark = pytest.mark.slow


def _server_args(keys: Keys, replica: int, port: int) -> list[str]:
    return ["--listen", f"coap://127.0.0.1:{port}", "--replica", str(replica), "-v",
            "--e2e-cert", str(keys / "server-e2e.pem"), "--e2e-key", str(keys / "server-e2e.key"),
            "--e2e-ca", str(keys / "e2e-ca.pem")]


def _events(proxy: Running, name: str) -> list[dict[str, Any]]:
    assert proxy.log_file is not None
    out = []
    for line in proxy.log_file.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == name:
            out.append(record)
    return out


async def _wait_event(proxy: Running, name: str, count: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = _events(proxy, name)
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"no {name} event within {timeout} s"
        await asyncio.sleep(0.05)


def _proxy_to(tmp_path: Path, ports: list[int]) -> Running:
    """coap-proxy with a replica set of the servers on ``ports``; probes every 0.2 s."""
    members = ",".join(f"coap://127.0.0.1:{p}" for p in ports)
    return start_proxy(tmp_path, "--listen", "coap://127.0.0.1:0", "--no-forward",
                       "--route", f"/=replicas:{members}",
                       "--health-interval", "0.2", "--health-timeout", "1")


def _e2e_credentials(keys: Keys) -> dtls.CertificateCredentials:
    return dtls.CertificateCredentials.from_files(
        keys / "client-e2e.pem", keys / "client-e2e.key", keys / "e2e-ca.pem")


async def test_sessions_and_kids_stay_on_their_replica_and_fail_over(
    tmp_path: Path, keys: Keys
) -> None:
    ports = [free_udp_port(), free_udp_port()]
    servers = {n: start_server(tmp_path, *_server_args(keys, n, ports[i]), name=f"replica{n}")
               for i, n in enumerate((1, 2))}
    proxy = _proxy_to(tmp_path, ports)
    ctx = await layer1.create_context()
    credentials = _e2e_credentials(keys)
    origin = proxy.uri("coap")
    channels = [Layer0Client(ctx.context, origin, credentials) for _ in range(10)]
    oscores = [OscoreModeRequester(ctx, origin, None, credentials) for _ in range(6)]

    async def post(requester: Any, text: bytes) -> None:
        # PUT: idempotent, so a client may resend it after a lost session (docs/PROTOCOL.md)
        message = aiocoap.Message(code=aiocoap.PUT, uri=origin + "/echo", payload=text)
        response = await asyncio.wait_for(requester.request(message).response, 30)
        assert response.code == aiocoap.CHANGED and response.payload == text, response

    async def round_(tag: str) -> None:
        await asyncio.gather(*(post(r, f"{tag}{i}".encode())
                               for i, r in enumerate([*channels, *oscores])))

    try:
        started = _events(proxy, "replica_set")
        assert started and started[0]["healthy"] == [1, 2]
        for n in range(3):
            await round_(f"r{n}-")
        # Each session and each kid names its replica; nobody handshook twice.
        l0_at = [replica_of_session(c.session_path[0]) for c in channels]
        kid_at = [replica_of_kid(o.requester.parameters.client_id) for o in oscores]
        assert all(c.handshakes == 1 for c in channels)
        assert all(o.requester.keyings == 1 for o in oscores)
        assert set(l0_at) | set(kid_at) == {1, 2}, (l0_at, kid_at)
        plain = await client(origin + "/hello")
        assert plain.rc == 0 and plain.stdout.startswith("Hello from coap-server"), plain.stderr

        # Replica 1 dies. The first request that meets its closed port (ICMP) marks it down
        # and goes to replica 2, as does every later one: no request fails.
        servers[1].proc.send_signal(signal.SIGKILL)
        servers[1].proc.wait(10)
        await round_("after-")
        down = await _wait_event(proxy, "replica_down", 1, timeout=5)
        assert down[0]["replica"] == 1 and down[0]["healthy"] == [2]
        assert down[0]["reason"] == "unreachable"
        retried = [e for e in _events(proxy, "exchange") if "retried" in e]
        assert retried and all(e["code"] in ("4.04", "4.01") for e in retried), retried
        assert [replica_of_session(c.session_path[0]) for c in channels] == [2] * 10
        assert [replica_of_kid(o.requester.parameters.client_id) for o in oscores] == [2] * 6
        assert [c.handshakes for c in channels] == [1 + (r == 1) for r in l0_at]
        assert [o.requester.keyings for o in oscores] == [1 + (r == 1) for r in kid_at]

        # It comes back on the same address: up again, new sessions may go there.
        ups = len(_events(proxy, "replica_up"))
        servers[1] = start_server(tmp_path, *_server_args(keys, 1, ports[0]), name="replica1b")
        up = await _wait_event(proxy, "replica_up", ups + 1, timeout=5)
        assert up[-1]["replica"] == 1 and up[-1]["healthy"] == [1, 2]
        await round_("back-")
        assert all(c.handshakes == 1 + (r == 1) for c, r in zip(channels, l0_at, strict=True))

        # Replica 2 hangs (no ICMP, no answer): down within health timeout + interval, its
        # clients go to replica 1; it is up again with its first answer.
        downs = len(_events(proxy, "replica_down"))
        servers[2].proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        down = await _wait_event(proxy, "replica_down", downs + 1, timeout=5)
        assert down[-1]["replica"] == 2 and down[-1]["reason"] == "no answer"
        assert time.monotonic() - t0 < 1 + 0.2 + 2  # timeout, interval, a loaded machine
        await round_("hung-")
        assert [replica_of_session(c.session_path[0]) for c in channels] == [1] * 10
        ups = len(_events(proxy, "replica_up"))
        servers[2].proc.send_signal(signal.SIGCONT)
        up = await _wait_event(proxy, "replica_up", ups + 1, timeout=5)
        assert up[-1]["replica"] == 2
    finally:
        for c in channels:
            await c.close()
        for o in oscores:
            await o.close()
        await ctx.shutdown()
        proxy.stop()
        for s in servers.values():
            s.stop()


async def test_replicas_share_an_oscore_state_folder_one_writer_per_kid(
    tmp_path: Path, keys: Keys
) -> None:
    """Two replicas keep their OSCORE contexts in one folder (a shared volume): each restores
    and writes only the files of its own number, so a restarted replica's clients go on
    without keying again (one Echo round), and the other replica's clients are untouched."""
    state = tmp_path / "shared-oscore-state"
    ports = [free_udp_port(), free_udp_port()]

    def replica(n: int) -> Running:
        return start_server(tmp_path, *_server_args(keys, n, ports[n - 1]),
                            "--oscore-state", str(state), name=f"replica{n}")

    servers = {n: replica(n) for n in (1, 2)}
    proxy = _proxy_to(tmp_path, ports)
    ctx = await layer1.create_context()
    credentials = _e2e_credentials(keys)
    origin = proxy.uri("coap")
    oscores = [OscoreModeRequester(ctx, origin, None, credentials) for _ in range(8)]

    async def round_(tag: str) -> None:
        async def put(r: Any, text: bytes) -> None:
            message = aiocoap.Message(code=aiocoap.PUT, uri=origin + "/echo", payload=text)
            response = await asyncio.wait_for(r.requester.request(message).response, 30)
            assert response.code == aiocoap.CHANGED and response.payload == text, response
        await asyncio.gather(*(put(r, f"{tag}{i}".encode()) for i, r in enumerate(oscores)))

    try:
        await round_("a")
        at = [replica_of_kid(o.requester.parameters.client_id) for o in oscores]
        assert set(at) == {1, 2}, at
        files = sorted(p.name for p in state.iterdir())
        assert len(files) == 8
        assert sorted(replica_of_kid(bytes.fromhex(f.split(".")[0])) for f in files) == sorted(at)
        other = [f for f in files if replica_of_kid(bytes.fromhex(f.split(".")[0])) == 2]
        downs = len(_events(proxy, "replica_down"))
        servers[1].stop()
        await _wait_event(proxy, "replica_down", downs + 1, timeout=5)
        ups = len(_events(proxy, "replica_up"))
        servers[1] = replica(1)  # same port, same shared folder
        await _wait_event(proxy, "replica_up", ups + 1, timeout=5)
        assert f"restored {at.count(1)} OSCORE context(s)" in servers[1].stderr
        await round_("b")
        assert [o.requester.keyings for o in oscores] == [1] * 8  # nobody keyed again
        for f in other:  # replica 1 neither restored nor removed replica 2's files
            assert (state / f).exists()
        assert len(list(state.iterdir())) == 8
    finally:
        for o in oscores:
            await o.close()
        await ctx.shutdown()
        proxy.stop()
        for s in servers.values():
            s.stop()


async def test_layer0_observations_are_registered_again_after_a_replica_dies(
    tmp_path: Path, keys: Keys
) -> None:
    """Layer 0 clients observe /sensors/temperature through a replica set; the replica that
    holds some of their sessions is killed. Those clients handshake with the other replica and
    their observations go on there (registered again, RFC 7641 3.3.1): every notification is a
    true reading, none is missing beyond the outage, the other clients see no gap at all."""
    ports = [free_udp_port(), free_udp_port()]
    servers = {n: start_server(tmp_path, *_server_args(keys, n, ports[i]), name=f"replica{n}")
               for i, n in enumerate((1, 2))}
    proxy = _proxy_to(tmp_path, ports)
    ctx = await layer1.create_context()
    credentials = _e2e_credentials(keys)
    origin = proxy.uri("coap")
    channels: list[Layer0Client] = []
    seen: list[list[tuple[float, float, bytes]]] = []  # per channel: (monotonic, wall, payload)
    readers: list[asyncio.Task[None]] = []
    errors: list[BaseException] = []

    async def observe(channel: Layer0Client, got: list[tuple[float, float, bytes]]) -> None:
        request = channel.request(aiocoap.Message(code=aiocoap.GET, observe=0,
                                                  uri=origin + "/sensors/temperature"))
        first = await asyncio.wait_for(request.response, 30)
        assert first.code == aiocoap.CONTENT and first.opt.observe is not None, first
        got.append((time.monotonic(), time.time(), first.payload))
        assert request.observation is not None
        try:
            async for note in request.observation:
                got.append((time.monotonic(), time.time(), note.payload))
        except BaseException as exc:  # an observation must not end: the test reads this
            errors.append(exc)
            raise

    async def notifications(count: int, of: list[int], timeout: float) -> None:
        start = [len(seen[i]) for i in of]
        deadline = time.monotonic() + timeout
        while not all(len(seen[i]) >= s + count for i, s in zip(of, start, strict=True)):
            assert not errors, errors
            assert time.monotonic() < deadline, [seen[i][-1:] for i in of]
            await asyncio.sleep(0.05)

    try:
        # Sessions spread over the replicas by the ClientHello's random: open channels until
        # both replicas hold some (the chance that eight all land on one is 1/128).
        while len(channels) < 8:
            channel = Layer0Client(ctx.context, origin, credentials)
            channels.append(channel)
            seen.append([])
            readers.append(asyncio.create_task(observe(channel, seen[-1])))
            await notifications(1, [len(channels) - 1], timeout=30)
        at = [replica_of_session(c.session_path[0]) for c in channels]
        assert set(at) == {1, 2}, at
        everyone = list(range(len(channels)))
        await notifications(2, everyone, timeout=10)

        victim = at[0]
        survivor = 3 - victim
        servers[victim].proc.send_signal(signal.SIGKILL)
        servers[victim].proc.wait(10)
        # The moved clients' observations continue from the survivor within a bounded outage.
        await notifications(3, everyone, timeout=30)
        assert not errors, errors
        assert [replica_of_session(c.session_path[0]) for c in channels] == [survivor] * 8
        assert [c.handshakes for c in channels] == [1 + (r == victim) for r in at]
        assert [c.reregistrations for c in channels] == [int(r == victim) for r in at]
        # The survivor registered each observation once: its own and the moved ones.
        assert servers[survivor].stderr.count(
            "GET /sensors/temperature (mode layer0-dtls") == len(channels)

        for i in everyone:
            times = [t for t, _, _ in seen[i]]
            gaps = sorted(b - a for a, b in itertools.pairwise(times))
            # Every notification is a true reading of its second (the resource's formula).
            for _, wall, payload in seen[i]:
                value = float(payload.decode().removesuffix(" C"))
                assert any(f"{Temperature.reading(wall - d):.2f}" == f"{value:.2f}"
                           for d in (0, 1, 2, 3)), (payload, wall)
            # One notification a second (3.5: a loaded machine); a moved client's observation
            # pauses once, for the outage: detection, a handshake, the registration.
            if at[i] == victim:
                assert gaps[-1] < 15 and gaps[-2] < 3.5, (i, gaps)
            else:
                assert gaps[-1] < 3.5, (i, gaps)
    finally:
        for task in readers:
            task.cancel()
        for c in channels:
            await c.close()
        await ctx.shutdown()
        proxy.stop()
        for s in servers.values():
            s.stop()
