"""The test rig: a credential set and every process of a run, started once, stopped always."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from coaplayers.programs import keys

from .clients import Endpoints, write_aiocoap_oscore_settings
from .procs import (
    Processes,
    start_aiocoap_proxy,
    start_aiocoap_server,
    start_coap_proxy,
    start_coap_server,
)


@contextlib.asynccontextmanager
async def rig(workdir: Path) -> AsyncIterator[tuple[Endpoints, Processes]]:
    """coap-server and coap-proxy (coap:// and coaps:// each), aiocoap-proxy and the stock
    aiocoap server, all on 127.0.0.1 with ephemeral ports."""
    creds = workdir / "creds"
    keys.create(creds, device="bench-device")
    oscore_dir = write_aiocoap_oscore_settings(workdir / "aiocoap-oscore")
    with Processes(workdir) as procs:
        # Started one after another: each start is a Python interpreter importing aiocoap,
        # and two cores are better spent on one at a time.
        server, s_coap, s_coaps = await asyncio.to_thread(start_coap_server, procs, creds)
        proxy, p_coap, p_coaps = await asyncio.to_thread(start_coap_proxy, procs, creds)
        aio_proxy, aio_proxy_port = await asyncio.to_thread(start_aiocoap_proxy, procs)
        aio_server, aio_server_port = await asyncio.to_thread(
            start_aiocoap_server, procs, oscore_dir
        )
        ep = Endpoints(
            creds=creds,
            server_coap=s_coap,
            server_coaps=s_coaps,
            proxy_coap=p_coap,
            proxy_coaps=p_coaps,
            aio_proxy=f"coap://127.0.0.1:{aio_proxy_port}",
            aio_server=f"coap://127.0.0.1:{aio_server_port}",
        )
        ep.pids = {
            "coap-server": server.pid, "coap-proxy": proxy.pid,
            "aiocoap-proxy": aio_proxy.pid, "aiocoap-server": aio_server.pid,
        }
        yield ep, procs
