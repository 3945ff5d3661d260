"""The 3x rule at coap-server and coap-proxy (issue 16, part 2), against the programs: a 41-byte
GET /firmware from an address that has not shown it receives draws at most 123 bytes; stock
clients (aiocoap-client, libcoap's coap-client) still fetch /firmware through coap-proxy over
coap://; a too-large answer that cannot be cut is challenged with an Echo value and delivered,
once, to the repetition; and our own end-to-end clients pass a proxy that challenges them."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest
from aiocoap import GET, POST, Message
from aiocoap.numbers import codes
from aiocoap.optiontypes import BlockOption

from coaplayers.programs.server.resources import Firmware
from tests.conftest import need_program, run_program

from .conftest import Keys, Running, client, start_proxy, start_server

pytestmark = pytest.mark.interop


def reflection_probe() -> bytes:
    """The issue's probe: a 41-byte GET /firmware asking for 1,024-byte blocks."""
    host = "h"
    while True:
        m = Message(code=GET, uri_path=("firmware",))
        m.mtype = 0  # CON
        m.mid, m.token = 0x4242, b"\x01\x02\x03\x04\x05\x06\x07\x08"
        m.opt.uri_host = host
        m.opt.block2 = BlockOption.BlockwiseTuple(0, False, 6)
        data = m.encode()
        if len(data) >= 41:
            assert len(data) == 41
            return data
        host += "h"


def exchange(port: int, data: bytes) -> bytes:
    """The answer to one request; an empty ACK first (a separate answer) must be small too."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(data, ("127.0.0.1", port))
        answer = s.recvfrom(4096)[0]
        if Message.decode(answer).code == codes.EMPTY:
            assert len(answer) == 4
            answer = s.recvfrom(4096)[0]
        return answer


def port_of(uri: str) -> int:
    return int(uri.rsplit(":", 1)[1])


async def test_a_41_byte_get_draws_at_most_three_times_its_size(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--listen", "coap://127.0.0.1:0")
    # An origin without the rule behind the proxy: the proxy's own rule is what is shown.
    open_server = start_server(tmp_path, "--listen", "coap://127.0.0.1:0",
                               "--amplification-factor", "0", name="open")
    try:
        proxy = start_proxy(tmp_path, "--listen", "coap://127.0.0.1:0",
                            "--route", f"/={open_server.uri('coap')}", "--metrics", "127.0.0.1:0")
        try:
            probe = reflection_probe()
            at_server = await asyncio.to_thread(exchange, port_of(server.uri("coap")), probe)
            at_proxy = await asyncio.to_thread(exchange, port_of(proxy.uri("coap")), probe)
            unlimited = await asyncio.to_thread(exchange, port_of(open_server.uri("coap")), probe)
        finally:
            assert proxy.stop() == 0
    finally:
        server.stop()
        open_server.stop()
    image = Firmware().image
    assert len(unlimited) > 1000  # what the rule prevents (25x)
    for answer in (at_server, at_proxy):
        assert len(answer) <= 3 * 41, len(answer)
        msg = Message.decode(answer)
        assert msg.code == codes.CONTENT
        b = msg.opt.block2
        assert b is not None and b.block_number == 0 and b.more and b.size < 1024
        assert msg.payload == image[: b.size]


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_stock_clients_fetch_firmware_through_the_proxy(tmp_path: Path,
                                                             keys: Keys) -> None:
    libcoap = need_program("coap-client-notls")
    aiocoap_client = str(Path(sys.executable).with_name("aiocoap-client"))
    # Hop 2 over Layer 1, as coap-keys sets it up: the proxy's address is verified there, and
    # the rule shown is the proxy's towards its plain clients.
    server = start_server(tmp_path, "--listen", "coaps://127.0.0.1:0",
                          "--psk-file", str(keys / "server-psk.json"))
    try:
        proxy = start_proxy(tmp_path, "--listen", "coap://127.0.0.1:0",
                            "--upstream-credentials", str(keys / "proxy-upstream.json"),
                            "--route", f"/={server.uri('coaps')}")
        try:
            uri = proxy.uri("coap") + "/firmware"
            out = tmp_path / "libcoap.bin"
            # 64 KiB in blocks of a few dozen bytes: slow (thousands of round trips through
            # two processes), which the rule accepts; bounded generously for a loaded machine.
            (_, _, _), (rc, fetched, err) = await asyncio.gather(
                run_program(libcoap, "-B", "400", "-o", str(out), uri, timeout=420),
                run_program(aiocoap_client, uri, timeout=420),
            )
        finally:
            assert proxy.stop() == 0
    finally:
        server.stop()
    image = Firmware().image
    assert rc == 0, err
    assert fetched == image
    assert out.read_bytes() == image


class BigAnswers(asyncio.DatagramProtocol):
    """An origin that answers every request with 900 bytes in one piece (no Block2), as a
    server without block-wise transfers would; it counts what it is asked."""

    def __init__(self) -> None:
        self.requests = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = Message.decode(data)
        if request.code.is_request():
            self.requests += 1
            answer = Message(code=codes.CHANGED, payload=b"z" * 900)
            answer.mtype, answer.mid, answer.token = 2, request.mid, request.token  # ACK
            assert self.transport is not None
            self.transport.sendto(answer.encode(), addr)


async def test_an_uncuttable_answer_is_challenged_and_held_for_the_echo(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    transport, origin = await loop.create_datagram_endpoint(
        BigAnswers, local_addr=("127.0.0.1", 0))
    origin_port = transport.get_extra_info("sockname")[1]
    try:
        proxy = start_proxy(tmp_path, "--listen", "coap://127.0.0.1:0",
                            "--route", f"/=coap://127.0.0.1:{origin_port}")
        try:
            port = port_of(proxy.uri("coap"))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(10)

                def ask(mid: int, echo: bytes | None = None) -> tuple[int, int, Message]:
                    m = Message(code=POST, payload=b"go", uri_path=("run",))
                    m.mtype, m.mid, m.token = 0, mid, mid.to_bytes(2, "big")
                    if echo is not None:
                        m.opt.echo = echo
                    s.sendto(m.encode(), ("127.0.0.1", port))
                    data = s.recvfrom(4096)[0]
                    return len(m.encode()), len(data), Message.decode(data)

                size, first_bytes, first = await asyncio.to_thread(ask, 1)
                _, _, repeated = await asyncio.to_thread(ask, 2, first.opt.echo)
                _, _, later = await asyncio.to_thread(ask, 3)
            # libcoap's client answers the challenge by itself (RFC 9175).
            out = tmp_path / "libcoap.out"
            await run_program(need_program("coap-client-notls"), "-m", "post", "-e", "go",
                              "-B", "10", "-o", str(out), proxy.uri("coap") + "/run", timeout=30)
        finally:
            assert proxy.stop() == 0
    finally:
        transport.close()
    assert first.code == codes.UNAUTHORIZED and first.opt.echo is not None
    assert first_bytes <= 3 * size
    # The repetition gets the answer the origin gave the first time: asked once, not twice.
    assert repeated.code == codes.CHANGED and repeated.payload == b"z" * 900
    # The address is verified now: full answers straight away.
    assert later.code == codes.CHANGED and len(later.payload) == 900
    assert out.read_bytes() == b"z" * 900
    assert origin.requests == 3  # each of the two challenged requests reached it once


async def test_end_to_end_clients_answer_the_proxys_echo(tmp_path: Path, keys: Keys,
                                                         app: Running) -> None:
    """Layer 0 and OSCORE through a plain hop: the proxy cannot cut protected answers, so it
    challenges the client's address, and coap-client repeats with the Echo value."""
    proxy = start_proxy(tmp_path, "--listen", "coap://127.0.0.1:0", "--metrics", "127.0.0.1:0")
    try:
        target = app.uri("coap") + "/firmware"
        e2e = ["--e2e-ca", str(keys / "e2e-ca.pem"), "--e2e-cert", str(keys / "client-e2e.pem"),
               "--e2e-key", str(keys / "client-e2e.key")]
        dtls, oscore = await asyncio.gather(
            client("-P", proxy.uri("coap"), "--layer0", "dtls", *e2e, "-o", str(tmp_path / "d"),
                   target, timeout=120),
            client("-P", proxy.uri("coap"), "--layer0", "oscore", *e2e, "-o", str(tmp_path / "o"),
                   target, timeout=120),
        )
    finally:
        assert proxy.stop() == 0
    image = Firmware().image
    assert dtls.rc == 0, dtls.stderr
    assert oscore.rc == 0, oscore.stderr
    assert (tmp_path / "d").read_bytes() == image
    assert (tmp_path / "o").read_bytes() == image
    assert proxy.log_file is not None
    log = proxy.log_file.read_text()
    assert '"kind":"held"' in log  # a challenged answer was delivered to its repetition


async def test_oscore_answers_the_proxys_echo_after_a_padded_handshake(
        tmp_path: Path, keys: Keys, app: Running) -> None:
    """A padded ClientHello lets the certificate flight through coap-proxy's 3x rule without
    an Echo, so the client's address is still unverified when the first large protected
    answer comes: the OSCORE mode must answer the proxy's 4.01 + Echo itself, also for
    requests that aiocoap's own OSCORE path carries (here one with an explicit Block2)."""
    proxy = start_proxy(tmp_path, "--listen", "coap://127.0.0.1:0")
    try:
        e2e = ["--e2e-ca", str(keys / "e2e-ca.pem"), "--e2e-cert", str(keys / "client-e2e.pem"),
               "--e2e-key", str(keys / "client-e2e.key")]
        done = await client("-P", proxy.uri("coap"), "--layer0", "oscore", *e2e, "--no-keep",
                            "-b", "1024", "-o", str(tmp_path / "o"),
                            app.uri("coap") + "/firmware",
                            timeout=60)
    finally:
        assert proxy.stop() == 0
    assert done.rc == 0, done.stderr
    assert (tmp_path / "o").read_bytes() == Firmware().image
    assert proxy.log_file is not None
    assert '"kind":"held"' in proxy.log_file.read_text()  # the proxy did challenge
