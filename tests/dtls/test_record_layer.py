"""The OpenSSL backend's own record layer once a handshake is complete (openssl._RecordLayer).

After the handshake the session frees OpenSSL's SSL object and protects records itself. These
tests hold it against OpenSSL's record layer (one side keeps its SSL object), for each suite
build_context allows, and check what a record layer must refuse.
"""

from __future__ import annotations

from typing import Any

import pytest

from coaplayers.dtls import (
    ConnectionClosed,
    DtlsConfig,
    OpenSslListener,
    OpenSslSession,
    State,
    build_context,
    records,
)

from .conftest import Pki
from .harness import CLIENT, SERVER, Network

SUITES = [
    "ECDHE-ECDSA-AES128-CCM8",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
]


def _keep_openssl(session: Any) -> None:
    """This session keeps OpenSSL's SSL object (and record layer) after its handshake."""
    session._release_openssl = lambda *_a: None


class _Listener(OpenSslListener):
    keep = False

    def accept(self, peer_key, datagram, now):  # type: ignore[no-untyped-def]
        replies, session = super().accept(peer_key, datagram, now)
        if session is not None and self.keep:
            _keep_openssl(session)
        return replies, session


def _network(certs: Pki, suite: str, keep: str | None, ctx: Any = None, **kw: Any) -> Network:
    ciphers = f"{suite}:@SECLEVEL=0"
    creds = certs.client_credentials()
    ctx = ctx or build_context(creds, server=False, ciphers=ciphers)
    client = OpenSslSession.client(ctx, creds)
    if keep == CLIENT:
        _keep_openssl(client)
    listener = _Listener(certs.server_credentials(), DtlsConfig(), ciphers=ciphers)
    listener.keep = keep == SERVER
    return Network(client, listener, **kw)


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("keep", [None, CLIENT, SERVER])
def test_records_interoperate_with_openssl(certs: Pki, suite: str, keep: str | None) -> None:
    net = _network(certs, suite, keep)
    net.handshake()
    assert net.server is not None
    client, server = net.client, net.server
    assert client.cipher_suite == server.cipher_suite == suite
    for side, session in ((CLIENT, client), (SERVER, server)):
        freed = side != keep
        assert (session._conn is None) is freed, side  # type: ignore[attr-defined]
    # the exporter computed from the master secret agrees with OpenSSL's
    for ctx in (None, b"", b"ctx"):
        assert client.export_keying_material(b"label", 42, ctx) == server.export_keying_material(
            b"label", 42, ctx
        )
    for i in range(3):
        net.client_send(b"up %d" % i)
        net.server_send(b"down %d" % i)
    net.settle()
    assert net.received(SERVER) == [b"up 0", b"up 1", b"up 2"]
    assert net.received(CLIENT) == [b"down 0", b"down 1", b"down 2"]
    big = b"x" * client.max_send_size  # type: ignore[operator]
    net.client_send(big)
    net.settle()
    assert net.received(SERVER)[-1] == big
    assert all(len(s.data) <= client.config.mtu for s in net.sent)
    client.close()
    net._collect()
    net.settle()
    assert net.closed_event(SERVER) == ConnectionClosed(None)
    assert server.state is State.CLOSED


def test_replayed_or_altered_records_are_dropped(certs: Pki) -> None:
    net = _network(certs, SUITES[0], None)
    net.handshake()
    net.client_send(b"pay once")
    datagram = net.sent[-1].data
    net.settle()
    net.inject(CLIENT, datagram)
    altered = bytearray(datagram)
    altered[-1] ^= 1
    net.inject(CLIENT, bytes(altered))
    wrong_type = bytearray(datagram)
    wrong_type[0] = records.CONTENT_ALERT
    net.inject(CLIENT, bytes(wrong_type))
    net.settle()
    assert net.received(SERVER) == [b"pay once"]
    # records out of order inside the window are accepted once each
    for i in range(3):
        net.client.send(b"r%d" % i)
    later = net.client.datagrams_to_send()
    for datagram in reversed(later):
        net.inject(CLIENT, datagram)
        net.inject(CLIENT, datagram)
    net.settle()
    assert net.received(SERVER) == [b"pay once", b"r2", b"r1", b"r0"]
    assert net.both_established()


def test_application_data_before_the_servers_handshake_ends_is_delivered_once(
    certs: Pki,
) -> None:
    ctx = build_context(certs.client_credentials(), server=False)
    full = _network(certs, SUITES[0], None, ctx)
    full.handshake()
    state = full.client.resumption_state  # type: ignore[attr-defined]
    full.client.close()
    full._collect()
    full.settle()
    client = OpenSslSession.client(ctx, certs.client_credentials(), resume=state)
    net = Network(client, full.listener, peer_key=("2001:db8::9", 1))
    net.start()
    while not client.is_established:
        assert net.step()
    assert client.resumed and net.server is not None and not net.server.is_established
    net.client_send(b"early")
    # the client's final flight arrives after its first application data
    net.in_flight.reverse()
    first = net.in_flight[0][1]
    net.step()
    assert not net.server.is_established and net.received(SERVER) == []
    net.settle()
    assert net.server.is_established
    net.inject(CLIENT, first)  # and again, later: a replay
    net.settle()
    assert net.received(SERVER) == [b"early"]


def test_a_session_ended_by_a_fatal_alert_is_not_resumed(certs: Pki) -> None:
    ctx = build_context(certs.client_credentials(), server=False)
    net = _network(certs, SUITES[0], None, ctx)
    net.handshake()
    state = net.client.resumption_state  # type: ignore[attr-defined]
    alert = net.client._records.protect(records.CONTENT_ALERT, b"\x02\x50")  # type: ignore[attr-defined]
    net.inject(CLIENT, alert)
    net.settle()
    assert net.server is not None and net.server.is_closed
    assert net.closed_event(SERVER).error is not None  # type: ignore[union-attr]
    again = Network(
        OpenSslSession.client(ctx, certs.client_credentials(), resume=state), net.listener
    )
    again.handshake()
    assert not (again.both_established() and again.client.resumed)
