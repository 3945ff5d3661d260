"""--workers 2 for coap-server and coap-proxy: Layer 0, OSCORE and plain clients, directly and
through the proxy, all from one client socket where that is the hard case (through a proxy,
every request may come from one address and port)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiocoap
import psutil
import pytest

from coaplayers import dtls, layer1
from coaplayers.layer0 import Layer0Client
from coaplayers.layer0_modes import OscoreModeRequester
from tests.proxy.conftest import http_get, metric

from .conftest import Keys, client, run, start_proxy, start_server

pytestmark = pytest.mark.slow


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def test_two_workers_each_serve_layer0_oscore_and_plain(tmp_path: Path, keys: Keys) -> None:
    server = start_server(
        tmp_path, "--workers", "2", "--listen", "coap://127.0.0.1:0",
        "--e2e-cert", str(keys / "server-e2e.pem"), "--e2e-key", str(keys / "server-e2e.key"),
        "--e2e-ca", str(keys / "e2e-ca.pem"))
    proxy = start_proxy(tmp_path, "--workers", "2", "--listen", "coap://127.0.0.1:0",
                        "--no-forward", "--route", f"/={server.uri('coap')}",
                        "--metrics", "127.0.0.1:0")
    metrics_url = next(line.split()[1] for line in proxy.lines if line.startswith("metrics "))
    server_workers = [c.pid for c in psutil.Process(server.proc.pid).children()]
    proxy_workers = [c.pid for c in psutil.Process(proxy.proc.pid).children()]
    assert len(server_workers) == 2 and len(proxy_workers) == 2
    mine = psutil.Process().cpu_affinity()  # not pinned unless asked (--pin-workers)
    assert all(psutil.Process(p).cpu_affinity() == mine for p in server_workers + proxy_workers)
    cpu_before = {pid: _cpu(pid) for pid in server_workers}
    ctx = await layer1.create_context()  # one socket for every client below
    credentials = dtls.CertificateCredentials.from_files(
        keys / "client-e2e.pem", keys / "client-e2e.key", keys / "e2e-ca.pem")
    origins = {"direct": server.uri("coap"), "proxy": proxy.uri("coap")}
    channels = {k: [Layer0Client(ctx.context, o, credentials) for _ in range(12)]
                for k, o in origins.items()}
    oscores = {k: [OscoreModeRequester(ctx, o, None, credentials) for _ in range(12)]
               for k, o in origins.items()}

    async def put(requester: Any, origin: str, text: bytes) -> None:
        message = aiocoap.Message(code=aiocoap.PUT, uri=origin + "/echo", payload=text)
        response = await asyncio.wait_for(requester.request(message).response, 30)
        assert response.code == aiocoap.CHANGED and response.payload == text, response

    try:
        for n in range(3):
            await asyncio.gather(*(
                put(r, origins[k], f"{k}{n}-{i}".encode())
                for k in origins for i, r in enumerate([*channels[k], *oscores[k]])))
        for k in origins:
            # Nobody handshook twice: every request reached the worker that holds its state.
            assert [c.handshakes for c in channels[k]] == [1] * 12
            assert [o.requester.keyings for o in oscores[k]] == [1] * 12
            # And the state is spread over both workers (the name's and the kid's steering).
            assert {ord(c.session_path[0][2]) % 2 for c in channels[k]} == {0, 1}
            assert {o.requester.parameters.client_id[-1] % 2 for o in oscores[k]} == {0, 1}
        # Plain clients: coap-client processes, and 16 sockets of our own to the proxy (the
        # kernel spreads the proxy's clients by address: all 16 on one worker is 2**-15).
        plain = await asyncio.gather(*(client(origins[k] + "/hello")
                                       for k in origins for _ in range(3)))
        assert all(r.rc == 0 and r.stdout.startswith("Hello from coap-server") for r in plain)
        sockets = [await aiocoap.Context.create_client_context() for _ in range(16)]
        try:
            answers = await asyncio.gather(*(asyncio.wait_for(c.request(aiocoap.Message(
                code=aiocoap.GET, uri=origins["proxy"] + "/hello")).response, 30)
                for c in sockets))
        finally:
            for c in sockets:
                await c.shutdown()
        assert all(a.payload.startswith(b"Hello from coap-server") for a in answers)
        # Every worker worked: the server's (CPU), the proxy's (their exchange lines).
        for pid in server_workers:
            assert _cpu(pid) > cpu_before[pid], pid
        assert proxy.log_file is not None
        lines = [json.loads(x) for x in proxy.log_file.read_text().splitlines()]
        exchanges = [x for x in lines if x.get("event") == "exchange"]
        assert {x["worker"] for x in exchanges} == {0, 1}
        # One scrape counts what both proxy workers did, as their exchange lines do.
        assert len([x for x in lines if x.get("event") == "start"]) == 2
        # (A repeat that answers the 3x rule's Echo is an exchange line of kind "held".)
        reverse = [x for x in exchanges if x.get("kind") == "reverse"]
        held = len(exchanges) - len(reverse)
        assert {x.get("kind") for x in exchanges} <= {"reverse", "held"}
        for _ in range(30):  # the workers write their gauges every half second
            text = await http_get(metrics_url)
            if metric(text, 'coap_proxy_requests_total{kind="reverse"}') == len(reverse) and (
                    metric(text, "coap_proxy_in_flight") == 0):
                break
            await asyncio.sleep(0.1)
        assert metric(text, 'coap_proxy_requests_total{kind="reverse"}') == len(reverse)
        assert metric(text, 'coap_proxy_requests_total{kind="held"}') == held
        assert metric(text, "coap_proxy_in_flight") == 0
    finally:
        for group in (*channels.values(), *oscores.values()):
            for r in group:
                await r.close()
        await ctx.shutdown()
        assert proxy.stop() == 0
        assert server.stop() == 0
    for pid in (*server_workers, *proxy_workers):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_pinned_workers_run_each_on_a_cpu_of_their_own(tmp_path: Path) -> None:
    """--pin-workers: worker i on the i-th CPU the program may use (round robin when there
    are more workers than CPUs), set from the start; requests are served as before."""
    cpus = sorted(psutil.Process().cpu_affinity())
    server = start_server(tmp_path, "--workers", "2", "--pin-workers",
                          "--listen", "coap://127.0.0.1:0")
    proxy = start_proxy(tmp_path, "--workers", "3", "--pin-workers", "--listen",
                        "coap://127.0.0.1:0", "--no-forward", "--route",
                        f"/={server.uri('coap')}")
    try:
        for program, count in ((server, 2), (proxy, 3)):
            workers = psutil.Process(program.proc.pid).children()
            assert len(workers) == count
            # In start order (worker i is started i-th, after worker i-1 said ready).
            workers.sort(key=lambda w: w.create_time())
            assert [w.cpu_affinity() for w in workers] == [
                [cpus[i % len(cpus)]] for i in range(count)]
            for i, w in enumerate(workers):  # every thread, also those started later
                for thread in w.threads():
                    assert os.sched_getaffinity(thread.id) == {cpus[i % len(cpus)]}
        answers = await asyncio.gather(*(client(proxy.uri("coap") + "/hello")
                                         for _ in range(4)))
        assert all(r.rc == 0 and r.stdout.startswith("Hello from coap-server") for r in answers)
    finally:
        assert proxy.stop() == 0
        assert server.stop() == 0


def test_a_dead_worker_stops_the_others_and_the_supervisor_exits_1(tmp_path: Path) -> None:
    """Fail whole: a supervisor (systemd, Kubernetes) restarts the program, and every worker's
    sessions go with it, which their clients recover from (a new handshake)."""
    server = start_server(tmp_path, "--workers", "2", "--listen", "coap://127.0.0.1:0")
    workers = psutil.Process(server.proc.pid).children()
    assert len(workers) == 2
    workers[1].kill()
    assert server.proc.wait(timeout=30) == 1
    assert "worker 1" in server.stderr and "stopping the others" in server.stderr
    psutil.wait_procs([workers[0]], timeout=10)
    assert not workers[0].is_running() or workers[0].status() == psutil.STATUS_ZOMBIE
    server.stop()


async def test_workers_flag_errors_exit_2() -> None:
    for program, bad in (("coap-server", "17"), ("coap-server", "x"), ("coap-proxy", "0")):
        r = await run(str(Path(sys.executable).parent / program), "--workers", bad)
        assert r.rc == 2 and "--workers" in r.stderr, (program, bad, r.stderr)
