"""RFC 7918 False Start at the Layer 0 server, sans-I/O (docs/PROTOCOL.md 3.3): a full
handshake's last client flight that carries the first request is answered with the server's
Finished and the request's response; a middle box that drops, reorders, alters or replays the
Finished or the request never gets a request executed unauthenticated, nor a wrong answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code

from coaplayers import pki
from coaplayers.dtls import (
    ApplicationData,
    CertificateCredentials,
    DtlsSession,
    GnuTlsSession,
    HandshakeComplete,
    OpenSslSession,
    RawPublicKeyCredentials,
    build_context,
    records,
)
from coaplayers.dtls.openssl import generate_p256_key
from coaplayers.layer0 import Layer0ServerCore, ServerLimits, inner, profile
from coaplayers.layer0.profile import handshake_tag
from coaplayers.layer0.server import layer0_config, make_listener

PEER = ("coap", "192.0.2.1:5683")
CA = pki.make_ca("test CA")
SERVER = pki.issue(CA, "server.example", names=["server.example"])
CLIENT = pki.issue(CA, "device-1")
RPK_SERVER, RPK_CLIENT = generate_p256_key(), generate_p256_key()
SERVER_CREDS = (
    CertificateCredentials([SERVER.certificate], SERVER.private_key, [CA.certificate]),
    RawPublicKeyCredentials(RPK_SERVER, trusted=[RPK_CLIENT.public_key()]),
)
CERT_CLIENT = CertificateCredentials([CLIENT.certificate], CLIENT.private_key, [CA.certificate],
                                     server_name="server.example")
CERT_CONTEXT = build_context(CERT_CLIENT, server=False, ciphers=profile.DTLS_CIPHERS)


def client_engine(kind: str) -> DtlsSession:
    config = layer0_config(client=True)
    assert config.false_start, "Layer 0 clients false-start"
    if kind == "x509":
        return OpenSslSession.client(CERT_CONTEXT, CERT_CLIENT, config)
    return GnuTlsSession.client(
        RawPublicKeyCredentials(RPK_CLIENT, trusted=[RPK_SERVER.public_key()]), config)


@dataclass
class Started:
    core: Layer0ServerCore
    client: DtlsSession
    sid: str
    tag: bytes
    last_flight: bytes  # the client's key exchange, ChangeCipherSpec and Finished
    request: bytes  # the first request's record, sealed under the new keys


def start(kind: str) -> Started:
    """One round trip: the ClientHello answered at once, the client false-started."""
    core = Layer0ServerCore(make_listener(SERVER_CREDS), ServerLimits())
    client = client_engine(kind)
    client.connect(0.0)
    created = core.entry(PEER, client.datagrams_to_send()[0], 0.0)
    assert created.code == Code.CREATED and created.location is not None
    tag = handshake_tag(created.payload)
    assert tag is not None
    client.receive_datagram(created.payload, 0.0)
    while not client.false_started:  # the rest of a flight longer than one datagram
        more = core.datagram(created.location[0], tag, 0.0)[0]
        assert more.payload, "the client never wrote its Finished"
        client.receive_datagram(more.payload, 0.0)
    last = b"".join(client.datagrams_to_send())
    client.send(inner.encode(b"\x01", Message(code=Code.GET, uri_path=["hello"])))
    request = b"".join(client.datagrams_to_send())
    return Started(core, client, created.location[0], tag, last, request)


KINDS = ["x509", "rpk"]


def split(data: bytes) -> list[bytes]:
    return records.split_records(data)


def is_finished(record: bytes) -> bool:
    return records.epoch(record) == 1 and records.content_type(record) == 22


def flip_last(record: bytes) -> bytes:
    return record[:-1] + bytes([record[-1] ^ 1])


@pytest.mark.parametrize("kind", KINDS)
def test_request_with_the_finished_is_answered_with_the_servers_finished(kind: str) -> None:
    s = start(kind)
    answer, plaintexts = s.core.datagram(s.sid, s.tag + s.last_flight + s.request, 0.1)
    assert answer.code == Code.CHANGED
    assert any(is_finished(r) for r in split(answer.payload))  # the server's last flight
    assert len(plaintexts) == 1 and inner.decode(plaintexts[0]).message.opt.uri_path == (
        "hello",)
    response = s.core.seal(s.sid, inner.encode(b"\x01", Message(code=Code.CONTENT,
                                                                 payload=b"hi")))
    s.client.receive_datagram(answer.payload + response, 0.2)
    events = []
    while (e := s.client.next_event()) is not None:
        events.append(e)
    assert [type(e) for e in events] == [HandshakeComplete, ApplicationData]
    assert inner.decode(events[1].data).message.payload == b"hi"  # type: ignore[attr-defined]
    # The same bytes again (a replay, or the client's repeat after a lost answer): the
    # server's Finished again, the request not a second time.
    again, replayed = s.core.datagram(s.sid, s.tag + s.last_flight + s.request, 0.3)
    assert again.code == Code.CHANGED and replayed == []


Tamper = Callable[[list[bytes], list[bytes]], list[bytes]]

TAMPERS: dict[str, Tamper] = {
    "Finished altered": lambda f, r: [flip_last(x) if is_finished(x) else x for x in f] + r,
    "Finished dropped": lambda f, r: [x for x in f if not is_finished(x)] + r,
    "request ahead of a dropped Finished": lambda f, r: r + [x for x in f
                                                            if not is_finished(x)],
    "request alone": lambda f, r: r,
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_no_request_runs_before_the_clients_finished_is_verified(kind: str,
                                                                  tamper: str) -> None:
    s = start(kind)
    payload = b"".join(TAMPERS[tamper](split(s.last_flight), split(s.request)))
    answer, plaintexts = s.core.datagram(s.sid, s.tag + payload, 0.1)
    assert plaintexts == []
    assert not any(is_finished(r) for r in split(answer.payload or b""))
    assert not s.core.sessions[s.sid].established
    # Its client, with no authentic answer, starts over (docs/PROTOCOL.md 3.3): that
    # handshake completes with the request, once.
    again = start(kind)
    answer, plaintexts = again.core.datagram(again.sid,
                                             again.tag + again.last_flight + again.request, 0.2)
    assert len(plaintexts) == 1 and again.core.sessions[again.sid].established


@pytest.mark.parametrize("kind", KINDS)
def test_an_altered_request_is_dropped_and_only_the_handshake_completes(kind: str) -> None:
    s = start(kind)
    request = b"".join(flip_last(r) for r in split(s.request))
    answer, plaintexts = s.core.datagram(s.sid, s.tag + s.last_flight + request, 0.1)
    assert plaintexts == [] and s.core.sessions[s.sid].established
    assert any(is_finished(r) for r in split(answer.payload))
    # Its client gets the server's Finished but no answer: nothing wrong is handed over.
    s.client.receive_datagram(answer.payload, 0.2)
    while (e := s.client.next_event()) is not None:
        assert not isinstance(e, ApplicationData)
    assert s.client.is_established


@pytest.mark.parametrize("kind", KINDS)
def test_an_altered_server_finished_hands_the_client_nothing(kind: str) -> None:
    s = start(kind)
    answer, _ = s.core.datagram(s.sid, s.tag + s.last_flight + s.request, 0.1)
    response = s.core.seal(s.sid, inner.encode(b"\x01", Message(code=Code.CONTENT,
                                                                 payload=b"hi")))
    altered = b"".join(flip_last(r) if is_finished(r) else r for r in split(answer.payload))
    s.client.receive_datagram(altered + response, 0.2)
    while (e := s.client.next_event()) is not None:
        assert not isinstance(e, ApplicationData)
    assert not s.client.is_established
