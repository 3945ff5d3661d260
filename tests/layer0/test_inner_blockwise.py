"""Inner Block1 inside Layer 0 meets the same bounds as plain CoAP: the inner request reaches
the resource's bounded assembler (coaplayers.blockwise)."""

from __future__ import annotations

import asyncio

import aiocoap
from aiocoap import POST, Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from coaplayers.blockwise import BlockwiseLimits, BoundedSite
from coaplayers.layer0 import Layer0Site, Policy

from ..conftest import free_udp_port
from .apps import Echo
from .conftest import Credentials, channel

T = 20.0


async def test_inner_blocks_out_of_order_and_beyond_the_limit(client_context) -> None:  # type: ignore[no-untyped-def]
    creds = Credentials("psk")
    site = BoundedSite(BlockwiseLimits(max_body=2048))
    site.add_resource(["echo"], Echo())
    layer0 = Layer0Site(site, creds.server, policy=Policy.build(protected=["/echo"]))
    port = free_udp_port()
    server = await aiocoap.Context.create_server_context(layer0, bind=("127.0.0.1", port))
    try:
        ch = channel(client_context, f"coap://127.0.0.1:{port}", creds)

        async def inner(n: int, payload: bytes = b"b" * 256) -> Message:
            m = Message(code=POST, uri_path=["echo"], payload=payload)
            m.opt.block1 = BlockOption.BlockwiseTuple(n, True, 4)
            return await asyncio.wait_for(ch.request(m).response, T)

        first, gap = await inner(0), await inner(2)
        fits = await asyncio.wait_for(
            ch.request(Message(code=POST, uri_path=["echo"], payload=b"f" * 2048)).response, T)
        big = await asyncio.wait_for(
            ch.request(Message(code=POST, uri_path=["echo"], payload=b"x" * 2049)).response, T)
    finally:
        layer0.close()
        await server.shutdown()
    assert first.code == Code.CONTINUE
    assert gap.code == Code.REQUEST_ENTITY_INCOMPLETE
    assert fits.code == Code.CHANGED and fits.payload == b"f" * 2048
    assert big.code == Code.REQUEST_ENTITY_TOO_LARGE and big.opt.size1 == 2048
