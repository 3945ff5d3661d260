"""coaplayers.message.error_to_message behaves as aiocoap's (which it copies for speed)."""

from __future__ import annotations

import logging
from typing import Any

import aiocoap.pipe
import pytest
from aiocoap import Message, error
from aiocoap.numbers.codes import Code

from coaplayers.message import error_to_message

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
