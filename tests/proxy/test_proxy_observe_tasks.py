"""A relayed observation that ends because its client went away leaves no pending task behind
("Task was destroyed but it is pending!" was in coap-proxy's log once), in process."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import GET, Message

from coaplayers.proxy import ProxyConfig, ProxyNode

from .conftest import Running


async def test_client_leaving_an_observation_leaves_no_pending_task(
    tmp_path: Path, origin: Running
) -> None:
    loop = asyncio.get_running_loop()
    problems: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    node = ProxyNode(ProxyConfig(listen=("coap://127.0.0.1:0",), allow=("127.0.0.1", "::1"),
                                 log_file=str(tmp_path / "proxy.jsonl")))
    try:
        (listen,) = await node.start()
        for _ in range(3):
            ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
            m = Message(code=GET, uri=f"{listen}/", observe=0)
            m.opt.proxy_uri = f"coap://{origin.hostport}/obs"
            first = await asyncio.wait_for(ctx.request(m).response, 10)
            assert first.opt.observe is not None
            await ctx.shutdown()  # gone: its next notification is answered with RST
            deadline = time.monotonic() + 10
            while node.site.observers:
                assert time.monotonic() < deadline, "the proxy kept relaying to a gone client"
                await asyncio.sleep(0.05)
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        await node.stop()
        loop.set_exception_handler(previous)
    destroyed = [p for p in problems if "destroyed but it is pending" in str(p.get("message"))]
    assert not destroyed, destroyed
