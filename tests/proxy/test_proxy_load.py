"""Load: 2,000 requests from 50 concurrent clients through coap-proxy, none lost, and the
proxy's memory back near its idle level once the clients are gone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiocoap
import pytest
from aiocoap import POST, Message

from .conftest import Running, http_get, metric, start_proxy

pytestmark = pytest.mark.slow

CLIENTS = 50
PER_CLIENT = 40


async def run_client(proxy: Running, origin: Running, n: int, results: list[bool]) -> None:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        for i in range(PER_CLIENT):
            body = f"client {n} request {i} ".encode() * 4
            m = Message(code=POST, payload=body, uri=f"coap://{proxy.hostport}/")
            m.opt.proxy_uri = f"coap://{origin.hostport}/echo"
            r = await asyncio.wait_for(ctx.request(m).response, 30)
            results.append(r.code == aiocoap.CHANGED and r.payload == body)
    finally:
        await ctx.shutdown()


async def test_2000_requests_50_clients_none_lost_memory_returns(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path, "--metrics", "127.0.0.1:0"))
    assert proxy.metrics is not None
    # Warm up (imports, caches, the upstream sockets) before taking the idle level.
    warm: list[bool] = []
    await run_client(proxy, origin, -1, warm)
    assert all(warm)
    idle = proxy.rss()

    results: list[bool] = []
    t0 = time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(*(run_client(proxy, origin, n, results) for n in range(CLIENTS))), 90
    )
    elapsed = time.monotonic() - t0
    peak = proxy.rss()
    assert len(results) == CLIENTS * PER_CLIENT
    assert all(results), f"{results.count(False)} of {len(results)} wrong or lost"

    text = await http_get(proxy.metrics)
    assert metric(text, 'coap_proxy_requests_total{kind="forward"}') == (
        CLIENTS * PER_CLIENT + PER_CLIENT)
    assert metric(text, "coap_proxy_in_flight") == 0
    assert metric(text, 'coap_proxy_errors_total{kind="timeout"}') == 0

    after = proxy.rss()
    print(f"load: {elapsed:.1f} s, rss idle {idle >> 20} MiB, peak {peak >> 20} MiB, "
          f"after {after >> 20} MiB")
    # What stays is aiocoap's per-message deduplication state (kept for EXCHANGE_LIFETIME) and
    # allocator slack: bounded, not growing with each exchange's payloads.
    assert after - idle < 16 * 2**20, (idle, peak, after)
    assert peak - idle < 64 * 2**20, (idle, peak)
