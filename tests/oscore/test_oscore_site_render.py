"""OscoreSite without a network: what the inner site answers comes back protected, including
errors raised by resources and every Observe notification, and loss of interest ends it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiocoap
import aiocoap.resource as resource
from aiocoap import Message
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe

from coaplayers.oscore import ContextStore, OscoreSite

from .support import build_site, static_pair

log = logging.getLogger("test")


class Broken(resource.Resource):
    async def render_get(self, request: Message) -> Message:
        raise RuntimeError("resource bug")


def _site() -> tuple[OscoreSite, Any, Any]:
    site, counter = build_site()
    site.add_resource(["broken"], Broken())
    client, server = static_pair(client_id=b"\x05")
    store = ContextStore()
    store.add(server)
    return OscoreSite(site, store), client, counter


def _protected(client: Any, path: str, observe: bool = False) -> tuple[Message, Any]:
    request = Message(code=Code.GET, uri=f"coap://127.0.0.1:5683/{path}")
    if observe:
        request.opt.observe = 0
    protected, request_id = client.protect(request)
    protected.direction = Direction.INCOMING
    protected.remote = _Remote()
    protected.mtype = aiocoap.CON
    return protected, request_id


class _Remote:
    """Enough of an aiocoap remote for the inner site."""

    scheme = "coap"
    hostinfo = "127.0.0.1:40000"
    hostinfo_local = "127.0.0.1:5683"
    uri_base = "coap://127.0.0.1:40000"
    uri_base_local = "coap://127.0.0.1:5683"
    blockwise_key = ("127.0.0.1", 40000)
    maximum_block_size_exp = 6
    maximum_payload_size = 1024
    is_multicast = False
    authenticated_claims: list[Any] = []


def _unprotect(client: Any, message: Message, request_id: Any) -> Message:
    message.direction = Direction.INCOMING
    inner, _ = client.unprotect(message, request_id)
    return inner


async def _render(site: OscoreSite, request: Message) -> list[Pipe.Event]:
    pipe = Pipe(request, log)
    events: list[Pipe.Event] = []
    pipe.on_event(lambda e: events.append(e) or not e.is_last)
    await site.render_to_pipe(pipe)
    return events


async def test_answers_and_errors_come_back_protected() -> None:
    site, client, _ = _site()
    for path, code, payload in (
        ("hello", Code.CONTENT, b"hello client-1"),
        ("missing", Code.NOT_FOUND, None),
        ("broken", Code.INTERNAL_SERVER_ERROR, None),
    ):
        request, request_id = _protected(client, path)
        events = await _render(site, request)
        assert len(events) == 1 and events[0].is_last and events[0].exception is None
        outer = events[0].message
        assert outer.opt.oscore is not None and outer.code == Code.CHANGED
        inner = _unprotect(client, outer, request_id)
        assert inner.code == code, path
        if payload is not None:
            assert inner.payload == payload


async def test_observe_notifications_are_protected_until_interest_ends() -> None:
    site, client, counter = _site()
    request, request_id = _protected(client, "obs", observe=True)
    pipe = Pipe(request, log)
    events: list[Pipe.Event] = []
    got = asyncio.Event()

    def on_event(event: Pipe.Event) -> bool:
        events.append(event)
        got.set()
        return True

    stop = pipe.on_event(on_event)
    task = asyncio.create_task(site.render_to_pipe(pipe))
    await asyncio.wait_for(got.wait(), 5)
    got.clear()
    counter.bump()
    await asyncio.wait_for(got.wait(), 5)
    assert [e.is_last for e in events] == [False, False]
    observes = [e.message.opt.observe for e in events]
    assert observes[0] < observes[1]
    payloads = [_unprotect(client, e.message, request_id).payload for e in events]
    assert payloads == [b"count 0", b"count 1"]
    assert counter.observers == 1
    stop()  # the client is gone: the rendering task ends, the observation with it
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.done()
    assert counter.observers == 0


class Slow(resource.Resource):
    """Answers only once released: a resource that waits."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def render_get(self, request: Message) -> Message:
        await self.release.wait()
        return Message(code=Code.CONTENT, payload=b"late")


def _collecting(request: Message) -> tuple[Pipe, list[Pipe.Event], asyncio.Event]:
    pipe = Pipe(request, log)
    events: list[Pipe.Event] = []
    last = asyncio.Event()

    def on_event(event: Pipe.Event) -> bool:
        events.append(event)
        if event.is_last:
            last.set()
        return not event.is_last

    pipe.on_event(on_event)
    return pipe, events, last


async def test_render_inline_answers_a_protected_request_before_returning() -> None:
    """coap-server's path (Layer0Site(eager=True) in front): no rendering task for a resource
    that answers at once; one that waits still gets its answer, later; an unprotected request
    is left to the usual rendering."""
    site, client, _ = _site()
    slow = Slow()
    site._inner_site.add_resource(["slow"], slow)  # type: ignore[attr-defined]
    request, request_id = _protected(client, "hello")
    pipe, events, _ = _collecting(request)
    tasks_before = len(asyncio.all_tasks())
    assert site.render_inline(pipe) is True
    assert len(events) == 1 and events[0].is_last  # answered during the call
    assert len(asyncio.all_tasks()) == tasks_before
    assert _unprotect(client, events[0].message, request_id).payload == b"hello client-1"
    # A replayed request is refused inline too (unprotected 4.01).
    pipe, events, _ = _collecting(request)
    assert site.render_inline(pipe) and events[0].message.code == Code.UNAUTHORIZED
    request, request_id = _protected(client, "slow")
    pipe, events, last = _collecting(request)
    assert site.render_inline(pipe) is True and events == []
    slow.release.set()
    await asyncio.wait_for(last.wait(), 5)
    assert _unprotect(client, events[0].message, request_id).payload == b"late"
    plain = Message(code=Code.GET, uri_path=["hello"])
    assert site.render_inline(Pipe(plain, log)) is False


async def test_a_layer0_site_hands_protected_requests_to_render_inline_only_when_eager() -> None:
    from coaplayers.dtls import PskStore
    from coaplayers.layer0 import Layer0Site
    from coaplayers.layer0.policy import Policy

    oscore_site, client, _ = _site()
    for eager in (True, False):
        outer = Layer0Site(oscore_site, PskStore({b"x": bytes(16)}), eager=eager,
                           policy=Policy.build(protected=()))
        request, request_id = _protected(client, "hello")
        pipe, events, _ = _collecting(request)
        assert outer.render_inline(pipe) is eager
        if eager:
            assert _unprotect(client, events[0].message, request_id).payload == b"hello client-1"
        else:
            assert events == []
        outer.close()
