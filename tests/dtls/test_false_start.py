"""RFC 7918 False Start in the engine: a client sends application data with its Finished
(certificates on OpenSSL, raw public keys on GnuTLS), the server takes it only after it has
verified that Finished, and a suite without forward secrecy never false-starts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from coaplayers.dtls import (
    ApplicationData,
    ConnectionClosed,
    DtlsConfig,
    DtlsSession,
    Event,
    GnuTlsListener,
    GnuTlsSession,
    HandshakeComplete,
    OpenSslPskClientSession,
    OpenSslPskListener,
    PskClientCredentials,
    PskStore,
    SessionClosed,
    records,
)
from coaplayers.dtls.openssl import build_psk_context

from .conftest import PSK_IDENTITY, PSK_KEY, Pki, openssl_backend
from .test_gnutls_rpk import client_credentials, server_credentials

FALSE_START = DtlsConfig(false_start=True)
PEER = ("2001:db8::7", 61616)


@dataclass
class Flight:
    """A client that has written its last flight, and the server that is waiting for it."""

    client: DtlsSession
    server: DtlsSession
    last_flight: list[bytes]


def to_client_last_flight(client: DtlsSession, listener: object) -> Flight:
    """Run the handshake up to the client's last flight (not delivered), without loss."""
    client.connect(0.0)
    to_server = client.datagrams_to_send()
    server: DtlsSession | None = None
    for _ in range(6):
        to_client: list[bytes] = []
        for datagram in to_server:
            if server is None:
                replies, server = listener.accept(PEER, datagram, 0.0)  # type: ignore[attr-defined]
                to_client += replies
            else:
                server.receive_datagram(datagram, 0.0)
        if server is not None:
            to_client += server.datagrams_to_send()
        for datagram in to_client:
            client.receive_datagram(datagram, 0.0)
        to_server = client.datagrams_to_send()
        if server is not None and any(
            records.epoch(r) == 1 for d in to_server for r in records.split_records(d)
        ):
            return Flight(client, server, to_server)
    raise AssertionError("the client never wrote its Finished")


def events(session: DtlsSession) -> list[Event]:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def cert_client_and_listener(certs: Pki, config: DtlsConfig) -> tuple[DtlsSession, object]:
    backend = openssl_backend(certs)
    return backend.new_client(config), backend.new_listener(DtlsConfig())


def rpk_client_and_listener(_certs: Pki, config: DtlsConfig) -> tuple[DtlsSession, object]:
    return (GnuTlsSession.client(client_credentials(), config),
            GnuTlsListener(server_credentials(), DtlsConfig()))


KINDS: dict[str, Callable[[Pki, DtlsConfig], tuple[DtlsSession, object]]] = {
    "x509": cert_client_and_listener,
    "rpk": rpk_client_and_listener,
}


@pytest.fixture(params=sorted(KINDS))
def flight(request: pytest.FixtureRequest, certs: Pki) -> Flight:
    client, listener = KINDS[request.param](certs, FALSE_START)
    return to_client_last_flight(client, listener)


def test_the_request_rides_the_finished_and_the_answer_the_servers(flight: Flight) -> None:
    client, server = flight.client, flight.server
    assert client.false_started and not client.is_established
    assert client.false_start_refused is None
    client.send(b"early request")
    request = client.datagrams_to_send()
    assert len(request) == 1 and records.epoch(request[0]) == 1

    server.receive_datagram(b"".join(flight.last_flight + request), 1.0)
    seen = events(server)
    # The request is handed over only after the handshake completed (the Finished verified).
    assert [type(e) for e in seen] == [HandshakeComplete, ApplicationData]
    assert seen[1] == ApplicationData(b"early request")
    final = server.datagrams_to_send()
    server.send(b"the answer")
    answer = b"".join(final + server.datagrams_to_send())

    client.receive_datagram(answer, 1.0)
    got = events(client)
    assert [type(e) for e in got] == [HandshakeComplete, ApplicationData]
    assert got[1] == ApplicationData(b"the answer")
    assert client.is_established and not client.false_started
    # The sequence numbers go on under the same keys: later records authenticate both ways.
    client.send(b"later")
    server.receive_datagram(b"".join(client.datagrams_to_send()), 2.0)
    assert events(server) == [ApplicationData(b"later")]
    server.send(b"later answer")
    client.receive_datagram(b"".join(server.datagrams_to_send()), 2.0)
    assert events(client) == [ApplicationData(b"later answer")]


def test_a_request_ahead_of_the_finished_still_waits_for_it(flight: Flight) -> None:
    """Record order within the datagram does not matter: the server holds the record."""
    flight.client.send(b"early request")
    request = flight.client.datagrams_to_send()
    flight.server.receive_datagram(b"".join(request + flight.last_flight), 1.0)
    seen = events(flight.server)
    assert [type(e) for e in seen] == [HandshakeComplete, ApplicationData]


def alter_finished(datagrams: list[bytes]) -> bytes:
    """The flight with one bit of the (encrypted) Finished record flipped."""
    recs = [r for d in datagrams for r in records.split_records(d)]
    out = []
    for r in recs:
        if records.epoch(r) == 1 and records.content_type(r) == records.CONTENT_HANDSHAKE:
            r = r[:-1] + bytes([r[-1] ^ 1])
        out.append(r)
    return b"".join(out)


def drop_finished(datagrams: list[bytes]) -> bytes:
    recs = [r for d in datagrams for r in records.split_records(d)]
    return b"".join(r for r in recs if records.epoch(r) != 1)


@pytest.mark.parametrize("tamper", [alter_finished, drop_finished])
def test_no_request_without_a_verified_finished(flight: Flight,
                                               tamper: Callable[[list[bytes]], bytes]) -> None:
    flight.client.send(b"early request")
    request = flight.client.datagrams_to_send()
    flight.server.receive_datagram(tamper(flight.last_flight) + b"".join(request), 1.0)
    seen = events(flight.server)
    assert not any(isinstance(e, ApplicationData) for e in seen)
    assert not flight.server.is_established
    # The request alone, later (reordered, or a proxy holding the flight back): still nothing.
    flight.server.receive_datagram(b"".join(request), 1.5)
    assert not any(isinstance(e, ApplicationData) for e in events(flight.server))


def test_an_altered_request_is_dropped_and_the_session_lives(flight: Flight) -> None:
    flight.client.send(b"early request")
    request = flight.client.datagrams_to_send()[0]
    altered = request[:-1] + bytes([request[-1] ^ 1])
    flight.server.receive_datagram(b"".join(flight.last_flight) + altered, 1.0)
    seen = events(flight.server)
    assert [type(e) for e in seen] == [HandshakeComplete]
    # The original still authenticates once (and a replay of it does not).
    flight.server.receive_datagram(request, 1.5)
    flight.server.receive_datagram(request, 1.6)
    assert events(flight.server) == [ApplicationData(b"early request")]


def test_the_answer_counts_only_with_the_servers_finished(flight: Flight) -> None:
    """An answer whose Finished was altered (or missing) is never handed over."""
    flight.client.send(b"early request")
    flight.server.receive_datagram(
        b"".join(flight.last_flight + flight.client.datagrams_to_send()), 1.0)
    events(flight.server)
    final = flight.server.datagrams_to_send()
    flight.server.send(b"the answer")
    answer = flight.server.datagrams_to_send()
    flight.client.receive_datagram(b"".join(answer), 1.0)  # the answer without the Finished
    assert not any(isinstance(e, ApplicationData) for e in events(flight.client))
    flight.client.receive_datagram(alter_finished(final) + b"".join(answer), 1.1)
    got = events(flight.client)
    assert not any(isinstance(e, ApplicationData) for e in got)
    assert not flight.client.is_established


def test_off_unless_configured(certs: Pki) -> None:
    client, listener = cert_client_and_listener(certs, DtlsConfig())
    flight = to_client_last_flight(client, listener)
    assert not flight.client.false_started
    with pytest.raises(SessionClosed):
        flight.client.send(b"early request")


def test_psk_without_forward_secrecy_does_not_false_start() -> None:
    client = OpenSslPskClientSession.psk_client(
        build_psk_context(server=False), PskClientCredentials(PSK_IDENTITY, PSK_KEY),
        FALSE_START)
    listener = OpenSslPskListener(PskStore({PSK_IDENTITY: PSK_KEY}), DtlsConfig())
    flight = to_client_last_flight(client, listener)
    assert not flight.client.false_started
    assert flight.client.false_start_refused is not None
    assert "forward-secret" in flight.client.false_start_refused
    assert flight.client.max_send_size is None
    with pytest.raises(SessionClosed):
        flight.client.send(b"early request")
    # The handshake itself goes on as usual.
    flight.server.receive_datagram(b"".join(flight.last_flight), 1.0)
    assert flight.server.is_established
    flight.client.receive_datagram(b"".join(flight.server.datagrams_to_send()), 1.0)
    assert flight.client.is_established
    assert not any(isinstance(e, ConnectionClosed) for e in events(flight.client))


def test_no_false_start_to_a_server_that_was_not_checked() -> None:
    """A raw-public-key client that pins no key (``require_peer`` off) accepts any server:
    RFC 7918 asks that the server be authenticated before application data goes out, so it
    does not false-start. (An OpenSSL client without a trusted CA fails the handshake.)"""
    from coaplayers.dtls import RawPublicKeyCredentials

    from .test_gnutls_rpk import CLIENT_KEY

    rpk = GnuTlsSession.client(RawPublicKeyCredentials(CLIENT_KEY, require_peer=False),
                               FALSE_START)
    flight = to_client_last_flight(rpk, GnuTlsListener(server_credentials(), DtlsConfig()))
    assert not flight.client.false_started
    assert flight.client.false_start_refused is not None
    assert "not checked" in flight.client.false_start_refused
    with pytest.raises(SessionClosed):
        flight.client.send(b"early request")
