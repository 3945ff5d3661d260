"""The application server's resources: what the demo and the tests talk to."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import math
import time
from typing import Any

import aiocoap
import aiocoap.resource as resource
import cbor2
from aiocoap.numbers.contentformat import ContentFormat

from coaplayers.amplification import AmplificationGuard, guarded
from coaplayers.blockwise import BlockwiseLimits, BoundedSite
from coaplayers.identity import describe_peer
from coaplayers.replica import REPLICA_PATH

FIRMWARE_SIZE = 64 * 1024


class Hello(resource.Resource):
    """Plain text greeting that names who asked, per layer."""

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(
            payload=f"Hello from coap-server ({describe_peer(request)})".encode(),
            content_format=ContentFormat.TEXT,
        )


class Time(resource.Resource):
    """The server's clock (UTC, ISO 8601) as text, or as JSON or CBOR on request (Accept)."""

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        accept = request.opt.accept
        # Max-Age 1: a caching proxy may serve it for the second it stays true (RFC 7252 5.6).
        if accept is None or accept == ContentFormat.TEXT:
            return aiocoap.Message(payload=now.encode(), content_format=ContentFormat.TEXT,
                                   max_age=1)
        if accept == ContentFormat.JSON:
            return aiocoap.Message(
                payload=json.dumps({"time": now}).encode(), content_format=ContentFormat.JSON,
                max_age=1,
            )
        if accept == ContentFormat.CBOR:
            return aiocoap.Message(
                payload=cbor2.dumps({"time": now}), content_format=ContentFormat.CBOR, max_age=1
            )
        return aiocoap.Message(
            code=aiocoap.NOT_ACCEPTABLE, payload=b"/time speaks text/plain, JSON and CBOR"
        )


class Echo(resource.Resource):
    """Answers POST and PUT with the same payload and Content-Format."""

    async def _echo(self, request: aiocoap.Message) -> aiocoap.Message:
        response = aiocoap.Message(code=aiocoap.CHANGED, payload=request.payload)
        if request.opt.content_format is not None:
            response.opt.content_format = request.opt.content_format
        return response

    render_post = _echo
    render_put = _echo


class Temperature(resource.ObservableResource):
    """A reading that changes every second while someone observes it (no timer otherwise).

    Its answers say so (Max-Age): an observer then knows when the next notification is due
    and can tell a path that went silent from a value that did not change (RFC 7641 3.3.1).
    """

    MAX_AGE = 2

    def __init__(self) -> None:
        super().__init__()
        self._handle: asyncio.TimerHandle | None = None

    def update_observation_count(self, count: int) -> None:
        if count and self._handle is None:
            # The registering GET carries the current value; the first notification is due
            # a second later, when the value has changed.
            self._handle = asyncio.get_running_loop().call_later(1.0, self._tick)
        elif not count and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self.updated_state()
        self._handle = asyncio.get_running_loop().call_later(1.0, self._tick)

    @staticmethod
    def reading(t: float) -> float:
        """A slow wave plus a per-second wobble; consecutive seconds never read the same.

        The wobble ((3 s) mod 7, in steps of 0.05) moves by at least 0.15 per second, more
        than the wave can (2.5 / 30 per second), so two-decimal values always differ.
        """
        s = int(t)
        return 21.0 + 2.5 * math.sin(s / 30.0) + ((3 * s) % 7) * 0.05

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        response = aiocoap.Message(
            payload=f"{self.reading(time.time()):.2f} C".encode(),
            content_format=ContentFormat.TEXT,
            max_age=1,  # the reading changes every second
        )
        response.opt.max_age = self.MAX_AGE
        return response


class Firmware(resource.Resource):
    """A 64 KiB deterministic image, for block-wise transfers; ETag-free on purpose."""

    def __init__(self) -> None:
        super().__init__()
        blocks = []
        seed = b"coaplayers-firmware"
        for _ in range(-(-FIRMWARE_SIZE // 32)):  # SHA-256 chain, 32 bytes a step
            seed = hashlib.sha256(seed).digest()
            blocks.append(seed)
        self.image = b"".join(blocks)[:FIRMWARE_SIZE]

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        response = aiocoap.Message(payload=self.image, content_format=ContentFormat.OCTETSTREAM)
        # Size2 (RFC 7959 section 4) in every block: clients can show progress against it.
        response.opt.size2 = len(self.image)
        return response


log = logging.getLogger("coap-server.requests")


class LoggingSite(BoundedSite):
    """The resource tree, logging each request it dispatches (``coap-server -v``).

    It sits innermost, under Layer 0 and OSCORE, so the log line shows what the application
    received after unprotection, and who sent it at which layer; for the same reason its
    bounded Block1 reassembly holds for requests in all three modes;
    and it holds answers to plain requests from unverified addresses to the 3x rule
    (``coaplayers.amplification``), which protected ones need not: a Layer 0 or OSCORE
    request authenticated before it got here.
    """

    def __init__(self, blockwise: BlockwiseLimits | None = None,
                 guard: AmplificationGuard | None = None) -> None:
        super().__init__(blockwise)
        self.guard = guard

    async def render_to_pipe(self, request: Any) -> None:
        guarded_request = guarded(request, self.guard, log)
        if guarded_request is None:
            return  # answered: a repetition with an Echo value got the answer held for it
        request = guarded_request
        req = request.request
        # Sizes, never payloads: logs travel further than the data they describe.
        log.info(
            "%s /%s (%s) %d bytes", req.code, "/".join(req.opt.uri_path), describe_peer(req),
            len(req.payload),
        )
        await super().render_to_pipe(request)


class Replica(resource.Resource):
    """This server's replica number (``--replica``), for the health probes of proxies that
    route to a replica set: they learn which address holds which sessions from it."""

    def __init__(self, replica: int) -> None:
        super().__init__()
        self.payload = str(replica).encode()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=self.payload, content_format=ContentFormat.TEXT)


def build_site(
    blockwise: BlockwiseLimits | None = None, replica: int | None = None,
    guard: AmplificationGuard | None = None,
) -> resource.Site:
    site = LoggingSite(blockwise, guard)
    if replica is not None:
        site.add_resource(list(REPLICA_PATH), Replica(replica))
    wkc = resource.WKCResource(site.get_resources_as_linkheader)
    site.add_resource([".well-known", "core"], wkc)
    site.add_resource(["hello"], Hello())
    site.add_resource(["time"], Time())
    site.add_resource(["echo"], Echo())
    site.add_resource(["sensors", "temperature"], Temperature())
    site.add_resource(["firmware"], Firmware())
    return site
