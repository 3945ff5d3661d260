"""Servers for the OSCORE-mode process tests (test_oscore_mode.py), run as subprocesses.

``python -m tests.oscore.mode_peers ours|stock --cert PEM --key PEM --ca PEM [--port N]``
prints ``listening coap://127.0.0.1:PORT`` once it serves, and runs until SIGTERM.

* ``ours``: the product's server stack, :func:`coaplayers.layer0_modes.wrap_site` around a small
  tree: ``/hello`` (names the peer and mode), ``/echo`` (POST), ``/count`` (POST adds one and
  answers the new value, GET answers it), so a test can tell whether a request was executed
  once or twice.
* ``stock``: an independently built OSCORE server. Only the keying comes from coaplayers'
  Layer 0 tunnel (that is the protocol under test); the OSCORE side is aiocoap's own
  ``OscoreSiteWrapper`` with aiocoap's own ``FilesystemSecurityContext``, written from the
  exporter output and the parameters exactly as docs/OSCORE-KEYING.md describes (first half
  Master Secret, second half Master Salt; CBOR map {7: client_id, 8: server_id} encoded with
  cbor2, not with coaplayers' encoder). ``/hello`` answers with the context's class and kid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
from aiocoap import resource
from aiocoap.credentials import CredentialsMap
from aiocoap.numbers.codes import Code
from aiocoap.oscore import FilesystemSecurityContext
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

from coaplayers.identity import describe_peer
from coaplayers.layer0 import Layer0Site, Policy, layer0_peer
from coaplayers.layer0_modes import Layer0ServerOptions, wrap_site
from coaplayers.programs import config as cfg

KEYING_PATH = [".well-known", "atls-oscore"]
PARAMETERS_CONTENT_FORMAT = 65001


class Hello(resource.Resource):
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=f"hello ({describe_peer(request)})".encode())


class Echo(resource.Resource):
    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=Code.CHANGED, payload=request.payload)


class Count(resource.Resource):
    """Not idempotent on purpose: a replayed POST that got through would show."""

    def __init__(self) -> None:
        super().__init__()
        self.value = 0

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        self.value += 1
        return aiocoap.Message(code=Code.CHANGED, payload=str(self.value).encode())

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=str(self.value).encode())


class StockHello(resource.Resource):
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        sc = getattr(request.remote, "security_context", None)
        if sc is None:
            return aiocoap.Message(code=Code.UNAUTHORIZED, payload=b"OSCORE only")
        text = f"stock {type(sc).__name__} kid={sc.recipient_id.hex()}"
        return aiocoap.Message(payload=text.encode())


class StockKeying(resource.Resource):
    """The keying resource written from the documentation, with aiocoap's context class."""

    def __init__(self, contexts: CredentialsMap, folder: Path) -> None:
        super().__init__()
        self.contexts = contexts
        self.folder = folder

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        peer = layer0_peer(request)
        if peer is None or peer.mode == "psk":
            return aiocoap.Message(code=Code.UNAUTHORIZED, payload=b"certificate Layer 0 only")
        client_id, server_id = os.urandom(2), b"\x05"
        exported = peer.export_keying_material(b"atls-oscore", 32, None)
        where = self.folder / client_id.hex()
        where.mkdir()
        (where / "settings.json").write_text(json.dumps({
            "sender-id_hex": server_id.hex(), "recipient-id_hex": client_id.hex(),
        }))
        (where / "secret.json").write_text(json.dumps({
            "secret_hex": exported[:16].hex(), "salt_hex": exported[16:].hex(),
        }))
        self.contexts[f":client-{client_id.hex()}"] = FilesystemSecurityContext(str(where))
        return aiocoap.Message(
            code=Code.CHANGED, content_format=PARAMETERS_CONTENT_FORMAT,
            payload=cbor2.dumps({7: client_id, 8: server_id}, canonical=True),
        )


def build(kind: str, certificate: Any, folder: Path) -> tuple[Any, Count]:
    site = resource.Site()
    count = Count()
    site.add_resource(["echo"], Echo())
    if kind == "ours":
        site.add_resource(["hello"], Hello())
        site.add_resource(["count"], count)
        return wrap_site(site, Layer0ServerOptions(certificate=certificate)), count
    contexts = CredentialsMap()
    site.add_resource(["hello"], StockHello())
    site.add_resource(KEYING_PATH, StockKeying(contexts, folder))
    # The tunnel protects nothing by itself: OSCORE requests pass it to OscoreSiteWrapper.
    policy = Policy.build(protected=())
    return Layer0Site(OscoreSiteWrapper(site, contexts), certificate, policy=policy), count


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["ours", "stock"])
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    certificate = cfg.certificate_from(args.cert, args.key, args.ca, require_peer=True,
                                       what="--layer0")
    with tempfile.TemporaryDirectory(prefix="stock-oscore-") as folder:
        site, _ = build(args.kind, certificate, Path(folder))
        ctx = await aiocoap.Context.create_server_context(
            site, bind=("127.0.0.1", args.port), transports=["udp6"]
        )
        port = args.port
        for ri in ctx.request_interfaces:
            mi = getattr(getattr(ri, "token_interface", None), "message_interface", None)
            sock = getattr(getattr(mi, "transport", None), "get_extra_info", lambda _: None)(
                "socket"
            )
            if isinstance(sock, socket.socket):
                port = sock.getsockname()[1]
        print(f"listening coap://127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await ctx.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
