"""The kernel's choice of worker (coaplayers.steering) on real sockets of one SO_REUSEPORT
group: every datagram comes from one client port, as through a proxy."""

from __future__ import annotations

import select
import socket

import aiocoap
import pytest
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import OpaqueOption

from coaplayers import steering


def _group(n: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    port = 0
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        port = s.getsockname()[1]
        socks.append(s)
    steering.attach(socks[0], n)
    return socks


def _who(socks: list[socket.socket], client: socket.socket, datagram: bytes) -> int:
    client.sendto(datagram, socks[0].getsockname())
    ready, _, _ = select.select(socks, [], [], 5)
    assert len(ready) == 1
    ready[0].recv(2048)
    return socks.index(ready[0])


def _message(path: tuple[str, ...] = (), oscore: bytes | None = None, host: str | None = None,
             token: bytes = b"\x01\x02", observe: int | None = None,
             payload: bytes = b"") -> bytes:
    m = aiocoap.Message(code=aiocoap.POST, uri_path=path, payload=payload)
    m.mid, m.token, m.mtype = 7, token, aiocoap.CON
    if host is not None:
        m.opt.uri_host = host
    if observe is not None:
        m.opt.observe = observe
    if oscore is not None:
        m.opt.add_option(OpaqueOption(OptionNumber.OSCORE, oscore))
    return m.encode()


@pytest.mark.parametrize("n", [2, 3, 4])
def test_session_names_and_kids_reach_their_worker_from_one_source_port(n: int) -> None:
    socks = _group(n)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_":
            want = ord(c) % n
            assert _who(socks, client, _message(("~Q" + c + "xy",))) == want
            # Behind Uri-Host (longer than 12 bytes: extended length) and Observe.
            name = "app-server.example.org"
            assert _who(socks, client, _message(("~Q" + c + "xy",), host=name, observe=0,
                                                 token=b"12345678")) == want
        for last in range(0, 256, 7):
            kid = bytes([0x35, last])
            oscore = bytes([0x09, 0x01]) + kid  # Partial IV 1 byte, kid
            assert _who(socks, client, _message(oscore=oscore)) == last % n
            with_context = bytes([0x19, 0x01, 0x02, 0xAA, 0xBB]) + kid
            assert _who(socks, client, _message(oscore=with_context, host="h")) == last % n
        # A first flight: by its ClientHello's random, behind the entry path's options.
        for r in range(0, 2**32, 2**32 // 37):
            hello = (bytes([22, 0xFE, 0xFD]) + bytes(10) + bytes([1]) + bytes(11) + b"\xfe\xfd"
                     + bytes(28) + r.to_bytes(4, "big") + b"rest of the flight")
            m = _message((".well-known", "atls"), payload=hello, host="app.example")
            assert _who(socks, client, m) == r % n
        # No routing key: the address hash, the same for every datagram of this client.
        plain = {_who(socks, client, _message(("hello",)))}
        plain.add(_who(socks, client, _message((".well-known", "atls"), payload=b"\x16" * 80)))
        plain.add(_who(socks, client, _message(("~",))))
        plain.add(_who(socks, client, _message(oscore=b"")))
        plain.add(_who(socks, client, b"\x40"))  # truncated
        plain.add(_who(socks, client, _message(tuple("abcdefgh"))))
        assert len(plain) == 1
    finally:
        client.close()
        for s in socks:
            s.close()


def test_the_program_fits_and_refuses_nonsense() -> None:
    program = steering.steering_program(4)
    assert len(program) < 4096  # the kernel's limit
    with pytest.raises(ValueError):
        steering.steering_program(0)
