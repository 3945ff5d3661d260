"""The Layer 0 handshake: bytes per flight and in total, round trips, and how many per second.

Sizes and round trips come from the in-memory driver (:mod:`.inmem`), which makes the same
outer exchanges as :class:`~coaplayers.layer0.Layer0Client`; they are DTLS bytes (the outer
CoAP payloads). The CoAP and UDP bytes around them, through a real proxy, are in the wire
section (``e2e_handshake``).

Handshakes per second at the server are measured two ways:

* in process: the CPU time (of this thread, so other processes on the machine do not count)
  spent inside :class:`Layer0ServerCore` (entry, datagram, pull: the server's CoAP-independent work,
  DTLS included) for full certificate handshakes, in batches;
* over the wire: concurrent :class:`Layer0Client` handshakes straight to coap-server, with
  the server process's CPU time per handshake read from /proc. The client runs on the same
  two cores, so the wall-clock rate is the client's limit as much as the server's; the
  server's CPU per handshake says what one core of server sustains.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from coaplayers.dtls import records

from .inmem import Exchange, Peers, handshake
from .procs import cpu_of

HANDSHAKE_NAMES = {
    0: "HelloRequest", 1: "ClientHello", 2: "ServerHello", 3: "HelloVerifyRequest",
    4: "NewSessionTicket", 11: "Certificate", 12: "ServerKeyExchange",
    13: "CertificateRequest", 14: "ServerHelloDone", 15: "CertificateVerify",
    16: "ClientKeyExchange", 20: "Finished",
}


def _describe(payload: bytes) -> list[str]:
    names = []
    for rec in records.split_records(payload) if payload else []:
        ctype = records.content_type(rec)
        if ctype == records.CONTENT_CHANGE_CIPHER_SPEC:
            names.append("ChangeCipherSpec")
        elif ctype == records.CONTENT_HANDSHAKE and records.epoch(rec) == 0:
            names.append(HANDSHAKE_NAMES.get(rec[records.HEADER_LEN], f"type {rec[13]}"))
        elif ctype == records.CONTENT_HANDSHAKE:
            names.append("Finished (encrypted)")
        elif ctype == records.CONTENT_ALERT:
            names.append("Alert")
        else:
            names.append("ApplicationData")
    return names


def _message_bytes(payload: bytes, into: dict[str, int]) -> None:
    for rec, name in zip(records.split_records(payload) if payload else [], _describe(payload),
                         strict=True):
        into[name] = into.get(name, 0) + len(rec)


def profile(exchanges: list[Exchange], resumed: bool) -> dict[str, Any]:
    """Flights (consecutive records from one side), totals and round trips of one handshake."""
    flights: list[dict[str, Any]] = []
    per_message: dict[str, int] = {}
    for ex in exchanges:
        for side, payload, tag in (("client", ex.up, ex.tag), ("server", ex.down, 0)):
            if not payload and not tag:
                continue
            _message_bytes(payload, per_message)
            messages = _describe(payload)
            if tag:  # the handshake tag counts: it is in the outer payload
                per_message["handshake tag"] = per_message.get("handshake tag", 0) + tag
                messages = ["handshake tag", *messages]
            if flights and flights[-1]["from"] == side:
                flights[-1]["bytes"] += len(payload) + tag
                flights[-1]["datagrams"] += 1
                flights[-1]["messages"] += messages
            else:
                flights.append({"from": side, "bytes": len(payload) + tag, "datagrams": 1,
                                "messages": messages})
    cookie = bool(exchanges) and "HelloVerifyRequest" in _describe(exchanges[0].down)
    rts = len(exchanges)
    return {
        "resumed": resumed,
        "flights": flights,
        "total_bytes": sum(f["bytes"] for f in flights),
        "client_bytes": sum(f["bytes"] for f in flights if f["from"] == "client"),
        "server_bytes": sum(f["bytes"] for f in flights if f["from"] == "server"),
        "bytes_per_message": per_message,
        "round_trips": rts,
        "cookie_exchange": cookie,
        "round_trips_beyond_cookie": rts - 1 if cookie else rts,
        "exchanges": [
            {"up": len(e.up) + e.tag, "down": len(e.down), "code": str(e.code),
             "up_messages": _describe(e.up), "down_messages": _describe(e.down)}
            for e in exchanges
        ],
    }


def profiles(creds: Any = None) -> dict[str, Any]:
    peers = Peers(creds)
    out: dict[str, Any] = {}
    core = peers.core("psk")
    r = handshake(core, peers.client("psk"), ("2001:db8::1", 1))
    out["psk"] = profile(r.exchanges, r.resumed)
    core = peers.core("cert")
    first = peers.client("cert")
    r = handshake(core, first, ("2001:db8::1", 2))
    out["certificate"] = profile(r.exchanges, r.resumed)
    state = first.resumption_state
    first.close()  # an orderly end: OpenSSL keeps the session resumable
    r = handshake(core, peers.client("cert", resume=state), ("2001:db8::1", 3))
    if not r.resumed:
        raise RuntimeError("the resumed handshake was a full one")
    out["resumed"] = profile(r.exchanges, r.resumed)
    core = peers.core("rpk")
    r = handshake(core, peers.client("rpk"), ("2001:db8::1", 4))
    out["rpk"] = profile(r.exchanges, r.resumed)
    out["method"] = ("in-process Layer0ServerCore and client engine; bytes are the DTLS records "
                     "(outer CoAP payloads); round trips are outer CoAP exchanges")
    return out


def rate_in_process(batches: int, per_batch: int, creds: Any = None,
                    kind: str = "cert") -> dict[str, Any]:
    """Full handshakes per second of server time (Layer0ServerCore calls only); ``kind`` is
    ``cert`` (X.509, OpenSSL) or ``rpk`` (raw public keys, GnuTLS)."""
    peers = Peers(creds)
    rates: list[float] = []
    n = 0
    for _ in range(batches):
        core = peers.core(kind, max_sessions=per_batch + 1)
        server = 0.0
        for _ in range(per_batch):
            n += 1
            client = peers.client(kind)
            server += handshake(core, client, ("2001:db8::3", n)).server_seconds
            client.abort()
        core.close_all()
        rates.append(per_batch / server)
    return {
        "handshakes": batches * per_batch,
        "batch_rates": rates,
        "per_second": statistics.median(rates),
        "server_ms_per_handshake": 1000 / statistics.median(rates),
        "method": "in-process: thread CPU time inside Layer0ServerCore (DTLS included, CoAP"
                  " excluded), "
                  f"median of {batches} batches of {per_batch}, sessions up to {per_batch}",
    }


async def rate_over_wire(server_coap: str, creds: Any, server_pid: int, *, seconds: float,
                         concurrency: int = 8) -> dict[str, Any]:
    """Full certificate handshakes straight to coap-server (plain CoAP, no proxy)."""
    import aiocoap

    from coaplayers.layer0 import Layer0Client

    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    loop = asyncio.get_running_loop()
    done = 0
    errors = 0
    stop_at = 0.0

    async def worker() -> None:
        nonlocal done, errors
        while loop.time() < stop_at:
            channel = Layer0Client(ctx, server_coap, creds)  # fresh: no resumption
            try:
                async with asyncio.timeout(30):
                    await channel.connect()
                done += 1
            except Exception:  # counted
                errors += 1
            channel.forget_session()  # no DELETE: the server keeps it until evicted (LRU)

    try:
        # warm-up: the first handshakes load certificates and fill caches
        stop_at = loop.time() + min(1.0, seconds / 3)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        done = errors = 0
        cpu0 = cpu_of(server_pid)
        t0 = loop.time()
        stop_at = t0 + seconds
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = loop.time() - t0
        cpu = cpu_of(server_pid) - cpu0
    finally:
        await ctx.shutdown()
    return {
        "handshakes": done,
        "errors": errors,
        "seconds": elapsed,
        "wall_per_second": done / elapsed if elapsed else 0.0,
        "server_cpu_share": cpu / elapsed if elapsed else 0.0,
        "server_cpu_ms_per_handshake": 1000 * cpu / done if done else None,
        "server_cpu_bound_per_second": done / cpu if cpu else None,
        "concurrency": concurrency,
        "method": "over the wire: Layer0Client certificate handshakes straight to coap-server "
                  "(coap://, no proxy); the server's CPU seconds from /proc",
    }
