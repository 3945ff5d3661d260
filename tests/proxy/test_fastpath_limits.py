"""The fast path's bounds are configuration (docs/PROXY.md, Limits): beyond them requests
take aiocoap's path, answered all the same."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiocoap
import pytest

from coaplayers.proxy.config import ConfigError, ProxyConfig

from .conftest import Running, _stop, http_get, metric, start_origin, start_proxy

FAST = "coap_proxy_fast_path_total"


async def post(ctx: aiocoap.Context, proxy: Running, target: str, payload: bytes
               ) -> aiocoap.Message:
    message = aiocoap.Message(code=aiocoap.POST, uri=proxy.listen[0], payload=payload)
    message.opt.proxy_uri = target
    return await asyncio.wait_for(ctx.request(message).response, 20)


async def test_beyond_its_sockets_requests_take_aiocoaps_path(
    tmp_path: Path, client: aiocoap.Context
) -> None:
    origins = [await start_origin(tmp_path), await start_origin(tmp_path)]
    config = tmp_path / "proxy.toml"
    config.write_text('listen = ["coap://127.0.0.1:0"]\nmetrics = "127.0.0.1:0"\n'
                      "fast_path_sockets = 1\ncache_entries = 0\n")
    try:
        proxy = await start_proxy(tmp_path, "--config", str(config))
        try:
            answers = [await post(client, proxy, f"{o.listen[0]}/echo", b"%d-%d" % (n, i))
                       for n, o in enumerate(origins) for i in range(3)]
            assert proxy.metrics is not None
            fast = metric(await http_get(proxy.metrics), FAST)
        finally:
            await _stop(proxy.proc)
    finally:
        for o in origins:
            await _stop(o.proc)
    assert [a.payload for a in answers] == [b"%d-%d" % (n, i) for n in range(2) for i in range(3)]
    assert fast == 3  # the first origin's: its socket is the one there may be


@pytest.mark.parametrize("field", ["fast_path_sockets", "fast_path_decisions",
                                   "fast_path_lookups"])
def test_the_bounds_are_checked(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ProxyConfig(**{field: 0})
