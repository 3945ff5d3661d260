"""Fuzzing the DTLS input path: record splitting and the ClientHello inspectors, then both
listeners (and the dual one) fed mutations of real ClientHellos, with and without a valid
cookie, and fresh server sessions fed mutations of real client flights.

tests/dtls/test_malformed.py already throws garbage at established sessions and at listeners
without a cookie; this adds the parsers themselves, cookie-bearing mutations (which get past
the stateless check into the backends), the dual listener and half-open sessions.

Contract: :func:`records.split_records` rejects with :class:`ProtocolViolation` only; the
inspectors (``client_hello_random``, ``offers_psk``, ``plausible``, ``handshake_type``) and
every listener and session entry point never raise on received bytes (RFC 6347: drop).
"""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from coaplayers.dtls import (
    ConnectionClosed,
    DtlsError,
    DtlsSession,
    HandshakeComplete,
    KindListener,
    ProtocolViolation,
    State,
    records,
)

from . import peers
from .common import FUZZ, bytes_input, corpus, corpus_files, mutated, only

DATAGRAMS = corpus("dtls")
HELLOS = [d for n, d in corpus_files("dtls").items() if "client_hello" in n]
CLIENT_FLIGHTS = [d for n, d in corpus_files("dtls").items() if n.endswith("_client.bin")]


def test_corpus_is_real_dtls() -> None:
    for name, data in corpus_files("dtls").items():
        recs = records.split_records(data)
        assert recs and b"".join(recs) == data, name
        if "client_hello" in name:
            assert records.client_hello_random(data) is not None, name
            assert records.offers_psk(data) == name.startswith("tinydtls"), name


@FUZZ
@given(data=bytes_input(DATAGRAMS, max_size=400))
@example(data=b"")
@example(data=b"\x16\xfe\xfd" + b"\x00" * 10)  # 13 bytes but the length is cut
@example(data=b"\x16\xfe\xfd" + b"\x00" * 8 + b"\xff\xff")  # length beyond the limit
def test_split_records_rejects_only_with_protocol_violation(data: bytes) -> None:
    with only(ProtocolViolation) as rejected:
        recs = records.split_records(data)
    if rejected:
        return
    assert b"".join(recs) == data  # lossless: every byte belongs to exactly one record
    for record in recs:
        assert len(record) >= records.HEADER_LEN
        assert record[0] in (20, 21, 22, 23) and record[1] == 0xFE
        assert len(record) - records.HEADER_LEN == int.from_bytes(record[11:13], "big")
        assert isinstance(records.plausible(record), bool)
        assert records.handshake_type(record) in (None, *range(256))
    assert records.pack_datagrams(recs, 1 << 16) == ([data] if data else [])


@FUZZ
@given(data=bytes_input(HELLOS + DATAGRAMS, max_size=300))
def test_client_hello_inspectors_never_raise(data: bytes) -> None:
    with only():
        random = records.client_hello_random(data)
        psk = records.offers_psk(data)
    assert isinstance(psk, bool)
    if random is not None:
        # only a whole, cleanly framed, self-consistent ClientHello yields its random
        assert len(random) == 32 and data[random_offset(data) :][:32] == random
        first = records.split_records(data)[0]
        assert records.handshake_type(first) == records.HANDSHAKE_CLIENT_HELLO
        assert records.plausible(first)


def random_offset(_: bytes) -> int:
    return records.HEADER_LEN + 12 + 2


# ------------------------------------------------------------------------- listeners


def check_listener_answer(replies: list[bytes], session: DtlsSession | None, mtu: int) -> None:
    for reply in replies:
        assert len(reply) <= mtu
        (record,) = records.split_records(reply)
        assert records.handshake_type(record) == records.HANDSHAKE_HELLO_VERIFY_REQUEST
    if session is not None:
        assert not replies
        assert session.state in (State.HANDSHAKING, State.CLOSED)
        for event in iter(session.next_event, None):
            assert isinstance(event, ConnectionClosed)  # never a HandshakeComplete from one hello
            assert event.error is None or isinstance(event.error, DtlsError)


def finish_handshake(client: DtlsSession, server: DtlsSession) -> bool:
    to_client = server.datagrams_to_send()
    for _ in range(20):
        for d in to_client:
            client.receive_datagram(d, 0.0)
        for d in client.datagrams_to_send():
            server.receive_datagram(d, 0.0)
        to_client = server.datagrams_to_send()
        if client.is_established and server.is_established:
            return True
    return False


@pytest.mark.parametrize("backend", sorted(peers.BACKENDS))
def test_listener_survives_mutated_client_hellos_with_and_without_cookie(backend: str) -> None:
    new_client, new_listener = peers.BACKENDS[backend]
    listener = new_listener(peers.L0_CONFIG)
    peer = ("fuzz", 7)
    # A ClientHello that carries this listener's valid cookie reaches the backend itself.
    hello, hvr, cookie_hello = peers.cookie_exchange(new_client(peers.L0_CONFIG), listener, peer)
    bases = [hello, cookie_hello, hvr, *HELLOS]
    sessions: list[DtlsSession] = []

    @FUZZ
    @given(datagram=mutated(bases), same_peer=st.booleans())
    @example(datagram=cookie_hello + b"\x00", same_peer=True)
    @example(datagram=cookie_hello[:-1], same_peer=True)
    @example(datagram=cookie_hello + cookie_hello, same_peer=True)
    def feed(datagram: bytes, same_peer: bool) -> None:
        with only():
            replies, session = listener.accept(peer if same_peer else ("other", 1), datagram, 0.0)
        check_listener_answer(replies, session, listener.config.mtu)
        if session is not None:
            sessions.append(session)
            session.abort()  # stay bounded; every session must also be safe to abort

    feed()
    # The listener still serves a real client afterwards.
    client = new_client(peers.L0_CONFIG)
    _, _, again = peers.cookie_exchange(client, listener, ("fresh", 1))
    _replies, server = listener.accept(("fresh", 1), again, 0.0)
    assert server is not None and finish_handshake(client, server)
    if hasattr(listener, "session_count"):
        assert listener.session_count == 1  # the aborted fuzz sessions left nothing behind


def test_kind_listener_routes_any_input_without_raising() -> None:
    dual = KindListener(psk=peers.psk_listener(peers.L0_CONFIG),
                        certificate=peers.cert_listener(peers.L0_CONFIG))

    @FUZZ
    @given(datagram=bytes_input(HELLOS, max_size=300))
    def feed(datagram: bytes) -> None:
        with only():
            replies, session = dual.accept(("dual", 1), datagram, 0.0)
        check_listener_answer(replies, session, 1024)
        if session is not None:
            session.abort()

    feed()
    for new_client in (peers.psk_client, peers.cert_client):
        client = new_client(peers.L0_CONFIG)
        _, _, again = peers.cookie_exchange(client, dual, ("dual", 2))
        _, server = dual.accept(("dual", 2), again, 0.0)
        assert server is not None and finish_handshake(client, server)


@pytest.mark.parametrize("backend", sorted(peers.BACKENDS))
def test_half_open_server_session_survives_mutated_client_flights(backend: str) -> None:
    """A session just past the cookie exchange gets a mutated second client flight: it either
    drops it, ends with a typed error, or (for an untouched flight) completes."""
    new_client, new_listener = peers.BACKENDS[backend]
    listener = new_listener(peers.L0_CONFIG)
    flights = [d for d in CLIENT_FLIGHTS if d is not None]
    counter = iter(range(1 << 30))

    @FUZZ
    @given(datagrams=st.lists(bytes_input(flights + DATAGRAMS, max_size=300),
                              min_size=1, max_size=3))
    def feed(datagrams: list[bytes]) -> None:
        peer = ("half-open", next(counter))
        client = new_client(peers.L0_CONFIG)
        _, _, again = peers.cookie_exchange(client, listener, peer)
        _, server = listener.accept(peer, again, 0.0)
        assert server is not None
        server.datagrams_to_send()
        with only():
            for datagram in datagrams:
                server.receive_datagram(datagram, 1.0)
                server.datagrams_to_send()
                server.handle_timer(2.0)
        for event in iter(server.next_event, None):
            assert isinstance(event, ConnectionClosed | HandshakeComplete)
            if isinstance(event, ConnectionClosed):
                assert event.error is None or isinstance(event.error, DtlsError)
        server.abort()

    feed()


@pytest.mark.parametrize("backend", sorted(peers.BACKENDS))
def test_sending_empty_application_data_keeps_the_session(backend: str) -> None:
    """Found by the Layer 0 fuzzing: OpenSSL's SSL_write of zero bytes failed and ended the
    session ("Unexpected EOF"); an empty send now sends nothing on both backends."""
    new_client, new_listener = peers.BACKENDS[backend]
    client, listener = new_client(peers.L0_CONFIG), new_listener(peers.L0_CONFIG)
    _, _, again = peers.cookie_exchange(client, listener, ("empty", 1))
    _, server = listener.accept(("empty", 1), again, 0.0)
    assert server is not None and finish_handshake(client, server)
    client.send(b"")
    assert client.is_established and client.datagrams_to_send() == []
    client.send(b"after")
    for d in client.datagrams_to_send():
        server.receive_datagram(d, 1.0)
    assert [e.data for e in iter(server.next_event, None) if hasattr(e, "data")] == [b"after"]
