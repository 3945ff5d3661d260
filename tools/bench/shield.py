"""How well a proxy shields the device behind it: upstream requests per downstream request.

Fifty clients (stock aiocoap contexts, each its own socket, through aiocoap's
``ProxyForwarder``) read, then observe, the baseline server's ``/reading`` through coap-proxy
and through aiocoap-proxy. The server counts what reaches it (``/stats``), so the figures are
the device's own:

- reads: closed-loop GETs for a window; upstream GETs / downstream answers (coap-proxy serves
  from its cache while the answer is fresh: 60 s, as the reading carries no Max-Age, which
  aiocoap-proxy would refuse with 4.02), and the requests per second each proxy
  answers (for coap-proxy, cache hits);
- observe: every client registers; upstream registrations for the 50 observers, and whether
  each client then got notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code

from .load import REQUEST_TIMEOUT
from .procs import cpu_of

READING = "/reading"


class _Reader:
    def __init__(self, ctx: aiocoap.Context, forwarder: Any, target: str) -> None:
        self.ctx = ctx
        self.forwarder = forwarder
        self.target = target

    async def get(self) -> aiocoap.Message:
        msg = aiocoap.Message(code=Code.GET, uri=self.target)
        response = await self.forwarder.request(msg).response
        if response.code != Code.CONTENT:
            raise RuntimeError(f"unexpected answer {response.code}")
        return response


async def _readers(proxy: str, target: str, count: int) -> list[_Reader]:
    from aiocoap.proxy.client import ProxyForwarder

    out = []
    for _ in range(count):
        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        out.append(_Reader(ctx, ProxyForwarder(proxy, ctx), target))
    return out


async def _stats(server: str) -> dict[str, int]:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        r = await asyncio.wait_for(
            ctx.request(aiocoap.Message(code=Code.GET, uri=f"{server}/stats")).response, 10)
        return dict(json.loads(r.payload))
    finally:
        await ctx.shutdown()


async def _reads(readers: list[_Reader], server: str, duration: float, pid: int | None
                 ) -> dict[str, Any]:
    for r in readers:  # warm: every client has a route, the cache holds the answer
        await asyncio.wait_for(r.get(), REQUEST_TIMEOUT)
    before = await _stats(server)
    cpu0 = cpu_of(pid) if pid else 0.0
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    done = errors = 0

    async def one(r: _Reader) -> None:
        nonlocal done, errors
        while loop.time() < end:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await r.get()
                done += 1
            except Exception:  # counted; the loop goes on
                errors += 1
                await asyncio.sleep(0.05)

    t0 = time.monotonic()
    await asyncio.gather(*(one(r) for r in readers))
    seconds = time.monotonic() - t0
    cpu = (cpu_of(pid) - cpu0) if pid else None
    after = await _stats(server)
    upstream = after["gets"] - before["gets"]
    return {
        "downstream": done, "upstream": upstream, "errors": errors, "seconds": round(seconds, 3),
        "rps": done / seconds if seconds else 0.0,
        "upstream_per_downstream": upstream / done if done else None,
        "proxy_cpu_us_per_request": 1e6 * cpu / done if cpu is not None and done else None,
    }


async def _observe(readers: list[_Reader], server: str, notifications: int = 2,
                   timeout: float = 10.0) -> dict[str, Any]:
    before = await _stats(server)
    requests = []
    got = [0] * len(readers)
    try:
        for r in readers:
            msg = aiocoap.Message(code=Code.GET, uri=r.target, observe=0)
            requests.append(r.forwarder.request(msg))

        async def watch(i: int, req: Any) -> None:
            first = await req.response
            if first.opt.observe is None:
                return
            got[i] = 1
            async for _ in req.observation:
                got[i] += 1
                if got[i] > notifications:
                    return

        results = await asyncio.wait_for(asyncio.gather(
            *(watch(i, q) for i, q in enumerate(requests)), return_exceptions=True), timeout)
        failed = [r for r in results if isinstance(r, BaseException)]
        after = await _stats(server)
    finally:
        for req in requests:
            with contextlib.suppress(Exception):
                if req.observation is not None:
                    req.observation.cancel()
    return {
        "observers": len(readers),
        "upstream_registrations": after["registrations"] - before["registrations"],
        "observers_notified": sum(1 for g in got if g > notifications),
        "errors": len(failed),
        "first_error": repr(failed[0]) if failed else None,
    }


async def measure(proxies: dict[str, str], server: str, pids: dict[str, int], *,
                  clients: int, duration: float, observe_timeout: float = 10.0) -> dict[str, Any]:
    """For each proxy (name -> coap:// URI): reads and observations of ``server``'s reading.

    ``observe_timeout`` bounds the observers' wait for their notifications; aiocoap-proxy's
    pooled observations never answer 50 observers, so every run waits it out once."""
    out: dict[str, Any] = {}
    for name, proxy in proxies.items():
        readers = await _readers(proxy, server + READING, clients)
        try:
            entry: dict[str, Any] = {}
            try:
                entry["reads"] = await _reads(readers, server, duration, pids.get(name))
            except Exception as exc:  # a proxy that cannot do it is a result, not a crash
                entry["reads"] = {"error": repr(exc)}
            try:
                entry["observe"] = await _observe(readers, server, timeout=observe_timeout)
            except Exception as exc:
                entry["observe"] = {"error": repr(exc)}
            out[name] = entry
        finally:
            for r in readers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(r.ctx.shutdown(), 5)
    ours, theirs = out.get("coap-proxy", {}), out.get("aiocoap-proxy", {})
    if "rps" in ours.get("reads", {}) and theirs.get("reads", {}).get("rps"):
        out["cache_hit_rps_ratio"] = ours["reads"]["rps"] / theirs["reads"]["rps"]
    out["method"] = (f"{clients} stock aiocoap clients (ProxyForwarder), closed-loop GET of"
                     f" {READING} (no Max-Age: 60 s) for {duration} s after one warm-up GET"
                     " each, then one Observe registration each; upstream counts from the"
                     " server's /stats")
    return out
