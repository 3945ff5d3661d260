"""The engine's own record layer once a handshake is complete (dtls/recordlayer.py).

After the handshake the session frees OpenSSL's SSL object and protects records itself. These
tests hold it against OpenSSL's record layer (one side keeps its SSL object), for each suite
build_context allows and for the PSK suite of OpenSslPskListener; check the hand-over under
loss, duplication and reordering (no explicit nonce twice under one key), the replay window's
edges, and sequence-number exhaustion; and check what a record layer must refuse.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from coaplayers.dtls import (
    ConnectionClosed,
    DtlsConfig,
    DtlsError,
    OpenSslListener,
    OpenSslPskClientSession,
    OpenSslPskListener,
    OpenSslSession,
    PskClientCredentials,
    PskStore,
    State,
    build_context,
    records,
)
from coaplayers.dtls.openssl import PSK_CIPHERS, build_psk_context
from coaplayers.dtls.recordlayer import RecordLayer

from .conftest import PSK_IDENTITY, PSK_KEY, Pki
from .harness import CLIENT, SERVER, Network

SUITES = [
    "ECDHE-ECDSA-AES128-CCM8",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
]


def _keep_openssl(session: Any) -> None:
    """This session keeps OpenSSL's SSL object (and record layer) after its handshake."""
    session._release_openssl = lambda *_a: None


class _Keeping:
    """A listener whose sessions keep OpenSSL's record layer when ``keep`` is set."""

    keep = False

    def accept(self, peer_key, datagram, now):  # type: ignore[no-untyped-def]
        replies, session = super().accept(peer_key, datagram, now)  # type: ignore[misc]
        if session is not None and self.keep:
            _keep_openssl(session)
        return replies, session


class _Listener(_Keeping, OpenSslListener):
    pass


class _PskListener(_Keeping, OpenSslPskListener):
    pass


def _psk_network(keep: str | None, **kw: Any) -> Network:
    client = OpenSslPskClientSession.psk_client(  # OpenSSL's record layer, to test ours
        build_psk_context(PSK_CIPHERS, server=False), PskClientCredentials(PSK_IDENTITY, PSK_KEY))
    if keep == CLIENT:
        _keep_openssl(client)
    listener = _PskListener(PskStore({PSK_IDENTITY: PSK_KEY}), DtlsConfig())
    listener.keep = keep == SERVER
    return Network(client, listener, **kw)


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


PSK_SUITE = "PSK-AES128-CCM8"


@pytest.mark.parametrize("suite", [*SUITES, PSK_SUITE])
@pytest.mark.parametrize("keep", [None, CLIENT, SERVER])
def test_records_interoperate_with_openssl(certs: Pki, suite: str, keep: str | None) -> None:
    net = _psk_network(keep) if suite == PSK_SUITE else _network(certs, suite, keep)
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


# ------------------------------------------------------------ explicit nonces (RFC 5288)


def _epoch1_records(net: Network, sender: str) -> list[bytes]:
    """Every distinct epoch 1 record ``sender`` put on the wire (a repeat of a flight is the
    same record again, not a new use of its nonce)."""
    seen: dict[bytes, None] = {}
    for sent in net.sent:
        if sent.sender == sender:
            for record in records.split_records(sent.data):
                if records.epoch(record) == 1:
                    seen[record] = None
    return list(seen)


def _nonce(record: bytes) -> bytes:
    return record[records.HEADER_LEN : records.HEADER_LEN + 8]


@pytest.mark.parametrize("suite", [*SUITES, PSK_SUITE])
@pytest.mark.parametrize("seed", range(6))
def test_no_explicit_nonce_twice_across_the_hand_over_under_loss(
    certs: Pki, suite: str, seed: int
) -> None:
    """Handshake and data through a network that loses, duplicates and reorders (seeded):
    each side's epoch 1 records, OpenSSL's (the Finished) and the own layer's, all carry
    distinct explicit nonces, and every record delivered is delivered once."""
    lossy: dict[str, Any] = dict(seed=seed, loss=0.3, duplicate=0.3, reorder=0.3)
    net = _psk_network(None, **lossy) if suite == PSK_SUITE else _network(
        certs, suite, None, **lossy)
    net.handshake()
    assert net.both_established()
    sent = {CLIENT: [b"up %d" % i for i in range(40)], SERVER: [b"down %d" % i for i in range(40)]}
    for i in range(40):
        net.client_send(sent[CLIENT][i])
        net.server_send(sent[SERVER][i])
        net.step()
    net.settle()
    for side, peer in ((CLIENT, SERVER), (SERVER, CLIENT)):
        recs = _epoch1_records(net, side)
        nonces = [_nonce(r) for r in recs]
        assert len(recs) > 40 and len(set(nonces)) == len(nonces), side
        got = net.received(peer)
        assert len(got) == len(set(got)) and set(got) <= set(sent[side]), side
        assert len(got) > 10, side  # most of them arrive at 30 % loss


@pytest.mark.parametrize("suite", SUITES)
def test_own_layer_nonces_are_epoch_and_sequence_number(certs: Pki, suite: str) -> None:
    net = _network(certs, suite, None)
    net.handshake()
    for i in range(3):
        net.client_send(b"%d" % i)
    net.settle()
    finished, *data = _epoch1_records(net, CLIENT)
    assert records.content_type(finished) == records.CONTENT_HANDSHAKE
    for record in data:
        assert _nonce(record) == record[3:11]  # epoch 1 || sequence number
    spent = _nonce(finished)
    if "GCM" in suite:
        # OpenSSL counts its GCM nonces up from a random value, not from the sequence number
        assert spent != finished[3:11]
    else:
        assert spent == finished[3:11]


@pytest.mark.parametrize("suite", SUITES[1:])
@pytest.mark.parametrize("side", [CLIENT, SERVER])
def test_a_nonce_openssl_used_is_never_written_again(certs: Pki, suite: str, side: str) -> None:
    """OpenSSL's GCM nonces count up from a random value, so the own layer's epoch || seq
    could meet one of them. Here OpenSSL is made to look as if it had written a record (a
    retransmission it discarded) whose random nonce was exactly the own layer's third
    sequence number: the own layer must skip that number, not reuse the nonce."""
    net = _network(certs, suite, None)
    session = net.client
    if side == SERVER:
        class Listener(OpenSslListener):
            def _new_session(self, conn):  # type: ignore[no-untyped-def]
                made = super()._new_session(conn)
                _collide(made)
                return made

        ciphers = f"{suite}:@SECLEVEL=0"
        net.listener = Listener(certs.server_credentials(), DtlsConfig(), ciphers=ciphers)
    else:
        _collide(session)
    net.handshake()
    assert net.both_established()
    writer, peer = (net.client, SERVER) if side == CLIENT else (net.server, CLIENT)
    assert writer is not None
    for i in range(6):
        writer.send(b"m%d" % i)
        net._collect()
    net.settle()
    assert net.received(peer) == [b"m%d" % i for i in range(6)]
    finished, *data = _epoch1_records(net, side)
    forged = (1 << 48 | records.sequence_number(finished) + 3).to_bytes(8, "big")
    nonces = [_nonce(r) for r in data]
    assert forged not in nonces
    assert len({*nonces, _nonce(finished), forged}) == len(data) + 2


def _collide(session: OpenSslSession) -> None:
    """Have ``session`` note, beside each epoch 1 record OpenSSL writes, one with the same
    header whose explicit nonce is epoch 1 || (its sequence number + 3)."""
    original = session._note_written

    def note(record: bytes) -> None:
        original(record)
        if records.epoch(record) == 1:
            seq = records.sequence_number(record)
            fake = (1 << 48 | seq + 3).to_bytes(8, "big")
            original(record[: records.HEADER_LEN] + fake + record[records.HEADER_LEN + 8 :])

    session._note_written = note  # type: ignore[method-assign]


# ------------------------------------------------------------------ replay window, limits


def _pair(next_seq: int = 0) -> tuple[RecordLayer, RecordLayer]:
    master, cr, sr = os.urandom(48), os.urandom(32), os.urandom(32)
    writer = RecordLayer(SUITES[1], master, cr, sr, is_client=True, next_seq=next_seq)
    reader = RecordLayer(SUITES[1], master, cr, sr, is_client=False, next_seq=0)
    return writer, reader


def _record_at(writer: RecordLayer, seq: int, data: bytes = b"x") -> bytes:
    writer._seq = seq
    return writer.protect(records.CONTENT_APPLICATION_DATA, data)


def test_replay_window_edges() -> None:
    writer, reader = _pair()
    at = {seq: _record_at(writer, seq, b"%d" % seq) for seq in
          (0, 1, 10, 36, 37, 73, 74, 100, 1000, 936, 937, 5000)}
    assert reader.unprotect(at[100]) == b"100"
    assert reader.unprotect(at[100]) is None  # replay of the highest
    assert reader.unprotect(at[37]) == b"37"  # 63 below the highest: inside the window
    assert reader.unprotect(at[37]) is None
    assert reader.unprotect(at[36]) is None  # 64 below: outside, never accepted
    assert reader.unprotect(at[0]) is None
    assert reader.unprotect(at[1000]) == b"1000"  # a jump beyond the window clears it
    assert reader.unprotect(at[937]) == b"937"
    assert reader.unprotect(at[936]) is None
    assert reader.unprotect(at[100]) is None
    # a forged record far ahead fails its tag and moves nothing
    forged = bytearray(at[5000])
    forged[-1] ^= 1
    assert reader.unprotect(bytes(forged)) is None
    assert reader.unprotect(_record_at(writer, 940)) == b"x"  # the window is still at 1000
    assert reader.unprotect(at[5000]) == b"5000"
    # a shift of exactly 64 keeps nothing below the new top's window
    _, fresh = _pair()
    fresh._write_iv, fresh._read_iv = reader._write_iv, reader._read_iv
    fresh._open = reader._open
    assert fresh.unprotect(at[10]) == b"10"
    assert fresh.unprotect(at[74]) == b"74"
    assert fresh.unprotect(at[10]) is None  # 64 below 74
    assert fresh.unprotect(at[73]) == b"73"


def test_a_record_whose_sequence_number_was_altered_is_dropped() -> None:
    writer, reader = _pair()
    record = bytearray(_record_at(writer, 7))
    record[10] ^= 1  # header sequence number: part of the AAD
    assert reader.unprotect(bytes(record)) is None
    assert reader._top == -1  # nothing moved


def test_sequence_numbers_exhaust_at_2_to_the_48() -> None:
    writer, reader = _pair(next_seq=(1 << 48) - 2)
    last = [writer.protect(records.CONTENT_APPLICATION_DATA, b"%d" % i) for i in range(2)]
    assert [records.sequence_number(r) for r in last] == [(1 << 48) - 2, (1 << 48) - 1]
    with pytest.raises(DtlsError, match="exhausted"):
        writer.protect(records.CONTENT_APPLICATION_DATA, b"one too many")
    with pytest.raises(DtlsError, match="exhausted"):  # and it stays so
        writer.protect(records.CONTENT_ALERT, b"\x01\x00")
    assert [reader.unprotect(r) for r in last] == [b"0", b"1"]
    # a spent nonce just below the end uses up the last number
    spent = [(1 << 48 | (1 << 48) - 1).to_bytes(8, "big")]
    master, cr, sr = os.urandom(48), os.urandom(32), os.urandom(32)
    edge = RecordLayer(SUITES[1], master, cr, sr, is_client=True, next_seq=(1 << 48) - 1,
                       spent=spent)
    with pytest.raises(DtlsError, match="exhausted"):
        edge.protect(records.CONTENT_APPLICATION_DATA, b"x")


def test_an_exhausted_session_ends_with_an_error(certs: Pki) -> None:
    net = _network(certs, SUITES[0], None)
    net.handshake()
    net.client._records._seq = 1 << 48  # type: ignore[attr-defined]
    net.client.send(b"no more")
    net._collect()
    assert net.client.is_closed
    closed = net.closed_event(CLIENT)
    assert closed is not None and "exhausted" in str(closed.error)
    assert not [s for s in net.sent if s.data.endswith(b"no more")]
