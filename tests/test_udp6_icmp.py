"""aiocoap's udp6 and ICMP errors: one peer's error must not drop a datagram to another
(coaplayers._aiocoap.install_send_error_fix, installed with coaplayers.message)."""

from __future__ import annotations

import asyncio

import aiocoap
from aiocoap import GET, NON, Message

import coaplayers.message  # noqa: F401  (installs the fix, as every program does)
from tests.conftest import UdpCollector, free_udp_port


async def test_an_icmp_error_from_one_peer_does_not_drop_the_next_datagram_to_another() -> None:
    """On loopback the closed port's ICMP error is back before the next send, which Linux
    then fails with it: that datagram (to a live peer) was lost and the live peer blamed."""
    loop = asyncio.get_running_loop()
    live_transport, live = await loop.create_datagram_endpoint(
        UdpCollector, local_addr=("127.0.0.1", 0))
    live_port = live_transport.get_extra_info("sockname")[1]
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        (ri,) = ctx.request_interfaces
        mman = ri.token_interface
        udp6 = mman.message_interface
        errors: list[tuple[object, object]] = []
        mman.dispatch_error = lambda exc, remote: errors.append((exc, remote))
        messages = []
        for i, port in enumerate((free_udp_port(), live_port) * 3):
            m = Message(code=GET, uri=f"coap://127.0.0.1:{port}/p{i}")
            m.mtype, m.mid, m.token = NON, 0x100 + i, bytes([i])
            m.remote = await udp6.determine_remote(m)
            messages.append(m)
        for m in messages:  # one synchronous burst: no chance to read the error queue between
            udp6.send(m)
        got = [Message.decode(await asyncio.wait_for(live.queue.get(), 2)) for _ in range(3)]
        assert [m.opt.uri_path for m in got] == [("p1",), ("p3",), ("p5",)]
        # The errors dispatched while sending name the closed port, never the live one.
        assert all(r.sockaddr[1] != live_port for _, r in errors), errors  # type: ignore[attr-defined]
    finally:
        await ctx.shutdown()
        live_transport.close()
