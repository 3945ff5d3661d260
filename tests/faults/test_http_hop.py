"""The malicious-proxy cases on the HTTP hop of Figure 2: a middlebox between coap-proxy (CoAP
to HTTP) and the application server's HTTP listener alters, replays and reorders the outer
HTTP exchanges of Layer 0 and of the OSCORE mode.

Topology::

    client --> coap-proxy --[HTTP: EvilHttp]--> application server (coaplayers.asgi)

What must hold, as on the CoAP hops: an altered request is refused and never runs, a replayed
one runs once, reordered ones each run once, and the client goes on on the same session.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import aiocoap.resource as resource
import httpx
import pytest
from aiocoap.message import UndecidedRemote
from aiocoap.numbers.codes import Code

from coaplayers.asgi import CoapAsgiApp, HttpListener
from coaplayers.layer0 import Layer0Site
from coaplayers.layer0_modes import Layer0ServerOptions, wrap_site
from coaplayers.proxy.config import ProxyConfig

from .conftest import App, Count, Keys, T, layer0_channel, oscore_message, oscore_requester

pytestmark = pytest.mark.slow


class HttpApp(App):
    """The suite's application server, listening on http:// only."""

    async def start(self) -> None:
        site = resource.Site()
        site.add_resource(["count"], Count(self))
        wrapped = wrap_site(site, Layer0ServerOptions(
            psk_store=self.creds.e2e_psk_store(), certificate=self.creds.e2e_server_cert()))
        assert isinstance(wrapped, Layer0Site)
        self.layer0 = wrapped
        self.http = HttpListener(CoapAsgiApp(wrapped), "127.0.0.1", 0)
        await self.http.start()
        self.port = self.http.port

    async def stop(self) -> None:
        if self.layer0 is not None:
            self.layer0.close()
            self.layer0 = None
        await self.http.close()


class EvilHttp:
    """An HTTP middlebox (an ASGI app on uvicorn) forwarding to ``upstream``; ``mode`` says what
    it does to protected requests: "flip" the body's last byte, "replay" it once more after
    the answer, "reorder" the next two."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode: str | None = None
        self.hits = 0
        self.replay_status: int | None = None
        self.seen = bytearray()  # every request and answer as it crossed, heads and bodies
        self._held: asyncio.Future[None] | None = None
        self.client = httpx.AsyncClient(timeout=60)
        self.listener = HttpListener(self, "127.0.0.1", 0)

    @staticmethod
    def protected(path: str, headers: dict[str, str], body: bytes) -> bool:
        layer0_data = path.startswith("/~") and body[:1] == b"\x17"
        return layer0_data or "oscore" in headers

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k != b"host"}
        path = scope["path"] + ("?" + scope["query_string"].decode()
                                if scope["query_string"] else "")
        target = self.upstream + path
        self.seen += repr((scope["method"], path, headers)).encode() + body
        mode = self.mode if self.protected(scope["path"], headers, body) else None
        if mode == "flip":
            self.hits += 1
            self.mode = None
            body = body[:-1] + bytes([body[-1] ^ 0x01])
        elif mode == "reorder":
            if self._held is None:  # the first: held until the second has gone through
                self._held = asyncio.get_running_loop().create_future()
                await asyncio.wait_for(asyncio.shield(self._held), T)
            else:
                self.hits += 1
                self.mode = None
                answer = await self.client.request(scope["method"], target, headers=headers,
                                                   content=body)
                self._held.set_result(None)
                await self._reply(send, answer)
                return
        answer = await self.client.request(scope["method"], target, headers=headers,
                                           content=body)
        if mode == "replay":
            self.hits += 1
            self.mode = None
            again = await self.client.request(scope["method"], target, headers=headers,
                                              content=body)
            self.replay_status = again.status_code
        await self._reply(send, answer)

    async def _reply(self, send: Any, answer: httpx.Response) -> None:
        self.seen += repr(answer.headers.multi_items()).encode() + answer.content
        out = [(k.encode(), v.encode()) for k, v in answer.headers.multi_items()
               if k not in ("transfer-encoding", "content-encoding")]
        await send({"type": "http.response.start", "status": answer.status_code,
                    "headers": out})
        await send({"type": "http.response.body", "body": answer.content})


@pytest.fixture
async def http_app(creds: Keys) -> AsyncIterator[HttpApp]:
    server = HttpApp(creds)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def evil(http_app: HttpApp) -> AsyncIterator[EvilHttp]:
    box = EvilHttp(f"http://127.0.0.1:{http_app.port}")
    await box.listener.start()
    try:
        yield box
    finally:
        await box.listener.close()
        await box.client.aclose()


@pytest.fixture
async def proxy(start_proxy: Any) -> Any:
    allow = ["--allow", "127.0.0.1"] if "allow" in {
        f.name for f in dataclasses.fields(ProxyConfig)} else []
    return await start_proxy(*allow)


def origin(box: EvilHttp) -> str:
    return f"http://127.0.0.1:{box.listener.port}"


async def post(requester: Any, nonce: bytes, oscore: bool, box: EvilHttp) -> Any:
    if oscore:
        # As coap-client builds a request for an http:// target (client/run.py).
        message = oscore_message(origin(box).replace("http:", "coap:", 1), Code.POST, "count",
                                 nonce)
        message.remote = UndecidedRemote("http", message.remote.hostinfo)
    else:
        message = aiocoap.Message(code=Code.POST, uri_path=["count"], payload=nonce)
    return await asyncio.wait_for(requester.request(message).response, T)


async def requester_for(kind: str, ctx: Any, creds: Keys, box: EvilHttp, proxy: Any) -> Any:
    if kind == "oscore":
        return oscore_requester(ctx, origin(box), creds, proxy.uri)
    credentials = creds.e2e_psk_client() if kind == "psk" else creds.e2e_client_cert()
    return layer0_channel(ctx, origin(box), credentials, proxy.uri)


KINDS = ["psk", "cert", "oscore"]


@pytest.mark.parametrize("kind", KINDS)
async def test_altered_request_on_the_http_hop_never_runs(
        kind: str, http_app: HttpApp, evil: EvilHttp, proxy: Any, client_ctx: Any,
        creds: Keys) -> None:
    r = await requester_for(kind, client_ctx, creds, evil, proxy)
    first = await post(r, b"warm-up", kind == "oscore", evil)
    assert first.code == Code.CHANGED
    evil.mode = "flip"
    try:
        answer = await post(r, b"attacked", kind == "oscore", evil)
    except Exception:  # refused: the client says so (RecordRejected, an OSCORE error)
        answer = None
    assert evil.hits == 1
    if answer is not None and answer.code.is_successful():
        # OSCORE: the refusal ("decryption failed") made the client re-key and send the
        # authentic request again, which ran once; the altered one never ran.
        assert kind == "oscore"
        assert http_app.executed == [b"warm-up", b"attacked"]
    else:
        assert http_app.executed == [b"warm-up"]
    after = await post(r, b"after", kind == "oscore", evil)
    assert after.code == Code.CHANGED and after.payload.startswith(b"after ")
    assert http_app.executed[-1] == b"after" and http_app.executed.count(b"attacked") <= 1
    await r.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_replayed_request_on_the_http_hop_runs_once(
        kind: str, http_app: HttpApp, evil: EvilHttp, proxy: Any, client_ctx: Any,
        creds: Keys) -> None:
    r = await requester_for(kind, client_ctx, creds, evil, proxy)
    assert (await post(r, b"warm-up", kind == "oscore", evil)).code == Code.CHANGED
    evil.mode = "replay"
    answer = await post(r, b"once", kind == "oscore", evil)
    assert evil.hits == 1
    assert answer.code == Code.CHANGED and answer.payload == b"once 2"
    assert http_app.executed.count(b"once") == 1
    assert evil.replay_status is not None and evil.replay_status >= 400
    assert (await post(r, b"after", kind == "oscore", evil)).code == Code.CHANGED
    await r.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_reordered_requests_on_the_http_hop_each_run_once(
        kind: str, http_app: HttpApp, evil: EvilHttp, proxy: Any, client_ctx: Any,
        creds: Keys) -> None:
    r = await requester_for(kind, client_ctx, creds, evil, proxy)
    assert (await post(r, b"warm-up", kind == "oscore", evil)).code == Code.CHANGED
    evil.mode = "reorder"
    first = asyncio.ensure_future(post(r, b"one", kind == "oscore", evil))
    second = asyncio.ensure_future(post(r, b"two", kind == "oscore", evil))
    a, b = await asyncio.gather(first, second)
    assert evil.hits == 1
    assert a.code == Code.CHANGED and a.payload.startswith(b"one ")
    assert b.code == Code.CHANGED and b.payload.startswith(b"two ")
    assert http_app.executed[1:] in ([b"two", b"one"], [b"one", b"two"])
    assert http_app.executed.index(b"two") < http_app.executed.index(b"one")  # reordered
    await r.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_the_http_hop_holds_no_inner_plaintext(
        kind: str, http_app: HttpApp, evil: EvilHttp, proxy: Any, client_ctx: Any,
        creds: Keys) -> None:
    r = await requester_for(kind, client_ctx, creds, evil, proxy)
    marker = b"INNER-PLAINTEXT-5d1e"
    answer = await post(r, marker, kind == "oscore", evil)
    assert answer.code == Code.CHANGED and answer.payload.startswith(marker)
    await r.close()
    assert len(evil.seen) > 200  # the middlebox saw the exchanges ...
    assert marker not in evil.seen and b"count" not in evil.seen  # ... and no inner part
    log = b"".join(p.read_bytes() for p in proxy.tmp.glob("proxy-*.jsonl"))
    assert b'"upstream":"http://127.0.0.1:' in log and marker not in log
