"""Inner Block1 under OSCORE meets the same bounds as plain CoAP: the unprotected request
reaches the resource's bounded assembler (coaplayers.blockwise)."""

from __future__ import annotations

import asyncio

import aiocoap
from aiocoap import Message
from aiocoap.numbers.codes import POST, Code
from aiocoap.optiontypes import BlockOption

from coaplayers.blockwise import BlockwiseLimits, BoundedSite
from coaplayers.oscore import ClientContexts, ContextStore, OscoreSite, attach

from ..conftest import free_udp_port
from .support import Echo, static_pair

TIMEOUT = 10.0


async def test_inner_blocks_out_of_order_and_beyond_the_limit(client: aiocoap.Context) -> None:
    site = BoundedSite(BlockwiseLimits(max_body=2048))
    site.add_resource(["echo"], Echo())
    client_ctx, server_ctx = static_pair()
    store = ContextStore()
    store.add(server_ctx)
    port = free_udp_port()
    server = await aiocoap.Context.create_server_context(
        OscoreSite(site, store), bind=("127.0.0.1", port), transports=["udp6"])
    contexts = ClientContexts()
    attach(client, contexts)
    uri = f"coap://127.0.0.1:{port}/echo"
    contexts.set(uri, client_ctx)

    async def send(m: Message, blockwise: bool = False) -> Message:
        return await asyncio.wait_for(
            client.request(m, handle_blockwise=blockwise).response, TIMEOUT)

    def block(n: int) -> Message:
        m = Message(code=POST, uri=uri, payload=b"b" * 256)
        m.opt.block1 = BlockOption.BlockwiseTuple(n, True, 4)
        return m

    try:
        first, gap = await send(block(0)), await send(block(2))
        fits = await send(Message(code=POST, uri=uri, payload=b"f" * 2048), blockwise=True)
        big = await send(Message(code=POST, uri=uri, payload=b"x" * 4096), blockwise=True)
    finally:
        await server.shutdown()
    assert first.code == Code.CONTINUE
    assert gap.code == Code.REQUEST_ENTITY_INCOMPLETE
    assert fits.code == Code.CHANGED and fits.payload == b"f" * 2048
    assert big.code == Code.REQUEST_ENTITY_TOO_LARGE and big.opt.size1 == 2048
