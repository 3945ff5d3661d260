"""The baseline origin server: stock aiocoap, nothing of coaplayers on the request path.

``python -m coaplayers_tools.bench.aioserver HOST PORT [OSCORE_DIR]`` serves ``/echo`` (POST answers
2.04 with the request payload) on plain UDP, and for the proxy-shield phase (:mod:`.shield`)
``/reading`` (GET: 40 bytes, no Max-Age; observable, a notification every half second)
and ``/stats`` (JSON: how many GETs and Observe registrations ``/reading`` had, which is how
the bench counts the requests that got through a proxy).
With ``OSCORE_DIR`` (a folder of folders, each holding aiocoap's ``settings.json`` for one
:class:`aiocoap.oscore.FilesystemSecurityContext`, one per client), the site sits behind
aiocoap's own ``OscoreSiteWrapper``, so OSCORE requests for those contexts are answered too.
It prints ``listening coap://HOST:PORT`` once bound, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import aiocoap
from aiocoap import resource


class Echo(resource.Resource):
    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED, payload=request.payload)


class Reading(resource.ObservableResource):
    """A device reading: what a caching, aggregating proxy should shield the device from."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.registrations = 0
        self.value = 0
        self._ticker: asyncio.TimerHandle | None = None

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        self.registrations += 1
        await super().add_observation(request, serverobservation)

    def update_observation_count(self, count: int) -> None:
        if count and self._ticker is None:
            self._ticker = asyncio.get_running_loop().call_later(0.5, self._tick)
        elif not count and self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def _tick(self) -> None:
        self.value += 1
        self.updated_state()
        self._ticker = asyncio.get_running_loop().call_later(0.5, self._tick)

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.gets += 1
        # No Max-Age (the RFC 7252 default, 60 s): aiocoap-proxy answers 4.02 to any upstream
        # answer carrying one, and it is the baseline here.
        return aiocoap.Message(payload=f"reading {self.value:032d}".encode())


class Stats(resource.Resource):
    def __init__(self, reading: Reading) -> None:
        super().__init__()
        self.reading = reading

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        body = {"gets": self.reading.gets, "registrations": self.reading.registrations}
        return aiocoap.Message(payload=json.dumps(body).encode())


async def serve(host: str, port: int, oscore_dir: str | None) -> None:
    site = resource.Site()
    site.add_resource(["echo"], Echo())
    reading = Reading()
    site.add_resource(["reading"], reading)
    site.add_resource(["stats"], Stats(reading))
    served: object = site
    if oscore_dir is not None:
        from pathlib import Path

        from aiocoap.credentials import CredentialsMap
        from aiocoap.oscore import FilesystemSecurityContext
        from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

        creds = CredentialsMap()
        for sub in sorted(Path(oscore_dir).iterdir()):
            if (sub / "settings.json").exists():
                creds[f":{sub.name}"] = FilesystemSecurityContext(str(sub))
        served = OscoreSiteWrapper(site, creds)
    ctx = await aiocoap.Context.create_server_context(
        served, bind=(host, port), transports=["udp6"]
    )
    print(f"listening coap://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await ctx.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m coaplayers_tools.bench.aioserver HOST PORT [OSCORE_DIR]",
              file=sys.stderr)
        return 2
    asyncio.run(serve(args[0], int(args[1]), args[2] if len(args) == 3 else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
