"""Bounded Block1 reassembly: the assembler without a network, then coap-server's resources over
real UDP (7,745 in-order blocks, out-of-order blocks, no traceback in the log)."""

from __future__ import annotations

import asyncio
import logging
import time

import aiocoap
import pytest
from aiocoap.blockwise import ContinueException
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from coaplayers.blockwise import (
    Block1Assembler,
    BlockOutOfOrder,
    BlockwiseLimits,
    RequestTooLarge,
)
from coaplayers.layer1 import create_context
from coaplayers.programs.server.resources import build_site


class Remote:
    def __init__(self, host: str = "192.0.2.1", port: int = 5683) -> None:
        self.sockaddr = (host, port)
        self.blockwise_key = (self.sockaddr, None)


def block(n: int, more: bool, payload: bytes, remote: Remote, szx: int = 6,
          path: str = "echo") -> aiocoap.Message:
    m = aiocoap.Message(code=aiocoap.POST, uri_path=[path], payload=payload)
    m.opt.block1 = BlockOption.BlockwiseTuple(n, more, szx)
    m.remote = remote
    return m


def feed(assembler: Block1Assembler, m: aiocoap.Message) -> aiocoap.Message | type:
    try:
        return assembler.feed(m)
    except ContinueException:
        return ContinueException
    except (BlockOutOfOrder, RequestTooLarge) as exc:
        return type(exc)


KIB = b"k" * 1024


def test_a_body_up_to_the_limit_is_assembled_and_beyond_it_refused() -> None:
    a = Block1Assembler(BlockwiseLimits(max_body=4096))
    r = Remote()
    assert [feed(a, block(n, True, KIB, r)) for n in range(3)] == [ContinueException] * 3
    whole = feed(a, block(3, False, KIB, r))
    assert isinstance(whole, aiocoap.Message) and whole.payload == KIB * 4
    assert whole.opt.block1.block_number == 3 and len(a) == 0
    assert [feed(a, block(n, True, KIB, r)) for n in range(5)] == [ContinueException] * 4 + [
        RequestTooLarge]
    assert len(a) == 0  # the refused body is gone
    message = RequestTooLarge(4096).to_message()
    assert message.code == Code.REQUEST_ENTITY_TOO_LARGE and message.opt.size1 == 4096


def test_a_body_announced_in_size1_beyond_the_limit_is_refused_at_block_0() -> None:
    a = Block1Assembler(BlockwiseLimits(max_body=4096))
    first = block(0, True, KIB, Remote())
    first.opt.size1 = 4097
    assert feed(a, first) is RequestTooLarge and len(a) == 0


def test_out_of_order_blocks_get_4_08_and_end_the_assembly() -> None:
    a = Block1Assembler()
    r = Remote()
    assert feed(a, block(1, True, KIB, r)) is BlockOutOfOrder  # nothing started
    feed(a, block(0, True, KIB, r))
    assert feed(a, block(0, True, KIB, r)) is ContinueException  # block 0 again: starts over
    feed(a, block(1, True, KIB, r))
    assert feed(a, block(1, True, KIB, r)) is ContinueException  # a repeat of what we hold
    assert feed(a, block(1, True, b"x" * 1024, r)) is BlockOutOfOrder  # a different one
    assert len(a) == 0
    feed(a, block(0, True, KIB, r))
    assert feed(a, block(2, True, KIB, r)) is BlockOutOfOrder  # a gap
    assert len(a) == 0 and a.stats["out_of_order"] == 3
    assert BlockOutOfOrder().to_message().code == Code.REQUEST_ENTITY_INCOMPLETE


def test_assemblies_are_bounded_per_peer_and_in_all() -> None:
    a = Block1Assembler(BlockwiseLimits(max_per_peer=2, max_assemblies=4))
    attacker = [Remote("198.51.100.7", p) for p in range(1000, 1010)]
    victim = Remote("192.0.2.1")
    feed(a, block(0, True, KIB, victim, path="v"))
    for n, r in enumerate(attacker):
        for path in ("a", "b", "c"):  # each port: a third body displaces its first
            feed(a, block(0, True, KIB, r, path=f"{path}{n}"))
    assert len(a) == 4
    # The host holding the most gave way each time: the victim's body goes on.
    assert feed(a, block(1, True, KIB, victim, path="v")) is ContinueException


def test_an_assembly_not_continued_within_its_lifetime_is_dropped() -> None:
    now = [0.0]
    a = Block1Assembler(BlockwiseLimits(lifetime=10), clock=lambda: now[0])
    r = Remote()
    feed(a, block(0, True, KIB, r))
    now[0] = 9.0
    assert feed(a, block(1, True, KIB, r)) is ContinueException
    now[0] = 19.5
    assert feed(a, block(2, True, KIB, r)) is BlockOutOfOrder


def test_assembly_cost_is_linear_in_the_body() -> None:
    """8 MiB in 1 KiB blocks: each block is appended, not the body so far copied (aiocoap's
    spool copies ~32 GiB for this body)."""
    a = Block1Assembler(BlockwiseLimits(max_body=16 << 20))
    r = Remote()
    blocks = [block(n, n < 8191, KIB, r) for n in range(8192)]
    t0 = time.process_time()
    for m in blocks[:-1]:
        with pytest.raises(ContinueException):
            a.feed(m)
    whole = a.feed(blocks[-1])
    assert len(whole.payload) == 8 << 20
    assert time.process_time() - t0 < 2.0


async def test_coap_server_resources_refuse_7745_in_order_blocks_at_the_limit(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    srv = await create_context(build_site(), listen=["coap://127.0.0.1:0"])
    cli = await aiocoap.Context.create_client_context()
    uri = srv.bound[0] + "/echo"

    async def send(n: int, more: bool) -> aiocoap.Message:
        m = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=KIB)
        m.opt.block1 = BlockOption.BlockwiseTuple(n, more, 6)
        return await asyncio.wait_for(cli.request(m, handle_blockwise=False).response, 10)

    try:
        answers = []
        for n in range(7745):  # 7.6 MiB, in order
            answer = await send(n, n < 7744)
            answers.append(answer.code)
            if answer.code != Code.CONTINUE:
                break
        refused = answer
        await send(0, True)
        out_of_order = await send(2, True)
        late = await send(5, True)
    finally:
        await cli.shutdown()
        await srv.shutdown()
    assert answers == [Code.CONTINUE] * 64 + [Code.REQUEST_ENTITY_TOO_LARGE]  # 64 KiB
    assert refused.opt.size1 == 64 * 1024
    assert out_of_order.code == late.code == Code.REQUEST_ENTITY_INCOMPLETE
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_block2_responses_are_kept_up_to_a_bound_for_the_whole_site() -> None:
    site = build_site(BlockwiseLimits(max_responses=2))
    srv = await create_context(site, listen=["coap://127.0.0.1:0"])
    cli = await aiocoap.Context.create_client_context()

    async def get(query: str, n: int) -> aiocoap.Message:
        m = aiocoap.Message(code=aiocoap.GET, uri=f"{srv.bound[0]}/firmware?{query}")
        m.opt.block2 = BlockOption.BlockwiseTuple(n, False, 6)
        return await asyncio.wait_for(cli.request(m, handle_blockwise=False).response, 10)

    try:
        for i in range(100):  # each query its own block key (aiocoap kept all 100)
            assert (await get(f"q{i}", 0)).code == Code.CONTENT
        kept = len(site.responses)
        early, recent = await get("q0", 1), await get("q99", 1)
    finally:
        await cli.shutdown()
        await srv.shutdown()
    assert kept == 2
    assert early.code == Code.REQUEST_ENTITY_INCOMPLETE  # gave way: the client starts again
    assert recent.code == Code.CONTENT and recent.opt.block2.block_number == 1
