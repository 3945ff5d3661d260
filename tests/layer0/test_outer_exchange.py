"""The client's outer exchanges: one block each, sent without aiocoap's block-wise runner;
an outer answer that comes in blocks is an outer error, not something to reassemble."""

from __future__ import annotations

import aiocoap
import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from coaplayers.dtls import PskClientCredentials
from coaplayers.layer0 import Layer0Client
from coaplayers.layer0.errors import OuterError

CREDS = PskClientCredentials(b"outer-1", b"outer-secret-016")


async def test_an_outer_answer_in_blocks_is_an_outer_error() -> None:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        channel = Layer0Client(ctx, "coap://192.0.2.1", CREDS)

        async def split_answer(msg: Message) -> Message:
            answer = Message(code=Code.CHANGED, payload=b"\x17" * 16)
            answer.opt.block2 = BlockOption.BlockwiseTuple(0, True, 4)
            return answer

        async def whole_answer(msg: Message) -> Message:
            return Message(code=Code.CHANGED, payload=b"\x17" * 16)

        channel._send_outer = split_answer  # type: ignore[method-assign]
        with pytest.raises(OuterError, match="in blocks"):
            await channel._post(Code.POST, ("~abcde",), b"\x17" * 16)
        channel._send_outer = whole_answer  # type: ignore[method-assign]
        answer = await channel._post(Code.POST, ("~abcde",), b"\x17" * 16)
        assert answer.code == Code.CHANGED and answer.payload == b"\x17" * 16
    finally:
        await ctx.shutdown()
