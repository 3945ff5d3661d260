"""``coap-bench --scaling``: what a request costs each role, with 1 and 2 workers per role, and
next to libcoap's proxy (C) and aiocoap-proxy with the same client and server.

Configurations, each measured with 1 and ``clients`` closed-loop clients (each on a socket of
its own, 40-byte POST /echo through the proxy, forward proxying with Proxy-Scheme as aiocoap
sends it):

- ``coap-proxy x1 / coap-server x1`` and ``x2 / x2`` (``--workers``), and ``x2 / x2`` with
  ``--pin-workers`` (worker i on CPU i): started together and measured in alternating rounds,
  each figure the median of its rounds, each round also at one paced load for all
  (``PACED_RATE``); the 2-worker totals are compared with x1 round by round
  (:func:`paired_rounds`), the bench's client alike as the control;
- ``coap-proxy replica set``: a reverse route to a replica set of two coap-server (one worker
  each) against ``coap-proxy reverse``, the same route to one of them: the difference in the
  proxy's CPU per request is the router's cost;
- ``libcoap proxy`` (``coap-server-notls -P``), ``aiocoap-proxy``, coap-proxy and coap-proxy
  ``--no-fast-path`` (every request through aiocoap) in front of one coap-server, in
  alternating rounds too.

On a machine with few cores the client competes for CPU with the roles, so wall rates mostly
show the client; CPU per request per role (from each process's CPU clock, every worker and
the supervisor counted) does not, and predicts each role's capacity per core (1 s / CPU per
request).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap.message import UndecidedRemote
from aiocoap.numbers.codes import Code

from .load import run_load
from .procs import Processes, coap_ping, free_udp_port, program

PAYLOAD = b"x" * 40
PACED_RATE = 1000.0
"""Requests/s of the paced point: a load every worker configuration carries on two cores
shared with the client, so that they are compared at the same load, not each at its most."""


class _Client:
    """One socket, one request at a time, through a forward or reverse proxy."""

    def __init__(self, ctx: aiocoap.Context, proxy: str, origin: str | None) -> None:
        self.ctx = ctx
        self.proxy = proxy  # host:port
        self.origin = origin  # forward: the origin's host:port; None: reverse

    async def post(self) -> None:
        if self.origin is None:
            msg = aiocoap.Message(code=Code.POST, uri=f"coap://{self.proxy}/echo",
                                  payload=PAYLOAD)
        else:
            msg = aiocoap.Message(code=Code.POST, uri=f"coap://{self.origin}/echo",
                                  payload=PAYLOAD)
            msg.opt.proxy_scheme = "coap"
            host, _, port = self.origin.rpartition(":")
            msg.opt.uri_host, msg.opt.uri_port = host, int(port)  # not left out for literals
            msg.remote = UndecidedRemote("coap", self.proxy)
        response = await self.ctx.request(msg).response
        if response.code != Code.CHANGED or bytes(response.payload) != PAYLOAD:
            raise RuntimeError(f"unexpected answer {response.code}")

    async def close(self) -> None:
        await self.ctx.shutdown()


def _tree(pid: int) -> list[int]:
    """A process and its children (a supervisor's workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
    return [pid, *kids]


async def _measure(procs_of: dict[str, list[int]], proxy: str, origin: str | None, *,
                   clients: int, duration: float, rate: float | None = None) -> dict[str, Any]:
    made = [_Client(await aiocoap.Context.create_client_context(), proxy, origin)
            for _ in range(clients)]
    try:
        for c in made[:10]:
            await asyncio.wait_for(c.post(), 30)  # resolve, warm every path
        # Every process of a role (a supervisor and its workers) read at the window's marks.
        pids = {f"{role}#{i}": pid for role, group in procs_of.items()
                for i, pid in enumerate(group)}
        result = await run_load(made, duration=duration, warmup=0.5,  # type: ignore[arg-type]
                                pids=pids, rate=rate, precise=True)
    finally:
        for c in made:
            await c.close()
    done = max(1, result.completed)
    cpu = {role: sum(v for k, v in result.cpu.items() if k.split("#")[0] == role)
           for role in procs_of}
    switches = result.switches or {}
    point: dict[str, Any] = {
        "clients": clients,
        "rps": result.rps,
        "errors": result.errors,
        "p50_ms": 1000 * result.percentile(50),
        "cpu_us_per_request": {k: 1e6 * v / done for k, v in cpu.items()},
        "client_cpu_us_per_request": 1e6 * result.cpu.get("client (coap-bench)", 0.0) / done,
        # Sleeps (voluntary) and preemptions (involuntary) of every process of a role: each
        # costs a process its caches; a role in more processes, less busy each, has more.
        "switches_per_request": {
            role: {kind: sum(v[i] for k, v in switches.items() if k.split("#")[0] == role)
                   / done for i, kind in enumerate(("voluntary", "involuntary"))}
            for role in procs_of},
    }
    if rate:
        point["rate"] = rate
    return point


async def run(workdir: Path, *, quick: bool = False, clients: int = 50,
              rounds: int | None = None, duration: float | None = None) -> dict[str, Any]:
    """``rounds`` (default 5, quick 1): more rounds narrow the paired figures' spread on a
    noisy machine; each costs the worker configurations 3 x 3 windows of ``duration``."""
    duration = duration or (1.0 if quick else 2.5)
    rounds = rounds or (1 if quick else 5)
    points = (1, clients)
    out: dict[str, Any] = {"duration": duration, "cpus": os.cpu_count(), "configs": {},
                           "worker_rounds": rounds, "paced_rate": PACED_RATE}
    with Processes(workdir) as procs:

        def server(name: str, workers: int, *extra: str) -> tuple[int, str]:
            port = free_udp_port()
            p = procs.start(name, [program("coap-server"), "--listen", f"coap://127.0.0.1:{port}",
                                   "--workers", str(workers), *extra], until="listening")
            return p.pid, f"127.0.0.1:{port}"

        def coap_proxy(name: str, workers: int, *extra: str) -> tuple[int, str]:
            port = free_udp_port()
            p = procs.start(name, [program("coap-proxy"), "--listen", f"coap://127.0.0.1:{port}",
                                   "--workers", str(workers), "--no-log-exchanges",
                                   "--cache-entries", "0", "--allow", "127.0.0.1", *extra],
                              until="ready")
            return p.pid, f"127.0.0.1:{port}"

        async def config(label: str, proxy_pid: int, proxy: str, server_pids: list[int],
                         origin: str | None) -> None:
            roles = {"proxy": _tree(proxy_pid), "server": [p for s in server_pids
                                                           for p in _tree(s)]}
            out["configs"][label] = [
                await _measure(roles, proxy, origin, clients=n, duration=duration)
                for n in points]

        # The worker configurations run side by side and are measured in alternating rounds
        # (medians): measured one after the other, the machine's load changes between them
        # by more than the difference sought.
        groups: dict[str, tuple[dict[str, list[int]], str, str]] = {}
        for workers, pin in ((1, ()), (2, ()), (2, ("--pin-workers",))):
            spid, saddr = server(f"server-x{workers}{'p' * bool(pin)}", workers, *pin)
            ppid, paddr = coap_proxy(f"proxy-x{workers}{'p' * bool(pin)}", workers, *pin)
            label = f"coap-proxy x{workers} / coap-server x{workers}" + (", pinned" * bool(pin))
            groups[label] = ({"proxy": _tree(ppid), "server": _tree(spid)}, paddr, saddr)
        async def alternate(groups: dict[str, tuple[dict[str, list[int]], str, str]], *,
                            pace: bool = False) -> None:
            measured: dict[str, dict[int, list[dict[str, Any]]]] = {
                label: {n: [] for n in points} for label in groups}
            paced: dict[str, list[dict[str, Any]]] = {label: [] for label in groups}
            labels = list(groups)
            for r in range(rounds):
                for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                    roles, paddr, saddr = groups[label]
                    for n in points:
                        measured[label][n].append(
                            await _measure(roles, paddr, saddr, clients=n, duration=duration))
                    if pace:
                        paced[label].append(await _measure(
                            roles, paddr, saddr, clients=clients, duration=duration,
                            rate=PACED_RATE))
            for label in labels:
                out["configs"][label] = [_median(measured[label][n]) for n in points]
            if pace:
                out["paced"] = {label: _median(paced[label]) for label in labels}
                out["rounds"] = paired_rounds(
                    {label: measured[label][clients] for label in labels}, paced)

        await alternate(groups, pace=True)
        for p in list(procs.procs):
            procs.stop(p)
        # The router's cost: a replica set of two against one route.
        s1, a1 = server("replica-0", 1, "--replica", "0")
        s2, a2 = server("replica-1", 1, "--replica", "1")
        ppid, paddr = coap_proxy("proxy-single", 1, "--no-forward", "--route", f"/=coap://{a1}")
        await config("coap-proxy reverse", ppid, paddr, [s1], None)
        ppid, paddr = coap_proxy("proxy-set", 1, "--no-forward", "--route",
                                 f"/=replicas:coap://{a1},coap://{a2}")
        await config("coap-proxy replica set", ppid, paddr, [s1, s2], None)
        for p in list(procs.procs):
            procs.stop(p)
        # The baselines, in front of one coap-server, side by side in alternating rounds too.
        spid, saddr = server("server-baselines", 1)
        baselines: dict[str, tuple[dict[str, list[int]], str, str]] = {}
        server_tree = _tree(spid)
        libcoap = shutil.which("coap-server-notls")
        if libcoap:
            port = free_udp_port()
            p = procs.start("libcoap-proxy", [libcoap, "-A", "127.0.0.1", "-p", str(port),
                                              "-P", ",bench-proxy"], until=None)
            await asyncio.to_thread(coap_ping, port)
            baselines["libcoap proxy (C)"] = (
                {"proxy": [p.pid], "server": server_tree}, f"127.0.0.1:{port}", saddr)
        port = free_udp_port()
        p = procs.start("aiocoap-proxy", [program("aiocoap-proxy"), "--forward", "--bind",
                                          f"127.0.0.1:{port}"], until=None)
        await asyncio.to_thread(coap_ping, port)
        baselines["aiocoap-proxy"] = (
            {"proxy": [p.pid], "server": server_tree}, f"127.0.0.1:{port}", saddr)
        ppid, paddr = coap_proxy("proxy-baseline", 1)
        baselines["coap-proxy x1 (same server)"] = (
            {"proxy": _tree(ppid), "server": server_tree}, paddr, saddr)
        ppid, paddr = coap_proxy("proxy-no-fast-path", 1, "--no-fast-path")
        baselines["coap-proxy x1 --no-fast-path (same server)"] = (
            {"proxy": _tree(ppid), "server": server_tree}, paddr, saddr)
        await alternate(baselines)
    out["router_us"] = router_microbench(5000 if quick else 20000)
    out["summary"] = summarise(out["configs"], clients, out["router_us"], out["rounds"])
    return out


def _median(points: list[dict[str, Any]]) -> dict[str, Any]:
    """One point from the same point's rounds: the median of each figure, errors summed."""
    def med(values: list[float]) -> float:
        return statistics.median(values)

    first = points[0]
    return {
        "clients": first["clients"],
        "rps": med([p["rps"] for p in points]),
        "errors": sum(p["errors"] for p in points),
        "p50_ms": med([p["p50_ms"] for p in points]),
        "cpu_us_per_request": {role: med([p["cpu_us_per_request"][role] for p in points])
                               for role in first["cpu_us_per_request"]},
        "client_cpu_us_per_request": med([p["client_cpu_us_per_request"] for p in points]),
        "switches_per_request": {
            role: {kind: med([p["switches_per_request"][role][kind] for p in points])
                   for kind in ("voluntary", "involuntary")}
            for role in first["switches_per_request"]},
        "rounds": len(points),
        **({"rate": first["rate"]} if "rate" in first else {}),
    }


X1 = "coap-proxy x1 / coap-server x1"
X2 = "coap-proxy x2 / coap-server x2"
X2_PINNED = X2 + ", pinned"


def paired_rounds(closed: dict[str, list[dict[str, Any]]],
                  paced: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Round by round, each 2-worker configuration's total CPU per request against the
    1-worker one measured in the same round (a ratio - 1): the machine's load drifts between
    rounds by more than the difference sought, much less within one. ``client`` is the same
    ratio for the bench's own client, whose code is the same in every configuration: what it
    shows is the machine's share (caches and scheduling), not the workers'."""
    def total(p: dict[str, Any]) -> float:
        return float(sum(p["cpu_us_per_request"].values()))

    def ratios(points: dict[str, list[dict[str, Any]]], label: str,
               of: Any = total) -> list[float]:
        pairs = zip(points.get(X1, []), points.get(label, []), strict=False)
        return [of(b) / of(a) - 1 for a, b in pairs if of(a)]

    def client(p: dict[str, Any]) -> float:
        return float(p["client_cpu_us_per_request"])

    return {"x2": ratios(closed, X2), "x2_pinned": ratios(closed, X2_PINNED),
            "x2_client": ratios(closed, X2, client), "x2_paced": ratios(paced, X2),
            "x2_pinned_paced": ratios(paced, X2_PINNED),
            "x2_paced_client": ratios(paced, X2, client)}


def router_microbench(rounds: int = 20000) -> dict[str, float]:
    """The routing decision alone, in process (microseconds): one route against a replica set
    of two, for a plain request and a session request. The end-to-end comparison above is too
    noisy on a shared machine to show a few per cent; this is what the set adds per request."""
    import timeit

    from coaplayers.proxy.config import ProxyConfig, Route
    from coaplayers.proxy.routing import Router

    single = Router(ProxyConfig(routes=(Route.parse("/=coap://127.0.0.1:1"),)))
    routed = Router(ProxyConfig(routes=(
        Route.parse("/=replicas:coap://127.0.0.1:1,coap://127.0.0.1:2"),)))
    replica_set = routed.sets["/"]
    for i, m in enumerate(replica_set.members.values()):
        replica_set.answered(m, i, 0.0)
    out: dict[str, float] = {}
    for kind, path in (("plain", ("echo",)), ("session", ("~AQEBA",))):
        msg = aiocoap.Message(code=Code.POST, uri_path=path, payload=PAYLOAD)
        for name, router in (("one route", single), ("replica set", routed)):
            def decide(r: Router = router, m: aiocoap.Message = msg) -> object:
                return r.decide(m, "127.0.0.1:40000")

            best = min(timeit.repeat(decide, number=rounds, repeat=3))
            out[f"{name}, {kind}"] = 1e6 * best / rounds
    return out


def summarise(configs: dict[str, list[dict[str, Any]]], clients: int,
              router: dict[str, float] | None = None,
              rounds: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """The figures the targets read (docs/BENCHMARKS.md, "Scaling")."""
    def at(label: str, n: int) -> dict[str, Any] | None:
        for point in configs.get(label, []):
            if point["clients"] == n:
                return point
        return None

    s: dict[str, Any] = {}
    one = at("coap-proxy x1 / coap-server x1", clients)
    two = at("coap-proxy x2 / coap-server x2", clients)
    if one and two:
        t1 = sum(one["cpu_us_per_request"].values())
        t2 = sum(two["cpu_us_per_request"].values())
        s["total_cpu_us_x1"], s["total_cpu_us_x2"] = t1, t2
        s["sharding_cost"] = t2 / t1 - 1 if t1 else None
        s["capacity_per_core"] = {
            role: 1e6 / us for role, us in one["cpu_us_per_request"].items() if us}
        pinned = at("coap-proxy x2 / coap-server x2, pinned", clients)
        if pinned:
            t3 = sum(pinned["cpu_us_per_request"].values())
            s["total_cpu_us_x2_pinned"] = t3
            s["sharding_cost_pinned"] = t3 / t1 - 1 if t1 else None
    for key, values in (rounds or {}).items():
        if values:  # the median of the paired rounds, and their spread
            s[f"paired_{key}"] = {"median": statistics.median(values), "min": min(values),
                                  "max": max(values), "rounds": len(values)}
    single, routed = at("coap-proxy reverse", clients), at("coap-proxy replica set", clients)
    if single and routed:
        a, b = single["cpu_us_per_request"]["proxy"], routed["cpu_us_per_request"]["proxy"]
        s["router_cost_end_to_end"] = (b - a) / a if a else None
    if single and router is not None:
        extra = max(router["replica set, plain"] - router["one route, plain"],
                    router["replica set, session"] - router["one route, session"])
        s["router_us"] = extra
        s["router_cost"] = extra / single["cpu_us_per_request"]["proxy"]
    ours, lib = at("coap-proxy x1 (same server)", clients), at("libcoap proxy (C)", clients)
    if ours and lib:
        s["proxy_cpu_vs_libcoap"] = (lib["cpu_us_per_request"]["proxy"]
                                     / ours["cpu_us_per_request"]["proxy"])
        s["rps_vs_libcoap_x2"] = (two["rps"] / lib["rps"]) if two and lib["rps"] else None
    return s


def at_clients(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The point with the most clients (the closed-loop load the targets read)."""
    return max(points, key=lambda p: p["clients"]) if points else None


def render(results: dict[str, Any]) -> str:
    lines = [f"scaling: plain 40-byte POST /echo through a proxy, {results['duration']} s per"
             f" point, {results['cpus']} CPUs (the client shares them); the worker"
             f" configurations run side by side, medians of {results.get('worker_rounds', 1)}"
             " alternating rounds"]
    paced = {f"{label}, {results.get('paced_rate', 0):.0f} req/s paced": [p]
             for label, p in results.get("paced", {}).items()}
    header = (f"{'configuration':56} {'clients':>7} {'req/s':>8} {'p50 ms':>7}"
              f" {'proxy us/req':>12} {'server us/req':>13} {'client us/req':>13}")
    lines.append(header)
    for label, points in {**results["configs"], **paced}.items():
        for p in points:
            cpu = p["cpu_us_per_request"]
            lines.append(f"{label:56} {p['clients']:>7} {p['rps']:>8.0f} {p['p50_ms']:>7.2f}"
                         f" {cpu.get('proxy', 0):>12.0f} {cpu.get('server', 0):>13.0f}"
                         f" {p['client_cpu_us_per_request']:>13.0f}")
    s = results.get("summary", {})
    if "capacity_per_core" in s:
        cap = ", ".join(f"{k} {v:,.0f} req/s" for k, v in s["capacity_per_core"].items())
        lines.append(f"capacity per core (1 worker, from CPU per request): {cap}")
    if s.get("sharding_cost") is not None:
        lines.append(f"total CPU per request, 2 workers vs 1: {100 * s['sharding_cost']:+.1f} %"
                     " (medians; target within 10 %)")

    def spread(key: str) -> str:
        p = s[f"paired_{key}"]
        return (f"{100 * p['median']:+.1f} % (round by round, {p['rounds']} rounds:"
                f" {100 * p['min']:+.1f} to {100 * p['max']:+.1f} %)")

    if "paired_x2" in s:
        lines.append(f"  paired with x1 in each round: {spread('x2')}")
    if "paired_x2_client" in s:
        lines.append(f"  the bench's client, the same code in both: {spread('x2_client')}")
    if s.get("sharding_cost_pinned") is not None:
        lines.append(f"  with --pin-workers: {100 * s['sharding_cost_pinned']:+.1f} %"
                     + (f", paired {spread('x2_pinned')}" if "paired_x2_pinned" in s else ""))
    if "paired_x2_paced" in s:
        lines.append(f"  at the same load ({results.get('paced_rate', 0):.0f} req/s paced, not"
                     f" each at its most): {spread('x2_paced')}; the client"
                     f" {spread('x2_paced_client')}")
    for label in (X1, X2):
        point = at_clients(results["configs"].get(label, []))
        if point and "switches_per_request" in point:
            sw = point["switches_per_request"]
            lines.append(f"  context switches per request, {label} (sleeps + preemptions): "
                         + ", ".join(f"{role} {v['voluntary']:.2f} + {v['involuntary']:.2f}"
                                     for role, v in sw.items()))
    if s.get("router_cost") is not None:
        lines.append(f"router's cost at the proxy: {s['router_us']:.2f} us per request ="
                     f" {100 * s['router_cost']:.1f} % of the proxy's CPU per request (target at"
                     " most 5 %)")
    if s.get("router_cost_end_to_end") is not None:
        lines.append(f"  (end to end, replica set vs one route: proxy CPU per request"
                     f" {100 * s['router_cost_end_to_end']:+.1f} %)")
    if s.get("proxy_cpu_vs_libcoap") is not None:
        lines.append(f"coap-proxy CPU per request vs libcoap's proxy: libcoap/ours ="
                     f" {s['proxy_cpu_vs_libcoap']:.2f}x (target at least 1.0x)")
    if s.get("rps_vs_libcoap_x2") is not None:
        lines.append(f"requests/s, coap-proxy x2 vs libcoap's proxy: {s['rps_vs_libcoap_x2']:.2f}x")
    return "\n".join(lines)
