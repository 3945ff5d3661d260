"""Record framing: split and pack round trips, and rejection of broken framing."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coaplayers.dtls import ProtocolViolation, records

RECORD = st.builds(
    lambda ctype, epoch, seq, body: bytes([ctype, 0xFE, 0xFD])
    + epoch.to_bytes(2, "big")
    + seq.to_bytes(6, "big")
    + len(body).to_bytes(2, "big")
    + body,
    st.sampled_from([20, 21, 22, 23]),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**48 - 1),
    st.binary(max_size=400),
)
FAST = settings(max_examples=200, deadline=None, database=None)


@FAST
@given(recs=st.lists(RECORD, max_size=8), mtu=st.integers(256, 1500))
def test_pack_then_split_round_trips(recs: list[bytes], mtu: int) -> None:
    datagrams = records.pack_datagrams(recs, mtu)
    assert [r for d in datagrams for r in records.split_records(d)] == recs
    for d in datagrams:
        # a datagram exceeds the MTU only when it is one record that alone does
        assert len(d) <= mtu or len(records.split_records(d)) == 1
    # as few datagrams as fit: no two neighbours could have shared one
    for a, b in itertools.pairwise(datagrams):
        assert len(a) + len(records.split_records(b)[0]) > mtu


@FAST
@given(recs=st.lists(RECORD, min_size=1, max_size=4), cut=st.integers(1, 1000))
def test_truncation_is_a_protocol_violation(recs: list[bytes], cut: int) -> None:
    data = b"".join(recs)
    end = len(data) - min(cut, len(data))
    boundaries = list(itertools.accumulate((len(r) for r in recs), initial=0))
    if end in boundaries:  # cut between records: the whole ones survive
        assert records.split_records(data[:end]) == recs[: boundaries.index(end)]
    else:
        with pytest.raises(ProtocolViolation):
            records.split_records(data[:end])


@FAST
@given(record=RECORD, seq=st.integers(0, 2**48 - 1))
def test_sequence_number_rewrite(record: bytes, seq: int) -> None:
    rewritten = records.with_sequence_number(record, seq)
    assert records.sequence_number(rewritten) == seq
    assert records.with_sequence_number(rewritten, records.sequence_number(record)) == record
    assert records.split_records(rewritten) == [rewritten]


@pytest.mark.parametrize(
    "data",
    [
        bytes([24, 0xFE, 0xFD]) + bytes(10),  # unknown content type
        bytes([22, 0x03, 0x03]) + bytes(10),  # TLS, not DTLS
        bytes([23, 0xFE, 0xFD]) + bytes(8) + b"\xff\xff" + bytes(100),  # past the end
        bytes([23, 0xFE, 0xFD]) + bytes(8) + (records.MAX_RECORD_PAYLOAD + 1).to_bytes(2, "big"),
        b"\x16\xfe",  # shorter than a header
    ],
)
def test_broken_framing_is_refused(data: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        records.split_records(data)


def test_empty_input_has_no_records() -> None:
    assert records.split_records(b"") == []
    assert records.pack_datagrams([], 600) == []


def _client_hello(session_id: bytes, cookie: bytes) -> bytes:
    body = (b"\xfe\xfd" + bytes(range(32)) + bytes([len(session_id)]) + session_id
            + bytes([len(cookie)]) + cookie + b"\x00\x02\xc0\xa8\x01\x00")
    n = len(body).to_bytes(3, "big")
    handshake = b"\x01" + n + b"\x00\x01" + b"\x00\x00\x00" + n + body
    return b"\x16\xfe\xfd" + bytes(8) + len(handshake).to_bytes(2, "big") + handshake


@pytest.mark.parametrize("session_id", [b"", b"s" * 32])
def test_client_hello_cookie(session_id: bytes) -> None:
    assert records.client_hello_cookie(_client_hello(session_id, b"")) == b""
    assert records.client_hello_cookie(_client_hello(session_id, b"c" * 20)) == b"c" * 20
    hello = _client_hello(session_id, b"c" * 20)
    assert records.client_hello_cookie(hello[:-1]) is None  # not a whole ClientHello
    assert records.client_hello_cookie(b"\x16\xfe\xfd" + bytes(10)) is None
