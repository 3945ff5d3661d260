"""Fuzzing coap-proxy's fast path: any datagram from a client, and any datagram an upstream
sends back to a forwarded request.

Contract: the core raises nothing on either (what it cannot use goes to aiocoap's path or is
dropped), and every exchange it took ends: after the upstream timeout nothing is in flight.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.proxy.test_fastpath_core import ACK, CLIENT, CON, NON, Rig, request

from .common import FUZZ, bytes_input, only

REQUESTS = [
    request(),
    request(mtype=NON, mid=9, token=b""),
    request(mid=3, token=b"12345678", payload=b"", content_format=0, accept=50),
    request(mid=4, o9=bytes.fromhex("0905aa"), payload=b"ciphertext"),
]
ANSWERS = [
    bytes((0x40 | ACK << 4 | 4, 0x44, 0, 0)) + bytes(4) + b"\xc1\x00\xff" + b"ok",
    bytes((0x40 | CON << 4 | 4, 0x45, 1, 2)) + bytes(4) + b"\x81x\xff" + b"separate",
    bytes((0x40 | ACK << 4, 0, 0, 0)),
]


@FUZZ
@given(client=st.lists(bytes_input(REQUESTS), min_size=1, max_size=6),
       upstream=st.lists(bytes_input(ANSWERS), max_size=6))
def test_the_fast_path_takes_any_datagram_and_ends_every_exchange(
    client: list[bytes], upstream: list[bytes]
) -> None:
    rig = Rig(upstream_timeout=5.0)
    for data in client:
        with only():
            rig.core._from_client(data, None, CLIENT)
    for data in upstream:
        sent = rig.up_sent[-1] if rig.up_sent else None
        if sent is not None and len(data) >= 8 and data[0] & 0x0F == 4:
            # aimed at the last forwarded request: its message ID and token
            data = data[:2] + sent[2:8] + data[8:]
        with only():
            rig.core._from_upstream(rig.up, data)
    rig.clock.advance(10.0)
    assert rig.site.in_flight.count == 0
