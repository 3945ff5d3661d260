"""The tunnel's wire contract without sockets: inner encoding, policy, and every outer answer
of docs/PROTOCOL.md produced by the sans-I/O core with a real engine driven in memory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code

from coaplayers.dtls import (
    AuthenticationFailed,
    ConnectionClosed,
    PskClientCredentials,
    PskStore,
    State,
    TinyDtlsSession,
    records,
)
from coaplayers.layer0 import InnerMessageError, Layer0ServerCore, Policy, ServerLimits, inner
from coaplayers.layer0.core import Answer
from coaplayers.layer0.examples import inner_examples
from coaplayers.layer0.profile import WELL_KNOWN_PATH, handshake_tag
from coaplayers.layer0.server import layer0_config, make_listener

CREDS = PskClientCredentials(b"dev-1", b"0123456789abcdef")
PEER = ("coap", "192.0.2.1:5683")


def test_inner_roundtrip_and_rejections() -> None:
    msg = Message(code=Code.POST, uri_path=["a", "b"], payload=b"xyz", content_format=0)
    decoded = inner.decode(inner.encode(b"\x01\x02", msg))
    assert decoded.token == b"\x01\x02"
    assert decoded.message.code == Code.POST and decoded.message.payload == b"xyz"
    assert decoded.message.opt.uri_path == ("a", "b")
    for bad in (b"", b"\x09" + b"\0" * 10, b"\x02\x01", b"\x00\x01\xff", b"\x00\x45\x0d"):
        with pytest.raises(InnerMessageError):
            inner.decode(bad)
    with pytest.raises(InnerMessageError):  # Uri-Host is outer only
        inner.encode(b"", Message(code=Code.GET, uri_host="x"))


def test_protocol_doc_inner_examples_match_the_implementation() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "PROTOCOL.md").read_text()
    for _title, data in inner_examples():
        assert re.search(data.hex(), doc.replace(" ", "")), f"{data.hex()} missing from the doc"


def test_policy_prefixes_and_grants() -> None:
    p = Policy.build(protected=["/secure"], grants={b"dev-1": ["/secure/a"], "other": ["/"]})
    assert p.requires_layer0(("secure", "x")) and not p.requires_layer0(("securex",))
    assert not p.requires_layer0(WELL_KNOWN_PATH)
    assert p.allows("dev-1", ("secure", "a", "1")) and not p.allows("dev-1", ("secure", "b"))
    assert p.allows("other", ("anything",)) and not p.allows("nobody", ("anything",))
    assert not p.allows("other", (*WELL_KNOWN_PATH, "x"))


def handshake(core: Layer0ServerCore, now: float = 0.0) -> tuple[TinyDtlsSession, str]:
    client = TinyDtlsSession.client(CREDS, layer0_config())
    client.connect(now)
    sid = None
    tag = b""
    queue = client.datagrams_to_send()
    for _ in range(10):
        datagram = queue.pop(0) if queue else b""
        if sid is None:
            answer = core.entry(PEER, datagram, now)
        else:
            answer = core.datagram(sid, tag + datagram, now)[0]
        assert answer is not None and answer.code in (Code.CREATED, Code.CHANGED)
        if answer.location:
            sid = answer.location[-1]
            tag = handshake_tag(answer.payload) or b""
        if answer.payload:
            client.receive_datagram(answer.payload, now)
        queue += client.datagrams_to_send()
        if client.is_established:
            assert sid is not None
            return client, sid
    raise AssertionError("no handshake")


def tag_of(created: Answer) -> bytes:
    tag = handshake_tag(created.payload)
    assert tag is not None
    return tag


def core(**limits: float) -> Layer0ServerCore:
    bounds = ServerLimits(**limits)  # type: ignore[arg-type]
    listener = make_listener(PskStore({CREDS.identity: CREDS.key}),
                             without_cookie=bounds.without_cookie)
    return Layer0ServerCore(listener, bounds)


def test_cookie_exchange_is_stateless_and_a_repeat_gets_the_same_answer() -> None:
    c = core(without_cookie=0)
    client = TinyDtlsSession.client(CREDS, layer0_config())
    client.connect(0.0)
    ch1 = client.datagrams_to_send()[0]
    hvr = c.entry(PEER, ch1, 0.0)
    assert hvr.code == Code.CHANGED and hvr.location is None and not c.sessions
    client.receive_datagram(hvr.payload, 0.0)
    ch2 = client.datagrams_to_send()[0]
    created = c.entry(PEER, ch2, 0.0)
    again = c.entry(PEER, ch2, 0.0)  # our 2.01 was lost; the client repeats
    assert created.code == again.code == Code.CREATED
    assert created.location == again.location and created.payload == again.payload
    assert len(c.sessions) == 1 and c.half_open_count == 1
    assert c.entry(PEER, b"not a client hello", 0.0).code == Code.BAD_REQUEST


def test_a_psk_hello_is_answered_at_once_until_too_many_handshakes_are_in_progress() -> None:
    c = core(without_cookie=2)
    clients = [TinyDtlsSession.client(CREDS, layer0_config()) for _ in range(4)]
    hellos = []
    for client in clients:
        client.connect(0.0)
        hellos.append(client.datagrams_to_send()[0])
    first = c.entry(PEER, hellos[0], 0.0)
    assert first.code == Code.CREATED and first.location
    assert records.handshake_type(first.payload) == records.HANDSHAKE_SERVER_HELLO
    again = c.entry(PEER, hellos[0], 0.0)  # our 2.01 was lost; the client repeats
    assert (again.code, again.location, again.payload) == (first.code, first.location,
                                                           first.payload)
    second = c.entry(PEER, hellos[1], 0.0)
    assert second.code == Code.CREATED
    # Two handshakes in progress: the next ClientHello needs the cookie, statelessly.
    hvr = c.entry(PEER, hellos[2], 0.0)
    assert hvr.code == Code.CHANGED and hvr.location is None and len(c.sessions) == 2
    assert records.handshake_type(hvr.payload) == records.HANDSHAKE_HELLO_VERIFY_REQUEST
    # The first two finish; the third returns its cookie (checked although the load is gone).
    for client, answer in zip(clients[:2], (first, second), strict=True):
        assert answer.location is not None
        client.receive_datagram(answer.payload, 0.0)
        flight = tag_of(answer) + b"".join(client.datagrams_to_send())
        finished = c.datagram(answer.location[-1], flight, 0.0)[0]
        client.receive_datagram(finished.payload, 0.0)
        assert client.is_established
    assert c.established_count == 2 and c.half_open_count == 0
    clients[2].receive_datagram(hvr.payload, 0.0)
    created = c.entry(PEER, clients[2].datagrams_to_send()[0], 0.0)
    assert created.code == Code.CREATED and c.half_open_count == 1
    # and with the load gone, the next ClientHello is answered at once again
    assert c.entry(PEER, hellos[3], 0.0).code == Code.CREATED


def test_an_unknown_psk_identity_gets_an_alert_and_leaves_no_session() -> None:
    c = core()
    stranger = TinyDtlsSession.client(PskClientCredentials(b"stranger", bytes(16)),
                                      layer0_config())
    stranger.connect(0.0)
    created = c.entry(PEER, stranger.datagrams_to_send()[0], 0.0)
    assert created.code == Code.CREATED and created.location
    stranger.receive_datagram(created.payload, 0.0)
    flight = tag_of(created) + b"".join(stranger.datagrams_to_send())
    refused = c.datagram(created.location[-1], flight, 0.0)[0]
    assert refused.code == Code.FORBIDDEN and not c.sessions and c.half_open_count == 0
    assert records.content_type(refused.payload) == records.CONTENT_ALERT
    stranger.receive_datagram(refused.payload, 0.0)
    assert stranger.state is State.CLOSED
    closed = [e for e in iter(stranger.next_event, None) if isinstance(e, ConnectionClosed)]
    assert isinstance(closed[-1].error, AuthenticationFailed)


def test_outer_answers_of_an_established_session() -> None:
    c = core()
    client, sid = handshake(c)
    assert c.established_count == 1 and c.half_open_count == 0
    client.send(inner.encode(b"\1", Message(code=Code.GET, uri_path=["x"])))
    record = b"".join(client.datagrams_to_send())
    answer, plaintexts = c.datagram(sid, record, 1.0)
    assert answer.code == Code.CHANGED and inner.decode(plaintexts[0]).token == b"\1"
    # Whatever does not authenticate is answered as an unknown name is (docs/PROTOCOL.md 6).
    unknown = (Code.NOT_FOUND, b"unknown session")
    replay, nothing = c.datagram(sid, record, 1.0)
    assert (replay.code, replay.payload) == unknown and nothing == []
    flipped = bytearray(record)
    flipped[-3] ^= 1
    client.send(b"\x00\x01")
    assert c.datagram(sid, bytes(flipped), 1.0)[0] == c.datagram("~nosuch", record, 1.0)[0]
    garbage = c.datagram(sid, b"garbage", 1.0)[0]
    assert (garbage.code, garbage.payload) == unknown
    assert c.datagram("nosuchid", record, 1.0)[0].code == Code.NOT_FOUND
    client.send(b"\x00\x01")
    bare_delete = c.datagram(sid, b"".join(client.datagrams_to_send()), 1.0, delete=True)
    assert bare_delete[0].code == Code.NOT_FOUND and sid in c.sessions
    client.close()
    bye = c.datagram(sid, b"".join(client.datagrams_to_send()), 1.0, delete=True)[0]
    assert bye.code == Code.DELETED and sid not in c.sessions


def test_limits_half_open_lru_and_idle() -> None:
    c = core(max_half_open=1, max_sessions=2, idle_timeout=10.0, handshake_timeout=5.0,
             without_cookie=0)
    first = TinyDtlsSession.client(CREDS, layer0_config())
    first.connect(0.0)
    hvr = c.entry(PEER, first.datagrams_to_send()[0], 0.0)
    first.receive_datagram(hvr.payload, 0.0)
    assert c.entry(PEER, first.datagrams_to_send()[0], 0.0).code == Code.CREATED
    second = TinyDtlsSession.client(CREDS, layer0_config())
    second.connect(0.0)
    hvr = c.entry(PEER, second.datagrams_to_send()[0], 0.0)
    second.receive_datagram(hvr.payload, 0.0)
    first_sid = next(iter(c.sessions))
    taken = c.entry(PEER, second.datagrams_to_send()[0], 0.5)
    # A full half-open table evicts its least recently active handshake, never refuses.
    assert taken.code == Code.CREATED and taken.carries_records
    assert first_sid not in c.sessions and c.half_open_count == 1
    assert c.stats.half_open_evicted == 1
    assert c.expire(5.5) and c.half_open_count == 0  # the stale half-open one is gone

    sids = [handshake(c, now=6.0 + i)[1] for i in range(3)]
    assert c.established_count == 2 and sids[0] not in c.sessions  # least recently used
    assert c.stats.evicted == 1
    assert set(c.expire(100.0)) == set(sids[1:]) and not c.sessions


def test_a_resumed_last_flight_carries_the_first_request() -> None:
    """docs/PROTOCOL.md 3.3: the client's ChangeCipherSpec and Finished of a resumed
    handshake, then an application-data record, in one request after the handshake tag; the
    core completes the session and hands the inner request to the shell in the same call."""
    from coaplayers.dtls import HandshakeComplete
    from coaplayers_tools.bench.inmem import Peers
    from coaplayers_tools.bench.inmem import handshake as full_handshake

    peers = Peers()
    tunnel = peers.core("cert")
    first = peers.client("cert")
    full_handshake(tunnel, first, ("2001:db8::1", 1))
    state = first.resumption_state
    first.close()
    client = peers.client("cert", resume=state)
    client.connect(0.0)
    created = tunnel.entry(("2001:db8::1", 2), b"".join(client.datagrams_to_send()), 0.0)
    assert created.code == Code.CREATED  # answered at once: no cookie exchange
    sid, tag = created.location[-1], tag_of(created)
    client.receive_datagram(created.payload, 0.0)
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    assert any(isinstance(e, HandshakeComplete) and e.resumed for e in events)
    final = b"".join(client.datagrams_to_send())
    request = inner.encode(b"\x01", Message(code=Code.GET, uri_path=["hello"]))
    client.send(request)
    record = b"".join(client.datagrams_to_send())
    answer, plaintexts = tunnel.datagram(sid, tag + final + record, 0.0)
    assert answer.code == Code.CHANGED and plaintexts == [request]
    assert tunnel.sessions[sid].established
    # The same bytes again (a copy held back in transit): nothing runs twice.
    _, plaintexts = tunnel.datagram(sid, tag + final + record, 0.0)
    assert plaintexts == []
    # Without the Finished the record alone does not authenticate a half-open session.
    other = peers.client("cert", resume=state)
    other.connect(0.0)
    created = tunnel.entry(("2001:db8::1", 3), b"".join(other.datagrams_to_send()), 0.0)
    other.receive_datagram(created.payload, 0.0)
    while other.next_event() is not None:
        pass
    other.datagrams_to_send()  # the Finished, withheld
    other.send(request)
    answer, plaintexts = tunnel.datagram(created.location[-1], tag_of(created)
                                         + b"".join(other.datagrams_to_send()), 0.0)
    assert plaintexts == [] and not tunnel.sessions[created.location[-1]].established


def test_every_kind_skips_the_cookie_until_the_shared_budget_is_spent() -> None:
    """Certificates and raw public keys are answered at once like PSK (docs/PROTOCOL.md 3.1):
    the ClientHello gets a 2.01 with the server's certificate flight, no HelloVerifyRequest,
    while fewer than ``without_cookie`` handshakes of any kind are in progress."""
    from coaplayers import pki
    from coaplayers.dtls import (
        CertificateCredentials,
        GnuTlsSession,
        OpenSslSession,
        RawPublicKeyCredentials,
        build_context,
    )
    from coaplayers.dtls.openssl import generate_p256_key as generate_key
    from coaplayers.layer0 import profile

    ca = pki.make_ca("test CA")
    server = pki.issue(ca, "server.example", names=["server.example"])
    client = pki.issue(ca, "device-1")
    rpk_server, rpk_client = generate_key(), generate_key()
    creds = (
        PskStore({CREDS.identity: CREDS.key}),
        CertificateCredentials([server.certificate], server.private_key, [ca.certificate]),
        RawPublicKeyCredentials(rpk_server, trusted=[rpk_client.public_key()]),
    )
    c = Layer0ServerCore(make_listener(creds, without_cookie=2), ServerLimits(without_cookie=2))
    cert_creds = CertificateCredentials([client.certificate], client.private_key,
                                        [ca.certificate], server_name="server.example")
    cert_ctx = build_context(cert_creds, server=False, ciphers=profile.DTLS_CIPHERS)

    def hello(kind: str) -> bytes:
        engine = (OpenSslSession.client(cert_ctx, cert_creds, layer0_config(client=True))
                  if kind == "x509" else
                  GnuTlsSession.client(RawPublicKeyCredentials(
                      rpk_client, trusted=[rpk_server.public_key()]), layer0_config(client=True))
                  if kind == "rpk" else TinyDtlsSession.client(CREDS, layer0_config()))
        engine.connect(0.0)
        return engine.datagrams_to_send()[0]

    for kind in ("x509", "rpk"):
        created = c.entry(PEER, hello(kind), 0.0)
        assert created.code == Code.CREATED and created.location
        recs = records.split_records(created.payload)
        assert records.handshake_type(recs[0]) == records.HANDSHAKE_SERVER_HELLO
        assert any(records.handshake_type(r) == 11 for r in recs)  # its Certificate
    # Two handshakes in progress, whatever their kinds: the next ClientHello of any kind
    # needs the cookie, statelessly.
    for kind in ("x509", "rpk", "psk"):
        hvr = c.entry(PEER, hello(kind), 0.0)
        assert hvr.code == Code.CHANGED and hvr.location is None, kind
        assert records.handshake_type(hvr.payload) == records.HANDSHAKE_HELLO_VERIFY_REQUEST
    assert len(c.sessions) == 2
