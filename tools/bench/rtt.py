"""Round trips to the first protected answer, counted on the wire, cold and warm.

On a constrained link a round trip costs far more than the CPU around it, and many requests
are one-shot (a ``coap-client`` run, a device that wakes, reports and sleeps): what counts is
how many times a client waits for the network before its first answer. This phase puts a
:class:`~coaplayers_tools.relay.FaultRelay` with a fixed one-way delay ``D`` (no loss) in front of
the proxy (hop 1, the constrained link), starts a fresh client with nothing but the state a
client keeps between runs, and sends one 40-byte ``POST /echo``.

Counting: the relay records every datagram as it arrives; the run starts when the client's
first datagram reaches the relay, and ends when the answer is in the client's hands (the same
event loop, so one clock). Every round trip through the relay costs ``2 D`` plus processing;
``floor(elapsed / 2 D)`` is the number of round trips as long as all processing of a run
stays under ``2 D``, which ``processing_s`` (what is left over) shows for each run.

*Cold* is a client with nothing kept; *warm* is a second client run after the first one
ended, with what the client keeps between runs (the same state folder). Retransmissions
would add their timeouts, so there is no loss here (see the loss phase for that).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..relay import FaultRelay, Faults
from ..relay.capture import read_capture
from ..relay.faults import Direction
from .clients import MODES, WIRE_ONLY, Endpoints, open_client

#: Modes of this phase: end-to-end over plain hops (one relay delay per round trip to the
#: server), Layer 1 alone and the OSCORE mode over Layer 1 (whose hop handshake crosses the
#: same link), and the static-key OSCORE baseline.
RTT_MODES = ("plain", "l0psk", "l0cert", "l0rpk", "oscore", "oscore_psk", "oscore_rpk", "l1",
             "oscore_l1", "aio_oscore")

#: EDHOC + OSCORE (RFC 9668, the EDHOC + OSCORE combined request): the first protected answer
#: two round trips after a cold start, one with an OSCORE context kept.
REFERENCE = {"label": "EDHOC + OSCORE (RFC 9668)", "cold": 2, "warm": 1}


def _addr(uri: str) -> tuple[str, int]:
    parts = urlsplit(uri)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _requests_up(grams: list[Any]) -> int:
    """Distinct CoAP requests the client sent (retransmissions counted once); None-safe for
    DTLS hops, where nothing decodes as CoAP."""
    ids = set()
    for g in grams:
        d = g.data
        if g.direction is Direction.UP and len(d) >= 4 and d[0] >> 6 == 1 and 1 <= d[1] < 32:
            ids.add(int.from_bytes(d[2:4], "big"))
    return len(ids)


async def one_run(mode: str, ep: Endpoints, workdir: Path, *, delay: float, run: str,
                  state: Path) -> dict[str, Any]:
    """One client run through a delaying relay: round trips to its first answer."""
    info = MODES.get(mode) or WIRE_ONLY[mode]
    secure = info.hop1 != "none"
    if mode == "aio_oscore":
        proxy_uri, origin = ep.aio_proxy, ep.aio_server
    elif secure:
        proxy_uri, origin = ep.proxy_coaps, ep.server_coaps
    else:
        proxy_uri, origin = ep.proxy_coap, ep.server_coap
    cap = workdir / f"rtt-{mode}-{run}.cap"
    loop = asyncio.get_running_loop()
    relay = FaultRelay(upstream=_addr(proxy_uri), record=cap, faults=Faults(delay=delay))
    async with relay:
        via = f"{'coaps' if secure else 'coap'}://127.0.0.1:{relay.address[1]}"
        client = await asyncio.wait_for(
            open_client(mode, ep, proxy=via, origin=origin, state=state), 30)
        try:
            await asyncio.wait_for(client.post(), 60)
            answered = loop.time()
        finally:
            await client.close()
        started = relay.started_at
    grams = read_capture(cap)
    if not grams:
        raise RuntimeError(f"{mode}: no datagram crossed the relay")
    elapsed = answered - (started + grams[0].time)
    rtt = 2 * delay
    trips = math.floor(elapsed / rtt)
    return {
        "round_trips": trips,
        "elapsed_s": round(elapsed, 4),
        "processing_s": round(elapsed - trips * rtt, 4),
        "coap_requests_up": _requests_up(grams) if not secure else None,
        "datagrams_up": sum(1 for g in grams if g.direction is Direction.UP),
        "datagrams_down": sum(1 for g in grams if g.direction is Direction.DOWN),
    }


async def measure(ep: Endpoints, workdir: Path, *, delay: float,
                  modes: tuple[str, ...] = RTT_MODES) -> dict[str, Any]:
    """Cold and warm runs of every mode; the reference line beside them."""
    out: dict[str, Any] = {}
    for mode in modes:
        state = workdir / f"rtt-state-{mode}"
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        entry: dict[str, Any] = {"label": (MODES.get(mode) or WIRE_ONLY[mode]).label}
        for run in ("cold", "warm"):
            entry[run] = await one_run(mode, ep, workdir, delay=delay, run=run, state=state)
        out[mode] = entry
    return {
        "modes": out,
        "reference": REFERENCE,
        "delay_ms": round(1000 * delay),
        "method": (f"FaultRelay with {1000 * delay:.0f} ms one-way delay in front of the proxy"
                   " (hop 1); one 40-byte POST per client run, from its first datagram to its"
                   " answer; round trips = floor(elapsed / (2 x delay)); cold: nothing kept,"
                   " warm: a second run with what the client keeps between runs"),
    }


#: Modes of the loss phase: the end-to-end modes over plain hops, cold and warm.
LOSS_MODES = ("l0psk", "l0cert", "oscore")


async def _one_shot(mode: str, ep: Endpoints, workdir: Path, *, loss: float, seed: int,
                    state: Path | None, timeout: float,
                    errors: list[str] | None = None) -> float | None:
    """Seconds from a fresh client's start to its (checked) answer; None if none came (why
    goes to ``errors``)."""
    loop = asyncio.get_running_loop()
    relay = FaultRelay(upstream=_addr(ep.proxy_coap), faults=Faults(loss=loss, seed=seed))
    async with relay:
        via = f"coap://127.0.0.1:{relay.address[1]}"
        t0 = loop.time()
        client = None
        try:
            async with asyncio.timeout(timeout):
                client = await open_client(mode, ep, proxy=via, origin=ep.server_coap,
                                           state=state)
                await client.post()  # raises unless the answer is the right one
            return loop.time() - t0
        except Exception as exc:  # counted as a failure; never a wrong answer (post checks)
            if errors is not None:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return None
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), 5)


async def measure_loss(ep: Endpoints, workdir: Path, *, loss: float, runs: int,
                       timeout: float = 120.0, concurrency: int = 16,
                       modes: tuple[str, ...] = LOSS_MODES) -> dict[str, Any]:
    """One-shot latency with ``loss`` each way on hop 1: ``runs`` client runs per mode, cold
    (nothing kept) and warm (each run with its own state folder, primed by one run without
    loss, as a device that has talked to the server before)."""
    sem = asyncio.Semaphore(concurrency)
    out: dict[str, Any] = {}
    for mode in modes:
        for run in ("cold", "warm"):
            errors: list[str] = []

            async def one(i: int, mode: str = mode, run: str = run,
                          errors: list[str] = errors) -> float | None:
                async with sem:
                    state = None
                    if run == "warm":
                        state = workdir / f"loss-state-{mode}-{i}"
                        state.mkdir(mode=0o700, parents=True, exist_ok=True)
                        primed = await _one_shot(mode, ep, workdir, loss=0.0, seed=i,
                                                 state=state, timeout=30, errors=errors)
                        if primed is None:
                            return None
                    return await _one_shot(mode, ep, workdir, loss=loss, seed=1000 + i,
                                           state=state, timeout=timeout, errors=errors)

            times = await asyncio.gather(*(one(i) for i in range(runs)))
            done = sorted(t for t in times if t is not None)
            out.setdefault(mode, {"label": (MODES.get(mode) or WIRE_ONLY[mode]).label})[run] = {
                "runs": runs,
                "answered": len(done),
                "median_s": round(statistics.median(done), 3) if done else None,
                "max_s": round(done[-1], 3) if done else None,
                "seconds": [round(t, 3) for t in done],
                "errors": errors,
            }
    return {
        "modes": out,
        "loss": loss,
        "method": (f"FaultRelay with {100 * loss:.0f}% loss each way in front of coap-proxy"
                   f" (hop 1), seeded per run; {runs} one-shot runs per mode and kind (fresh"
                   " client: context, socket, Layer 0 session), from the client's start to its"
                   f" checked answer, bounded at {timeout:g} s; warm runs first make one run"
                   " without loss with their own state folder"),
    }
