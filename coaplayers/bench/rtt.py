"""Round trips to the first protected answer, counted on the wire, cold and warm.

On a constrained link a round trip costs far more than the CPU around it, and many requests
are one-shot (a ``coap-client`` run, a device that wakes, reports and sleeps): what counts is
how many times a client waits for the network before its first answer. This phase puts a
:class:`~coaplayers.relay.FaultRelay` with a fixed one-way delay ``D`` (no loss) in front of
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
import math
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
RTT_MODES = ("plain", "l0psk", "l0cert", "l0rpk", "oscore", "l1", "oscore_l1", "aio_oscore")

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
