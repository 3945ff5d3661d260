"""Bytes on the wire: a recording relay on each hop, a fresh client per mode, N requests.

Hop 1 is client -> proxy, hop 2 is proxy -> server; each has a
:class:`~coaplayers_tools.relay.FaultRelay` (no faults, ``record=`` a capture file) in front of the
next node. The client is told to use relay 1 as its proxy and relay 2's address as the origin,
so the proxy forwards to relay 2. Sizes are UDP payloads (add 28 bytes of IPv4 + UDP headers
per datagram for the IP packet size). Handshakes and warm-up requests happen before the
measured window, which is cut out of the capture by line counts.

For the Layer 0 and OSCORE modes the end-to-end handshake (or the OSCORE keying: the Layer 0
handshake whose last two flights carry it, docs/OSCORE-KEYING.md 9.1) is recorded on its own, and on
plain hops its datagrams are decoded as CoAP to separate CoAP from DTLS bytes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..relay import FaultRelay
from ..relay.capture import read_capture
from ..relay.faults import Direction
from .clients import MODES, WIRE_ONLY, Endpoints, open_client


@dataclass
class Window:
    up_datagrams: int
    up_bytes: int
    down_datagrams: int
    down_bytes: int
    coap_requests: int  # CON/NON requests seen going up (plain hops only; else None)

    def as_dict(self, n: int) -> dict[str, Any]:
        return {
            "requests": n,
            "up_datagrams_per_request": self.up_datagrams / n,
            "up_bytes_per_request": self.up_bytes / n,
            "down_datagrams_per_request": self.down_datagrams / n,
            "down_bytes_per_request": self.down_bytes / n,
        }


def _count(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _window(path: Path, start: int, end: int) -> tuple[Window, list[Any]]:
    grams = read_capture(path)[start:end]
    up = [g for g in grams if g.direction is Direction.UP]
    down = [g for g in grams if g.direction is Direction.DOWN]
    requests = 0
    for g in up:
        if len(g.data) >= 4 and g.data[0] >> 6 == 1 and 1 <= g.data[1] < 32:
            requests += 1
    return Window(len(up), sum(len(g.data) for g in up), len(down),
                  sum(len(g.data) for g in down), requests), grams


def _addr(uri: str) -> tuple[str, int]:
    parts = urlsplit(uri)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _decode_coap(grams: list[Any]) -> list[dict[str, Any]]:
    """Each datagram of a plain-CoAP hop: direction, size, code, payload size (DTLS bytes)."""
    from aiocoap import Message

    out = []
    for g in grams:
        try:
            msg = Message.decode(g.data)
        except Exception:  # not CoAP (a DTLS hop)
            out.append({"dir": g.direction.value, "bytes": len(g.data), "coap": None})
            continue
        out.append({
            "dir": g.direction.value, "bytes": len(g.data), "code": str(msg.code),
            "mtype": str(msg.mtype), "payload": len(msg.payload),
            "path": "/".join(msg.opt.uri_path),
        })
    return out


async def _plain_post(ctx: Any, via: str, origin: str) -> None:
    import aiocoap
    from aiocoap.proxy.client import ProxyForwarder

    from .clients import PAYLOAD

    msg = aiocoap.Message(code=aiocoap.POST, uri=f"{origin}/echo", payload=PAYLOAD)
    await ProxyForwarder(via, ctx).request(msg).response


async def measure_mode(
    mode: str, ep: Endpoints, workdir: Path, *, requests: int
) -> dict[str, Any]:
    info = MODES.get(mode) or WIRE_ONLY[mode]
    hop_secure = info.hop1 != "none"
    if mode == "aio_plain" or mode == "aio_oscore":
        proxy_uri, origin_uri = ep.aio_proxy, ep.aio_server
    elif mode == "aio_via_coap_proxy":
        proxy_uri, origin_uri = ep.proxy_coap, ep.aio_server
    elif hop_secure:
        proxy_uri, origin_uri = ep.proxy_coaps, ep.server_coaps
    else:
        proxy_uri, origin_uri = ep.proxy_coap, ep.server_coap
    scheme = "coaps" if hop_secure else "coap"
    cap1, cap2 = workdir / f"wire-{mode}-hop1.cap", workdir / f"wire-{mode}-hop2.cap"
    relay2 = FaultRelay(upstream=_addr(origin_uri), record=cap2)
    relay1 = FaultRelay(upstream=_addr(proxy_uri), record=cap1)
    async with relay2, relay1:
        via = f"{scheme}://127.0.0.1:{relay1.address[1]}"
        origin = f"{scheme}://127.0.0.1:{relay2.address[1]}"
        client = await asyncio.wait_for(open_client(mode, ep, proxy=via, origin=origin), 30)
        try:
            handshake: dict[str, Any] | None = None
            requester = client._requester
            connect = None
            if hasattr(requester, "channel"):
                connect = requester.channel.connect
            elif hasattr(requester, "requester"):
                connect = requester.requester.key
            if connect is not None:
                if hop_secure:
                    # Layer 1 first, with one unprotected request through the same context:
                    # the hop handshakes are not part of the end-to-end figures.
                    await asyncio.wait_for(_plain_post(client._ctx.context, via, origin), 30)
                a1, a2 = _count(cap1), _count(cap2)
                await asyncio.wait_for(connect(), 30)
                b1, b2 = _count(cap1), _count(cap2)
                w1, g1 = _window(cap1, a1, b1)
                w2, _ = _window(cap2, a2, b2)
                handshake = {
                    "hop1": {"up_datagrams": w1.up_datagrams, "up_bytes": w1.up_bytes,
                             "down_datagrams": w1.down_datagrams, "down_bytes": w1.down_bytes,
                             "total_bytes": w1.up_bytes + w1.down_bytes},
                    "hop2": {"up_bytes": w2.up_bytes, "down_bytes": w2.down_bytes,
                             "total_bytes": w2.up_bytes + w2.down_bytes},
                }
                if not hop_secure:
                    decoded = _decode_coap(g1)
                    handshake["hop1"]["exchanges"] = sum(1 for d in decoded if d["dir"] == "up")
                    handshake["hop1"]["dtls_bytes"] = sum(d.get("payload", 0) for d in decoded)
                    handshake["hop1"]["datagrams"] = decoded
            for _ in range(3):
                await asyncio.wait_for(client.post(), 30)
            a1, a2 = _count(cap1), _count(cap2)
            for _ in range(requests):
                await asyncio.wait_for(client.post(), 30)
            await asyncio.sleep(0.05)  # a late separate ACK would belong to the window
            b1, b2 = _count(cap1), _count(cap2)
        finally:
            await client.close()
    w1, g1 = _window(cap1, a1, b1)
    w2, g2 = _window(cap2, a2, b2)
    out: dict[str, Any] = {
        "mode": mode,
        "label": info.label,
        "hop1": w1.as_dict(requests),
        "hop2": w2.as_dict(requests),
    }
    if handshake is not None:
        out["e2e_handshake"] = handshake
    if not hop_secure:
        out["hop1_sample"] = _decode_coap(g1[:2])
        out["hop2_sample"] = _decode_coap(g2[:2])
    return out
