"""receive_application_data: the established-session shortcut the Layer 1 transport takes for
each datagram gives what receive_datagram would, and hands everything else back to it."""

from __future__ import annotations

from coaplayers.dtls import ConnectionClosed

from .conftest import Backend
from .harness import CLIENT, SERVER


def _established(backend: Backend):  # type: ignore[no-untyped-def]
    net = backend.network()
    net.handshake()
    net.client_send(b"first")  # through the general path: the server learns that the
    net.server_send(b"reply")  # client has its final flight, and the other way round
    net.settle()
    assert net.received(SERVER) == [b"first"] and net.received(CLIENT) == [b"reply"]
    return net, net.client, net.server


def _sealed(session, data: bytes) -> bytes:  # type: ignore[no-untyped-def]
    session.send(data)
    (datagram,) = session.datagrams_to_send()
    return datagram


def test_one_record_gives_its_plaintext_at_once(backend: Backend) -> None:
    _, client, server = _established(backend)
    for i in range(3):
        assert server.receive_application_data(_sealed(client, b"m%d" % i), 1.0) == [b"m%d" % i]
    assert client.receive_application_data(_sealed(server, b"back"), 1.0) == [b"back"]
    assert not server.has_pending and not client.has_pending
    assert server.is_established and client.is_established


def test_forged_and_replayed_records_are_dropped(backend: Backend) -> None:
    _, client, server = _established(backend)
    datagram = _sealed(client, b"once")
    forged = datagram[:-1] + bytes([datagram[-1] ^ 1])
    assert server.receive_application_data(forged, 1.0) == []
    assert server.receive_application_data(datagram, 1.0) == [b"once"]
    assert server.receive_application_data(datagram, 1.0) == []  # a replay
    assert server.is_established and not server.has_pending


def test_everything_else_goes_the_general_way(backend: Backend) -> None:
    _, client, server = _established(backend)
    two = _sealed(client, b"a") + _sealed(client, b"b")  # two records in one datagram
    assert server.receive_application_data(two, 1.0) is None
    server.receive_datagram(two, 1.0)
    assert [e.data for e in _drain(server)] == [b"a", b"b"]
    assert server.receive_application_data(b"\x17\xfe\xfd" + bytes(10), 1.0) is None  # short
    client.close()  # close_notify: an alert record
    (alert,) = client.datagrams_to_send()
    assert server.receive_application_data(alert, 1.0) is None
    server.receive_datagram(alert, 1.0)
    assert any(isinstance(e, ConnectionClosed) for e in _drain(server))
    assert server.receive_application_data(_sealed_fresh(backend), 1.0) is None  # closed


def test_not_before_the_peer_has_our_final_flight(backend: Backend) -> None:
    net = backend.network()
    net.handshake()
    # The side that finished last keeps its final flight until the peer sends data: a
    # repeat of the peer's flight must still be answered, so no shortcut yet.
    last = net.server if net.server._final_flight else net.client
    other = net.client if last is net.server else net.server
    assert last._final_flight
    assert last.receive_application_data(_sealed(other, b"x"), 1.0) is None


def _drain(session):  # type: ignore[no-untyped-def]
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def _sealed_fresh(backend: Backend) -> bytes:
    """An application-data record of some other session (any well-formed one will do)."""
    _, client, _ = _established(backend)
    return _sealed(client, b"elsewhere")
