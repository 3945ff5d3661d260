"""Handshakes between two engines in memory: events, data, close, loss, final flight, MTU."""

from __future__ import annotations

import pytest

from coaplayers.dtls import (
    AlertReceived,
    ConnectionClosed,
    DtlsConfig,
    DtlsError,
    HandshakeComplete,
    SessionClosed,
    State,
    TinyDtlsListener,
    records,
)

from .conftest import Backend
from .harness import CLIENT, SERVER, Network

SEEDS = range(50)
# A 30 s handshake budget is too short for 30% loss on every datagram (the ClientHello alone
# can use half of it in back-off); these tests are about converging, not about the budget.
PATIENT = DtlsConfig(handshake_timeout=300.0)


def assert_agreed(net: Network, backend: Backend) -> None:
    """Both sides completed once, name each other correctly, and can talk both ways."""
    assert net.both_established(), (net.client.state, net.server and net.server.state)
    client_done = net.handshake_complete(CLIENT)
    server_done = net.handshake_complete(SERVER)
    assert client_done.peer_identity == backend.identity_seen_by_client
    assert server_done.peer_identity == backend.identity_seen_by_server
    assert client_done.cipher_suite == server_done.cipher_suite == backend.cipher_suite
    assert net.closed_event(CLIENT) is None and net.closed_event(SERVER) is None
    net.loss = net.duplicate = net.reorder = 0.0
    net.client_send(b"ping")
    net.settle()
    net.server_send(b"pong")
    net.settle()
    assert net.received(SERVER)[-1:] == [b"ping"]
    assert net.received(CLIENT)[-1:] == [b"pong"]


def assert_idle(net: Network) -> None:
    """No timer once established, and a long quiet spell sends nothing and changes nothing."""
    assert net.client.get_timer() is None
    assert net.server is not None and net.server.get_timer() is None
    before = len(net.sent)
    for session in (net.client, net.server):
        session.handle_timer(net.now + 3600.0)
    net._collect()
    assert len(net.sent) == before
    assert net.both_established()
    assert not net.step()  # nothing in flight, no timer: the network is idle


def without_epoch0_numbers(datagram: bytes) -> bytes:
    return b"".join(
        records.with_sequence_number(r, 0) if records.epoch(r) == 0 else r
        for r in records.split_records(datagram)
    )


def fresh_epoch0_numbers(net: Network, sender: str) -> bool:
    """RFC 6347: every record a side sends in epoch 0 has a new, higher sequence number."""
    numbers = [
        records.sequence_number(r)
        for s in net.sent
        if s.sender == sender and not s.stateless
        for r in records.split_records(s.data)
        if records.epoch(r) == 0
    ]
    return numbers == sorted(set(numbers))


# ---------------------------------------------------------------------------- clean handshake


def test_clean_handshake_events_and_data(backend: Backend) -> None:
    net = backend.network()
    net.handshake()
    assert net.now == 0.0  # no timer had to fire
    assert net.timer_wakeups == {CLIENT: 0, SERVER: 0}
    assert all(not s.resumed for s in (net.client, net.server))
    assert net.client.peer_identity == backend.identity_seen_by_client
    assert net.client.cipher_suite == backend.cipher_suite
    assert_agreed(net, backend)
    # several records each way, in order, nothing else reported
    for i in range(5):
        net.client_send(b"c%d" % i)
        net.server_send(b"s%d" % i)
    net.settle()
    assert net.received(SERVER) == [b"ping"] + [b"c%d" % i for i in range(5)]
    assert net.received(CLIENT) == [b"pong"] + [b"s%d" % i for i in range(5)]
    assert_idle(net)


@pytest.mark.parametrize("closer", [CLIENT, SERVER])
def test_close_notify_reaches_the_other_side(backend: Backend, closer: str) -> None:
    net = backend.network()
    net.handshake()
    other = SERVER if closer == CLIENT else CLIENT
    if isinstance(net.listener, TinyDtlsListener):
        assert net.listener.session_count == 1
    (net.client if closer == CLIENT else net.server).close()  # type: ignore[union-attr]
    net._collect()
    net.settle()
    assert net.closed_event(closer) == ConnectionClosed(None)
    assert net.closed_event(other) == ConnectionClosed(None)
    assert AlertReceived(1, 0) in net.events_of(other, AlertReceived)
    assert net.client.state is State.CLOSED and net.server.state is State.CLOSED  # type: ignore[union-attr]
    assert net.client.get_timer() is None and net.server.get_timer() is None  # type: ignore[union-attr]
    if isinstance(net.listener, TinyDtlsListener):
        assert net.listener.session_count == 0
    with pytest.raises(SessionClosed):
        net.client.send(b"late")
    net.client.close()  # closing twice is harmless and reports nothing new
    net._collect()
    assert len(net.events_of(CLIENT, ConnectionClosed)) == 1


def test_abort_reports_the_given_error_and_frees_the_session(backend: Backend) -> None:
    net = backend.network()
    net.handshake()
    error = DtlsError("evicted")
    assert net.server is not None
    net.server.abort(error)
    net._collect()
    assert net.closed_event(SERVER) == ConnectionClosed(error)
    assert not net.in_flight  # abort tells the peer nothing
    if isinstance(net.listener, TinyDtlsListener):
        assert net.listener.session_count == 0


# ----------------------------------------------------------------------- unreliable networks


@pytest.mark.parametrize(
    "conditions",
    [
        {"loss": 0.3},
        {"duplicate": 0.3},
        {"reorder": 0.5, "duplicate": 0.2},
        {"loss": 0.3, "duplicate": 0.3, "reorder": 0.5},
    ],
    ids=["loss", "duplicate", "reorder", "all"],
)
def test_handshake_converges_on_a_bad_network(backend: Backend, conditions: dict) -> None:
    worst = 0.0
    for seed in SEEDS:
        net = backend.network(PATIENT, seed=seed, **conditions)
        net.handshake()
        assert net.both_established(), f"seed {seed}: {net.events}"
        worst = max(worst, net.now)
        # no timer spins: wake-ups stay near what exponential back-off allows
        assert sum(net.timer_wakeups.values()) <= 4 * (net.now + 1), f"seed {seed}"
        assert fresh_epoch0_numbers(net, CLIENT) and fresh_epoch0_numbers(net, SERVER)
        assert_agreed(net, backend)
        assert_idle(net)
    if "loss" in conditions:
        assert worst > 0.0  # the loss really made someone retransmit


def test_retransmission_backs_off_exponentially(backend: Backend) -> None:
    config = DtlsConfig(initial_retransmit=1.0, max_retransmit=8.0, handshake_timeout=40.0)
    net = backend.network(config, drop=lambda sender, _: True)  # nothing ever arrives
    net.start()
    net.run()
    times = [s.time for s in net.sent if s.sender == CLIENT]
    assert times == [0.0, 1.0, 3.0, 7.0, 15.0, 23.0, 31.0, 39.0]
    assert net.timer_wakeups[CLIENT] == len(times)  # 7 retransmissions + the deadline
    # the same ClientHello each time, under a new record sequence number
    assert {without_epoch0_numbers(s.data) for s in net.sent} == {
        without_epoch0_numbers(net.sent[0].data)
    }
    assert fresh_epoch0_numbers(net, CLIENT)


@pytest.mark.parametrize("resume", [False, True], ids=["full", "resumed"])
def test_lost_final_flight_is_repeated_when_the_peer_retransmits(
    backend: Backend, resume: bool
) -> None:
    if resume and backend.name != "openssl":
        pytest.skip("only OpenSSL resumes sessions")
    kw = {}
    if resume:
        first = Network(backend.new_client(DtlsConfig()), backend.new_listener(DtlsConfig()))
        first.handshake()
        kw["resume"] = first.client.resumption_state  # type: ignore[attr-defined]
        listener = first.listener
    else:
        listener = backend.new_listener(DtlsConfig())
    net = Network(backend.new_client(DtlsConfig(), **kw), listener, drop_final_flight=True)
    net.handshake()
    assert net.final_flight is not None
    finisher, flight = net.final_flight
    waiter = CLIENT if finisher == SERVER else SERVER
    # Full handshakes end with the server's flight, abbreviated ones with the client's.
    assert finisher == (CLIENT if resume else SERVER)
    assert net.lost == len(flight)
    assert net.both_established()
    assert net.timer_wakeups[finisher] == 0  # an established side runs no timer ...
    assert net.timer_wakeups[waiter] == 1  # ... the waiting side's retransmission did it
    after = [s.data for s in net.sent if s.sender == finisher][-len(flight) :]
    # the same datagrams again, but epoch 0 records (ChangeCipherSpec) under new numbers
    assert [without_epoch0_numbers(d) for d in after] == [
        without_epoch0_numbers(d) for d in flight
    ]
    assert after != flight
    assert all(fresh_epoch0_numbers(net, sender) for sender in (CLIENT, SERVER))
    sent = [without_epoch0_numbers(s.data) for s in net.sent if s.sender == finisher]
    assert sum(d in {without_epoch0_numbers(f) for f in flight} for d in sent) == 2 * len(flight)
    assert_agreed(net, backend)
    assert_idle(net)


# ------------------------------------------------------------------------------------- MTU


@pytest.mark.parametrize("mtu", [256, 600, 1152])
def test_every_datagram_fits_the_mtu(backend: Backend, mtu: int) -> None:
    config = DtlsConfig(mtu=mtu, handshake_timeout=300.0)
    for seed in range(5):
        net = backend.network(config, seed=seed, loss=0.2, reorder=0.3)
        net.handshake()
        assert net.both_established(), f"seed {seed}"
        limit = net.client.max_send_size
        assert limit is not None and 0 < limit < mtu
        net.loss = net.reorder = 0.0
        net.client_send(b"x" * limit)
        net.server_send(b"y" * limit)
        net.settle()
        assert net.received(SERVER) == [b"x" * limit]
        assert net.received(CLIENT) == [b"y" * limit]
        sizes = [len(s.data) for s in net.sent]
        assert max(sizes) <= mtu, f"seed {seed}: {sorted(sizes)[-3:]} > {mtu}"
    if backend.name == "openssl" and mtu <= 600:
        assert any(len(s.data) > mtu - 50 for s in net.sent)  # the certificates were split


def test_oversized_send_raises_and_keeps_the_session(backend: Backend) -> None:
    net = backend.network(DtlsConfig(mtu=600))
    with pytest.raises(SessionClosed):
        net.client.send(b"too early")
    assert net.client.max_send_size is None
    net.handshake()
    limit = net.client.max_send_size
    assert limit is not None
    with pytest.raises(DtlsError, match="MTU"):
        net.client.send(b"z" * (limit + 1))
    net._collect()
    assert net.both_established()
    assert not net.in_flight
    assert_agreed(net, backend)


def test_handshake_complete_is_reported_once_under_duplication(backend: Backend) -> None:
    net = backend.network(PATIENT, seed=3, duplicate=0.9)
    net.handshake()
    net.run()  # let every duplicate arrive
    assert len(net.events_of(CLIENT, HandshakeComplete)) == 1
    assert len(net.events_of(SERVER, HandshakeComplete)) == 1
    assert_agreed(net, backend)
