"""coap-proxy's fast path on Layer 1 hops: a ``coaps://`` client's requests to a ``coaps://``
upstream forwarded as plaintext between the two DTLS sessions, below aiocoap, with what
aiocoap's path does on the wire (every test runs on both paths)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import pytest

from coaplayers import layer1
from coaplayers.credentials import psk_store_from
from coaplayers.layer1 import ClientCredentials

from .conftest import Running, _read_until, _stop, http_get, metric, start_proxy
from .test_proxy_layer1 import HOP1, HOP2, SERVER, upstream_credentials

FAST = "coap_proxy_fast_path_total"

PATHS = [pytest.param((), id="fast"), pytest.param(("--no-fast-path",), id="aiocoap")]


async def start_server(port: int = 0) -> tuple[asyncio.subprocess.Process, str]:
    """coap-server on coaps:// with the proxy's hop-2 PSK; (process, its coaps:// URI)."""
    proc = await asyncio.create_subprocess_exec(
        SERVER, "--listen", f"coaps://127.0.0.1:{port}", "--psk", f"{HOP2[0]}:{HOP2[1]}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        line = (await _read_until(proc, "listening", 20))[-1]
    except BaseException:
        await _stop(proc)
        raise
    return proc, line.split()[-1]


@pytest.fixture
async def client() -> AsyncIterator[aiocoap.Context]:
    creds = ClientCredentials()
    creds.load_from_dict({"coaps://*": {"dtls": {
        "psk": {"ascii": HOP1[1]}, "client-identity": {"ascii": HOP1[0]}}}})
    ctx = await layer1.create_context(client_credentials=creds)
    try:
        yield ctx.context
    finally:
        await ctx.shutdown()


async def through(ctx: aiocoap.Context, proxy: Running, target: str, payload: bytes = b"",
                  code: aiocoap.Code = aiocoap.POST, timeout: float = 20.0) -> aiocoap.Message:
    """A request for ``target`` forwarded by ``proxy`` (Proxy-Uri), over the client's Layer 1
    session with the proxy."""
    message = aiocoap.Message(code=code, uri=f"coaps://127.0.0.1:{proxy.port}",
                              payload=payload)
    message.opt.proxy_uri = target
    return await asyncio.wait_for(ctx.request(message).response, timeout)


async def proxy_for(tmp: Path, server_uri: str, extra: tuple[str, ...]) -> Running:
    port = int(server_uri.rsplit(":", 1)[1])
    return await start_proxy(
        tmp, "--psk", f"{HOP1[0]}:{HOP1[1]}", "--metrics", "127.0.0.1:0",
        "--upstream-credentials", str(upstream_credentials(tmp, port)), *extra,
        listen="coaps://127.0.0.1:0",
    )


@dataclass
class Hops:
    """coap-server behind coap-proxy, both on Layer 1 (``server`` replaced if restarted)."""

    server: asyncio.subprocess.Process
    server_uri: str
    proxy: Running

    async def request(self, ctx: aiocoap.Context, path: str, payload: bytes = b"",
                      code: aiocoap.Code = aiocoap.POST) -> aiocoap.Message:
        return await through(ctx, self.proxy, self.server_uri + path, payload, code)

    async def fast_path_count(self) -> float:
        assert self.proxy.metrics is not None
        return metric(await http_get(self.proxy.metrics), FAST)


@contextlib.asynccontextmanager
async def hops(tmp: Path, extra: tuple[str, ...]) -> AsyncIterator[Hops]:
    server, server_uri = await start_server()
    h = Hops(server, server_uri, proxy=None)  # type: ignore[arg-type]
    try:
        h.proxy = await proxy_for(tmp, server_uri, extra)
        try:
            yield h
        finally:
            await _stop(h.proxy.proc)
    finally:
        await _stop(h.server)


@pytest.mark.parametrize("extra", PATHS)
async def test_layer1_requests_go_between_the_sessions(
    tmp_path: Path, client: aiocoap.Context, extra: tuple[str, ...]
) -> None:
    async with hops(tmp_path, extra) as h:
        hello = await h.request(client, "/hello", code=aiocoap.GET)
        answers = [await h.request(client, "/echo", b"%d" % i * 10) for i in range(30)]
        # Concurrently too: each answer is its own request's.
        many = await asyncio.gather(*(h.request(client, "/echo", b"c%d" % i * 8)
                                      for i in range(20)))
        fast = await h.fast_path_count()
    proxy = h.proxy
    # Hop by hop: the server saw the proxy's Layer 1 identity.
    assert hello.payload == b"Hello from coap-server (mode plain, layer 1 peer proxy)"
    assert [(a.code, a.payload) for a in answers] == [
        (aiocoap.CHANGED, b"%d" % i * 10) for i in range(30)]
    assert [a.payload for a in many] == [b"c%d" % i * 8 for i in range(20)]
    if extra:
        assert fast == 0
    else:
        # The first requests go through aiocoap while the fast path opens its own session.
        assert fast >= 40
    exchanges = [e for e in proxy.log_lines() if e["event"] == "exchange"]
    assert len(exchanges) == 51
    assert {e["identity"] for e in exchanges} == {HOP1[0]}
    assert {e["code"] for e in exchanges} == {"2.05", "2.04"}


@pytest.mark.parametrize("extra", PATHS)
async def test_layer1_upstream_that_lost_the_session_is_handshaken_again(
    tmp_path: Path, client: aiocoap.Context, extra: tuple[str, ...]
) -> None:
    async with hops(tmp_path, extra) as h:
        before = [await h.request(client, "/echo", b"a%d" % i) for i in range(10)]
        h.server.kill()  # its sessions are gone with it, without a close_notify
        await h.server.wait()
        h.server, _ = await start_server(int(h.server_uri.rsplit(":", 1)[1]))
        after = [await h.request(client, "/echo", b"b%d" % i) for i in range(10)]
    assert [a.payload for a in before] == [b"a%d" % i for i in range(10)]
    assert [(a.code, a.payload) for a in after] == [
        (aiocoap.CHANGED, b"b%d" % i) for i in range(10)]


@pytest.mark.parametrize("extra", PATHS)
async def test_layer1_upstream_gone_is_504_before_the_upstream_timeout(
    tmp_path: Path, client: aiocoap.Context, extra: tuple[str, ...]
) -> None:
    async with hops(tmp_path, (*extra, "--ack-timeout", "0.5")) as h:
        before = [await h.request(client, "/echo", b"a%d" % i) for i in range(10)]
        h.server.kill()  # no close_notify: the proxy's session looks alive
        await h.server.wait()
        started = asyncio.get_running_loop().time()
        gone = await h.request(client, "/echo", b"x")
        took = asyncio.get_running_loop().time() - started
        fast = await h.fast_path_count()
    assert [a.payload for a in before] == [b"a%d" % i for i in range(10)]
    # Its retransmissions go unanswered, a new handshake meets the ICMP error: 5.04, not
    # the 10 s upstream timeout.
    assert str(gone.code) == "5.04 Gateway Timeout"
    assert took < 8
    assert fast == 0 if extra else fast >= 9  # (the first while the fast path opens its own)


@pytest.mark.parametrize("extra", PATHS)
async def test_layer1_clients_format_errors_and_long_tokens_are_answered_as_on_udp(
    tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """Inside a client's Layer 1 session the listener applies the same wire-format rules as
    on plain UDP (docs/PROXY.md, Message layer): a CON whose payload marker has no payload
    gets an RST of its message ID (RFC 7252 3, 4.2), one with a 13-byte token 4.00 with
    that token (RFC 8974 2.2.2)."""
    creds = ClientCredentials()
    creds.load_from_dict({"coaps://*": {"dtls": {
        "psk": {"ascii": HOP1[1]}, "client-identity": {"ascii": HOP1[0]}}}})
    ctx = await layer1.create_context(client_credentials=creds)
    proxy = await start_proxy(tmp_path, "--psk", f"{HOP1[0]}:{HOP1[1]}", *extra,
                              listen="coaps://127.0.0.1:0")
    try:
        uri = f"coaps://127.0.0.1:{proxy.port}"
        first = aiocoap.Message(code=aiocoap.GET, uri=uri + "/nowhere")
        answer = await asyncio.wait_for(ctx.context.request(first).response, 20)
        assert answer.code == aiocoap.PROXYING_NOT_SUPPORTED  # (the session is up)
        transport = ctx.layer1
        remote = await transport.determine_remote(aiocoap.Message(code=aiocoap.GET, uri=uri))
        got: asyncio.Queue[bytes] = asyncio.Queue()
        transport.plaintext_hook = lambda data, _remote: bool(got.put_nowait(data)) or True
        transport.send_encoded(remote, bytes([0x40, 0x01, 0x4A, 0x01, 0xFF]))
        assert await asyncio.wait_for(got.get(), 5) == bytes([0x70, 0x00, 0x4A, 0x01])
        token = b"t" * 13
        transport.send_encoded(remote, bytes([0x4D, 0x01, 0x4A, 0x02, 0x00]) + token)
        reply = await asyncio.wait_for(got.get(), 5)
        assert reply[:5] == bytes([0x6D, 0x80, 0x4A, 0x02, 0x00]), reply
        assert reply[5:18] == token
    finally:
        await ctx.shutdown()
        await _stop(proxy.proc)


@pytest.mark.parametrize("extra", PATHS)
async def test_a_layer1_upstreams_answer_with_an_empty_payload_marker_is_502(
    tmp_path: Path, client: aiocoap.Context, extra: tuple[str, ...]
) -> None:
    """A coaps:// upstream (a Layer 1 listener in this process that answers in raw bytes)
    answers with a payload marker followed by no payload, a message format error (RFC 7252
    3): the client gets 5.02, as from a coap:// upstream, not the answer relayed."""
    origin = await layer1.create_context(
        listen=["coaps://127.0.0.1:0"], psk_store=psk_store_from([f"{HOP2[0]}:{HOP2[1]}"]))
    transport = origin.layer1

    def answer(data: bytes, remote: object) -> bool:
        if len(data) >= 4 and 1 <= data[1] < 32 and data[0] >> 4 & 3 == 0:  # a CON request
            tkl = data[0] & 0x0F
            transport.send_encoded(remote, bytes([0x60 | tkl, 0x45]) + data[2:4 + tkl] + b"\xff")
            return True
        return False

    transport.plaintext_hook = answer
    origin_uri = origin.bound[0]
    try:
        proxy = await proxy_for(tmp_path, origin_uri, extra)
        try:
            answers = [await through(client, proxy, origin_uri + "/x", code=aiocoap.GET)
                       for _ in range(3)]  # (the fast path's own session opens meanwhile)
        finally:
            await _stop(proxy.proc)
    finally:
        await origin.shutdown()
    assert [a.code for a in answers] == [aiocoap.BAD_GATEWAY] * 3, answers
