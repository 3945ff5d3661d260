"""A session name is a routing key, not a secret (docs/PROTOCOL.md 2, 3.3, 3.4; SECURITY.md).

Whoever knows ``/~<sid>`` (every proxy does) may send anything to it from any address: nothing
that does not authenticate changes the session, and it is answered as a dead name is. Engine
level tests drive :class:`Layer0ServerCore` by hand; the loopback ones use real UDP sockets, a real
client channel and a second socket as the attacker.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any, cast

import aiocoap
import pytest
from aiocoap import CON, GET, POST, Message
from aiocoap.numbers.codes import Code

from coaplayers.dtls import PskClientCredentials, PskStore, TinyDtlsSession, records
from coaplayers.layer0 import Layer0ServerCore, ServerLimits, inner
from coaplayers.layer0.profile import handshake_tag, pull_message
from coaplayers.layer0.server import layer0_config, make_listener

from .apps import OBS_MARKER
from .conftest import channel

CREDS = PskClientCredentials(b"device-1", b"0123456789abcdef")
PEER = ("coap", "192.0.2.1:5683")
UNKNOWN = (Code.NOT_FOUND, b"unknown session")
T = 10.0


def record(ctype: int, epoch: int, seq: int, body: bytes) -> bytes:
    return (bytes([ctype, 0xFE, 0xFD]) + epoch.to_bytes(2, "big") + seq.to_bytes(6, "big")
            + len(body).to_bytes(2, "big") + body)


def forgeries(client_hello: bytes) -> list[bytes]:
    """What an attacker that knows only the name sends: garbage, plausible records, alerts."""
    fatal_alert = record(records.CONTENT_ALERT, 0, 7, b"\x02\x28")  # handshake_failure
    close_notify = record(records.CONTENT_ALERT, 0, 8, b"\x01\x00")
    # a plausible ClientKeyExchange with the next message_seq (what a forger can predict)
    cke_body = bytes([16]) + (34).to_bytes(3, "big") + (1).to_bytes(2, "big") + bytes(3) \
        + (34).to_bytes(3, "big") + b"\x00\x20" + os.urandom(32)
    return [
        b"",
        os.urandom(40),
        fatal_alert,
        close_notify,
        record(records.CONTENT_HANDSHAKE, 0, 3, cke_body),
        record(records.CONTENT_CHANGE_CIPHER_SPEC, 0, 4, b"\x01"),
        record(records.CONTENT_HANDSHAKE, 1, 0, os.urandom(40)),  # a "Finished"
        record(records.CONTENT_APPLICATION_DATA, 1, 5, os.urandom(40)),
        client_hello,
        bytes(8) + fatal_alert,  # a wrong tag
    ]


def core(**limits: Any) -> Layer0ServerCore:
    return Layer0ServerCore(make_listener(PskStore({CREDS.identity: CREDS.key})),
                            ServerLimits(**limits))


def snapshot(c: Layer0ServerCore, sid: str) -> tuple[object, ...]:
    s = c.sessions[sid]
    return (list(c.sessions), s.last_active, list(s.outbox), s.hs_last_in, list(s.hs_last_out),
            c.half_open_count, s.dtls.state, s.established)


def test_nothing_without_the_tag_changes_a_half_open_session_and_the_handshake_completes() -> None:
    c = core()
    other = TinyDtlsSession.client(CREDS, layer0_config(client=True))
    other.connect(0.0)
    assert c.entry(PEER, other.datagrams_to_send()[0], 0.0).code == Code.CREATED
    client = TinyDtlsSession.client(CREDS, layer0_config(client=True))
    client.connect(0.0)
    hello = client.datagrams_to_send()[0]
    created = c.entry(PEER, hello, 1.0)
    assert created.code == Code.CREATED and created.location
    sid, tag = created.location[-1], handshake_tag(created.payload)
    assert tag is not None
    dead = c.datagram("~dead0", b"", 1.0)[0]
    for now, payload in enumerate(forgeries(hello), start=2):
        before = snapshot(c, sid)
        for delete in (False, True):
            answer, plaintexts = c.datagram(sid, payload, float(now), delete=delete)
            assert (answer.code, answer.payload) == UNKNOWN and plaintexts == []
            assert answer == dead
        assert snapshot(c, sid) == before, payload[:16]
    client.receive_datagram(created.payload, 50.0)
    flight = tag + b"".join(client.datagrams_to_send())
    # the genuine flight, then forgeries against the answer cache: the repeat still works
    finished = c.datagram(sid, flight, 50.0)[0]
    assert finished.code == Code.CHANGED and c.sessions[sid].established
    for payload in forgeries(hello):
        assert c.datagram(sid, payload, 51.0)[0] == dead
    client.receive_datagram(finished.payload, 52.0)
    assert client.is_established
    assert c.stats.unauthenticated >= 2 * len(forgeries(hello))
    # the last-active order was set by the genuine requests only: the other half-open
    # session, older and untouched, is still the one to go first
    assert list(c.sessions)[-1] == sid


def established(c: Layer0ServerCore) -> tuple[TinyDtlsSession, str]:
    client = TinyDtlsSession.client(CREDS, layer0_config(client=True))
    client.connect(0.0)
    created = c.entry(PEER, client.datagrams_to_send()[0], 0.0)
    assert created.location
    sid, tag = created.location[-1], handshake_tag(created.payload) or b""
    client.receive_datagram(created.payload, 0.0)
    finished = c.datagram(sid, tag + b"".join(client.datagrams_to_send()), 0.0)[0]
    client.receive_datagram(finished.payload, 0.0)
    assert client.is_established and c.sessions[sid].established
    while client.next_event() is not None:
        pass
    return client, sid


def pull(client: TinyDtlsSession, ack: int) -> bytes:
    client.send(pull_message(ack))
    return b"".join(client.datagrams_to_send())


def test_queued_datagrams_stay_until_a_pull_acknowledges_them() -> None:
    c = core()
    client, sid = established(c)
    seals = [c.seal(sid, inner.encode(b"\1", Message(code=Code.CONTENT, payload=b"n%d" % i)))
             for i in range(3)]
    for sealed in seals:
        assert c.enqueue(sid, sealed)
    # pulls from anyone without the keys: 4.04, the queue as it was
    for forged in (b"", os.urandom(30), seals[0]):
        assert (c.datagram(sid, forged, 1.0)[0].code, len(c.sessions[sid].outbox)) == (
            Code.NOT_FOUND, 3)
    # nor does the handshake tag take them once the session is established
    tagged = c.datagram(sid, c.sessions[sid].tag, 1.5)[0]
    assert (tagged.code, tagged.payload, len(c.sessions[sid].outbox)) == (Code.CHANGED, b"", 3)
    first, _ = c.datagram(sid, pull(client, -1), 2.0)
    assert first.code == Code.CHANGED and first.payload == b"".join(seals)
    # the answer was lost: the next pull still acknowledges nothing and gets it all again
    again, _ = c.datagram(sid, pull(client, -1), 3.0)
    assert again.payload == first.payload
    top = max(records.sequence_number(r) for r in records.split_records(again.payload))
    # an acknowledgement of the first only, then of everything
    second_seq = records.sequence_number(records.split_records(seals[1])[0])
    partial, _ = c.datagram(sid, pull(client, second_seq - 1), 4.0)
    assert partial.payload == b"".join(seals[1:])
    done, plaintexts = c.datagram(sid, pull(client, top), 5.0)
    assert done.pull and done.payload == b"" and plaintexts == [] and not c.sessions[sid].outbox
    # a replayed pull is a record seen before: 4.04, no state
    replayed = pull(client, -1)
    c.datagram(sid, replayed, 6.0)
    assert c.datagram(sid, replayed, 7.0)[0].code == Code.NOT_FOUND
    assert c.sessions[sid].last_active == 6.0


def test_forged_traffic_does_not_refresh_an_established_session() -> None:
    c = core(max_sessions=2, idle_timeout=100.0)
    client_a, sid_a = established(c)
    _, sid_b = established(c)
    c.datagram(sid_a, pull(client_a, -1), 10.0)
    for t, payload in enumerate(forgeries(b""), start=20):
        assert c.datagram(sid_a, payload, float(t))[0].code == Code.NOT_FOUND
    assert c.sessions[sid_a].last_active == 10.0
    assert c.expire(105.0) == [sid_b]  # b has been idle longer
    assert c.expire(111.0) == [sid_a]  # the forgeries kept a alive not a second longer


# --------------------------------------------------------------------- over UDP


class Prober(asyncio.DatagramProtocol):
    """A second socket: plain CoAP exchanges to any path, as an attacker sends them."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[bytes, asyncio.Future[Message]] = {}
        self._ids = itertools.count(int.from_bytes(os.urandom(2), "big"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            msg = Message.decode(data)
        except Exception:
            return
        future = self.waiting.pop(msg.token, None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def ask(self, address: tuple[str, int], code: Code, path: str, payload: bytes,
                  timeout: float = T) -> Message:
        n = next(self._ids)
        msg = Message(code=code, payload=payload, uri_path=[path])
        msg.mtype, msg.mid, msg.token = CON, n & 0xFFFF, n.to_bytes(4, "big")
        future = asyncio.get_running_loop().create_future()
        self.waiting[msg.token] = future
        assert self.transport is not None
        self.transport.sendto(msg.encode(), address)
        return await asyncio.wait_for(future, timeout)


async def prober() -> Prober:
    _, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        Prober, local_addr=("127.0.0.1", 0))
    return protocol


def shape(msg: Message) -> tuple[object, ...]:
    """Everything of an answer except its message ID and token."""
    return (msg.mtype, msg.code, msg.payload, msg.opt.encode())


@pytest.mark.slow
async def test_an_observer_loses_no_notification_while_another_address_pulls_its_session(
    start_origin, client_context
):
    """Notifications for 12 s (more than two of the server's 5 s poll holds) and at least 60,
    each awaited before the next, while four loops on another socket send empty POSTs (the
    pull before this profile version) to its session."""
    origin = await start_origin("psk", limits=ServerLimits(poll_hold=5.0))
    ch = channel(client_context, f"coap://127.0.0.1:{origin.port}", origin.creds)
    req = ch.request(Message(code=GET, uri_path=["counter"], observe=0))
    first = await asyncio.wait_for(req.response, T)
    assert first.payload == OBS_MARKER + b" 0"
    assert req.observation is not None
    notes = req.observation.__aiter__()
    sid = ch.session_path[0]
    attacker = await prober()
    answers: list[Message] = []
    stop = asyncio.Event()

    async def pull_loop() -> None:
        while not stop.is_set():
            answers.append(await attacker.ask(origin.address, POST, sid, b""))
            await asyncio.sleep(0.01)  # pacing (the machine is shared), not synchronisation

    loops = [asyncio.create_task(pull_loop()) for _ in range(4)]
    counter = origin.resources["counter"]
    loop = asyncio.get_running_loop()
    end = loop.time() + 12.0
    delivered = 0
    try:
        while loop.time() < end or delivered < 60:  # each turn delivers or fails (bounded)
            counter.bump()
            try:
                note = await asyncio.wait_for(notes.__anext__(), T)
            except TimeoutError:
                lost = f"notification {counter.value} lost after {delivered}"
                raise AssertionError(lost) from None
            assert note.payload == OBS_MARKER + b" %d" % counter.value
            delivered += 1
            await asyncio.sleep(0.1)  # pacing of the sensor, not synchronisation
    finally:
        stop.set()
        for task in loops:
            task.cancel()
        results = await asyncio.gather(*loops, return_exceptions=True)
        attacker.transport.close()  # type: ignore[union-attr]
    # A loop ends by cancellation or, when its answer and the cancellation meet (Python
    # 3.11's wait_for then returns the answer), by seeing stop set: never by an error.
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results), results
    assert delivered >= 50 and len(answers) > 100
    assert {(a.code, a.payload) for a in answers} == {UNKNOWN}
    assert ch.handshakes == 1
    req.observation.cancel()
    await ch.close()


class HandshakeRelay(asyncio.DatagramProtocol):
    """Relays client <-> origin; when the origin names a session (2.01), it first has an
    attacker's socket send forgeries to that half-open session, then forwards the 2.01."""

    def __init__(self, origin: tuple[str, int], attacker: Prober) -> None:
        self.origin, self.attacker = origin, attacker
        self.transport: asyncio.DatagramTransport | None = None
        self.client: Any = None
        self.upstream: asyncio.DatagramTransport | None = None
        self.attacked: list[str] = []
        self.answers: list[Message] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        relay = self
        tasks: set[asyncio.Task[None]] = set()

        class Up(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                task = loop.create_task(relay.downstream(data))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        self.upstream, _ = await loop.create_datagram_endpoint(
            Up, local_addr=("127.0.0.1", 0), remote_addr=self.origin)
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client = addr
        assert self.upstream is not None
        self.upstream.sendto(data)

    async def downstream(self, data: bytes) -> None:
        msg = Message.decode(data)
        if msg.code == Code.CREATED and msg.opt.location_path:
            sid = msg.opt.location_path[0]
            self.attacked.append(sid)
            for payload in forgeries(b""):
                for code in (POST, Code.DELETE):
                    self.answers.append(await self.attacker.ask(self.origin, code, sid, payload))
        assert self.transport is not None
        self.transport.sendto(data, self.client)

    def close(self) -> None:
        for t in (self.transport, self.upstream):
            if t is not None:
                t.close()


@pytest.mark.parametrize("mode", ["psk", "cert"])
async def test_a_handshake_completes_while_forgeries_hit_its_half_open_session(
    mode, start_origin, client_context
):
    origin = await start_origin(mode)
    attacker = await prober()
    relay = HandshakeRelay(origin.address, attacker)
    host, port = await relay.start()
    try:
        ch = channel(client_context, f"coap://{host}:{port}", origin.creds)
        await asyncio.wait_for(ch.connect(), T)
        # one attempt, the session the first 2.01 named: no forgery ended or disturbed it
        assert relay.attacked and ch.session_path == (relay.attacked[0],)
        assert len(relay.attacked) == 1 and origin.layer0.core.stats.handshakes == 1
        assert {(a.code, a.payload) for a in relay.answers} == {UNKNOWN}
        again = await asyncio.wait_for(ch.request(Message(code=GET, uri_path=["text"])).response,
                                       T)
        assert again.code == Code.CONTENT
        await ch.close()
    finally:
        relay.close()
        attacker.transport.close()  # type: ignore[union-attr]


async def test_live_and_dead_names_answer_alike_to_unauthenticated_probes(
    start_origin, client_context
):
    origin = await start_origin("psk", limits=ServerLimits(poll_hold=5.0))
    ch = channel(client_context, f"coap://127.0.0.1:{origin.port}", origin.creds)
    # an established session with an observation (so that a real pull would be held) ...
    req = ch.request(Message(code=GET, uri_path=["counter"], observe=0))
    await asyncio.wait_for(req.response, T)
    live = ch.session_path[0]
    # ... a half-open one (a ClientHello, never continued) ...
    attacker = await prober()
    hello = TinyDtlsSession.client(origin.creds.client, layer0_config(client=True))
    hello.connect(0.0)
    created = Message(code=POST, payload=hello.datagrams_to_send()[0],
                      uri_path=[".well-known", "atls"])
    created.mtype, created.mid, created.token = CON, 1, b"hs"
    created.opt.content_format = 65000
    future = asyncio.get_running_loop().create_future()
    attacker.waiting[b"hs"] = future
    attacker.transport.sendto(created.encode(), origin.address)  # type: ignore[union-attr]
    msg = await asyncio.wait_for(future, T)
    assert msg.code == Code.CREATED
    half_open = msg.opt.location_path[0]
    # ... and one that never was
    names = {"established": live, "half-open": half_open, "never": "~zzzzz"}
    probes: list[tuple[Code, bytes]] = [
        (POST, b""), (POST, os.urandom(37)), (POST, b"\x17\xfe\xfd" + os.urandom(50)),
        (POST, record(records.CONTENT_APPLICATION_DATA, 1, 99, os.urandom(40))),
        (POST, record(records.CONTENT_ALERT, 0, 1, b"\x02\x28")),
        (POST, record(records.CONTENT_HANDSHAKE, 0, 2, os.urandom(30))),
        (Code.DELETE, b""), (Code.DELETE, record(records.CONTENT_ALERT, 1, 3, os.urandom(26))),
        (POST, os.urandom(1100)),
    ]
    loop = asyncio.get_running_loop()
    for code, payload in probes:
        seen = {}
        for kind, name in names.items():
            t0 = loop.time()
            answer = await attacker.ask(origin.address, code, name, payload)
            # answered at once, in the ACK, never held like a pull
            assert loop.time() - t0 < 2.0 and answer.mtype == aiocoap.ACK
            seen[kind] = shape(answer)
        assert len(set(seen.values())) == 1, (code, payload[:8], seen)
    # and none of it disturbed the live sessions
    assert live in origin.layer0.core.sessions and half_open in origin.layer0.core.sessions
    counter = origin.resources["counter"]
    counter.bump()
    note = await asyncio.wait_for(req.observation.__aiter__().__anext__(), T)
    assert note.payload == OBS_MARKER + b" 1"
    req.observation.cancel()
    await ch.close()
    attacker.transport.close()  # type: ignore[union-attr]
