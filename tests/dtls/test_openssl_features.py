"""What only the OpenSSL backend has: the TLS exporter and session resumption."""

from __future__ import annotations

import gc

import pytest

from coaplayers.dtls import DtlsConfig, DtlsError, OpenSslListener, records

from .conftest import Backend, Pki, openssl_backend, tinydtls_backend
from .harness import CLIENT, SERVER, Network


def test_exporter_agrees_on_both_sides(openssl: Backend) -> None:
    net = openssl.network()
    net.handshake()
    assert net.server is not None
    client_key = net.client.export_keying_material(b"atls-oscore", 32)
    server_key = net.server.export_keying_material(b"atls-oscore", 32)
    assert client_key == server_key and len(client_key) == 32
    assert net.client.export_keying_material(b"other label", 32) != client_key
    with_context = net.client.export_keying_material(b"atls-oscore", 32, b"ctx")
    assert with_context == net.server.export_keying_material(b"atls-oscore", 32, b"ctx")
    assert with_context != client_key
    # a second session between the same two parties exports different keys
    again = Network(openssl.new_client(DtlsConfig()), net.listener)
    again.handshake()
    assert again.client.export_keying_material(b"atls-oscore", 32) != client_key


def test_exporter_needs_an_established_session(openssl: Backend) -> None:
    net = openssl.network()
    with pytest.raises(DtlsError, match="established"):
        net.client.export_keying_material(b"atls-oscore", 32)
    net.handshake()
    net.client.close()
    with pytest.raises(DtlsError):
        net.client.export_keying_material(b"atls-oscore", 32)


def test_tinydtls_has_no_exporter() -> None:
    net = tinydtls_backend().network()
    net.handshake()
    assert net.both_established()
    with pytest.raises(DtlsError, match="no TLS exporter"):
        net.client.export_keying_material(b"atls-oscore", 32)
    assert net.both_established()  # asking did not hurt the session


def test_resumption_is_shorter_and_reported(openssl: Backend) -> None:
    full = openssl.network()
    full.handshake()
    state = full.client.resumption_state  # type: ignore[attr-defined]
    assert state is not None
    full.client.close()

    resumed = Network(openssl.new_client(DtlsConfig(), resume=state), full.listener)
    resumed.handshake()
    assert resumed.both_established()
    for side in (CLIENT, SERVER):
        done = resumed.handshake_complete(side)
        assert done.resumed is True
    assert resumed.client.resumed and resumed.server.resumed  # type: ignore[union-attr]
    assert resumed.handshake_complete(SERVER).peer_identity == openssl.identity_seen_by_server
    assert resumed.handshake_complete(CLIENT).peer_identity == openssl.identity_seen_by_client
    assert resumed.bytes_sent() < full.bytes_sent() / 2, (resumed.bytes_sent(), full.bytes_sent())
    assert resumed.client.export_keying_material(b"x", 16) == resumed.server.export_keying_material(  # type: ignore[union-attr]
        b"x", 16
    )
    resumed.client_send(b"after resumption")
    resumed.settle()
    assert resumed.received(SERVER) == [b"after resumption"]


def test_resumption_against_a_restarted_server_falls_back_to_a_full_handshake(
    openssl: Backend, certs: Pki
) -> None:
    full = openssl.network()
    full.handshake()
    state = full.client.resumption_state  # type: ignore[attr-defined]
    restarted = OpenSslListener(certs.server_credentials())  # empty session cache
    net = Network(openssl.new_client(DtlsConfig(), resume=state), restarted)
    net.handshake()
    assert net.both_established()
    assert net.handshake_complete(CLIENT).resumed is False
    assert net.handshake_complete(SERVER).resumed is False


def test_resumption_under_loss(certs: Pki) -> None:
    backend = openssl_backend(certs)
    patient = DtlsConfig(handshake_timeout=300.0)
    listener = backend.new_listener(patient)
    full = Network(backend.new_client(patient), listener)
    full.handshake()
    state = full.client.resumption_state  # type: ignore[attr-defined]
    for seed in range(20):
        net = Network(
            backend.new_client(patient, resume=state), listener,
            seed=seed, loss=0.3, duplicate=0.2, reorder=0.4,
        )
        net.handshake()
        assert net.both_established(), f"seed {seed}"
        assert net.handshake_complete(CLIENT).resumed
        assert net.handshake_complete(SERVER).resumed
        net.client.abort()  # as an owner does when it drops a session
        net.server.abort()  # type: ignore[union-attr]


@pytest.mark.parametrize("end", ["client closes", "server closes", "both evicted"])
def test_sessions_stay_resumable_after_an_orderly_end_or_eviction(
    openssl: Backend, end: str
) -> None:
    full = openssl.network()
    full.handshake()
    assert full.server is not None
    state = full.client.resumption_state  # type: ignore[attr-defined]
    if end == "client closes":
        full.client.close()
    elif end == "server closes":
        full.server.close()
    else:
        full.client.abort(DtlsError("evicted"))
        full.server.abort(DtlsError("evicted"))
    full._collect()
    full.settle()
    assert full.client.is_closed and full.server.is_closed
    del full.client, full.server, full.servers  # let OpenSSL free both connections
    gc.collect()
    net = Network(openssl.new_client(DtlsConfig(), resume=state), full.listener)
    net.handshake()
    assert net.handshake_complete(CLIENT).resumed and net.handshake_complete(SERVER).resumed



def _lock_step(client, listener, pause_at: int):  # type: ignore[no-untyped-def]
    """One handshake in strict request/answer steps (as Layer 0 carries it), with a wall-clock
    pause at ``pause_at`` (2 n: before request n reaches the server, 2 n + 1: before its answer
    reaches the client); returns the sizes of each request and answer."""
    import time

    def pause() -> None:
        # Not synchronisation: OpenSSL runs its own retransmission timer on the wall clock
        # (1 s) and cannot be given another clock, so the path has to be this slow.
        time.sleep(1.05)

    steps: list[tuple[int, int]] = []
    client.connect(time.monotonic())
    queue = client.datagrams_to_send()
    server = None
    for step in range(12):
        if pause_at == 2 * step:
            pause()
        up = queue.pop(0)
        if server is None:
            answers, server = listener.accept("peer", up, time.monotonic())
            if server is not None:
                answers = server.datagrams_to_send()
        else:
            server.receive_datagram(up, time.monotonic())
            answers = server.datagrams_to_send()
        steps.append((len(up), len(answers)))
        if pause_at == 2 * step + 1:
            pause()
        for answer in answers:
            client.receive_datagram(answer, time.monotonic())
        queue += client.datagrams_to_send()
        if not queue:
            return steps, server
    raise AssertionError(f"the handshake did not settle: {steps}")


@pytest.mark.parametrize("pause_at", [2, 3, 4, 5])
def test_openssl_own_timer_adds_no_flight_at_the_end_of_the_handshake(
    openssl: Backend, pause_at: int
) -> None:
    """A slow path let OpenSSL's timer expire: its repeats were taken for the final flight and
    both sides answered each other's repeats for ever (Layer 0 handshakes under loss)."""
    config = DtlsConfig()
    listener = openssl.new_listener(config)
    client = openssl.new_client(config)
    steps, server = _lock_step(client, listener, pause_at)
    assert client.is_established and server is not None and server.is_established, steps
    assert len(steps) == 3, steps  # ClientHello, ClientHello + cookie, the client's flight
    state = client.resumption_state  # type: ignore[attr-defined]
    client.close()
    again = openssl.new_client(config, resume=state)
    steps, server = _lock_step(again, listener, pause_at)
    assert again.is_established and server is not None and server.is_established, steps
    # ClientHello (a cached session is resumed without a cookie), the client's final flight
    assert len(steps) == 2, steps


def _hello_of(client) -> bytes:  # type: ignore[no-untyped-def]
    client.connect(0.0)
    (hello,) = client.datagrams_to_send()
    return hello


def test_a_cached_session_is_resumed_without_a_cookie_exchange(
    openssl: Backend, certs: Pki
) -> None:
    full = openssl.network()
    full.handshake()
    state = full.client.resumption_state  # type: ignore[attr-defined]
    full.client.close()
    resumed = Network(openssl.new_client(DtlsConfig(), resume=state), full.listener)
    resumed.handshake()
    assert resumed.handshake_complete(SERVER).resumed and resumed.handshake_complete(CLIENT).resumed
    assert not any(s.stateless for s in resumed.sent)  # no HelloVerifyRequest
    hello, answer = resumed.sent[0], resumed.sent[1]
    assert (hello.sender, answer.sender) == (CLIENT, SERVER)
    assert len(answer.data) < 1.5 * len(hello.data)  # ServerHello, CCS, Finished: no amplifier
    resumed.client_send(b"resumed at once")
    resumed.settle()
    assert resumed.received(SERVER) == [b"resumed at once"]
    # Turned off, the same offer goes through the cookie exchange.
    strict = OpenSslListener(certs.server_credentials(), resume_without_cookie=False)
    replies, session = strict.accept("peer", _hello_of(openssl.new_client(DtlsConfig())), 0.0)
    assert session is None and replies


def test_an_unknown_session_gets_the_cookie_exchange_and_no_server_flight(
    openssl: Backend, certs: Pki
) -> None:
    full = openssl.network()
    full.handshake()
    state = full.client.resumption_state  # type: ignore[attr-defined]
    # A server that does not hold the session (restarted): the offer is answered with a
    # HelloVerifyRequest only, stateless, whatever the session ID.
    restarted = OpenSslListener(certs.server_credentials())
    hello = _hello_of(openssl.new_client(DtlsConfig(), resume=state))
    replies, session = restarted.accept("peer", hello, 0.0)
    assert session is None and len(replies) == 1
    assert replies[0][records.HEADER_LEN] == records.HANDSHAKE_HELLO_VERIFY_REQUEST
    forged = bytearray(hello)
    sid_at = records.HEADER_LEN + 12 + 2 + 32 + 1
    forged[sid_at : sid_at + 8] = b"\xff" * 8  # a session ID that was never issued
    replies, session = full.listener.accept("peer", bytes(forged), 0.0)
    assert session is None and len(replies) == 1
    assert replies[0][records.HEADER_LEN] == records.HANDSHAKE_HELLO_VERIFY_REQUEST
