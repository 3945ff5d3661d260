"""Fail closed: a request meant for OSCORE never leaves unprotected, whichever request
interface aiocoap hands it to.

The capture is a real UDP socket standing in for the origin server. After the refused
request the client sends a plain Layer 0 request (never OSCORE-protected) to the same
socket: datagrams from one socket over loopback arrive in order, so the first datagram the
capture sees says whether the refused request went out, without waiting for a silence.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiocoap
import pytest
from aiocoap import Message
from aiocoap.numbers.codes import GET, POST

from coaplayers.layer1 import create_context
from coaplayers.oscore import ClientContexts, OscoreClientTransport, attach
from coaplayers.oscore.errors import UnprotectedRequestRefused
from tests.conftest import UdpCollector

from .support import static_pair

TIMEOUT = 10.0


@pytest.fixture
async def capture() -> AsyncIterator[tuple[int, asyncio.Queue[bytes]]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        UdpCollector, local_addr=("127.0.0.1", 0))
    try:
        yield transport.get_extra_info("sockname")[1], proto.queue
    finally:
        transport.close()


async def _first_datagram(
    client: aiocoap.Context, port: int, queue: asyncio.Queue[bytes],
) -> Message:
    """Send the tunnel sentinel and decode the first datagram the capture received (the
    sentinel stays unanswered: it ends with the client's shutdown)."""
    sentinel = client.request(Message(
        code=POST, uri=f"coap://127.0.0.1:{port}/.well-known/atls", payload=b"sentinel"))
    UNANSWERED.append(sentinel.response)
    return Message.decode(await asyncio.wait_for(queue.get(), TIMEOUT))


UNANSWERED: list[asyncio.Future[Message]] = []


async def _ended(response: asyncio.Future[Message]) -> None:
    """An unanswered request ends with the client's shutdown (LibraryShutdown)."""
    with pytest.raises(aiocoap.error.LibraryShutdown):
        await asyncio.wait_for(response, TIMEOUT)


def _not_consulted(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiocoap's two-pass interface choice (recognize_remote, then determine_remote) never
    calls fill_or_recognize_remote; declining here forces the same wrong choice."""

    async def declines(self: Any, message: Message) -> bool:
        return False

    for name in ("fill_or_recognize_remote", "recognize_remote"):
        monkeypatch.setattr(OscoreClientTransport, name, declines, raising=False)

    async def determines(self: Any, message: Message) -> None:
        return None

    monkeypatch.setattr(OscoreClientTransport, "determine_remote", determines, raising=False)


def _moved_last(client: aiocoap.Context) -> None:
    """The OSCORE transport asked after the plain ones (which claim every coap:// URI)."""
    interfaces = client.request_interfaces
    oscore = next(ri for ri in interfaces if isinstance(ri, OscoreClientTransport))
    interfaces.remove(oscore)
    interfaces.append(oscore)


@pytest.mark.parametrize("layered", [False, True], ids=["aiocoap-context", "layered-context"])
@pytest.mark.parametrize("force", ["not-consulted", "moved-last"])
async def test_a_request_meant_for_oscore_never_leaves_unprotected(
    capture: tuple[int, asyncio.Queue[bytes]], monkeypatch: pytest.MonkeyPatch,
    force: str, layered: bool,
) -> None:
    port, queue = capture
    layered_ctx = await create_context() if layered else None
    client = (layered_ctx.context if layered_ctx is not None
              else await aiocoap.Context.create_client_context(transports=["udp6"]))
    try:
        contexts = ClientContexts()
        attach(client, contexts)
        uri = f"coap://127.0.0.1:{port}/secret"
        contexts.set(uri, static_pair()[0])
        forced: Callable[[], None] = (
            (lambda: _not_consulted(monkeypatch)) if force == "not-consulted"
            else (lambda: _moved_last(client)))
        forced()
        for message in (Message(code=GET, uri=uri),
                        Message(code=POST, uri=uri, payload=b"x" * 3000),  # block-wise
                        Message(code=GET, uri=uri, observe=0)):
            pending = client.request(message).response
            arrived = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait(
                {pending, arrived}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            if arrived in done:
                UNANSWERED.append(pending)
                pytest.fail(f"left unprotected: {Message.decode(arrived.result())}")
            arrived.cancel()
            assert pending in done
            with pytest.raises(UnprotectedRequestRefused, match="unprotected"):
                pending.result()
        first = await _first_datagram(client, port, queue)
        assert first.opt.uri_path == (".well-known", "atls"), first
        assert first.payload == b"sentinel"
    finally:
        monkeypatch.undo()
        if layered_ctx is not None:
            await layered_ctx.shutdown()
        else:
            await client.shutdown()
    while UNANSWERED:
        await _ended(UNANSWERED.pop())


async def test_two_pass_interface_choice_still_protects(
    capture: tuple[int, asyncio.Queue[bytes]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With aiocoap's development branch's choice (recognize_remote for every interface,
    then determine_remote), the request goes out protected."""
    port, queue = capture

    async def two_pass(self: aiocoap.Context, message: Message) -> Any:
        for ri in self.request_interfaces:
            if await ri.recognize_remote(message):
                return ri
        for ri in self.request_interfaces:
            remote = await ri.determine_remote(message)
            if remote:
                message.remote = remote
                return ri
        raise aiocoap.error.NoRequestInterface()

    monkeypatch.setattr(aiocoap.Context, "find_remote_and_interface", two_pass)
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        for ri in client.request_interfaces:
            _give_two_pass_methods(ri, monkeypatch)
        contexts = ClientContexts()
        attach(client, contexts)
        uri = f"coap://127.0.0.1:{port}/secret"
        contexts.set(uri, static_pair()[0])
        request = client.request(Message(code=GET, uri=uri))
        protected = Message.decode(await asyncio.wait_for(queue.get(), TIMEOUT))
        assert protected.opt.oscore is not None
        assert protected.opt.uri_path == ()  # the path travels encrypted
        assert protected.code == aiocoap.POST  # the outer code of a request without Observe
    finally:
        monkeypatch.undo()
        await client.shutdown()
    await _ended(request.response)


def _give_two_pass_methods(ri: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """aiocoap 0.4.17's token manager has only fill_or_recognize_remote: split it the way
    the development branch does (recognize an already resolved remote; else resolve)."""
    from aiocoap.message import UndecidedRemote

    async def recognize_remote(message: Message) -> bool:
        if isinstance(message.remote, UndecidedRemote):
            return False
        return bool(await ri.fill_or_recognize_remote(message))

    async def determine_remote(message: Message) -> Any:
        if not isinstance(message.remote, UndecidedRemote):
            return None
        if await ri.fill_or_recognize_remote(message):
            return message.remote
        return None

    monkeypatch.setattr(ri, "recognize_remote", recognize_remote, raising=False)
    monkeypatch.setattr(ri, "determine_remote", determine_remote, raising=False)
