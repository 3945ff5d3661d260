"""coap-proxy while it starts: its listener answers before its upstream side exists.

A client that took the first answered ping for readiness, or one retransmitting through a
restart, reaches the listener in that moment; its request waits for the rest of the start
instead of being refused (it was answered 5.05 "no coap transport configured").
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiocoap
import pytest
from aiocoap import GET, Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from coaplayers.proxy import ProxyConfig, ProxyNode
from tests.conftest import free_udp_port, proxy_command
from tests.conftest import stop_process as _stop

from .conftest import ROOT, Running

pytestmark = pytest.mark.slow


def proxied_get(mid: int, origin_port: int) -> bytes:
    m = Message(code=GET, uri_path=["start", str(mid)])
    m.mtype, m.mid, m.token = Type.NON, mid, mid.to_bytes(2, "big")
    m.opt.proxy_scheme = "coap"
    m.opt.uri_host, m.opt.uri_port = "127.0.0.1", origin_port
    return m.encode()


async def test_requests_that_come_while_it_starts_are_forwarded(
    tmp_path: Path, origin: Running
) -> None:
    loop = asyncio.get_running_loop()
    port = free_udp_port()
    command = proxy_command(tmp_path, listen=f"coap://127.0.0.1:{port}", amplification=False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        proc = await asyncio.create_subprocess_exec(
            *command.argv, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
            stderr=open(command.err_file, "wb"))
        try:
            answers: dict[int, Message] = {}
            mid, last = 0x2000, None
            deadline = loop.time() + 20
            # A new request every 2 ms (those before the bind are lost) until one is answered:
            # the first ones to arrive reach the listener while the proxy is still starting.
            # Then one more, and everything answered up to its answer is looked at.
            while last is None or last not in answers:
                assert loop.time() < deadline, f"answered: {sorted(answers)}, sent up to {mid}"
                if last is None:
                    mid += 1
                    sock.sendto(proxied_get(mid, origin.port), ("127.0.0.1", port))
                    if answers:
                        last = mid
                try:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 2048), 0.002)
                except TimeoutError:
                    continue
                answer = Message.decode(data)
                answers[int.from_bytes(answer.token, "big")] = answer
        finally:
            await _stop(proc)
    for number, answer in sorted(answers.items()):
        assert answer.code == Code.CONTENT, (number, answer.code, answer.payload)
        assert json.loads(answer.payload)["path"] == ["start", str(number)]


async def test_a_held_request_is_forwarded_at_ready_and_refused_if_it_never_comes(
    tmp_path: Path, origin: Running
) -> None:
    """In process, with the hold made by hand: its release, and its bound (upstream_timeout)
    for a start that never ends."""
    node = ProxyNode(ProxyConfig(
        listen=("coap://127.0.0.1:0",), allow=("127.0.0.1",), upstream_timeout=0.5,
        fast_path=False, amplification_factor=0, log_file=str(tmp_path / "proxy.jsonl")))
    (listen,) = await node.start()
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        def request(path: str) -> asyncio.Future[Message]:
            m = Message(code=GET, uri=f"{listen}/")
            m.opt.proxy_uri = f"coap://{origin.hostport}/{path}"
            return asyncio.ensure_future(ctx.request(m).response)

        node.site.hold_until_ready()
        refused = await asyncio.wait_for(request("never"), 10)
        assert (refused.code, refused.payload) == (Code.SERVICE_UNAVAILABLE, b"proxy starting")
        assert refused.opt.max_age == 1

        held = request("held")
        done, _ = await asyncio.wait([held], timeout=0.2)  # (shorter than the bound)
        assert not done, "answered before the node was ready"
        node.site.ready()
        answer = await asyncio.wait_for(held, 10)
        assert answer.code == Code.CONTENT and json.loads(answer.payload)["path"] == ["held"]
    finally:
        await ctx.shutdown()
        await node.stop()
