"""coaplayers.message: ``error_to_message`` behaves as aiocoap's (which it copies for speed),
and ``request_through`` leaves no reference cycle behind once a one-answer request is answered
(aiocoap's Request holds one until the garbage collector finds it)."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from typing import Any

import aiocoap
import aiocoap.pipe
import pytest
from aiocoap import Message, error
from aiocoap.numbers.codes import Code

from coaplayers.message import error_to_message, request_through

log = logging.getLogger("test")


def _run(wrap: Any, feed: Any) -> tuple[list[tuple[Any, bool]], list[bool]]:
    """Feed events into the responder's pipe; what the requester's pipe got, and whether
    the responder's pipe lost interest when the requester's did."""
    outer = aiocoap.pipe.Pipe(Message(code=Code.GET, uri="coap://h/x"), log)
    got: list[tuple[Any, bool]] = []

    def on_event(event: Any) -> bool:
        got.append((event.message.code if event.message else event.exception, event.is_last))
        return not event.is_last

    outer.on_event(on_event)
    inner = wrap(outer, log)
    ended: list[bool] = []
    inner.on_interest_end(lambda: ended.append(True))
    feed(inner)
    return got, ended


CASES = {
    "answer": lambda p: p.add_response(Message(code=Code.CONTENT), is_last=True),
    "notification then answer": lambda p: (
        p.add_response(Message(code=Code.CONTENT), is_last=False),
        p.add_response(Message(code=Code.VALID), is_last=True)),
    "renderable error": lambda p: p.add_exception(error.NotFound()),
    "other exception": lambda p: p.add_exception(RuntimeError("boom")),
    "unrenderable renderable": lambda p: p.add_exception(_Broken()),
}


class _Broken(error.RenderableError):
    def to_message(self) -> Message:
        raise ValueError("cannot")


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_as_aiocoap(case: str) -> None:
    ours = _run(error_to_message, CASES[case])
    theirs = _run(aiocoap.pipe.error_to_message, CASES[case])
    assert ours == theirs
    assert ours[0], "the requester got nothing"


def _context(loop: asyncio.AbstractEventLoop) -> Any:
    """What request_through uses of an aiocoap context."""
    return type("Ctx", (), {"log": log, "loop": loop})()


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
    ctx = _context(loop)
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
    ctx = _context(loop)
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
    ctx = _context(loop)
    stopped: list[bool] = []

    class Silent:
        def request(self, pipe: Any) -> None:
            pipe.on_interest_end(lambda: stopped.append(True))

    request = request_through(ctx, Silent(), Message(code=Code.GET, uri="coap://h/x"))
    request.response.cancel()
    await asyncio.sleep(0)
    assert stopped == [True]


async def test_an_exception_after_the_end_is_logged_not_a_type_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiocoap 0.4.17 raised ``TypeError: Logger._log() got an unexpected keyword argument
    'exception'`` here (seen in coap-proxy's log): a rendering task that failed after its
    pipe had ended took the TypeError instead of its own exception."""
    log = logging.getLogger("tests.pipe")
    pipe = aiocoap.pipe.Pipe(Message(code=Code.GET), log)
    events: list[Any] = []
    pipe.on_event(lambda ev: (events.append(ev), not ev.is_last)[1])

    async def render() -> None:
        pipe.add_response(Message(code=Code.CONTENT), is_last=True)
        raise RuntimeError("failed after answering")

    with caplog.at_level(logging.INFO, "tests.pipe"):
        aiocoap.pipe.run_driving_pipe(pipe, render())
        await asyncio.sleep(0)  # the task's one step (it is not awaited by design)
        await asyncio.sleep(0)
        pipe.add_exception(ValueError("later still"))  # raised TypeError directly
    assert [ev.message.code for ev in events] == [Code.CONTENT]
    discarded = [r for r in caplog.records if "added after" in r.getMessage()]
    assert len(discarded) == 2
    assert {type(r.exc_info[1]) for r in discarded if r.exc_info} == {RuntimeError, ValueError}
