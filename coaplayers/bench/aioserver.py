"""The baseline origin server: stock aiocoap, nothing of coaplayers on the request path.

``python -m coaplayers.bench.aioserver HOST PORT [OSCORE_DIR]`` serves ``/echo`` (POST answers
2.04 with the request payload) on plain UDP. With ``OSCORE_DIR`` (a folder of folders, each
holding aiocoap's ``settings.json`` for one :class:`aiocoap.oscore.FilesystemSecurityContext`,
one per client), the site sits behind aiocoap's own ``OscoreSiteWrapper``, so OSCORE requests
for those contexts are answered too.
It prints ``listening coap://HOST:PORT`` once bound, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aiocoap
from aiocoap import resource


class Echo(resource.Resource):
    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED, payload=request.payload)


async def serve(host: str, port: int, oscore_dir: str | None) -> None:
    site = resource.Site()
    site.add_resource(["echo"], Echo())
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
        print("usage: python -m coaplayers.bench.aioserver HOST PORT [OSCORE_DIR]",
              file=sys.stderr)
        return 2
    asyncio.run(serve(args[0], int(args[1]), args[2] if len(args) == 3 else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
