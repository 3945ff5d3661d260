"""Layer0Site.render_inline: Layer 0 requests answered while the context dispatches them."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiocoap
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe

from coaplayers.dtls import PskClientCredentials, PskStore, TinyDtlsSession
from coaplayers.layer0 import Layer0Site, Policy
from coaplayers.layer0.profile import CONTENT_FORMAT, handshake_tag
from coaplayers.layer0.server import answer_inline, layer0_config

from .pipes import Answers, collecting_pipe, establish

CREDS = PskClientCredentials(b"inline-1", b"inline-secret-16")
log = logging.getLogger(__name__)


class Remote:
    scheme = "coap"
    hostinfo = "192.0.2.7:40000"


class Site:
    """An application site that records what reaches it."""

    def __init__(self) -> None:
        self.rendered: list[tuple[str, ...]] = []

    async def render_to_pipe(self, pipe: Pipe) -> None:
        self.rendered.append(tuple(pipe.request.opt.uri_path))
        pipe.add_response(Message(code=Code.CONTENT, payload=b"app"), is_last=True)


def _pipe(code: Code, path: str, payload: bytes = b"") -> tuple[Pipe, Answers]:
    request = Message(code=code, uri_path=[p for p in path.split("/") if p], payload=payload)
    request.remote = Remote()
    return collecting_pipe(request)


def _site(policy: Policy | None = None) -> tuple[Layer0Site, Site]:
    app = Site()
    return Layer0Site(app, PskStore({CREDS.identity: CREDS.key}), policy=policy), app


def test_handshake_requests_are_answered_before_render_inline_returns() -> None:
    async def run() -> None:
        site, _ = _site()
        client = TinyDtlsSession.client(CREDS, layer0_config())
        client.connect(0.0)
        # A PSK ClientHello is answered at once (no cookie exchange): a session and its flight
        pipe, answers = _pipe(Code.POST, "/.well-known/atls", client.datagrams_to_send()[0])
        assert site.render_inline(pipe) is True
        assert answers[0].code == Code.CREATED and answers[0].opt.location_path
        assert answers[0].opt.content_format == CONTENT_FORMAT
        sid = answers[0].opt.location_path[0]
        assert sid in site.core.sessions
        # a handshake pull (the tag alone) with nothing queued: empty 2.04 at once
        pipe, answers = _pipe(Code.POST, sid, handshake_tag(bytes(answers[0].payload)))
        assert site.render_inline(pipe)
        assert [(a.code, a.payload) for a in answers] == [(Code.CHANGED, b"")]
        # without the tag it is answered as an unknown name is
        pipe, answers = _pipe(Code.POST, sid)
        assert site.render_inline(pipe)
        assert [(a.code, a.payload) for a in answers] == [(Code.NOT_FOUND, b"unknown session")]
        pipe, answers = _pipe(Code.POST, "~zzzzz", b"\x16\xfe\xfd" + bytes(10))
        assert site.render_inline(pipe)
        assert [a.code for a in answers] == [Code.NOT_FOUND]
        site.close()

    asyncio.run(run())


def test_other_requests_are_left_to_the_usual_rendering() -> None:
    async def run() -> None:
        site, app = _site(Policy.build(protected=()))
        pipe, answers = _pipe(Code.GET, "/hello")
        assert site.render_inline(pipe) is False
        assert answers == [] and app.rendered == []
        await site.render_to_pipe(pipe)
        assert app.rendered == [("hello",)] and answers[0].payload == b"app"
        site.close()

    asyncio.run(run())


def test_a_failing_tunnel_request_gets_5_00_inline() -> None:
    async def run() -> None:
        site, _ = _site()

        def broken(*_: Any) -> Any:
            raise RuntimeError("boom")

        site.core.entry = broken  # type: ignore[method-assign]
        pipe, answers = _pipe(Code.POST, "/.well-known/atls", b"\x16")
        assert site.render_inline(pipe)
        assert [a.code for a in answers] == [Code.INTERNAL_SERVER_ERROR]
        site.close()

    asyncio.run(run())


def test_answer_inline_puts_the_tunnel_in_front_of_a_context() -> None:
    async def run() -> None:
        site, app = _site()
        ctx = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", 0))
        try:
            answer_inline(ctx, site)
            client = TinyDtlsSession.client(CREDS, layer0_config())
            client.connect(0.0)
            pipe, answers = _pipe(Code.POST, "/.well-known/atls", client.datagrams_to_send()[0])
            ctx.render_to_pipe(pipe)
            assert [a.code for a in answers] == [Code.CREATED]  # answered during the call
            pipe, answers = _pipe(Code.GET, "/hello")
            ctx.render_to_pipe(pipe)
            assert answers == []  # rendered in a task, as aiocoap does
            async with asyncio.timeout(5):
                await answers.last.wait()
            assert answers[0].code == Code.UNAUTHORIZED  # the default policy protects "/"
            assert app.rendered == []
        finally:
            site.close()
            await ctx.shutdown()

    asyncio.run(run())


class HostSite:
    """Answers with a response object it keeps, carrying an outer-only option (Uri-Host)."""

    def __init__(self) -> None:
        self.response = Message(code=Code.CONTENT, payload=b"kept", uri_host="example.org")

    async def render_to_pipe(self, pipe: Pipe) -> None:
        pipe.add_response(self.response, is_last=True)


def test_inner_answers_drop_outer_only_options_without_touching_the_resources_message() -> None:
    from coaplayers.dtls import ApplicationData
    from coaplayers.layer0 import inner

    async def post(site: Layer0Site, path: str, payload: bytes) -> Message:
        pipe, answers = _pipe(Code.POST, path, payload)
        assert site.render_inline(pipe)
        async with asyncio.timeout(5):
            await answers.last.wait()
        return answers[-1]

    async def run() -> None:
        app = HostSite()
        site = Layer0Site(app, PskStore({CREDS.identity: CREDS.key}),
                          policy=Policy.build(protected=()))
        client, sid = await establish(site, CREDS, post)
        client.send(inner.encode(b"\x07", Message(code=Code.GET, uri_path=["x"])))
        answer = await post(site, sid, b"".join(client.datagrams_to_send()))
        client.receive_datagram(answer.payload, 0.0)
        data = [e.data for e in iter(client.next_event, None) if isinstance(e, ApplicationData)]
        assert len(data) == 1
        got = inner.decode(data[0])
        assert got.token == b"\x07" and got.message.code == Code.CONTENT
        assert got.message.payload == b"kept" and got.message.opt.uri_host is None
        assert app.response.opt.uri_host == "example.org"  # the resource's own object intact
        site.close()

    asyncio.run(run())
