"""coaplayers.message.request_through: an answered one-answer request leaves no reference
cycle behind (aiocoap's Request holds one until the garbage collector finds it)."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from typing import Any

import aiocoap
from aiocoap import Message
from aiocoap.numbers.codes import Code

from coaplayers.message import request_through


class _Answers:
    """A request interface that answers every request with 2.05 on the next loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fail: bool = False) -> None:
        self.loop = loop
        self.fail = fail

    def request(self, pipe: Any) -> None:
        if self.fail:
            self.loop.call_soon(pipe.add_exception, aiocoap.error.NetworkError("no route"))
        else:
            self.loop.call_soon(pipe.add_response, Message(code=Code.CONTENT, payload=b"ok"),
                                True)


async def test_an_answered_request_is_freed_without_the_collector() -> None:
    loop = asyncio.get_running_loop()
    ctx = type("Ctx", (), {"log": logging.getLogger("t"), "loop": loop})()
    gc.collect()
    gc.disable()
    try:
        request = request_through(ctx, _Answers(loop), Message(code=Code.GET, uri="coap://h/x"))
        answer = await asyncio.wait_for(request.response, 5)
        assert answer.payload == b"ok"
        await asyncio.sleep(0)  # the done callbacks run
        ref = weakref.ref(request)
        del request, answer
        assert ref() is None, "the request was kept alive by a reference cycle"
    finally:
        gc.enable()


async def test_a_failed_request_drops_its_interest_handle_too() -> None:
    """(Its exception's traceback may still hold it: that is Python's, not this cycle.)"""
    loop = asyncio.get_running_loop()
    ctx = type("Ctx", (), {"log": logging.getLogger("t"), "loop": loop})()
    request = request_through(ctx, _Answers(loop, fail=True),
                              Message(code=Code.GET, uri="coap://h/x"))
    handle = request._stop_interest
    try:
        await asyncio.wait_for(request.response, 5)
    except aiocoap.error.NetworkError:
        pass
    await asyncio.sleep(0)
    assert request._stop_interest is not handle


async def test_cancelling_before_the_answer_still_stops_interest() -> None:
    loop = asyncio.get_running_loop()
    ctx = type("Ctx", (), {"log": logging.getLogger("t"), "loop": loop})()
    stopped: list[bool] = []

    class Silent:
        def request(self, pipe: Any) -> None:
            pipe.on_interest_end(lambda: stopped.append(True))

    request = request_through(ctx, Silent(), Message(code=Code.GET, uri="coap://h/x"))
    request.response.cancel()
    await asyncio.sleep(0)
    assert stopped == [True]
