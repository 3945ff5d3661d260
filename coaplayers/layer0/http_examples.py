"""Print the HTTP binding's byte-exact example of docs/PROTOCOL.md section 12:
``python -m coaplayers.layer0.http_examples``.

A real run on loopback, no part simulated: a Layer 0 client (PSK) sends one protected GET and
ends the session through coap-proxy (in-process, CoAP to HTTP), to a Layer0Site served by the
HTTP listener (uvicorn); a TCP relay between the two records the HTTP hop as sent. DTLS bytes
differ on every run (randoms, keys); the HTTP framing around them does not, except the session
name and the lengths of handshake messages.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiocoap
import aiocoap.resource as resource
from aiocoap import Message
from aiocoap.numbers.codes import Code

from ..asgi import CoapAsgiApp, HttpListener
from ..dtls import PskClientCredentials, PskStore
from .client import Layer0Client
from .server import Layer0Site


class _Hello(resource.Resource):
    async def render_get(self, request: Message) -> Message:
        return Message(payload=b"22.5 C", content_format=0)


async def _capture_run() -> list[tuple[str, bytes]]:
    from dataclasses import fields

    from ..proxy.config import ProxyConfig
    from ..proxy.node import ProxyNode

    site = resource.Site()
    site.add_resource(["temperature"], _Hello())
    layer0 = Layer0Site(site, PskStore({b"device-1": b"secret-psk-0123"}))
    origin = HttpListener(CoapAsgiApp(layer0), "127.0.0.1", 0)
    await origin.start()
    wire: list[tuple[str, bytes]] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", origin.port)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, who: str) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await r.read(65536):
                    wire.append((who, chunk))
                    w.write(chunk)
                    await w.drain()
            w.close()

        await asyncio.gather(pump(reader, up_writer, "proxy"), pump(up_reader, writer, "origin"))

    tap = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = tap.sockets[0].getsockname()[1]
    extra = {"allow": ("127.0.0.1",)} if "allow" in {f.name for f in fields(ProxyConfig)} else {}
    proxy = ProxyNode(ProxyConfig(listen=("coap://127.0.0.1:0",), log_exchanges=False,
                                  **extra))  # type: ignore[arg-type]
    proxy_uri = (await proxy.start())[0]
    ctx = await aiocoap.Context.create_client_context()
    try:
        channel = Layer0Client(ctx, f"http://127.0.0.1:{port}",
                                PskClientCredentials(b"device-1", b"secret-psk-0123"),
                                proxy=proxy_uri)
        answer = await asyncio.wait_for(
            channel.request(Message(code=Code.GET, uri_path=["temperature"])).response, 30)
        assert answer.payload == b"22.5 C", answer
        await channel.close()
    finally:
        await ctx.shutdown()
        await proxy.stop()
        tap.close()
        await origin.close()
        layer0.close()
    return wire


def _show(who: str, data: bytes) -> str:
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = [f"{who} -> ({len(data)} bytes, head {len(head) + len(sep)}, body {len(body)}):"]
    lines += ["    " + line for line in head.decode("latin-1").split("\r\n")]
    if body:
        lines.append("    body: " + " ".join(body[i:i + 32].hex()
                                            for i in range(0, len(body), 32)))
    return "\n".join(lines)


def main() -> None:
    wire = asyncio.run(_capture_run())
    merged: list[tuple[str, bytes]] = []
    for who, chunk in wire:  # one HTTP message may arrive in two reads
        if merged and merged[-1][0] == who and not chunk.startswith((b"HTTP/", b"POST ",
                                                                        b"GET ", b"DELETE ")):
            merged[-1] = (who, merged[-1][1] + chunk)
        else:
            merged.append((who, chunk))
    print("\n\n".join(_show(who, data) for who, data in merged))


if __name__ == "__main__":
    main()
