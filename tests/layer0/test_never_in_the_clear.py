"""Fail closed at Layer 0: the inner request and answer never cross the wire in the clear,
whichever request interface aiocoap hands the outer messages to (the inner message is
encrypted before aiocoap sees anything). A recording relay stands between client and origin
and keeps every datagram of the handshake and the exchange."""

from __future__ import annotations

import asyncio
from typing import Any

import aiocoap
import pytest

from coaplayers.layer0 import Layer0Client

from .tamper import TamperRelay

SECRET = b"inner secret 7f3a"


class RecordingRelay(TamperRelay):
    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(upstream)
        self.seen: list[tuple[str, bytes]] = []

    def _maybe_flip(self, direction: str, data: bytes) -> bytes:
        self.seen.append((direction, data))
        return super()._maybe_flip(direction, data)


@pytest.mark.parametrize("order", ["as-built", "reversed"])
async def test_inner_messages_never_in_the_clear(
    start_origin: Any, client_context: aiocoap.Context, order: str,
) -> None:
    origin = await start_origin("psk")
    relay = RecordingRelay(origin.address)
    host, port = await relay.start()
    if order == "reversed":  # another interface choice: ask the transports the other way round
        client_context.request_interfaces.reverse()
    channel = Layer0Client(client_context, f"coap://{host}:{port}", origin.creds.client)
    try:
        response = await asyncio.wait_for(channel.request(aiocoap.Message(
            code=aiocoap.POST, uri_path=["echo"], payload=SECRET)).response, 20)
    finally:
        await channel.close()
        relay.close()
    assert response.code == aiocoap.CHANGED and SECRET in response.payload
    assert {d for d, _ in relay.seen} == {"up", "down"}
    for direction, datagram in relay.seen:
        assert SECRET not in datagram, direction
        outer = aiocoap.Message.decode(datagram)
        assert "echo" not in outer.opt.uri_path  # the inner path travels encrypted too
