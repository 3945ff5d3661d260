"""run_driving_pipe_eagerly: what aiocoap's run_driving_pipe does, without a task for a
coroutine that never waits; and Layer0Site(eager=True) answering inner requests inline."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiocoap import Message, error
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe, error_to_message

from coaplayers.dtls import ApplicationData, PskClientCredentials, PskStore
from coaplayers.layer0 import Layer0Site, Policy, inner
from coaplayers.layer0.eager import run_driving_pipe_eagerly

from .pipes import Answers, collecting_pipe, establish

log = logging.getLogger(__name__)
CREDS = PskClientCredentials(b"eager-1", b"eager-secret-016")


def _pipe(request: Message | None = None) -> tuple[Pipe, Answers]:
    return collecting_pipe(request or Message(code=Code.GET, uri_path=["x"]))


def _tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


def test_a_coroutine_that_does_not_wait_answers_before_the_call_returns() -> None:
    async def run() -> None:
        pipe, answers = _pipe()

        async def render(p: Pipe) -> None:
            p.add_response(Message(code=Code.CONTENT, payload=b"now"), is_last=True)

        before = _tasks()
        run_driving_pipe_eagerly(error_to_message(pipe, log), render(pipe))
        assert [(a.code, a.payload) for a in answers] == [(Code.CONTENT, b"now")]
        assert _tasks() == before  # no task was made

    asyncio.run(run())


def test_a_coroutine_that_waits_goes_on_in_a_task() -> None:
    async def run() -> None:
        pipe, answers = _pipe()
        gate: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def render(p: Pipe) -> None:
            payload = await gate
            await asyncio.sleep(0)  # a bare yield as well
            p.add_response(Message(code=Code.CONTENT, payload=payload), is_last=True)

        run_driving_pipe_eagerly(error_to_message(pipe, log), render(pipe), name="waits")
        assert answers == []
        assert [t.get_name() for t in _tasks()] == ["waits"]
        gate.set_result(b"later")
        async with asyncio.timeout(5):
            await answers.last.wait()
        assert [(a.code, a.payload) for a in answers] == [(Code.CONTENT, b"later")]

    asyncio.run(run())


def test_exceptions_become_responses_before_and_after_waiting() -> None:
    async def run() -> None:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def not_found(p: Pipe) -> None:
            raise error.NotFound()

        async def broken_later(p: Pipe) -> None:
            await gate
            raise RuntimeError("boom")

        pipe, answers = _pipe()
        run_driving_pipe_eagerly(error_to_message(pipe, log), not_found(pipe))
        assert [a.code for a in answers] == [Code.NOT_FOUND]

        pipe, answers = _pipe()
        run_driving_pipe_eagerly(error_to_message(pipe, log), broken_later(pipe))
        gate.set_result(None)
        async with asyncio.timeout(5):
            await answers.last.wait()
        assert [a.code for a in answers] == [Code.INTERNAL_SERVER_ERROR]

    asyncio.run(run())


def test_losing_interest_cancels_a_waiting_coroutine_and_what_it_awaits() -> None:
    async def run() -> None:
        pipe = Pipe(Message(code=Code.GET, uri_path=["x"]), log)
        stop = pipe.on_event(lambda event: True)
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ended = asyncio.Event()
        seen: list[str] = []

        async def render(p: Pipe) -> None:
            try:
                await gate
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            finally:
                ended.set()

        run_driving_pipe_eagerly(pipe, render(pipe))
        stop()  # the requester lost interest
        async with asyncio.timeout(5):
            await ended.wait()
        assert seen == ["cancelled"] and gate.cancelled()

    asyncio.run(run())


class App:
    """Answers at once, without waiting."""

    async def render_to_pipe(self, pipe: Pipe) -> None:
        pipe.add_response(Message(code=Code.CONTENT, payload=b"app"), is_last=True)


def test_an_eager_site_answers_an_inner_request_inline() -> None:
    async def post(site: Layer0Site, path: str, payload: bytes) -> Answers:
        request = Message(code=Code.POST, uri_path=[p for p in path.split("/") if p],
                          payload=payload)

        class Remote:
            scheme = "coap"
            hostinfo = "192.0.2.9:40000"

        request.remote = Remote()
        pipe, answers = _pipe(request)
        assert site.render_inline(pipe)
        return answers

    async def run() -> None:
        site = Layer0Site(App(), PskStore({CREDS.identity: CREDS.key}),
                          policy=Policy.build(protected=()), eager=True)
        async def last(site: Layer0Site, path: str, payload: bytes) -> Message:
            return (await post(site, path, payload))[-1]

        client, sid = await establish(site, CREDS, last)
        client.send(inner.encode(b"\x05", Message(code=Code.GET, uri_path=["x"])))
        before = _tasks()
        answers = await post(site, sid, b"".join(client.datagrams_to_send()))
        assert len(answers) == 1 and answers[0].code == Code.CHANGED  # answered inline
        assert _tasks() == before
        client.receive_datagram(answers[0].payload, 0.0)
        data = [e.data for e in iter(client.next_event, None) if isinstance(e, ApplicationData)]
        got = inner.decode(data[0])
        assert got.token == b"\x05" and got.message.payload == b"app"
        site.close()

    asyncio.run(run())
