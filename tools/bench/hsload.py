"""Full Layer 0 handshakes against coap-server as fast as it answers them: the rate it sustains.

:func:`coaplayers_tools.bench.handshake.rate_over_wire` drives handshakes with the product's own
client (:class:`~coaplayers.layer0.Layer0Client` on an aiocoap context). On two cores that
client is the bottleneck: it spends about twice the server's CPU per handshake, so the server
idles most of the time, and a server that idles pays for every wake-up on its own. This load
generator spends on each handshake little more than the client's DTLS engine: it encodes the
three outer requests itself (aiocoap's :class:`~aiocoap.Message` codec, no message layer, no
token manager) on one UDP socket, with as many handshakes in flight as asked. With coap-server
busy for most of the run, its CPU time per handshake is what it sustains.

Written here rather than borrowed because no CoAP load tool speaks Layer 0; it
sends each request once and counts a handshake that gets no answer within the timeout as an
error (there is no loss on loopback).
"""

from __future__ import annotations

import asyncio
import os
import statistics
from typing import Any
from urllib.parse import urlsplit

from aiocoap import CON, POST, Message

from coaplayers.dtls import ConnectionClosed, HandshakeComplete
from coaplayers.layer0.profile import (
    CHANGED,
    CONTENT_FORMAT,
    CREATED,
    WELL_KNOWN_PATH,
    handshake_tag,
)

from .inmem import Peers
from .procs import cpu_of


class _Endpoint(asyncio.DatagramProtocol):
    """One UDP socket, responses matched to requests by token."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[bytes, asyncio.Future[Message]] = {}
        self.stray = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            msg = Message.decode(data)
        except Exception:  # counted: a load generator must not stop on one odd datagram
            self.stray += 1
            return
        future = self.waiting.pop(msg.token, None)
        if future is None or future.done():
            self.stray += 1
            return
        future.set_result(msg)


class _Load:
    def __init__(self, endpoint: _Endpoint, peers: Peers, kind: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.peers = peers
        self.kind = kind
        self.timeout = timeout
        self._mid = int.from_bytes(os.urandom(2), "big")
        self._token = int.from_bytes(os.urandom(4), "big")

    async def exchange(self, path: tuple[str, ...], payload: bytes) -> Message:
        self._mid = (self._mid + 1) & 0xFFFF
        self._token = (self._token + 1) & 0xFFFFFFFF
        token = self._token.to_bytes(4, "big")
        msg = Message(mtype=CON, mid=self._mid, token=token, code=POST, payload=payload)
        msg.opt.uri_path = path
        if path == WELL_KNOWN_PATH:
            msg.opt.content_format = CONTENT_FORMAT
        future = asyncio.get_running_loop().create_future()
        self.endpoint.waiting[token] = future
        assert self.endpoint.transport is not None
        self.endpoint.transport.sendto(msg.encode())
        try:
            async with asyncio.timeout(self.timeout):
                return await future
        finally:
            self.endpoint.waiting.pop(token, None)

    async def handshake(self) -> None:
        """One full handshake, as :func:`.inmem.handshake` makes it in memory."""
        loop = asyncio.get_running_loop()
        client = self.peers.client(self.kind)
        try:
            client.connect(loop.time())
            queue = list(client.datagrams_to_send())
            sid: str | None = None
            tag = b""  # the handshake tag starts every request to the half-open session
            for _ in range(16):
                datagram = queue.pop(0) if queue else b""
                path = WELL_KNOWN_PATH if sid is None else (sid,)
                answer = await self.exchange(path, tag + datagram if sid else datagram)
                if answer.code == CREATED and answer.opt.location_path:
                    sid = answer.opt.location_path[-1]
                    created_tag = handshake_tag(answer.payload)
                    if created_tag is None:
                        raise RuntimeError("session created without a ServerHello")
                    tag = created_tag
                elif answer.code != CHANGED:
                    raise RuntimeError(f"handshake refused: {answer.code}")
                if answer.payload:
                    client.receive_datagram(answer.payload, loop.time())
                done = False
                while (event := client.next_event()) is not None:
                    if isinstance(event, HandshakeComplete):
                        done = True
                    elif isinstance(event, ConnectionClosed):
                        raise RuntimeError(f"handshake failed: {event.error}")
                queue.extend(client.datagrams_to_send())
                if done and not queue:
                    return
                if not queue and not answer.payload:
                    raise RuntimeError("handshake stalled")
            raise RuntimeError("handshake did not finish in 16 exchanges")
        finally:
            # No DELETE (as rate_over_wire): the server keeps the session until it evicts it.
            client.close()
            client.datagrams_to_send()


async def rate_sustained(server_coap: str, creds: Any, server_pid: int, *, kind: str = "cert",
                         seconds: float, windows: int = 3, concurrency: int = 24,
                         timeout: float = 10.0) -> dict[str, Any]:
    """Full handshakes of ``kind`` ("cert" or "rpk") straight to coap-server (``coap://``) from
    the lean generator above; the server's CPU share and CPU time per handshake from /proc.

    ``seconds`` are cut into ``windows`` back-to-back windows and the figures are the medians
    of the windows' (the machine's other tenants come and go; one slow window is not the
    server's rate)."""
    parts = urlsplit(server_coap)
    host = (parts.hostname or "").strip("[]")
    loop = asyncio.get_running_loop()
    transport, endpoint = await loop.create_datagram_endpoint(
        _Endpoint, remote_addr=(host, parts.port or 5683))
    load = _Load(endpoint, Peers(creds), kind, timeout)
    done = errors = 0
    stop_at = 0.0

    async def worker() -> None:
        nonlocal done, errors
        while loop.time() < stop_at:
            try:
                await load.handshake()
                done += 1
            except (RuntimeError, TimeoutError):
                errors += 1

    measured: list[dict[str, float]] = []
    total = failed = 0
    try:
        stop_at = loop.time() + min(1.0, seconds / 3)  # warm-up: caches, session table
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        for _ in range(max(1, windows)):
            done = errors = 0
            cpu0, own0, t0 = cpu_of(server_pid), cpu_of(), loop.time()
            stop_at = t0 + seconds / max(1, windows)
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = loop.time() - t0
            cpu, own = cpu_of(server_pid) - cpu0, cpu_of() - own0
            total += done
            failed += errors
            measured.append({
                "handshakes": done, "seconds": elapsed,
                "wall_per_second": done / elapsed,
                "server_cpu_share": cpu / elapsed,
                "generator_cpu_share": own / elapsed,
                "server_cpu_ms_per_handshake": 1000 * cpu / done if done else float("inf"),
            })
    finally:
        transport.close()

    def median(key: str) -> float:
        return statistics.median(w[key] for w in measured)

    ms = median("server_cpu_ms_per_handshake")
    return {
        "kind": kind,
        "handshakes": total,
        "errors": failed,
        "stray_datagrams": endpoint.stray,
        "seconds": sum(w["seconds"] for w in measured),
        "wall_per_second": median("wall_per_second"),
        "server_cpu_share": median("server_cpu_share"),
        "generator_cpu_share": median("generator_cpu_share"),
        "server_cpu_ms_per_handshake": ms if total else None,
        "server_cpu_bound_per_second": 1000 / ms if total and ms else None,
        "windows": measured,
        "concurrency": concurrency,
        "method": "over the wire, server busy: a lean generator (one UDP socket, the outer "
                  "requests encoded directly, the client DTLS engine) makes full handshakes "
                  "straight to coap-server (coap://, no proxy); the server's CPU from /proc; "
                  "medians of back-to-back windows",
    }


__all__ = ["rate_sustained"]

