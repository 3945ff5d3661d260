"""The compact duplicate table (coaplayers.dedup) in contexts made by layer1.create_context:
a repeated request is answered from the table without running the resource again, over real
UDP and over Layer 1, and entries expire after the exchange lifetime."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiocoap
import aiocoap.resource as resource
from aiocoap import CON, NON, Message
from aiocoap.message import Direction
from aiocoap.numbers.constants import TransportTuning

from coaplayers import dedup, dtls
from coaplayers.layer1 import create_context

T = 10.0


class Counting(resource.Resource):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def render_post(self, request: Message) -> Message:
        self.calls += 1
        return Message(code=aiocoap.CHANGED, payload=b"run %d" % self.calls)


def _mman(ctx: Any, scheme: str) -> Any:
    for interface in ctx.request_interfaces:
        mman = getattr(interface, "token_interface", None)
        if mman is not None and scheme in type(mman.message_interface).__name__.lower():
            return mman
    raise LookupError(scheme)


def _raw(mid: int, token: bytes) -> bytes:
    m = Message(code=aiocoap.POST, uri_path=["count"], payload=b"x")
    m.mtype, m.mid, m.token = CON, mid, token
    return m.encode()


async def _exchange(sock: socket.socket, port: int, datagram: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, datagram, ("127.0.0.1", port))
    return await asyncio.wait_for(loop.sock_recv(sock, 2048), T)


async def test_repeated_request_is_answered_from_the_table() -> None:
    counting = Counting()
    site = resource.Site()
    site.add_resource(["count"], counting)
    srv = await create_context(site, listen=["coap://127.0.0.1:0"])
    try:
        port = int(srv.bound[0].rsplit(":", 1)[1])
        mman = _mman(srv.context, "udp6")
        table = mman.compact_duplicates
        request = _raw(0x4242, b"\x01")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            first = await _exchange(sock, port, request)
            again = await _exchange(sock, port, request)  # a retransmission of the same CON
            assert again == first
            assert Message.decode(first).payload == b"run 1"
            assert counting.calls == 1
            assert len(table) == 1
            assert not mman._recent_messages  # aiocoap's own table stays unused
            other = _raw(0x4243, b"\x02")
            assert Message.decode(await _exchange(sock, port, other)).payload == b"run 2"
            assert len(table) == 2
    finally:
        await srv.shutdown()
    assert len(table) == 0  # shutdown empties it


class _Clock:
    """Just enough of an event loop for the table: a settable time and captured timers."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Any]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Any) -> Any:
        entry = (self.now + delay, callback)
        self.timers.append(entry)

        class Handle:
            def cancel(_self) -> None:
                if entry in self.timers:
                    self.timers.remove(entry)

        return Handle()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [t for t in self.timers if t[0] <= self.now]
        for t in due:
            self.timers.remove(t)
            t[1]()


class _Manager:
    def __init__(self) -> None:
        self.loop = _Clock()
        self.log = __import__("logging").getLogger("test.dedup")
        self.sent: list[Message] = []

    def _send_via_transport(self, message: Message) -> None:
        self.sent.append(message)


class ShortLived(TransportTuning):
    EXCHANGE_LIFETIME = 5.0


def _request(mid: int, remote: Any, mtype: Any = CON) -> Message:
    m = Message(code=aiocoap.GET, uri_path=["a"], transport_tuning=ShortLived())
    m.mtype, m.mid, m.token, m.remote = mtype, mid, b"t", remote
    return m


def test_entries_expire_after_the_exchange_lifetime_and_peers_are_forgotten() -> None:
    mman = _Manager()
    table = dedup.CompactDuplicates(mman)
    peer_a, peer_b = ("192.0.2.1", 5683), ("192.0.2.2", 5683)
    assert table.deduplicate(_request(1, peer_a)) is False
    answer = Message(code=aiocoap.CONTENT, payload=b"ok")
    answer.mtype, answer.mid, answer.token, answer.remote = aiocoap.ACK, 1, b"t", peer_a
    table.store(answer)
    assert table.deduplicate(_request(1, peer_a)) is True  # a repeat: answered again
    assert [(m.mtype, m.mid, m.payload, m.remote) for m in mman.sent] == [
        (aiocoap.ACK, 1, b"ok", peer_a)]
    assert mman.sent[0].direction == Direction.OUTGOING
    assert table.deduplicate(_request(1, peer_b)) is False  # same MID, another peer
    assert table.deduplicate(_request(2, peer_a, NON)) is False
    assert table.deduplicate(_request(2, peer_a, NON)) is True  # a NON repeat: dropped
    assert len(mman.sent) == 1
    mman.loop.advance(3.0)
    assert table.deduplicate(_request(3, peer_b)) is False  # expires 3 s after the others
    mman.loop.advance(2.5)  # the first four are past their 5 s
    assert len(table) == 1 and peer_a not in table._peers and peer_b in table._peers
    assert table.deduplicate(_request(1, peer_a)) is False  # forgotten: new again
    mman.loop.advance(10.0)
    assert len(table) == 0 and not table._peers and not table._remotes
    assert not mman.loop.timers


async def test_layer1_server_answers_a_repeated_request_once() -> None:
    """Over DTLS the transport hands decrypted requests to the same message manager."""
    counting = Counting()
    site = resource.Site()
    site.add_resource(["count"], counting)
    store = dtls.PskStore({b"dev": b"secret-key-16byt"})
    srv = await create_context(site, listen=["coaps://127.0.0.1:0"], psk_store=store)
    cli = await create_context(client_credentials=_creds())
    try:
        uri = srv.bound[0] + "/count"
        first = await asyncio.wait_for(
            cli.context.request(Message(code=aiocoap.POST, uri=uri, payload=b"x")).response, T)
        assert first.payload == b"run 1"
        table = _mman(srv.context, "layer1").compact_duplicates
        assert len(table) == 1
    finally:
        await cli.shutdown()
        await srv.shutdown()


def _creds() -> Any:
    from coaplayers.layer1 import ClientCredentials

    creds = ClientCredentials()
    creds.load_from_dict({"coaps://*": {"dtls": {"psk": {"ascii": "secret-key-16byt"},
                                                  "client-identity": {"ascii": "dev"}}}})
    return creds
