"""Observe aggregation (RFC 7641 section 5): many observers through coap-proxy cost the origin
one observation; protected ones stay one per client. Real aiocoap and libcoap observers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiocoap
import pytest
from aiocoap import GET, Message
from aiocoap.optiontypes import OpaqueOption

from tests.conftest import need_program, run_program

from .conftest import Running, poll_metric, start_proxy

pytestmark = pytest.mark.interop


def observe_via(proxy: Running, target: str, protected: bool = False) -> Message:
    m = Message(code=GET, uri=f"coap://{proxy.hostport}/", observe=0)
    m.opt.proxy_uri = target
    if protected:  # what an OSCORE observation looks like to the proxy
        m.opt.add_option(OpaqueOption(9, b"\x09\x00\x42"))
    return m


async def observe_n(ctx: aiocoap.Context, msg: Message, n: int,
                    all_in: asyncio.Event | None = None) -> list[int]:
    """The first answer and notifications until n values (after ``all_in`` is set, if given);
    the observation is then cancelled."""
    req = ctx.request(msg)
    first = await asyncio.wait_for(req.response, 10)
    if all_in is not None:
        await asyncio.wait_for(all_in.wait(), 15)
    assert first.opt.observe is not None, first
    seen = [int(first.payload)]

    async def collect() -> None:
        async for note in req.observation:
            seen.append(int(note.payload))
            if len(seen) == n:
                return

    await asyncio.wait_for(collect(), 15)
    req.observation.cancel()
    return seen


@pytest.mark.slow
async def test_many_observers_share_one_upstream_observation(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path, "--metrics", "127.0.0.1:0"))
    target = f"coap://{origin.hostport}/obs"
    ctxs = [await aiocoap.Context.create_client_context(transports=["udp6"]) for _ in range(5)]
    libcoap = need_program("coap-client-notls")
    outs = [tmp_path / f"lc{i}.out" for i in range(2)]
    try:
        lc = [asyncio.ensure_future(run_program(
            libcoap, "-s", "3", "-B", "5", "-o", str(out), "-P", f"coap://{proxy.hostport}",
            target, timeout=30)) for out in outs]
        all_in = asyncio.Event()
        observing = asyncio.gather(
            *(observe_n(c, observe_via(proxy, target), 6, all_in) for c in ctxs))
        await poll_metric(proxy, "coap_proxy_observers", 7)  # all seven clients observe ...
        await poll_metric(proxy, "coap_proxy_observations", 1)  # ... through one upstream
        all_in.set()
        seen = await observing
        await asyncio.gather(*lc)
    finally:
        for c in ctxs:
            await c.shutdown()
    for values in seen:  # every client in order, nothing repeated
        assert values == sorted(values) and len(set(values)) == len(values) == 6, values
    for out in outs:
        assert out.exists() and len(out.read_bytes()) >= 2, "libcoap got no notifications"
    registrations = [e for e in proxy.log_lines() if e["event"] == "exchange"
                     and e["routing"].get("observe") == 0]  # type: ignore[union-attr]
    assert len(registrations) == 7
    assert sum(1 for e in registrations if e.get("observe") != "shared") == 1
    await poll_metric(proxy, "coap_proxy_observations", 0)  # the last one left: deregistered
    await poll_metric(proxy, "coap_proxy_observers", 0)


async def test_protected_or_unshared_observations_stay_one_per_client(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    proxies.append(shared := await start_proxy(tmp_path, "--metrics", "127.0.0.1:0"))
    proxies.append(off := await start_proxy(tmp_path, "--metrics", "127.0.0.1:0",
                                            "--no-aggregate-observations"))
    target = f"coap://{origin.hostport}/obs"
    ctxs = [await aiocoap.Context.create_client_context(transports=["udp6"]) for _ in range(4)]
    try:
        reqs = [ctxs[0].request(observe_via(shared, target, protected=True)),
                ctxs[1].request(observe_via(shared, target, protected=True)),
                ctxs[2].request(observe_via(off, target)),
                ctxs[3].request(observe_via(off, target))]
        for r in reqs:
            assert (await asyncio.wait_for(r.response, 10)).opt.observe is not None
        await poll_metric(shared, "coap_proxy_observations", 2)
        await poll_metric(off, "coap_proxy_observations", 2)
        for r in reqs:
            r.observation.cancel()
    finally:
        for c in ctxs:
            await c.shutdown()
