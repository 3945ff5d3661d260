"""A small aiocoap origin server for the proxy tests, run as a subprocess.

libcoap's coap-server has no echo resource and cannot report what options reached it, so the
proxy tests use this one: ``/echo`` answers a POST or PUT with the same payload, ``/big``
serves 3,000 bytes (block-wise), ``/obs`` is observable, ``/slow?S`` answers after S seconds,
``/critopt?S`` answers after S seconds with the unknown critical option 65001, a POST to
``.../create`` answers 2.01 with the Location-Path ``.../made``, ``/etag?MAXAGE`` has the ETag
"e1" (2.03 to a request holding it), ``/count`` and ``/count0`` (Max-Age 0) answer a new number
per GET, ``/obscount`` says how many Observe registrations ``/obs`` had, ``/doc`` is ``DOC``
(300 bytes, ETag, Max-Age 60) and ``/docgets`` says how many GETs (each block one) it had,
and every other path answers with a
JSON report of the request as it arrived (method, path, query, every option in hex), which is
how the tests see what the proxy forwarded.

Usage: ``python -m tests.proxy.echo_server HOST PORT``; prints ``listen coap://HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys

import aiocoap
from aiocoap import resource
from aiocoap.numbers import codes
from aiocoap.optiontypes import OpaqueOption

BIG = bytes(range(256)) * 11 + b"0123456789" * 18 + b"!" * 4  # 3,000 bytes, not text
DOC = b"".join(b"line %02d of the document, for readers\n" % i for i in range(9))[:300]
DOC_ETAG = b"doc-v1"


class Origin(resource.ObservableResource):
    """One resource that dispatches on the first path segment, so any path can be routed here."""

    def __init__(self) -> None:
        super().__init__()
        self.counter = 0
        self.gets = 0  # GETs of /count and /count0
        self.registrations = 0  # Observe registrations of /obs
        self.doc_gets = 0  # GETs of /doc

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        path = list(request.opt.uri_path)
        first = path[0] if path else ""
        if first == "echo" and request.code in (codes.POST, codes.PUT):
            return aiocoap.Message(
                code=codes.CHANGED,
                payload=request.payload,
                content_format=request.opt.content_format,
            )
        if first == "big":
            return aiocoap.Message(code=codes.CONTENT, payload=BIG)
        if first == "slow":
            await asyncio.sleep(float(request.opt.uri_query[0]) if request.opt.uri_query else 1.0)
            return aiocoap.Message(code=codes.CONTENT, payload=b"slow done")
        if first == "badopt":  # an answer a proxy must not relay (unknown proxy-unsafe option)
            bad = aiocoap.Message(code=codes.CONTENT, payload=b"x")
            bad.opt.add_option(OpaqueOption(65002, b"u"))
            return bad
        if first == "critopt":  # safe-to-forward but critical: a client may reject the answer
            await asyncio.sleep(float(request.opt.uri_query[0]) if request.opt.uri_query else 0)
            crit = aiocoap.Message(code=codes.CONTENT, payload=b"critical")
            crit.opt.add_option(OpaqueOption(65001, b"c"))
            return crit
        if path[-1:] == ["create"] and request.code == codes.POST:  # 2.01 with a Location-Path
            made = aiocoap.Message(code=codes.CREATED)
            made.opt.location_path = [*path[:-1], "made"]
            return made
        if first == "etag":  # ETag "e1", Max-Age from the query (default 1); 2.03 if held
            max_age = int(request.opt.uri_query[0]) if request.opt.uri_query else 1
            if b"e1" in request.opt.etags:
                valid = aiocoap.Message(code=codes.VALID, max_age=max_age)
                valid.opt.etag = b"e1"
                return valid
            tagged = aiocoap.Message(code=codes.CONTENT, payload=b"tagged body",
                                     max_age=max_age)
            tagged.opt.etag = b"e1"
            return tagged
        if first in ("count", "count0"):  # a new value per GET; "count0" says Max-Age 0
            self.gets += 1
            counted = aiocoap.Message(code=codes.CONTENT, payload=str(self.gets).encode())
            if first == "count0":
                counted.opt.max_age = 0
            return counted
        if first == "doc":
            self.doc_gets += 1
            doc = aiocoap.Message(code=codes.CONTENT, payload=DOC, max_age=60)
            doc.opt.etag = DOC_ETAG
            return doc
        if first == "docgets":
            return aiocoap.Message(code=codes.CONTENT, payload=str(self.doc_gets).encode())
        if first == "obscount":
            return aiocoap.Message(code=codes.CONTENT, payload=str(self.registrations).encode())
        if first == "obs":
            return aiocoap.Message(code=codes.CONTENT, payload=str(self.counter).encode())
        report = {
            "method": str(request.code),
            "path": path,
            "query": list(request.opt.uri_query),
            "uri_host": request.opt.uri_host,
            "options": [
                [int(o.number), o.encode().hex()] for o in request.opt.option_list()
            ],
            "payload_len": len(request.payload),
        }
        return aiocoap.Message(
            code=codes.CONTENT, payload=json.dumps(report).encode(), content_format=50
        )

    async def add_observation(self, request: aiocoap.Message, serverobservation: object) -> None:
        path = list(request.opt.uri_path)
        if path[:1] == ["obs"]:
            self.registrations += 1
            serverobservation.accept(lambda: None)  # type: ignore[attr-defined]
            self._observations.add(serverobservation)


async def tick(site: Origin) -> None:
    while True:
        await asyncio.sleep(0.2)
        site.counter += 1
        for obs in list(site._observations):
            obs.trigger()


async def main(host: str, port: int) -> None:
    site = Origin()
    # UDP only: aiocoap's TCP and WebSocket servers would bind their default ports whatever
    # ``port`` says, and fail when another program holds them.
    ctx = await aiocoap.Context.create_server_context(site, bind=(host, port),
                                                      transports=["udp6"])
    sock = None
    for ri in ctx.request_interfaces:
        t = getattr(getattr(ri, "token_interface", None), "message_interface", None)
        if t is not None and hasattr(t, "transport"):
            sock = t.transport.get_extra_info("socket")
    bound = sock.getsockname()[1] if isinstance(sock, socket.socket) else port
    print(f"listen coap://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ticker = asyncio.create_task(tick(site))
    await stop.wait()
    ticker.cancel()
    await ctx.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
