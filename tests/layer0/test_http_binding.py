"""Layer 0 over ATLS's HTTP binding, through coap-proxy as a CoAP-to-HTTP cross-proxy.

Topology (the Layered DTLS draft's Figure 2): Layer0Client -> coap-proxy (CoAP to HTTP) ->
[TCP capture] -> the origin's Layer0Site served by uvicorn (coaplayers.asgi). The capture
records the HTTP hop byte for byte: it must hold the outer exchanges and no inner plaintext.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiocoap import GET, POST, Message
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives.asymmetric import ec

from coaplayers.asgi import CoapAsgiApp, HttpListener
from coaplayers.dtls import RawPublicKeyCredentials

from .apps import ECHO_MARKER, OBS_MARKER, TEXT_MARKER
from .conftest import Credentials, Origin, channel

pytestmark = pytest.mark.slow
T = 30.0


class RpkCredentials(Credentials):
    def __init__(self) -> None:
        server_key = ec.generate_private_key(ec.SECP256R1())
        client_key = ec.generate_private_key(ec.SECP256R1())
        self.mode = "rpk"
        self.server = RawPublicKeyCredentials(server_key, [client_key.public_key()])  # type: ignore[assignment]
        self.client = RawPublicKeyCredentials(client_key, [server_key.public_key()])  # type: ignore[assignment]
        self.identity = ""


class TcpCapture:
    """A TCP relay that records both directions (the HTTP hop as a capture would show it)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.data = bytearray()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> TcpCapture:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while chunk := await r.read(65536):
                    self.data += chunk
                    w.write(chunk)
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        for r, w in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(pump(r, w))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


class HttpOrigin(Origin):
    """The Layer 0 origin served over HTTP only."""

    async def start(self) -> None:
        from coaplayers.layer0 import Layer0Site

        from .apps import make_site

        site, self.resources = make_site()
        self.layer0 = Layer0Site(site, self.creds.server, policy=self.policy, limits=self.limits)
        self.http = HttpListener(CoapAsgiApp(self.layer0), "127.0.0.1", 0)
        await self.http.start()
        self.port = self.http.port
        self.starts += 1

    async def stop(self) -> None:
        if self.layer0 is not None:
            self.layer0.close()
        if getattr(self, "http", None) is not None:
            await self.http.close()
            self.http = None  # type: ignore[assignment]


def creds_for(mode: str) -> Credentials:
    return RpkCredentials() if mode == "rpk" else Credentials(mode)


@pytest.mark.parametrize("mode", ["psk", "cert", "rpk"])
async def test_layer0_across_the_cross_proxy_shows_no_plaintext_on_the_http_hop(
    mode: str, start_proxy, client_context, tmp_path: Path
) -> None:
    origin = HttpOrigin(creds_for(mode))
    await origin.start()
    try:
        async with TcpCapture(("127.0.0.1", origin.port)) as capture:
            proxy = await start_proxy("coaplayers")
            ch = channel(client_context, f"http://127.0.0.1:{capture.port}", origin.creds,
                         proxy=proxy.uri)
            text = await asyncio.wait_for(
                ch.request(Message(code=GET, uri_path=["text"])).response, T)
            assert text.code == Code.CONTENT and text.payload == b"hello " + TEXT_MARKER
            body = ECHO_MARKER * 150  # 2400 bytes: inner Block1 and Block2
            echo = await asyncio.wait_for(
                ch.request(Message(code=POST, uri_path=["echo"], payload=body)).response, T)
            assert echo.code == Code.CHANGED and echo.payload == body
            # Inner Observe crosses too: its notifications ride the pulls (long-polled POSTs).
            req = ch.request(Message(code=GET, uri_path=["counter"], observe=0))
            first = await asyncio.wait_for(req.response, T)
            assert first.payload == OBS_MARKER + b" 0"
            origin.resources["counter"].bump()
            note = await asyncio.wait_for(req.observation.__aiter__().__anext__(), T)
            assert note.payload == OBS_MARKER + b" 1"
            req.observation.cancel()
            assert ch.handshakes == 1
            await ch.close()
            wire = bytes(capture.data)
        assert b"POST /.well-known/atls HTTP/1.1" in wire
        assert b"HTTP/1.1 201 Created" in wire and b"location: /~" in wire
        for marker in (TEXT_MARKER, ECHO_MARKER, OBS_MARKER, b"/text", b"/echo", b"counter"):
            assert marker not in wire, marker
        log = b"".join(p.read_bytes() for p in tmp_path.glob("coaplayers-proxy-*.log"))
        assert f'"upstream":"http://127.0.0.1:{capture.port}/~'.encode() in log
        for marker in (TEXT_MARKER, ECHO_MARKER, OBS_MARKER):
            assert marker not in log
    finally:
        await origin.stop()
