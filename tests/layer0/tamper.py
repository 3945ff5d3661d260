"""A malicious middle box for the tests: a UDP relay that can flip one payload byte of the next
CoAP message in either direction. (The project's FaultRelay models an unreliable network, not
an attacker, so it has no such knob.) It can also move a client to a new source port right
after an answer, before the client's next request, as a NAT rebinding or a middle box that
sends from several sockets does (FaultRelay rebinds from the test's task, too late to come
between an answer and the request it triggers)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aiocoap


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: TamperRelay, client: tuple[Any, ...]) -> None:
        self.relay, self.client = relay, client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.relay._from_upstream(self.client, data)


class TamperRelay(asyncio.DatagramProtocol):
    """Listen on an ephemeral port, forward to ``upstream``; :meth:`flip_next` arms a flip."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None
        self._clients: dict[tuple[Any, ...], _Upstream] = {}
        self._armed = {"up": 0, "down": 0}
        self.flipped = {"up": 0, "down": 0}
        self.flip_done = asyncio.Event()
        self._rebind_armed = 0
        self.sources: list[tuple[Any, ...]] = []
        """Every upstream-side address the relay has sent from, in order."""

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def close(self) -> None:
        for up in self._clients.values():
            if up.transport is not None:
                up.transport.close()
        if self.transport is not None:
            self.transport.close()

    def flip_next(self, direction: str, min_payload: int = 16) -> None:
        """Flip one byte in the middle of the next payload of at least ``min_payload`` bytes."""
        self.flip_done.clear()
        self._armed[direction] = min_payload

    def rebind_after_answers(self, count: int) -> None:
        """Each of the next ``count`` answers, once passed on, moves its client to a new
        upstream socket: the upstream sees the client's next request from a new port."""
        self._rebind_armed = count

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        asyncio.get_running_loop().create_task(self._to_upstream(addr, data))

    async def _to_upstream(self, client: tuple[Any, ...], data: bytes) -> None:
        up = self._clients.get(client)
        if up is None:
            loop = asyncio.get_running_loop()
            _, proto = await loop.create_datagram_endpoint(
                lambda: _Upstream(self, client), remote_addr=self.upstream
            )
            up = self._clients.setdefault(client, cast(_Upstream, proto))
            assert up.transport is not None
            self.sources.append(up.transport.get_extra_info("sockname"))
        assert up.transport is not None
        up.transport.sendto(self._maybe_flip("up", data))

    def _from_upstream(self, client: tuple[Any, ...], data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(self._maybe_flip("down", data), client)
        if self._rebind_armed:
            self._rebind_armed -= 1
            up = self._clients.pop(client)
            if up.transport is not None:
                up.transport.close()

    def _maybe_flip(self, direction: str, data: bytes) -> bytes:
        need = self._armed[direction]
        if not need:
            return data
        try:
            msg = aiocoap.Message.decode(data)
        except Exception:
            return data
        if len(msg.payload) < need:
            return data
        payload = bytearray(msg.payload)
        payload[len(payload) // 2] ^= 0x01
        index = data.rindex(bytes(msg.payload))
        self._armed[direction] = 0
        self.flipped[direction] += 1
        self.flip_done.set()
        return data[:index] + bytes(payload) + data[index + len(payload) :]
