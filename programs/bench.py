"""``coap-bench``: every mode against the baselines in one run; table, JSON and PNG.

Phases, in order (each bounded in time, every process ended however the run ends):

1. the rig: a coap-keys credential set, coap-server and coap-proxy (coap:// and coaps://
   listeners each), aiocoap-proxy --forward and a stock aiocoap server;
2. bytes on the wire with recording relays on both hops (:mod:`.wire`);
3. throughput and latency, 1 and 50 concurrent clients per mode, in interleaved rounds so
   that every ratio compares figures taken close together (:mod:`.load`); then how well each
   proxy shields the device: upstream requests per downstream request for 50 clients reading
   and observing one resource, and cache-hit throughput (:mod:`.shield`; ``--shield`` runs
   the rig and this phase alone);
4. full certificate and raw-public-key handshakes against coap-server over the wire: from
   the product's client (:mod:`.handshake`) and, to keep the server busy, from a lean load
   generator (:mod:`.hsload`);
5. in process, without the rig: handshake sizes and round trips, handshakes per second,
   memory per Layer 0 session and per OSCORE context (:mod:`.memory`, one process each);
6. start-up: ``--help`` of each program and a first plain GET in fresh processes, next to
   libcoap's and aiocoap's clients (:mod:`.startup`; ``--startup`` runs this phase alone);
7. round trips to the first protected answer, cold and warm, through a relay that delays hop 1
   (:mod:`.rtt`; ``--rtt`` runs the rig and this phase alone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from coaplayers_tools.bench import handshake, hsload, report, rtt, shield, startup, wire
from coaplayers_tools.bench.clients import (
    MODES,
    WIRE_ONLY,
    Endpoints,
    open_client,
    probe_stock_oscore,
)
from coaplayers_tools.bench.load import open_clients, run_load
from coaplayers_tools.bench.rig import rig

EPILOG = """\
examples:
  coap-bench --json bench.json --png bench.png        # the full run (about 6 minutes)
  coap-bench --quick --json quick.json                # a smoke run (about a minute)
  coap-bench --modes plain,l0psk_l1 --rounds 1        # only some modes (others are skipped)
  coap-bench --startup                                # start-up times alone (seconds)
  coap-bench --costs                                  # the code's shortcuts, per call
  coap-bench --http --json http.json                  # the CoAP-to-HTTP topology alone
  coap-bench --rtt                                    # round trips to the first answer alone
  coap-bench --shield                                 # the proxy's cache and aggregation alone
  coap-bench --loss 20                                # one-shot latency at 20% loss, 20 runs
  coap-bench --scaling --json scaling.json            # workers, router, libcoap's proxy

modes: """ + ", ".join(MODES) + """
The PNG needs matplotlib: pip install -e '.[bench]'. Exit status 0 when the run completed
(whatever the targets say), 1 if a phase failed, 3 if the PNG could not be written.
See docs/BENCHMARKS.md for what each figure means.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coap-bench",
        description="Throughput, latency, bytes on the wire, Layer 0 handshake cost and memory "
        "of every coaplayers mode, next to aiocoap baselines measured in the same run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smoke run: short windows, small counts")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON")
    p.add_argument("--png", metavar="FILE", help="write a chart (needs matplotlib)")
    p.add_argument("--rounds", type=int, help="interleaved throughput rounds, and --scaling's"
                   " rounds of the worker configurations (default 5, quick 1)")
    p.add_argument("--duration", type=float,
                   help="seconds measured per point (default 2.5, quick 1)")
    p.add_argument("--clients", type=int, default=50, help="the concurrent-clients point (50)")
    p.add_argument("--modes", help="comma-separated subset of the throughput modes")
    p.add_argument("--memory-counts", help="comma-separated session counts (default 1000,10000;"
                   " quick 100,1000)")
    p.add_argument("--http", action="store_true",
                   help="only the cloud-proxy topology: Layer 0 and OSCORE through coap-proxy"
                   " as a CoAP-to-HTTP cross-proxy, against plain CoAP-to-HTTP, with the HTTP"
                   " hop's bytes per request")
    p.add_argument("--scaling", action="store_true",
                   help="only the scaling section: CPU per request per role with 1 and 2"
                   " workers, the router's cost, libcoap's proxy and aiocoap-proxy as baselines")
    p.add_argument("--costs", action="store_true",
                   help="only the per-call costs of the code's shortcuts next to the aiocoap"
                   " calls they replace (docs/BENCHMARKS.md, 'Costs behind the code')")
    p.add_argument("--startup", action="store_true",
                   help="only the start-up figures: --help and a first GET in fresh processes,"
                   " with libcoap's and aiocoap's clients beside ours")
    p.add_argument("--rtt", action="store_true",
                   help="only the rig and the round trips to the first protected answer, cold"
                   " and warm, per mode")
    p.add_argument("--shield", action="store_true",
                   help="only the rig and the proxy-shield phase: upstream requests per"
                   " downstream request for clients reading and observing one resource through"
                   " coap-proxy and aiocoap-proxy, and cache-hit throughput")
    p.add_argument("--loss", type=int, metavar="RUNS",
                   help="only the rig and one-shot latency at 20%% loss each way on hop 1: RUNS"
                   " client runs per mode, cold and warm (a few minutes)")
    p.add_argument("--rtt-delay", type=float, metavar="MS",
                   help="one-way delay of hop 1 while counting round trips (default 250,"
                   " quick 150)")
    p.add_argument("--workdir", metavar="DIR",
                   help="keep credentials, logs and captures here (default: a temporary folder,"
                   " removed at the end)")
    return p


def _png_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _say(text: str) -> None:
    print(f"[coap-bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- phases


async def phase_wire(ep: Endpoints, workdir: Path, requests: int, modes: list[str]
                     ) -> dict[str, Any]:
    out: dict[str, Any] = {"modes": {}}
    for mode in modes + list(WIRE_ONLY):
        out["modes"][mode] = await wire.measure_mode(mode, ep, workdir, requests=requests)
    ms = out["modes"]

    def diff(mode: str, base: str) -> dict[str, Any] | None:
        if mode not in ms or base not in ms:
            return None
        a, b = ms[mode], ms[base]
        return {
            "versus": base,
            "hop1_request": a["hop1"]["up_bytes_per_request"] - b["hop1"]["up_bytes_per_request"],
            "hop1_response": a["hop1"]["down_bytes_per_request"]
            - b["hop1"]["down_bytes_per_request"],
            "hop2_request": a["hop2"]["up_bytes_per_request"] - b["hop2"]["up_bytes_per_request"],
            "hop2_response": a["hop2"]["down_bytes_per_request"]
            - b["hop2"]["down_bytes_per_request"],
        }

    pairs = {"l1": "plain", "l0psk": "plain", "l0cert": "plain", "l0rpk": "plain",
             "oscore": "plain", "oscore_psk": "plain", "l0psk_l1": "l1", "l0cert_l1": "l1",
             "l0rpk_l1": "l1", "oscore_l1": "l1", "aio_oscore": "aio_plain"}
    out["overhead"] = {m: d for m, b in pairs.items() if (d := diff(m, b)) is not None}
    out["stock_aiocoap_oscore_via_aiocoap_proxy"] = await probe_stock_oscore(
        ep, workdir / "stock-oscore-client")
    out["method"] = ("FaultRelay(record=...) on hop 1 (client->proxy) and hop 2 (proxy->server);"
                     f" {requests} sequential requests after the handshakes and 3 warm-up"
                     " requests; UDP payload bytes")
    return out


async def phase_throughput(ep: Endpoints, modes: list[str], *, clients: int, rounds: int,
                           duration: float, warmup: float) -> dict[str, Any]:
    pools: dict[str, list[Any]] = {}
    pids = dict(ep.pids)
    try:
        for mode in modes:
            _say(f"opening {clients} clients: {mode}")
            pools[mode] = await open_clients(lambda mode=mode: open_client(mode, ep), clients)
        raw: list[dict[str, dict[int, dict[str, Any]]]] = []
        for r in range(rounds):
            this: dict[str, dict[int, dict[str, Any]]] = {}
            # Each round starts elsewhere in the list, so that no mode is always the one
            # measured first (or right after the 50-client point of a heavy one).
            shift = r * len(modes) // max(1, rounds)
            for mode in modes[shift:] + modes[:shift]:
                for n in (1, clients):
                    res = await run_load(pools[mode][:n], duration=duration, warmup=warmup,
                                         pids=pids)
                    this.setdefault(mode, {})[n] = res.as_dict()
                    _say(f"round {r + 1}/{rounds} {mode:>18} x{n:<3} {res.rps:8.0f} req/s"
                         f" p50 {1000 * res.percentile(50):6.1f} ms"
                         f" p99 {1000 * res.percentile(99):6.1f} ms errors {res.errors}")
            raw.append(this)
    finally:
        for pool in pools.values():
            for c in pool:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.close(), 5)
    summary = report.summarise_throughput(raw)
    return {
        "summary": summary,
        "rounds": raw,
        "modes": {m: MODES[m].label for m in modes},
        "method": f"closed loop, each client its own context and sessions; {rounds} interleaved"
                  f" round(s) of {duration} s per point after {warmup} s warm-up; one"
                  " client-side process (coap-bench) for all clients",
    }


async def phase_memory(counts: list[int], creds: Path, timeout: float) -> dict[str, Any]:
    jobs = [(kind, n) for n in counts for kind in ("psk", "cert", "rpk", "oscore")]
    jobs.append(("cert-release-buffers", counts[0]))
    # Longest first (certificates, largest count), so that two at a time end together.
    jobs.sort(key=lambda job: (job[0].startswith(("cert", "rpk")), job[1]), reverse=True)
    out: dict[str, Any] = {}
    sem = asyncio.Semaphore(2)

    async def one(kind: str, n: int) -> None:
        async with sem:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "coaplayers_tools.bench.memory", kind, str(n), str(creds),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            try:
                stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
                out[f"{kind}@{n}"] = {"error": f"no result within {timeout:g} s"}
                return
            if proc.returncode != 0:
                out[f"{kind}@{n}"] = {"error": stderr.decode(errors="replace")[-500:]}
                return
            entry = json.loads(stdout)
            entry["where"] = "in-process (Layer0ServerCore / ContextStore), see method"
            out[f"{kind}@{n}"] = entry
            _say(f"memory {kind} x{n}: {entry['bytes_per_item'] / 1024:.1f} KiB each")

    await asyncio.gather(*(one(k, n) for k, n in jobs))
    order = [f"{k}@{n}" for k in ("psk", "cert", "rpk", "cert-release-buffers", "oscore")
             for n in counts]
    return {k: out[k] for k in order if k in out}


# ------------------------------------------------------------------------------------ run


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    quick = args.quick
    rounds = args.rounds or (1 if quick else 5)
    duration = args.duration or (1.0 if quick else 2.5)
    warmup = 0.3 if quick else 0.5
    counts = ([int(c) for c in args.memory_counts.split(",")] if args.memory_counts
              else ([100, 1000] if quick else [1000, 10000]))
    modes = args.modes.split(",") if args.modes else list(MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"coap-bench: unknown mode(s) {', '.join(unknown)}")
    for needed in ("plain", "aio_plain"):
        if needed not in modes:
            modes.insert(0, needed)  # the baselines every ratio needs
    results: dict[str, Any] = {
        "meta": {
            "quick": quick, "rounds": rounds, "duration": duration, "warmup": warmup,
            "clients": [1, args.clients], "payload_bytes": 40,
            "host": platform.node(), "cpus": os.cpu_count(),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    t0 = time.monotonic()
    delay = (args.rtt_delay or (150 if quick else 250)) / 1000
    async with rig(workdir) as (ep, _procs):
        _say("rig up: " + ", ".join(f"{k} pid {v}" for k, v in ep.pids.items()))
        if args.loss:
            _say(f"one-shot latency at 20% loss each way on hop 1, {args.loss} runs per point")
            results["loss"] = await rtt.measure_loss(ep, workdir, loss=0.2, runs=args.loss)
            results["meta"]["seconds"] = round(time.monotonic() - t0, 1)
            results["targets"] = report.evaluate(results)
            return results
        if args.shield:
            _say("proxy shield: reads and observations of one resource through each proxy")
            results["shield"] = await shield.measure(
                {"coap-proxy": ep.proxy_coap, "aiocoap-proxy": ep.aio_proxy}, ep.aio_server,
                ep.pids, clients=args.clients, duration=duration,
                observe_timeout=5.0 if quick else 10.0)
            results["meta"]["seconds"] = round(time.monotonic() - t0, 1)
            results["targets"] = report.evaluate(results)
            return results
        _say(f"round trips to the first answer ({1000 * delay:.0f} ms each way on hop 1)")
        results["rtt"] = await rtt.measure(ep, workdir, delay=delay)
        if args.rtt:
            results["meta"]["seconds"] = round(time.monotonic() - t0, 1)
            results["targets"] = report.evaluate(results)
            return results
        _say("bytes on the wire")
        results["wire"] = await phase_wire(ep, workdir, 10 if quick else 20, modes)
        _say("throughput")
        results["throughput"] = await phase_throughput(
            ep, modes, clients=args.clients, rounds=rounds, duration=duration, warmup=warmup)
        _say("proxy shield: reads and observations of one resource through each proxy")
        results["shield"] = await shield.measure(
            {"coap-proxy": ep.proxy_coap, "aiocoap-proxy": ep.aio_proxy}, ep.aio_server,
            ep.pids, clients=args.clients, duration=duration,
            observe_timeout=5.0 if quick else 10.0)
        _say("certificate handshakes over the wire")
        from coaplayers_tools.bench.clients import _e2e_cert, _e2e_rpk

        results["handshake"] = {"rate_over_wire": await handshake.rate_over_wire(
            ep.server_coap, _e2e_cert(ep.creds), ep.pids["coap-server"],
            seconds=1.5 if quick else 4.0)}
        _say("raw-public-key handshakes over the wire")
        results["handshake"]["rate_over_wire_rpk"] = await handshake.rate_over_wire(
            ep.server_coap, _e2e_rpk(ep.creds), ep.pids["coap-server"],
            seconds=1.5 if quick else 4.0)
        _say("handshakes against a busy coap-server (lean load generator)")
        for kind, key in (("cert", "rate_sustained"), ("rpk", "rate_sustained_rpk")):
            results["handshake"][key] = await hsload.rate_sustained(
                ep.server_coap, ep.creds, ep.pids["coap-server"], kind=kind,
                seconds=1.5 if quick else 4.0)
    _say("handshake profiles and in-process rate")
    results["handshake"]["profiles"] = await asyncio.to_thread(handshake.profiles, ep.creds)
    results["handshake"]["rate_in_process"] = await asyncio.to_thread(
        handshake.rate_in_process, 3, 40 if quick else 150, ep.creds)
    results["handshake"]["rate_in_process_rpk"] = await asyncio.to_thread(
        handshake.rate_in_process, 3, 40 if quick else 150, ep.creds, "rpk")
    _say(f"memory at {', '.join(map(str, counts))}")
    results["memory"] = await phase_memory(counts, ep.creds, 120 if quick else 300)
    _say("start-up")
    results["startup"] = await asyncio.to_thread(startup.measure, 3 if quick else 7)
    results["meta"]["seconds"] = round(time.monotonic() - t0, 1)
    results["targets"] = report.evaluate(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from coaplayers.loglimit import install_log_limits

    install_log_limits()  # its in-process peers log what the network does to them
    if args.png and not _png_available():
        print("coap-bench: --png needs matplotlib, which is not installed; install the bench"
              " extra (.venv/bin/pip install -e '.[bench]') or leave out --png. The table and"
              " JSON are still written.", file=sys.stderr)
    if args.costs:
        from coaplayers_tools.bench import costs

        measured = costs.measure(500 if args.quick else 5000)
        print(costs.render(measured), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"costs": measured}, indent=1) + "\n")
        return 0
    if args.startup:
        results: dict[str, Any] = {"startup": startup.measure(3 if args.quick else 7)}
        results["targets"] = report.evaluate(results)
        print(report.render_startup_only(results), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
        return 0
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        cleanup = False
    else:
        workdir = Path(tempfile.mkdtemp(prefix="coap-bench-"))
        cleanup = True
    if args.scaling or args.http:
        if args.scaling:
            from coaplayers_tools.bench import scaling as phase

            key, coro = "scaling", phase.run(workdir, quick=args.quick, clients=args.clients,
                                             rounds=args.rounds, duration=args.duration)
        else:
            from coaplayers_tools.bench import http as phase  # type: ignore[no-redef]

            key, coro = "http", phase.run(workdir, quick=args.quick)
        return _alone(key, coro, phase.render, args, workdir, cleanup)
    status = 0
    try:
        ran = asyncio.run(_main_task(args, workdir))
    except KeyboardInterrupt:
        print("coap-bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, the details are in the logs
        print(f"coap-bench: failed: {type(exc).__name__}: {exc} (logs: {workdir})",
              file=sys.stderr)
        cleanup = False
        return 1
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)
    if ran is None:
        print("coap-bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    results = ran
    print(report.render(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    if args.png:
        if _png_available():
            report.write_png(results, args.png)
        else:
            print("coap-bench: PNG not written: matplotlib is missing (pip install -e"
                  " '.[bench]')", file=sys.stderr)
            status = 3
    return status


def _alone(key: str, coro: Any, render: Any, args: argparse.Namespace, workdir: Path,
           cleanup: bool) -> int:
    """A phase run by itself (--http, --scaling): its table, its JSON."""
    try:
        results = {key: asyncio.run(coro)}
    except Exception as exc:  # one line, the details are in the logs
        print(f"coap-bench: failed: {type(exc).__name__}: {exc} (logs: {workdir})",
              file=sys.stderr)
        return 1
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(results[key]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


async def _main_task(args: argparse.Namespace, workdir: Path) -> dict[str, Any] | None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await run(args, workdir)
    except asyncio.CancelledError:
        return None


if __name__ == "__main__":
    sys.exit(main())
