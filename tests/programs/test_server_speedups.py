"""coap-server's aiocoap speed-ups answer exactly what aiocoap would."""

from __future__ import annotations

import socket

from aiocoap.transports.udp6 import UDP6EndpointAddress, _in6_pktinfo

from coaplayers.programs.server.speedups import remember_local_multicast


class _Interface:
    pass


INTERFACE = _Interface()  # addresses hold it weakly

def _remote(local: str) -> UDP6EndpointAddress:
    pktinfo = _in6_pktinfo.pack(socket.inet_pton(socket.AF_INET6, local), 0)
    return UDP6EndpointAddress(("::ffff:192.0.2.1", 40000, 0, 0), INTERFACE, pktinfo=pktinfo)


LOCALS = ["::ffff:127.0.0.1", "::ffff:224.0.1.187", "ff02::fd", "2001:db8::1", "::1"]


def test_remembered_multicast_answers_match_aiocoap() -> None:
    compute = UDP6EndpointAddress.is_multicast_locally.fget
    expected = {local: compute(_remote(local)) for local in LOCALS}
    assert sorted(expected.values()) == [False, False, False, True, True]
    remember_local_multicast()
    remember_local_multicast()  # a second call changes nothing
    memo_fget = UDP6EndpointAddress.is_multicast_locally.fget
    assert getattr(memo_fget, "_coaplayers_memo", False)
    for _ in range(2):  # computed, then remembered
        for local in LOCALS:
            remote = _remote(local)
            assert remote.is_multicast_locally is expected[local]
            assert (remote.as_response_address() is remote) is not expected[local]
