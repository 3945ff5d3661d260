"""Layer 0 client and server over real UDP on loopback, no proxy: identity, policy,
concurrency, resumption, limits and failure reporting."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiocoap import GET, POST, Message
from aiocoap.numbers.codes import Code

from coaplayers.dtls import PskClientCredentials, TicketStore, TinyDtlsSession, build_context
from coaplayers.layer0 import (
    HandshakeFailed,
    Layer0Client,
    Layer0Config,
    NoAnswer,
    OuterError,
    Policy,
    ServerLimits,
    SessionLost,
)
from coaplayers.layer0.server import layer0_config

from .apps import OBS_MARKER, TEXT_MARKER
from .conftest import FastTuning, channel
from .tamper import TamperRelay

T = 20.0


async def test_identity_policy_and_plain_access(start_origin, client_context):
    policy = Policy.build(protected=["/text", "/whoami"], grants={"device-psk-1": ["/whoami"]})
    origin = await start_origin("psk", policy=policy)
    uri = f"coap://127.0.0.1:{origin.port}"
    ch = channel(client_context, uri, origin.creds)
    who = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["whoami"])).response, T)
    assert who.payload == b"device-psk-1"
    denied = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
    assert denied.code == Code.FORBIDDEN
    tunnel = Message(code=GET, uri_path=[".well-known", "atls"])
    assert (await asyncio.wait_for(ch.request(tunnel).response, T)).code == Code.FORBIDDEN
    plain = await client_context.request(Message(code=GET, uri=f"{uri}/text")).response
    assert plain.code == Code.UNAUTHORIZED
    public = await client_context.request(Message(code=GET, uri=f"{uri}/public/text")).response
    assert public.code == Code.CONTENT  # not protected: served plainly as before
    await ch.close()
    assert origin.layer0.core.sessions == {}  # close_notify ended it on the server


@pytest.mark.parametrize("mode", ["psk", "cert"])
async def test_concurrent_requests_share_one_session(start_origin, client_context, mode):
    """Certificates false-start: one request carries the client's last flight, the others
    wait for its answer instead of sending the flight beside it (docs/PROTOCOL.md 3.3)."""
    origin = await start_origin(mode)
    ch = channel(client_context, f"coap://127.0.0.1:{origin.port}", origin.creds)
    reqs = [ch.request(Message(code=GET, uri_path=["text"])) for _ in range(20)]
    posts = [
        ch.request(Message(code=POST, uri_path=["echo"], payload=b"n%d" % i)) for i in range(10)
    ]
    got = await asyncio.wait_for(asyncio.gather(*(r.response for r in reqs + posts)), T)
    assert all(r.payload == b"hello " + TEXT_MARKER for r in got[:20])
    assert [r.payload for r in got[20:]] == [b"n%d" % i for i in range(10)]
    assert ch.handshakes == 1 and origin.layer0.core.stats.handshakes == 1
    await ch.close()


async def test_certificate_mode_resumes_across_channels(start_origin, client_context):
    origin = await start_origin("cert")
    tickets = TicketStore()
    shared = build_context(origin.creds.client, server=False)
    uri = f"coap://127.0.0.1:{origin.port}"
    config = Layer0Config(transport_tuning=FastTuning())
    first = Layer0Client(
        client_context, uri, origin.creds.client, config=config, tickets=tickets, ssl_context=shared
    )
    assert (await asyncio.wait_for(first.connect(), T)).resumed is False
    assert first.last_handshake.peer_identity == "origin.test"
    key = first.export_keying_material(b"EXPORTER-test", 16)
    await first.close()
    second = Layer0Client(
        client_context, uri, origin.creds.client, config=config, tickets=tickets, ssl_context=shared
    )
    r = await asyncio.wait_for(second.request(Message(code=GET, uri_path=["whoami"])).response, T)
    assert r.payload == b"device-cert-1"
    assert second.last_handshake.resumed is True
    assert second.export_keying_material(b"EXPORTER-test", 16) != key
    assert origin.layer0.core.stats.resumed == 1
    await second.close()


async def test_evicted_session_non_idempotent_is_not_resent(start_origin, client_context):
    origin = await start_origin("psk", limits=ServerLimits(max_sessions=1, poll_hold=2.0))
    uri = f"coap://127.0.0.1:{origin.port}"
    a, b = channel(client_context, uri, origin.creds), channel(client_context, uri, origin.creds)
    await asyncio.wait_for(a.connect(), T)
    await asyncio.wait_for(b.connect(), T)  # evicts a's session (least recently used)
    assert origin.layer0.core.stats.evicted == 1
    echo = origin.resources["echo"]
    with pytest.raises(SessionLost):
        await asyncio.wait_for(
            a.request(Message(code=POST, uri_path=["echo"], payload=b"x")).response, T
        )
    assert echo.calls == 0
    again = await asyncio.wait_for(a.request(Message(code=GET, uri_path=["text"])).response, T)
    assert again.code == Code.CONTENT and a.handshakes == 2
    await a.close()
    await b.close()


async def test_wrong_psk_fails_with_a_useful_error(start_origin, client_context):
    origin = await start_origin("psk")
    wrong = PskClientCredentials(b"device-psk-1", b"not-the-right-k!")
    config = Layer0Config(transport_tuning=FastTuning(), handshake_timeout=5.0)
    ch = Layer0Client(client_context, f"coap://127.0.0.1:{origin.port}", wrong, config=config)
    with pytest.raises(HandshakeFailed) as info:
        await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
    assert "wrong key" in str(info.value)
    assert origin.resources["text"].calls == 0
    await ch.close()


async def test_silent_server_is_no_answer_not_a_key_problem(start_origin, client_context):
    """A bound socket that never answers (a wrong port, a stopped server): after the handshake
    timeout the error says nobody answered, naming the first hop, instead of blaming loss or
    the key. A server that answered our ClientHello still gets the handshake failure."""
    config = Layer0Config(transport_tuning=FastTuning(), handshake_timeout=2.0)
    origin = await start_origin("psk")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        direct = Layer0Client(client_context, f"coap://127.0.0.1:{port}", origin.creds.client,
                               config=config)
        via = Layer0Client(client_context, f"coap://127.0.0.1:{origin.port}",
                            origin.creds.client, proxy=f"coap://127.0.0.1:{port}",
                            config=config)

        async def unanswered(ch: Layer0Client, hop: str) -> None:
            with pytest.raises(NoAnswer) as info:
                await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response,
                                       T)
            assert f"no answer from {hop}" in str(info.value)
            assert isinstance(info.value, OuterError)
            assert isinstance(info.value.__cause__, TimeoutError)
            await ch.close()

        # Both wait out the handshake timeout at once.
        await asyncio.gather(unanswered(direct, f"coap://127.0.0.1:{port}"),
                             unanswered(via, "the proxy coap://"))
    wrong = PskClientCredentials(b"device-psk-1", b"not-the-right-k!")
    ch = Layer0Client(client_context, f"coap://127.0.0.1:{origin.port}", wrong, config=config)
    with pytest.raises(HandshakeFailed):
        await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
    await ch.close()


async def test_half_open_limit_evicts_the_oldest_handshake(start_origin, client_context):
    origin = await start_origin("psk", limits=ServerLimits(max_half_open=1))
    core = origin.layer0.core
    # One slot taken by a stuck handshake (a client that never goes on; a PSK ClientHello is
    # answered at once, without a cookie exchange).
    now = asyncio.get_running_loop().time()  # the server's clock
    stuck = TinyDtlsSession.client(origin.creds.client, layer0_config())
    stuck.connect(now)
    peer = ("coap", "192.0.2.9:5683")
    assert core.entry(peer, stuck.datagrams_to_send()[0], now).code == Code.CREATED
    assert core.half_open_count == 1
    ch = channel(client_context, f"coap://127.0.0.1:{origin.port}", origin.creds)
    resp = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
    assert resp.payload == b"hello " + TEXT_MARKER
    assert core.stats.half_open_evicted == 1 and core.half_open_count == 0
    await ch.close()


async def test_requests_cost_40_bytes_over_plain_coap_for_ever(
    start_origin, client_context, tmp_path
):
    """docs/PROTOCOL.md 2 and 4.1: one 7-byte session path, no Content-Format, 1-byte inner
    tokens that come back to the pool; so 300 requests (more than 256 tokens) all cost the
    same, 40 bytes over the same request sent plainly (29 of them the DTLS record)."""
    from aiocoap.numbers.types import Type

    from coaplayers.layer0 import inner
    from coaplayers_tools.relay import FaultRelay, read_capture

    origin = await start_origin("psk")
    capture = tmp_path / "wire.capture"
    async with FaultRelay(upstream=origin.address, record=capture) as relay:
        host, port = relay.address
        ch = channel(client_context, f"coap://{host}:{port}", origin.creds)
        await asyncio.wait_for(ch.connect(), T)
        for i in range(300):
            msg = Message(code=POST, uri_path=["echo"], payload=b"%040d" % i)
            assert (await asyncio.wait_for(ch.request(msg).response, T)).payload == b"%040d" % i
    ups = [d.data for d in read_capture(capture) if d.direction.value == "up"]
    sessions = [
        (len(d), m) for d in ups
        if len((m := Message.decode(d)).opt.uri_path) == 1 and m.payload[:1] == b"\x17"
    ]
    assert len(sessions) == 300
    record = 29 + len(inner.encode(b"\x01", Message(code=POST, uri_path=["echo"],
                                                   payload=b"%040d" % 0)))
    assert {len(m.payload) for _, m in sessions} == {record}

    def sent_plainly(outer: Message) -> int:
        """The same request without Layer 0, with the outer token it went with (aiocoap's
        tokens count up from a random start: now and then one more byte or one less)."""
        plain = Message(code=POST, uri_path=["echo"], payload=b"%040d" % 0)
        plain.mtype, plain.mid, plain.token = Type.CON, 1, outer.token
        return len(plain.encode())

    assert {size - sent_plainly(m) for size, m in sessions} == {40}
    assert all(m.opt.content_format is None for _, m in sessions)
    await ch.close()


@pytest.mark.parametrize("reregister", [True, False])
async def test_observation_after_a_server_restart(start_origin, client_context, reregister):
    """The server restarts and forgets the session and its observers: the channel registers
    the observation again after a new handshake, and it goes on with the fresh state; without
    re-registration it ends with SessionLost."""
    origin = await start_origin("psk")
    ch = channel(client_context, f"coap://127.0.0.1:{origin.port}", origin.creds,
                 reregister_observations=reregister)
    req = ch.request(Message(code=GET, uri_path=["counter"], observe=0))
    first = await asyncio.wait_for(req.response, T)
    assert first.payload == OBS_MARKER + b" 0" and first.opt.observe is not None
    notes = req.observation.__aiter__()
    origin.resources["counter"].bump()
    assert (await asyncio.wait_for(notes.__anext__(), T)).payload == OBS_MARKER + b" 1"

    await origin.restart()  # a new Site: the counter starts at 0 again, without observers

    if not reregister:
        with pytest.raises(SessionLost):
            await asyncio.wait_for(notes.__anext__(), T)
        assert ch.reregistrations == 0
        await ch.close()
        return
    fresh = await asyncio.wait_for(notes.__anext__(), T)
    assert fresh.payload == OBS_MARKER + b" 0"
    assert ch.reregistrations == 1 and ch.handshakes == 2
    counter = origin.resources["counter"]
    assert counter.observers == 1
    counter.bump()
    assert (await asyncio.wait_for(notes.__anext__(), T)).payload == OBS_MARKER + b" 1"
    counter.observers_changed.clear()
    req.observation.cancel()  # Observe: 1 on the new session
    await asyncio.wait_for(counter.observers_changed.wait(), T)
    assert counter.observers == 0
    await ch.close()


@pytest.mark.parametrize("mode", ["psk", "cert", "rpk"])
async def test_a_new_source_port_within_the_cookie_exchange_costs_one_fresh_hello(
    start_origin, client_context, mode
):
    """The origin asks every ClientHello for a cookie bound to the address it came from; the
    relay in front of it sends the cookie-bearing ClientHello from another port than the first
    (a NAT rebinding, a middle box's socket pool). The client starts over with a fresh
    ClientHello, which the new port's cookie exchange then admits (docs/PROTOCOL.md 3.1)."""
    origin = await start_origin(mode, limits=ServerLimits(poll_hold=5.0, without_cookie=0))
    relay = TamperRelay(origin.address)
    host, port = await relay.start()
    relay.rebind_after_answers(1)
    ch = channel(client_context, f"coap://{host}:{port}", origin.creds)
    try:
        text = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response, T)
    finally:
        await ch.close()
        relay.close()
    assert text.code == Code.CONTENT and text.payload == b"hello " + TEXT_MARKER
    assert ch.handshakes == 1 and origin.layer0.core.stats.handshakes == 1
    assert len(set(relay.sources)) == 2
