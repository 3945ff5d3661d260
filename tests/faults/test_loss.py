"""Part 1 of issue 8: 20 % loss on every hop, and every request still succeeds.

client --[relay: 20 % loss both ways]--> coap-proxy --[relay: 20 % loss both ways]--> server

200 Layer 0 requests (end-to-end DTLS, PSK) and 200 OSCORE-mode requests, each bounded. The
clients' and the proxy's CoAP timers are set for loopback (conftest: first retransmission
after 0.1-0.15 s, ten retransmissions); Layer 0 handshake flights ride on CoAP exchanges, so
those timers govern the handshakes too. Eight clients (each with its own Layer 0 session or
OSCORE context) share the work, which keeps the run short without putting one session's
records out of order: the run lasts as long as its unluckiest client, whose few requests that
lost many tries in a row wait out CoAP's exponential back-off.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from aiocoap import GET, Message
from aiocoap.numbers.codes import Code

from coaplayers_tools.relay import FaultRelay, Faults

from .conftest import App, Keys, layer0_channel, oscore_message, oscore_requester, uri

pytestmark = pytest.mark.slow
N = 200
CLIENTS = 8
EACH = 120.0  # bound of one request: only nine losses in a row on one hop come near it
LOSS = 0.2
SEED = int(os.environ.get("COAPLAYERS_LOSS_SEED", "0"))  # other loss patterns, by hand


async def run_requests(clients, send, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    """``n`` requests shared by the clients, each client one request at a time; latencies."""
    latencies: list[float] = []
    todo = iter(range(n))

    async def worker(client) -> None:  # type: ignore[no-untyped-def]
        for i in todo:
            t0 = time.monotonic()
            await asyncio.wait_for(send(client, i), EACH)
            latencies.append(time.monotonic() - t0)

    await asyncio.gather(*(worker(c) for c in clients))
    return latencies


def summary(name: str, lat: list[float], took: float) -> str:
    lat = sorted(lat)
    return (f"{name}: {len(lat)} requests in {took:.1f} s, median {lat[len(lat) // 2]:.2f} s,"
            f" p95 {lat[int(len(lat) * 0.95)]:.2f} s, max {lat[-1]:.2f} s")


async def test_200_layer0_and_200_oscore_requests_with_20_percent_loss_on_every_hop(
    app: App, creds: Keys, start_proxy, client_contexts
) -> None:
    contexts = await client_contexts(CLIENTS)
    async with FaultRelay(upstream=app.address, faults=Faults(loss=LOSS, seed=21 + SEED)) as hop2:
        proxy = await start_proxy()
        hop1_faults = Faults(loss=LOSS, seed=12 + SEED)
        async with FaultRelay(upstream=proxy.address, faults=hop1_faults) as hop1:
            origin = uri(hop2.address)
            via = uri(hop1.address)

            channels = [
                layer0_channel(ctx, origin, creds.e2e_psk_client(), via) for ctx in contexts
            ]

            async def layer0_get(ch, i: int) -> None:  # type: ignore[no-untyped-def]
                msg = Message(code=GET, uri_path=["nonce"], uri_query=[f"l0-{i}"])
                resp = await ch.request(msg).response
                assert resp.code == Code.CONTENT and resp.payload == b"nonce l0-%d" % i

            t0 = time.monotonic()
            l0 = await run_requests(channels, layer0_get, N)
            t_l0 = time.monotonic() - t0
            assert len(l0) == N
            assert [ch.handshakes for ch in channels] == [1] * CLIENTS
            for ch in channels:
                await ch.close()

            requesters = [oscore_requester(ctx, origin, creds, via) for ctx in contexts]

            async def oscore_get(osc, i: int) -> None:  # type: ignore[no-untyped-def]
                resp = await osc.request(oscore_message(origin, GET, f"nonce?os-{i}")).response
                assert resp.code == Code.CONTENT and resp.payload == b"nonce os-%d" % i

            t0 = time.monotonic()
            os_ = await run_requests(requesters, oscore_get, N)
            t_os = time.monotonic() - t0
            assert len(os_) == N
            assert [r.keyings for r in requesters] == [1] * CLIENTS
            for r in requesters:
                await r.close()

            s1, s2 = hop1.stats, hop2.stats
            print(summary("Layer 0", l0, t_l0))
            print(summary("OSCORE", os_, t_os))
            print("hop 1:", s1.format())
            print("hop 2:", s2.format())
            # The loss really happened, on both hops and in both directions.
            for s in (s1, s2):
                for d in (s.up, s.down):
                    assert d.lost > 0.1 * d.received, s.format()
    # Each request ran once on the server (GETs; the first answer of each was delivered).
    assert app.gets >= 2 * N
