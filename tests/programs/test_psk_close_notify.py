"""Layer 1 PSK clients ending their sessions with close_notify cannot crash coap-server.

A crash seen in ``coap-bench --quick`` ("Fatal Python error: Floating point exception" in
coap-proxy during a Layer 1 PSK accept): when the Layer 1 PSK listener was tinydtls, every
server session lived in one shared tinydtls context, whose peers sit in a uthash table.
tinydtls' ``handle_alert`` removes the peer from that table on a close_notify or fatal alert and
then frees it through ``dtls_destroy_peer``, which removes it a second time: with other peers in
the table, each such alert leaves the item count and the peer's bucket count one too low. Three
sessions in one bucket, ended by their clients while a fourth stays up, bring the item count to
0 as the third is added while its bucket count has wrapped past the expansion threshold; the
expansion then divides by the ideal chain length, 0 (SIGFPE).

The test plays that sequence over real UDP: its clients are the engine's tinydtls PSK sessions
on sockets whose ports it picks so that their sessions land in one bucket of that table (the
bucket is computed as tinydtls did: Jenkins' hash over its ``session_t`` holding the listener's
synthetic address). The server must still answer afterwards.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiocoap import GET, Message

from coaplayers.dtls import records
from coaplayers.dtls.credentials import PskClientCredentials
from coaplayers.dtls.tinydtls import TinyDtlsSession

from .conftest import PSK_TEXT, Running, start_server

pytestmark = pytest.mark.slow

_M = 0xFFFFFFFF
_BUCKETS = 32  # uthash's initial table
_WAIT = 10.0


# HASH_JEN_MIX: a, b, c in turn, each less the other two, then xor the last one shifted.
_MIX_SHIFTS = (13, -8, 13, 12, -16, 5, 3, -10, 15)  # negative: shift left


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    v = [a, b, c]
    for n, shift in enumerate(_MIX_SHIFTS):
        i = n % 3
        y, z = v[(i + 1) % 3], v[(i + 2) % 3]
        x = (v[i] - y - z) & _M
        v[i] = x ^ ((z << -shift) & _M if shift < 0 else z >> shift)
    return v[0], v[1], v[2]


def _jenkins(key: bytes) -> int:
    """uthash's HASH_JEN."""
    h, i, j, pos, left = 0xFEEDBEEF, 0x9E3779B9, 0x9E3779B9, 0, len(key)
    while left >= 12:
        i = (i + int.from_bytes(key[pos:pos + 4], "little")) & _M
        j = (j + int.from_bytes(key[pos + 4:pos + 8], "little")) & _M
        h = (h + int.from_bytes(key[pos + 8:pos + 12], "little")) & _M
        i, j, h = _mix(i, j, h)
        pos, left = pos + 12, left - 12
    h = (h + len(key)) & _M
    tail = key[pos:] + bytes(12 - left)
    i = (i + int.from_bytes(tail[0:4], "little")) & _M
    j = (j + int.from_bytes(tail[4:8], "little")) & _M
    h = (h + (int.from_bytes(tail[8:11], "little") << 8)) & _M
    return _mix(i, j, h)[2]


def _synthetic_address(peer_key: object, random: bytes) -> tuple[str, int]:
    """The address the tinydtls listener gave a session in its shared context."""
    import hashlib

    digest = hashlib.sha256(repr(peer_key).encode() + random).digest()
    return (socket.inet_ntop(socket.AF_INET6, digest[:16]),
            1 + int.from_bytes(digest[16:18]) % 65535)


def _bucket(peer_key: object, random: bytes) -> int:
    host, port = _synthetic_address(peer_key, random)
    sin6 = (struct.pack("<H", socket.AF_INET6) + struct.pack(">H", port) + bytes(4)
            + socket.inet_pton(socket.AF_INET6, host) + bytes(4))
    session_t = struct.pack("<I", len(sin6)) + bytes(4) + sin6.ljust(128, b"\0") + bytes(8)
    return _jenkins(session_t) % _BUCKETS


class _Client:
    """A tinydtls PSK client session over a UDP socket bound to a port chosen by ``fits``."""

    def __init__(self, server: Running, fits: Callable[[int], bool]) -> None:
        self.program = server
        host, port = server.uri("coaps").removeprefix("coaps://").rsplit(":", 1)
        self.server = (host, int(port))
        self.session = TinyDtlsSession.client(PskClientCredentials(PSK_TEXT[0].encode(),
                                                                   PSK_TEXT[1].encode()))
        self.session.connect(time.monotonic())
        self.pending = self.session.datagrams_to_send()
        self.random = records.client_hello_random(self.pending[0])
        assert self.random is not None
        self.sock = self._bind(fits)
        self.port = self.sock.getsockname()[1]
        self.first_reply: bytes | None = None

    def _bind(self, fits: Callable[[int], bool]) -> socket.socket:
        start = 20000 + int.from_bytes(os.urandom(2)) % 30000
        for port in range(start, start + 5000):
            if not fits(self.bucket_at(port)):
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            return sock
        raise AssertionError("no free port puts the session in the wanted bucket")

    def bucket_at(self, port: int) -> int:
        assert self.random is not None
        return _bucket(("127.0.0.1", port), self.random)

    @property
    def bucket(self) -> int:
        return self.bucket_at(self.port)

    def run(self, done: Callable[[], bool], what: str) -> None:
        """Exchange datagrams until ``done``; retransmits on the session's timer; bounded."""
        deadline = time.monotonic() + _WAIT
        while True:
            for d in self.pending + self.session.datagrams_to_send():
                self.sock.sendto(d, self.server)
            self.pending = []
            if done():
                return
            now = time.monotonic()
            if now >= deadline:
                rc = self.program.proc.poll()
                state = "running" if rc is None else f"exited with {rc}"
                raise AssertionError(f"coap-server did not answer ({what}); it is {state}:"
                                     f" {self.program.stderr[-2000:]}")
            timer = self.session.get_timer()
            wait = min(deadline, timer if timer is not None else deadline) - now
            self.sock.settimeout(max(0.01, wait))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                self.session.handle_timer(time.monotonic())
                continue
            if self.first_reply is None:
                self.first_reply = data
            self.session.receive_datagram(data, time.monotonic())

    def handshake(self) -> None:
        self.run(lambda: self.session.is_established, "handshake")

    def get(self) -> Message:
        request = Message(code=GET, uri_path=(".well-known", "core"))
        request.mtype, request.mid, request.token = 0, 0x1234, os.urandom(4)  # CON
        self.session.send(request.encode())
        answers: list[Message] = []

        def answered() -> bool:
            while (event := self.session.next_event()) is not None:
                data = getattr(event, "data", None)
                if isinstance(data, bytes):
                    answers.append(Message.decode(data))
            return any(a.token == request.token for a in answers)

        self.run(answered, "GET over Layer 1")
        return next(a for a in answers if a.token == request.token)

    def close(self) -> None:
        self.session.close()
        for d in self.session.datagrams_to_send():
            self.sock.sendto(d, self.server)
        self.sock.close()


def test_sessions_ended_by_close_notify_leave_the_psk_listener_serving(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--listen", "coaps://127.0.0.1:0",
                          "--psk", ":".join(PSK_TEXT))
    try:
        address = server
        kept = _Client(address, lambda b: True)
        kept.handshake()
        # Layer 1 listeners keep the stateless cookie exchange.
        assert kept.first_reply is not None
        assert records.handshake_type(kept.first_reply) == records.HANDSHAKE_HELLO_VERIFY_REQUEST
        first = _Client(address, lambda b: b != kept.bucket)
        target = first.bucket
        clients = [first, _Client(address, lambda b: b == target),
                   _Client(address, lambda b: b == target)]
        for n, c in enumerate(clients):
            c.handshake()  # the third one's hello crashed tinydtls' peer table
            assert c.get().code.is_successful(), f"session {n}"
            c.close()
        # A close_notify is the client's last word; whatever the server did with it, it
        # must still be up and serving both the kept session and new ones.
        assert server.proc.poll() is None, server.stderr
        assert kept.get().code.is_successful()
        fresh = _Client(address, lambda b: True)
        fresh.handshake()
        assert fresh.get().code.is_successful()
        fresh.close()
        kept.close()
        assert server.proc.poll() is None, server.stderr
        assert "Traceback" not in server.stderr
    finally:
        server.stop()
