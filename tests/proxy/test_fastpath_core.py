"""coap-proxy's fast path core without sockets or a clock: datagrams in, datagrams out.

The wire behaviour against real processes is pinned in ``test_proxy_wire.py`` (both paths);
here: the option codec against aiocoap's, which datagrams the fast path leaves to aiocoap,
and the timers (empty ACK, retransmission, timeout, separate answers) on a fake clock.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from aiocoap.optiontypes import OpaqueOption

from coaplayers.dedup import CompactDuplicates
from coaplayers.proxy.accesslog import AccessLog
from coaplayers.proxy.config import ProxyConfig
from coaplayers.proxy.fastpath import (
    ACK,
    CON,
    NON,
    RST,
    FastPath,
    Malformed,
    Upstream,
    encode_options,
    parse_options,
)
from coaplayers.proxy.metrics import MetricsRegistry
from coaplayers.proxy.site import ProxySite

CLIENT = ("::ffff:127.0.0.1", 40000, 0, 0)
ORIGIN = "127.0.0.1:5683"


class Clock:
    """A fake loop: ``call_later`` handles fire when ``advance`` passes their time."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[list[Any]] = []

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, fn: Callable[[], None]) -> Any:
        timer = [self.now + delay, fn, False]

        class Handle:
            def cancel(self) -> None:
                timer[2] = True

        self.timers.append(timer)
        return Handle()

    def time(self) -> float:  # (the duplicate table's loop)
        return self.now

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = sorted((t for t in self.timers if not t[2] and t[0] <= end),
                         key=lambda t: t[0])
            if not due:
                break
            timer = due[0]
            timer[2] = True
            self.now = max(self.now, timer[0])
            timer[1]()
        self.now = end


class Rig:
    def __init__(self, **config: Any) -> None:
        config.setdefault("allow", ("127.0.0.1",))
        config.setdefault("cache_entries", 0)
        config.setdefault("log_exchanges", False)
        self.clock = Clock()
        self.site = ProxySite(ProxyConfig(listen=("coap://127.0.0.1:0",), **config),
                              MetricsRegistry(), AccessLog(None), clock=self.clock)
        self.site.upstream = object()  # type: ignore[assignment]  # (contexts exist)
        mman = type("M", (), {"log": logging.getLogger("test"), "loop": self.clock})()
        self.duplicates = CompactDuplicates(mman)
        self.up_sent: list[bytes] = []
        self.up = Upstream("origin", self.up_sent.append)
        self.down: list[bytes] = []
        self.mids = iter(range(1000, 70000))
        self.core = FastPath(
            self.site, send_down=lambda data, pktinfo, address: self.down.append(data),
            duplicates=self.duplicates, next_mid=lambda: next(self.mids) & 0xFFFF,
            upstream_for=lambda sockaddr, version, decision: self.up,
            resolve=lambda host, port: None, call_later=self.clock.call_later,
            hostinfo=lambda address: f"{address[0]}:{address[1]}", clock=self.clock,
        )

    def answer_up(self, mtype: int, code: int, payload: bytes = b"", options: bytes = b"",
                  request: bytes | None = None, mid: int | None = None) -> None:
        """What the origin sends for the last (or ``request``'s) upstream request."""
        req = request or self.up_sent[-1]
        tkl = req[0] & 0x0F
        m = req[2:4] if mid is None else mid.to_bytes(2, "big")
        data = bytes((0x40 | mtype << 4 | tkl, code)) + m + req[4:4 + tkl] + options
        if payload:
            data += b"\xff" + payload
        self.core.from_upstream(self.up, data)


def request(mtype: int = CON, code: Code = Code.POST, mid: int = 7, token: bytes = b"tk",
            payload: bytes = b"x" * 40, **options: Any) -> bytes:
    m = Message(code=code, payload=payload, uri=f"coap://{ORIGIN}/echo")
    m.mtype, m.mid, m.token = Type(mtype), mid, token
    m.opt.proxy_scheme = "coap"
    m.opt.uri_host, m.opt.uri_port = "127.0.0.1", 5683
    for name, value in options.items():
        if name[0] == "o" and name[1:].isdigit():
            m.opt.add_option(OpaqueOption(int(name[1:]), value))
        else:
            setattr(m.opt, name, value)
    return m.encode()


def decoded(data: bytes) -> Message:
    return Message.decode(data)


# -- the option codec ------------------------------------------------------------------------


def test_option_codec_agrees_with_aiocoap() -> None:
    rng = random.Random(7)
    for _ in range(300):
        m = Message(code=Code.GET)
        m.mtype, m.mid, m.token = Type.CON, 1, b""
        numbers = sorted(rng.choice([1, 4, 11, 12, 15, 17, 60, 300, 2000, 65000])
                         for _ in range(rng.randrange(0, 6)))
        for n in numbers:
            m.opt.add_option(OpaqueOption(n, bytes(rng.randrange(256) for _ in range(
                rng.choice([0, 1, 12, 13, 14, 268, 269, 300])))))
        if rng.random() < 0.5:
            m.payload = b"p" * rng.randrange(1, 40)
        raw = m.encode()
        options, at = parse_options(raw, 4)
        assert options == [(int(o.number), o.encode()) for o in m.opt.option_list()]
        assert raw[4:at] == encode_options(options)
        assert raw[at:] == ((b"\xff" + m.payload) if m.payload else b"")


@pytest.mark.parametrize("bad", [
    b"\xff",  # a payload marker and nothing after it
    b"\xf1x",  # option delta 15
    b"\x1f",  # option length 15
    b"\x15ab",  # a value running past the end
    b"\xd0",  # an extended delta byte missing
])
def test_malformed_options_are_refused(bad: bytes) -> None:
    with pytest.raises((Malformed, IndexError)):
        parse_options(b"\x40\x01\x00\x01" + bad, 4)


# -- what it takes, what it leaves to aiocoap ---------------------------------------------


def test_plain_post_is_forwarded_with_routing_options_regenerated() -> None:
    rig = Rig()
    assert rig.core.from_client(request(o1=b"\x01", content_format=0), None, CLIENT)
    up = decoded(rig.up_sent[-1])
    assert up.mtype == Type.CON and up.code == Code.POST and len(up.token) == 4
    assert up.opt.proxy_scheme is None and up.opt.uri_host is None and up.opt.uri_port is None
    assert list(up.opt.uri_path) == ["echo"] and up.opt.content_format == 0
    assert up.opt.get_option(1)[0].value == b"\x01"
    assert up.opt.get_option(16)[0].value == 16  # Hop-Limit inserted (RFC 8768)
    assert up.payload == b"x" * 40
    rig.answer_up(ACK, 0x44, b"done", options=b"\xc1\x00")  # 2.04, Content-Format 0
    answer = decoded(rig.down[-1])
    assert (answer.mtype, answer.mid, answer.token, answer.code) == (
        Type.ACK, 7, b"tk", Code.CHANGED)
    assert answer.payload == b"done" and answer.opt.content_format == 0
    assert rig.site.in_flight.count == 0


@pytest.mark.parametrize("options", [
    {"observe": 0}, {"block2": (0, False, 6)}, {"echo": b"e" * 8}, {"no_response": 2},
    {"o2050": b"x"},  # an unsafe option it does not know (aiocoap's path answers 4.02)
    {"o21": b"x"},  # a safe option aiocoap knows and this path does not (EDHOC)
])
def test_requests_needing_aiocoap_are_left_to_it(options: dict[str, Any]) -> None:
    rig = Rig()
    data = request(**options)
    assert not rig.core.from_client(data, None, CLIENT)
    assert rig.up_sent == [] and rig.duplicates.seen(CLIENT, 7) is None


def test_unknown_safe_to_forward_options_are_forwarded_as_they_came() -> None:
    """Such as Layer 0's outer Padding: a ClientHello that carries it must leave from where
    the next (unpadded) one does, or the origin's cookie, bound to that address, fails."""
    rig = Rig()
    assert rig.core.from_client(request(o65052=b"\0" * 30, o2048=b"x"), None, CLIENT)
    (sent,) = rig.up_sent
    got = decoded(sent)
    assert [(int(o.number), o.value) for o in got.opt.option_list()
            if int(o.number) in (2048, 65052)] == [(2048, b"x"), (65052, b"\0" * 30)]


def test_exchange_lines_are_the_routing_decisions_and_each_requests_own() -> None:
    """The log fields that follow from the routing options are made once per decision; the
    OSCORE flag, method, type, client and sizes are each request's (as aiocoap's path logs
    them: site.routing_fields)."""
    import io
    import json

    from coaplayers.proxy.site import routing_fields

    rig = Rig(log_exchanges=True)
    stream = io.StringIO()
    rig.site.access_log = AccessLog(stream=stream)
    first = request(mid=1, token=b"a", payload=b"x" * 10)
    second = request(mtype=NON, mid=2, token=b"b", payload=b"y" * 3, oscore=b"\x09\x01")
    for data in (first, second):
        assert rig.core.from_client(data, None, CLIENT)
        rig.answer_up(ACK if data is first else NON, 0x44)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["routing"] for line in lines] == [
        routing_fields(decoded(first)), routing_fields(decoded(second))]
    assert "oscore" not in lines[0]["routing"] and lines[1]["routing"]["oscore"] is True
    assert [(line["method"], line["type"], line["request_bytes"]) for line in lines] == [
        ("POST", "CON", 10), ("POST", "NON", 3)]
    assert {line["upstream"] for line in lines} == {f"coap://{ORIGIN}/echo"}


def test_get_is_left_to_aiocoap_with_the_cache_on_or_from_an_unverified_address() -> None:
    assert not Rig(cache_entries=16).core.from_client(request(code=Code.GET, payload=b""),
                                                      None, CLIENT)
    rig = Rig()
    assert not rig.core.from_client(request(code=Code.GET, payload=b""), None, CLIENT)
    assert rig.site.guard is not None
    rig.site.guard.mark_verified(CLIENT[:2])
    assert rig.core.from_client(request(code=Code.GET, payload=b""), None, CLIENT)


def test_refused_routes_and_other_schemes_are_left_to_aiocoap() -> None:
    rig = Rig(allow=())  # forward proxying reaches nothing: aiocoap's path answers 4.03
    assert not rig.core.from_client(request(), None, CLIENT)
    rig = Rig()
    assert not rig.core.from_client(request(proxy_scheme="coaps"), None, CLIENT)


def test_draining_and_multicast_are_left_to_aiocoap() -> None:
    rig = Rig()
    multicast = bytes.fromhex("ff02") + bytes(14) + bytes(4)
    assert not rig.core.from_client(request(), multicast, CLIENT)
    rig.site.begin_drain()
    assert not rig.core.from_client(request(mid=8), None, CLIENT)


def test_acks_and_resets_not_for_its_own_messages_are_left_to_aiocoap() -> None:
    rig = Rig()
    assert not rig.core.from_client(bytes((0x60, 0, 0, 9)), None, CLIENT)
    assert not rig.core.from_client(bytes((0x70, 0, 0, 9)), None, CLIENT)


# -- duplicates ----------------------------------------------------------------------------


def test_a_duplicate_is_forwarded_once_and_answered_again() -> None:
    rig = Rig()
    data = request()
    assert rig.core.from_client(data, None, CLIENT)
    assert rig.core.from_client(data, None, CLIENT)  # while the upstream works: dropped
    assert len(rig.up_sent) == 1 and rig.down == []
    rig.answer_up(ACK, 0x44, b"ok")
    assert rig.core.from_client(data, None, CLIENT)
    assert len(rig.up_sent) == 1 and rig.down == [rig.down[0]] * 2


def test_a_request_aiocoap_took_stays_with_aiocoap() -> None:
    rig = Rig()
    rig.duplicates.remember(CLIENT, 7, 247.0)  # (aiocoap's path saw it)
    assert not rig.core.from_client(request(), None, CLIENT)
    assert rig.up_sent == []


# -- time ----------------------------------------------------------------------------------


def test_slow_upstream_empty_ack_then_con_answer_until_acknowledged() -> None:
    rig = Rig(downstream_ack_timeout=1.0)
    data = request()
    rig.core.from_client(data, None, CLIENT)
    rig.clock.advance(0.2)
    assert rig.down == [bytes((0x60, 0, 0, 7))]  # empty ACK with the request's MID
    assert rig.core.from_client(data, None, CLIENT)  # a duplicate gets the empty ACK again
    assert rig.down[-1] == bytes((0x60, 0, 0, 7))
    rig.answer_up(CON, 0x44, b"late")
    assert rig.up_sent[-1][:2] == bytes((0x60, 0))  # the upstream's CON answer is ACKed
    separate = decoded(rig.down[-1])
    assert separate.mtype == Type.CON and separate.token == b"tk" and separate.mid != 7
    count = len(rig.down)
    rig.clock.advance(1.6)
    assert len(rig.down) == count + 1 and rig.down[-1] == rig.down[count - 1]  # again
    ack = bytes((0x60, 0)) + separate.mid.to_bytes(2, "big")
    assert rig.core.from_client(ack, None, CLIENT)  # ends the retransmission
    rig.clock.advance(30)
    assert len(rig.down) == count + 1


def test_upstream_retransmission_then_timeout() -> None:
    rig = Rig(ack_timeout=1.0, upstream_timeout=10.0)
    rig.core.from_client(request(), None, CLIENT)
    rig.clock.advance(1.6)
    assert len(rig.up_sent) == 2 and rig.up_sent[0] == rig.up_sent[1]
    rig.clock.advance(10)
    answer = decoded(rig.down[-1])
    assert answer.code == Code.GATEWAY_TIMEOUT and answer.token == b"tk"
    assert rig.site.in_flight.count == 0


def test_an_empty_ack_upstream_stops_retransmission() -> None:
    rig = Rig(ack_timeout=1.0)
    rig.core.from_client(request(), None, CLIENT)
    rig.answer_up(ACK, 0)
    rig.clock.advance(5)
    assert len(rig.up_sent) == 1
    rig.answer_up(NON, 0x45, b"late", request=rig.up_sent[0], mid=4242)
    assert decoded(rig.down[-1]).payload == b"late"


def test_non_request_gets_a_non_answer_and_upstream_rst_is_502() -> None:
    rig = Rig()
    rig.core.from_client(request(mtype=NON), None, CLIENT)
    rig.answer_up(NON, 0x45, b"n", mid=1)
    answer = decoded(rig.down[-1])
    assert answer.mtype == Type.NON and answer.token == b"tk"
    rig.core.from_client(request(mid=8, token=b"r"), None, CLIENT)
    rig.answer_up(RST, 0)
    assert decoded(rig.down[-1]).code == Code.BAD_GATEWAY


def test_an_unknown_unsafe_option_in_the_answer_is_502() -> None:
    rig = Rig()
    rig.core.from_client(request(), None, CLIENT)
    rig.answer_up(ACK, 0x45, b"x", options=b"\xe1\x07\xf6v")  # option 2307: unsafe, unknown
    answer = decoded(rig.down[-1])
    assert answer.code == Code.BAD_GATEWAY and b"2307" in answer.payload


def test_an_answer_beyond_3x_for_an_unverified_client_is_challenged() -> None:
    rig = Rig()
    data = request(payload=b"")
    rig.core.from_client(data, None, CLIENT)
    rig.answer_up(ACK, 0x44, b"y" * 400)
    answer = decoded(rig.down[-1])
    assert answer.code == Code.UNAUTHORIZED and answer.opt.echo
    assert len(rig.down[-1]) <= 3 * len(data)


def test_metrics_are_counted_in_numbers_and_reach_the_registry() -> None:
    rig = Rig()
    for mid in range(5):
        rig.core.from_client(request(mid=mid), None, CLIENT)
        rig.answer_up(ACK, 0x44, b"z")
    m = rig.site.metrics
    assert m.requests.get(kind="forward") == 5
    assert m.responses.get(code="2.04") == 5
    assert m.bytes.get(direction="upstream") == 200 and m.bytes.get(direction="downstream") == 5


# -- replica sets --------------------------------------------------------------------------


def test_replica_set_requests_go_to_the_member_their_session_names() -> None:
    from coaplayers import replica
    from coaplayers.proxy.config import Route

    rig = Rig(routes=(Route.parse("/=replicas:coap://127.0.0.1:1,coap://127.0.0.1:2"),),
              forward=False)
    chosen: list[Any] = []

    def upstream_for(sockaddr: Any, version: int, decision: Any) -> Upstream:
        chosen.append(sockaddr)
        return rig.up

    rig.core.upstream_for = upstream_for  # type: ignore[method-assign]
    s = rig.site.router.sets["/"]
    for i, m in enumerate(sorted(s.members.values(), key=lambda m: m.key)):
        s.answered(m, i, now=0.0)
    decisions: list[object] = []
    decide = rig.site.router.decide

    def counted(*args: Any) -> Any:
        decisions.append(args)
        return decide(*args)

    rig.site.router.decide = counted  # type: ignore[method-assign, assignment]

    def session(n: int, mid: int) -> bytes:
        m = Message(code=Code.POST, payload=b"record",
                    uri="coap://proxy/~" + replica.session_name(n, "AAAAA")[0] + "bcd")
        m.mtype, m.mid, m.token = Type.CON, mid, b"s"
        return m.encode()

    for mid in range(6):
        assert rig.core.from_client(session(mid % 2, mid), None, CLIENT)
        rig.answer_up(ACK, 0x44)
    assert [a[1] for a in chosen] == [1, 2, 1, 2, 1, 2]
    assert len(decisions) == 2  # once per routing options (a session), then remembered
    # Replica 0 is down: its sessions' requests go to replica 1 (which answers 4.04 there).
    s.fail("coap://127.0.0.1:1", "unreachable")
    assert rig.core.from_client(session(0, 10), None, CLIENT)
    assert chosen[-1][1] == 2
    # No member up: aiocoap's path answers (5.03).
    s.fail("coap://127.0.0.1:2", "unreachable")
    assert not rig.core.from_client(session(1, 11), None, CLIENT)


def test_an_icmp_error_reported_at_a_send_moves_a_set_members_requests() -> None:
    """A connected socket reports the ICMP error of an earlier datagram (the member died) at
    the next send: the request goes once to another member, as when the reader gets it,
    not 5.04 at once (which an OSCORE or Layer 0 client of the dead member would take for
    the end, instead of re-keying with another)."""
    import errno

    from coaplayers import replica
    from coaplayers.proxy.config import Route

    rig = Rig(routes=(Route.parse("/=replicas:coap://127.0.0.1:1,coap://127.0.0.1:2"),),
              forward=False)
    sent: dict[int, list[bytes]] = {1: [], 2: []}

    def refused(data: bytes) -> None:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    ups = {1: Upstream("m1", refused), 2: Upstream("m2", sent[2].append)}
    rig.core.upstream_for = (  # type: ignore[method-assign]
        lambda sockaddr, version, decision: ups[sockaddr[1]])
    s = rig.site.router.sets["/"]
    for i, m in enumerate(sorted(s.members.values(), key=lambda m: m.key)):
        s.answered(m, i, now=0.0)
    m = Message(code=Code.POST, payload=b"record",
                uri="coap://proxy/~" + replica.session_name(0, "AAAAA")[0] + "bcd")
    m.mtype, m.mid, m.token = Type.CON, 5, b"s"
    assert rig.core.from_client(m.encode(), None, CLIENT)
    rig.clock.advance(0.01)
    assert rig.down == []  # no 5.04
    (moved,) = sent[2]
    assert decoded(moved).payload == b"record"
    assert s.members["coap://127.0.0.1:1"].up is False
    rig.core.from_upstream(ups[2], bytes((0x60 | moved[0] & 0x0F, 0x44)) + moved[2:])
    (answer,) = rig.down
    assert decoded(answer).code == Code.CHANGED


def test_a_clients_second_con_waits_for_the_first_and_is_then_retransmitted() -> None:
    rig = Rig(ack_timeout=1.0, upstream_timeout=30.0)
    rig.core.from_client(request(mid=1, token=b"a"), None, CLIENT)
    rig.core.from_client(request(mid=2, token=b"b"), None, CLIENT)
    assert len(rig.up_sent) == 1  # RFC 7252 4.7: one outstanding CON per client and upstream
    rig.clock.advance(0.5)  # both acknowledged empty towards the client meanwhile
    rig.answer_up(ACK, 0x44, b"1")  # the first answered: the second goes
    assert len(rig.up_sent) == 2 and decoded(rig.up_sent[1]).opt.uri_path == ("echo",)
    rig.clock.advance(1.6)  # not acknowledged: sent again, timed from when it went out
    assert len(rig.up_sent) == 3 and rig.up_sent[2] == rig.up_sent[1]
    rig.answer_up(ACK, 0x44, b"2", request=rig.up_sent[1])
    assert [decoded(d).payload for d in rig.down if decoded(d).code] == [b"1", b"2"]
