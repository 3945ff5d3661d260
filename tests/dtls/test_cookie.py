"""The listeners stay stateless until a ClientHello returns a cookie made for that peer."""

from __future__ import annotations

import gc
import tracemalloc

from coaplayers.dtls import DtlsConfig, TinyDtlsListener, records

from .conftest import Backend
from .harness import CLIENT, Network

RANDOM_AT = records.HEADER_LEN + 12 + 2  # record header, handshake header, client_version


def first_client_hello(backend: Backend) -> bytes:
    client = backend.new_client(DtlsConfig())
    client.connect(0.0)
    (hello,) = client.datagrams_to_send()
    assert records.client_hello_random(hello) is not None
    return hello


def with_random(hello: bytes, n: int) -> bytes:
    random = n.to_bytes(32, "big")
    return hello[:RANDOM_AT] + random + hello[RANDOM_AT + 32 :]


def assert_hello_verify_request(replies: list[bytes]) -> None:
    assert len(replies) == 1
    (record,) = records.split_records(replies[0])
    assert records.handshake_type(record) == records.HANDSHAKE_HELLO_VERIFY_REQUEST


def test_cookieless_client_hellos_keep_no_state(backend: Backend) -> None:
    listener = backend.new_listener(DtlsConfig())
    hello = first_client_hello(backend)

    def flood(start: int, count: int) -> None:
        for i in range(start, start + count):
            peer = (f"2001:db8::{i:x}", 1024 + i % 60000)
            replies, session = listener.accept(peer, with_random(hello, i), float(i))
            assert session is None
            assert_hello_verify_request(replies)
            assert len(replies[0]) <= 60  # a small answer: little amplification

    flood(0, 500)  # warm caches and interned objects up
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        flood(500, 10_000)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert growth < 64 * 1024, f"{growth} bytes kept for 10,000 cookieless ClientHellos"
    if isinstance(listener, TinyDtlsListener):
        assert listener.session_count == 0


def test_cookie_is_bound_to_the_peer_key(backend: Backend) -> None:
    listener = backend.new_listener(DtlsConfig())
    client = backend.new_client(DtlsConfig())
    client.connect(0.0)
    (hello,) = client.datagrams_to_send()
    replies, session = listener.accept("peer A", hello, 0.0)
    assert session is None
    assert_hello_verify_request(replies)
    client.receive_datagram(replies[0], 0.0)
    (hello_with_cookie,) = client.datagrams_to_send()
    assert len(hello_with_cookie) > len(hello)  # it carries the cookie

    # The same ClientHello from another peer: a new HelloVerifyRequest, no session.
    replies, session = listener.accept("peer B", hello_with_cookie, 0.0)
    assert session is None
    assert_hello_verify_request(replies)
    # A cookie altered by one bit: likewise.
    tampered = bytearray(hello_with_cookie)
    cookie_at = RANDOM_AT + 32 + 1 + hello_with_cookie[RANDOM_AT + 32] + 1
    tampered[cookie_at] ^= 1
    replies, session = listener.accept("peer A", bytes(tampered), 0.0)
    assert session is None
    assert_hello_verify_request(replies)
    if isinstance(listener, TinyDtlsListener):
        assert listener.session_count == 0

    # From the peer it was made for, it opens a session, and the handshake goes on.
    replies, session = listener.accept("peer A", hello_with_cookie, 0.0)
    assert replies == [] and session is not None
    net = Network(client, listener, peer_key="peer A", server=session, servers=[session])
    net._collect()
    net.run(until=net.both_established)
    assert net.both_established()


def test_non_client_hello_datagrams_are_ignored_by_the_listener(backend: Backend) -> None:
    net = backend.network()
    net.handshake()
    listener = backend.new_listener(DtlsConfig())  # e.g. a restarted server
    for sent in net.sent:
        if sent.sender == CLIENT and records.client_hello_random(sent.data) is None:
            assert listener.accept("peer", sent.data, 0.0) == ([], None)
    if isinstance(listener, TinyDtlsListener):
        assert listener.session_count == 0


def test_hello_parsing_reads_session_id_and_cookie(backend: Backend) -> None:
    listener = backend.new_listener(DtlsConfig())
    client = backend.new_client(DtlsConfig())
    client.connect(0.0)
    (hello,) = client.datagrams_to_send()
    assert records.session_id_and_cookie(hello) == (b"", 0)  # a fresh client offers neither
    assert not records.has_cookie(hello)
    assert records.session_id_without_cookie(hello) is None
    assert records.server_hello_session_id(hello) is None  # not a ServerHello

    replies, _ = listener.accept("peer A", hello, 0.0)
    (verify_request,) = records.split_records(replies[0])
    cookie_len = verify_request[records.HEADER_LEN + 12 + 2]  # after the server_version
    client.receive_datagram(replies[0], 0.0)
    (hello_with_cookie,) = client.datagrams_to_send()
    assert records.session_id_and_cookie(hello_with_cookie) == (b"", cookie_len) != (b"", 0)
    assert records.has_cookie(hello_with_cookie)
    assert records.session_id_and_cookie(hello[: RANDOM_AT + 32]) is None  # cut short

    net = backend.network()
    net.handshake()
    server_hellos = [
        r for sent in net.sent if sent.sender != CLIENT
        for r in records.split_records(sent.data)
        if records.handshake_type(r) == records.HANDSHAKE_SERVER_HELLO
    ]
    assert server_hellos
    session_id = records.server_hello_session_id(server_hellos[0])
    assert session_id is not None and len(session_id) <= 32
