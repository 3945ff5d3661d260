"""``coap-bench --http``: the cloud-proxy topology (Figure 2) measured on its own.

coap-client's library -> coap-proxy (CoAP to HTTP) -> [TCP tap] -> coap-server on http://.
For each mode (plain CoAP-to-HTTP, Layer 0 with PSK, certificates and raw public keys, the
OSCORE mode) one fresh client sends the bench's 40-byte POST /echo: warm-up requests first
(the end-to-end handshake or keying included), then a counted window of sequential requests
(latency, and the HTTP hop's bytes per request from the tap), then a closed loop of several
clients for the throughput. Ratios compare each protected mode with plain CoAP-to-HTTP
through the same proxy and server, measured in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap.message import UndecidedRemote
from aiocoap.numbers.codes import Code

from coaplayers import layer1
from coaplayers.layer0_modes import Layer0ClientOptions, open_requester

from .clients import PAYLOAD, _e2e_cert, _e2e_psk, _e2e_rpk
from .procs import Processes, program

HTTP_MODES = {
    "http_plain": "plain CoAP to HTTP (no end-to-end protection)",
    "http_l0psk": "Layer 0 DTLS (PSK) across the cross-proxy",
    "http_l0cert": "Layer 0 DTLS (certificates) across the cross-proxy",
    "http_l0rpk": "Layer 0 DTLS (raw public keys) across the cross-proxy",
    "http_oscore": "OSCORE mode across the cross-proxy",
}


class Tap:
    """A TCP relay in front of the HTTP server that counts bytes each way."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.up = 0
        self.down = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError, OSError):  # the tap closing
            await self._relay(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, upward: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await r.read(65536):
                    if upward:
                        self.up += len(chunk)
                    else:
                        self.down += len(chunk)
                    w.write(chunk)
                    await w.drain()
            w.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))


class HttpClient:
    def __init__(self, ctx: Any, requester: Any, origin: str) -> None:
        self.ctx = ctx
        self.requester = requester
        self.origin = origin

    async def post(self) -> None:
        msg = aiocoap.Message(code=Code.POST, payload=PAYLOAD,
                              uri=self.origin.replace("http:", "coap:", 1) + "/echo")
        # An http:// target: options as for coap://, the remote's scheme names HTTP (as
        # coap-client builds it).
        msg.remote = UndecidedRemote("http", msg.remote.hostinfo)
        response = await self.requester.request(msg).response
        if response.code != Code.CHANGED or bytes(response.payload) != PAYLOAD:
            raise RuntimeError(f"unexpected answer {response.code}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            close = getattr(self.requester, "close", None)
            if close is not None:
                await close()
        await self.ctx.shutdown()


async def open_http_client(mode: str, creds: Path, proxy: str, origin: str) -> HttpClient:
    ctx = await layer1.create_context(client_credentials=layer1.ClientCredentials())
    e2e = {
        "http_plain": None,
        "http_l0psk": Layer0ClientOptions("dtls", psk=_e2e_psk(creds)),
        "http_l0cert": Layer0ClientOptions("dtls", certificate=_e2e_cert(creds)),
        "http_l0rpk": Layer0ClientOptions("dtls", raw_public_key=_e2e_rpk(creds)),
        "http_oscore": Layer0ClientOptions("oscore", certificate=_e2e_cert(creds)),
    }[mode]
    requester = await open_requester(ctx, proxy=proxy, e2e=e2e, target=f"{origin}/echo")
    return HttpClient(ctx, requester, origin)


async def measure_mode(mode: str, creds: Path, proxy: str, tap: Tap, *, requests: int,
                       clients: int, duration: float) -> dict[str, Any]:
    origin = f"http://127.0.0.1:{tap.port}"
    one = await open_http_client(mode, creds, proxy, origin)
    try:
        for _ in range(3):  # handshake / keying and warm-up, outside the window
            await asyncio.wait_for(one.post(), 30)
        up0, down0 = tap.up, tap.down
        latencies = []
        for _ in range(requests):
            t0 = time.perf_counter()
            await asyncio.wait_for(one.post(), 30)
            latencies.append(time.perf_counter() - t0)
        http_up = (tap.up - up0) / requests
        http_down = (tap.down - down0) / requests
    finally:
        await one.close()
    pool = [await open_http_client(mode, creds, proxy, origin) for _ in range(clients)]
    done = 0
    errors = 0
    try:
        for c in pool:
            await asyncio.wait_for(c.post(), 30)
        stop = time.perf_counter() + duration

        async def loop(c: HttpClient) -> None:
            nonlocal done, errors
            while time.perf_counter() < stop:
                try:
                    await asyncio.wait_for(c.post(), 30)
                    done += 1
                except Exception:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in pool))
        elapsed = time.perf_counter() - t0
    finally:
        for c in pool:
            await c.close()
    return {
        "label": HTTP_MODES[mode],
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "sequential_rps": requests / sum(latencies),
        f"rps_{clients}_clients": done / elapsed,
        "errors": errors,
        "http_hop_request_bytes": http_up,
        "http_hop_response_bytes": http_down,
    }


async def run(workdir: Path, *, quick: bool) -> dict[str, Any]:
    creds = workdir / "credentials"
    clients = 5 if quick else 20
    requests = 20 if quick else 200
    duration = 1.0 if quick else 3.0
    with Processes(workdir) as procs:
        keys = await asyncio.create_subprocess_exec(
            program("coap-keys"), str(creds), stdout=asyncio.subprocess.DEVNULL)
        await keys.wait()
        server = procs.start("server-http", [
            program("coap-server"), "--config", str(creds / "server.toml"),
            "--listen", "http://127.0.0.1:0"], until="listening")
        http_port = int(server.uris("listening")[0].rsplit(":", 1)[1])
        from dataclasses import fields

        from coaplayers.proxy.config import ProxyConfig

        allow = (["--allow", "127.0.0.1"]
                 if "allow" in {f.name for f in fields(ProxyConfig)} else [])
        proxy = procs.start("proxy-http", [
            program("coap-proxy"), "--listen", "coap://127.0.0.1:0", "--no-log-exchanges",
            *allow], until="ready")
        proxy_uri = proxy.uris("listening")[0]
        tap = Tap(http_port)
        await tap.start()
        try:
            modes = {}
            for mode in HTTP_MODES:
                modes[mode] = await measure_mode(mode, creds, proxy_uri, tap, requests=requests,
                                                 clients=clients, duration=duration)
        finally:
            tap.close()
    plain = modes["http_plain"]
    key = f"rps_{clients}_clients"
    for result in modes.values():
        result["ratio_sequential_vs_plain"] = result["sequential_rps"] / plain["sequential_rps"]
        result[f"ratio_{clients}_clients_vs_plain"] = result[key] / plain[key]
        result["extra_request_bytes_vs_plain"] = (
            result["http_hop_request_bytes"] - plain["http_hop_request_bytes"])
        result["extra_response_bytes_vs_plain"] = (
            result["http_hop_response_bytes"] - plain["http_hop_response_bytes"])
    return {
        "modes": modes,
        "clients": clients,
        "method": f"coap-proxy (CoAP to HTTP) and coap-server --listen http:// as processes, a"
                  f" byte-counting TCP tap between them; per mode {requests} sequential 40-byte"
                  f" POSTs after 3 warm-up ones (handshakes and keying outside the window),"
                  f" then {clients} clients in a closed loop for {duration} s; hop 1 plain CoAP",
    }


def render(results: dict[str, Any]) -> str:
    clients = results["clients"]
    lines = [
        f"{'mode (Figure 2: CoAP -> coap-proxy -> HTTP)':<46} {'p50 ms':>7} {'req/s':>7}"
        f" {'x' + str(clients) + ' req/s':>11} {'ratio':>6} {'HTTP up B':>9} {'down B':>7}",
    ]
    for mode, r in results["modes"].items():
        lines.append(
            f"{mode:<46} {r['latency_p50_ms']:7.2f} {r['sequential_rps']:7.0f}"
            f" {r[f'rps_{clients}_clients']:11.0f}"
            f" {r[f'ratio_{clients}_clients_vs_plain']:6.2f}"
            f" {r['http_hop_request_bytes']:9.1f} {r['http_hop_response_bytes']:7.1f}")
    lines.append("ratio: throughput with several clients against plain CoAP-to-HTTP; bytes:"
                 " the HTTP hop per request (head and body, both ways)")
    return "\n".join(lines)
