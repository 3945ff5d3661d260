"""Layer 0 end to end through real, independent proxies (aiocoap-proxy and libcoap's proxy).

Topology: Layer0Client -> [proxy subprocess] -> [relay] -> in-process origin (Layer0Site).
The relay between proxy and origin is where the proxy's view of the traffic is recorded or
tampered with.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiocoap
import pytest
from aiocoap import GET, POST, Message
from aiocoap.numbers.codes import Code

from coaplayers.layer0 import RecordRejected, ResponseRejected
from coaplayers_tools.relay import FaultRelay, Faults, read_capture

from .apps import ECHO_MARKER, OBS_MARKER, TEXT_MARKER
from .conftest import FastTuning, LossTuning, channel
from .tamper import TamperRelay

pytestmark = pytest.mark.slow
T = 30.0  # bound of any single step


async def observe_three(ch, counter) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Observe /counter inside Layer 0; the test bumps it after each notification arrives."""
    req = ch.request(Message(code=GET, uri_path=["counter"], observe=0))
    first = await asyncio.wait_for(req.response, T)
    assert first.opt.observe is not None, "the inner observation was not established"
    seen = [first.payload]

    async def collect() -> None:
        counter.bump()
        async for note in req.observation:
            seen.append(note.payload)
            if len(seen) == 4:
                return
            counter.bump()

    await asyncio.wait_for(collect(), T)
    req.observation.cancel()
    return seen


@pytest.mark.parametrize("mode", ["psk", "cert"])
async def test_get_post_observe_through_proxy_and_nothing_leaks(
    proxy_kind, mode, start_origin, start_proxy, client_context, tmp_path: Path
):
    origin = await start_origin(mode)
    capture = tmp_path / "proxy-to-origin.capture"
    async with FaultRelay(upstream=origin.address, record=capture) as relay:
        proxy = await start_proxy(proxy_kind)
        host, port = relay.address
        ch = channel(client_context, f"coap://{host}:{port}", origin.creds, proxy=proxy.uri)

        text = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
        assert text.code == Code.CONTENT and text.payload == b"hello " + TEXT_MARKER

        body = (ECHO_MARKER + bytes(range(256))) * 11  # 2992 bytes
        body += ECHO_MARKER[: 3000 - len(body)]
        assert len(body) == 3000
        echo = await asyncio.wait_for(
            ch.request(Message(code=POST, uri_path=["echo"], payload=body)).response, T
        )
        assert echo.code == Code.CHANGED and echo.payload == body

        notes = await observe_three(ch, origin.resources["counter"])
        assert notes == [OBS_MARKER + b" %d" % i for i in range(4)]
        assert ch.handshakes == 1
        await ch.close()
        tunnel = read_capture(capture)  # line buffered: complete up to here

        # A control: a plain request over the same hop shows the capture would see plaintext.
        plain = Message(code=GET, uri_path=["public", "text"])
        plain.remote = aiocoap.message.UndecidedRemote.from_pathless_uri(proxy.uri)
        plain.opt.proxy_scheme = "coap"
        plain.opt.uri_host, plain.opt.uri_port = host, port
        control = await asyncio.wait_for(client_context.request(plain).response, T)
        assert TEXT_MARKER in control.payload

    assert len(tunnel) > 20
    tunnel_bytes = b"".join(d.data for d in tunnel)
    for marker in (TEXT_MARKER, ECHO_MARKER, OBS_MARKER, b"counter", b"echo", b"text"):
        assert marker not in tunnel_bytes, f"{marker!r} crossed the proxy's hop in clear"
    assert b"atls" in tunnel_bytes  # the outer path is visible, and only that
    everything = b"".join(d.data for d in read_capture(capture))
    assert TEXT_MARKER in everything  # the control request did cross in clear


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_flipped_byte_is_rejected_never_answered(
    direction, start_origin, start_proxy, client_context
):
    origin = await start_origin("psk")
    tamper = TamperRelay(origin.address)
    host, port = await tamper.start()
    try:
        proxy = await start_proxy("aiocoap")
        ch = channel(client_context, f"coap://{host}:{port}", origin.creds, proxy=proxy.uri)
        first = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
        assert first.payload == b"hello " + TEXT_MARKER

        echo = origin.resources["echo"]
        tamper.flip_next(direction)
        req = ch.request(Message(code=POST, uri_path=["echo"], payload=ECHO_MARKER * 4))
        expected = RecordRejected if direction == "up" else ResponseRejected
        with pytest.raises(expected):
            await asyncio.wait_for(req.response, T)
        assert tamper.flipped[direction] == 1
        # An altered request is never executed; an altered answer is never delivered.
        assert echo.calls == (0 if direction == "up" else 1)

        # The session survives the attack: the next request works without a new handshake.
        again = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
        assert again.payload == b"hello " + TEXT_MARKER
        assert ch.handshakes == 1
        await ch.close()
    finally:
        tamper.close()


async def test_recorded_request_sent_again_is_rejected(
    start_origin, start_proxy, client_context, tmp_path: Path
):
    origin = await start_origin("psk")
    capture = tmp_path / "replay.capture"
    async with FaultRelay(upstream=origin.address, record=capture) as relay:
        proxy = await start_proxy("aiocoap")
        host, port = relay.address
        ch = channel(client_context, f"coap://{host}:{port}", origin.creds, proxy=proxy.uri)
        await asyncio.wait_for(ch.connect(), T)
        resp = await asyncio.wait_for(
            ch.request(Message(code=POST, uri_path=["echo"], payload=b"pay once")).response, T
        )
        assert resp.payload == b"pay once"
        echo = origin.resources["echo"]
        assert echo.calls == 1

    # The attacker on the proxy-origin hop replays the last tunnel POST it saw (the echo),
    # with a fresh message ID and token so that CoAP deduplication does not mask the replay.
    posts = []
    for d in read_capture(capture):
        if d.direction.value != "up":
            continue
        m = aiocoap.Message.decode(d.data)
        if m.code == POST and m.payload and len(m.opt.uri_path) == 1:  # a session: /~<sid>
            posts.append(m)
    recorded = posts[-1]
    replay = Message(code=POST, payload=recorded.payload, uri_path=recorded.opt.uri_path)
    replay.opt.content_format = recorded.opt.content_format
    replay.remote = aiocoap.message.UndecidedRemote("coap", f"127.0.0.1:{origin.port}")
    replay.transport_tuning = FastTuning()
    answer = await asyncio.wait_for(client_context.request(replay).response, T)
    # refused as a record that does not authenticate is: like an unknown name
    assert (answer.code, answer.payload) == (Code.NOT_FOUND, b"unknown session")
    assert echo.calls == 1, "the replayed request was executed again"

    # The same bytes sent again unchanged (same message ID): CoAP deduplication answers, the
    # resource still runs once.
    raw = [d.data for d in read_capture(capture) if d.direction.value == "up"]
    assert echo.calls == 1 and raw
    await ch.close()


async def test_proxy_restart_keeps_the_layer0_session(
    proxy_kind, start_origin, start_proxy, client_context
):
    origin = await start_origin("psk")
    proxy = await start_proxy(proxy_kind)
    ch = channel(client_context, f"coap://127.0.0.1:{origin.port}", origin.creds, proxy=proxy.uri)
    one = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
    assert one.code == Code.CONTENT
    path = ch.session_path

    await proxy.restart()
    assert proxy.starts == 2

    two = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
    assert two.payload == b"hello " + TEXT_MARKER
    assert ch.handshakes == 1 and ch.session_path == path
    assert origin.layer0 is not None and origin.layer0.core.stats.handshakes == 1
    await ch.close()


def leave_tcp_time_wait(port: int) -> None:
    """A loopback TCP connection whose local port is ``port``, closed first by that side: it
    keeps the port in TIME_WAIT for a minute, as any outgoing loopback connection on this
    machine does with its ephemeral port (which may be the number of a UDP port in use)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.socket()
        client.bind(("127.0.0.1", port))
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        client.close()
        accepted.close()


async def test_proxy_restarts_on_its_udp_port_whatever_holds_tcp_on_that_number(
    proxy_kind, start_proxy
):
    """The restart above on a port whose TCP twin was taken while the proxy was down (an
    aiocoap-proxy listening on TCP too exited at the bind; the ping then waited 15 s)."""
    proxy = await start_proxy(proxy_kind)
    await proxy.stop()
    leave_tcp_time_wait(proxy.port)
    with socket.socket() as listener, pytest.raises(OSError):  # the port's TCP twin is taken
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", proxy.port))
    await asyncio.wait_for(proxy.start(), T)
    assert proxy.starts == 2


async def test_server_restart_leads_to_a_new_handshake(start_origin, start_proxy, client_context):
    origin = await start_origin("cert")
    proxy = await start_proxy("aiocoap")
    ch = channel(client_context, f"coap://127.0.0.1:{origin.port}", origin.creds, proxy=proxy.uri)
    one = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
    assert one.code == Code.CONTENT
    old_path = ch.session_path

    await origin.restart()

    two = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
    assert two.payload == b"hello " + TEXT_MARKER
    assert ch.handshakes == 2 and ch.session_path != old_path
    assert origin.layer0 is not None and origin.layer0.core.stats.handshakes == 1
    await ch.close()


@pytest.mark.timeout(400)
async def test_fifty_requests_with_20_percent_loss_on_each_hop(
    start_origin, start_proxy, client_context
):
    """Through coap-proxy: aiocoap-proxy passes too, but it retransmits upstream after 2-3 s
    with doubling, which makes the same 50 requests take about four minutes."""
    origin = await start_origin("psk")
    loss = Faults(loss=0.2, seed=7)
    async with FaultRelay(upstream=origin.address, faults=loss) as hop2:
        proxy = await start_proxy("coaplayers", ack_timeout=LossTuning.ACK_TIMEOUT)
        async with FaultRelay(
            upstream=("127.0.0.1", proxy.port), faults=Faults(loss=0.2, seed=11)
        ) as hop1:
            h2, p2 = hop2.address
            h1, p1 = hop1.address
            ch = channel(
                client_context, f"coap://{h2}:{p2}", origin.creds, proxy=f"coap://{h1}:{p1}",
                transport_tuning=LossTuning(),
            )
            for i in range(50):
                resp = await asyncio.wait_for(
                    ch.request(Message(code=GET, uri_path=["text"])).response, 120
                )
                assert resp.payload == b"hello " + TEXT_MARKER, f"request {i}"
            assert hop1.stats.up.lost + hop1.stats.down.lost > 0
            assert hop2.stats.up.lost + hop2.stats.down.lost > 0
            await ch.close()


@pytest.mark.parametrize("mode", ["rpk", "cert", "psk"])
async def test_handshake_with_a_cookie_exchange_through_coap_proxy(
    mode, start_origin, start_proxy, client_context
):
    """The origin asks every ClientHello for a cookie, which binds to the address the request
    came from: coap-proxy must send a client's ClientHellos upstream from one place. (A raw
    public key client pads its first ClientHello with the outer Padding option only; coap-proxy
    sent that one through aiocoap's path and the second, unpadded, on its fast path, from
    another socket: the cookie never matched.)"""
    from coaplayers.layer0 import ServerLimits

    origin = await start_origin(mode, limits=ServerLimits(poll_hold=5.0, without_cookie=0))
    proxy = await start_proxy("coaplayers")
    host, port = origin.address
    ch = channel(client_context, f"coap://{host}:{port}", origin.creds, proxy=proxy.uri)
    try:
        text = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
    finally:
        await ch.close()
    assert text.code == Code.CONTENT and text.payload == b"hello " + TEXT_MARKER
    assert ch.handshakes == 1


@pytest.mark.parametrize("proxy_name", ["aiocoap", "libcoap", "coaplayers"])
async def test_a_new_upstream_port_within_the_cookie_exchange_through_each_proxy(
    proxy_name, start_origin, start_proxy, client_context
):
    """Between the proxy and an origin that always asks for a cookie, the path moves to a new
    source port right after the HelloVerifyRequest (a NAT rebinding behind the proxy): the
    cookie-bearing ClientHello gets a new HelloVerifyRequest, and the client starts over with
    a fresh ClientHello through the same, independent proxy (docs/PROTOCOL.md 3.1)."""
    from coaplayers.layer0 import ServerLimits

    origin = await start_origin("psk", limits=ServerLimits(poll_hold=5.0, without_cookie=0))
    nat = TamperRelay(origin.address)
    host, port = await nat.start()
    nat.rebind_after_answers(1)
    try:
        proxy = await start_proxy(proxy_name)
        ch = channel(client_context, f"coap://{host}:{port}", origin.creds, proxy=proxy.uri)
        try:
            text = await asyncio.wait_for(
                ch.request(Message(code=GET, uri_path=["text"])).response, T)
        finally:
            await ch.close()
    finally:
        nat.close()
    assert text.code == Code.CONTENT and text.payload == b"hello " + TEXT_MARKER
    assert ch.handshakes == 1 and len(set(nat.sources)) == 2
