"""The OpenSSL PSK client (what keys the OSCORE mode from a PSK): handshakes with OpenSSL's
PSK listener and tinydtls' listener, agrees on the exporter, fails on a wrong key."""

from __future__ import annotations

import asyncio

import pytest

from coaplayers.dtls import (
    DtlsConfig,
    OpenSslPskClientSession,
    OpenSslPskListener,
    PskClientCredentials,
    PskStore,
    TinyDtlsListener,
)
from coaplayers.dtls.openssl import build_psk_context
from tests.conftest import UdpCollector

from .conftest import PSK_IDENTITY, PSK_KEY
from .harness import CLIENT, SERVER, Network


def _client(key: bytes = PSK_KEY) -> OpenSslPskClientSession:
    return OpenSslPskClientSession.psk_client(
        build_psk_context(server=False), PskClientCredentials(PSK_IDENTITY, key), DtlsConfig())


@pytest.mark.parametrize("listener", ["openssl", "tinydtls"])
def test_psk_handshake_and_exporter(listener: str) -> None:
    store = PskStore({PSK_IDENTITY: PSK_KEY})
    server = (OpenSslPskListener(store, DtlsConfig()) if listener == "openssl"
              else TinyDtlsListener(store, DtlsConfig()))
    net = Network(_client(), server)
    net.handshake()
    assert net.handshake_complete(CLIENT).cipher_suite in ("PSK-AES128-CCM8",
                                                           "TLS_PSK_WITH_AES_128_CCM_8")
    assert net.handshake_complete(CLIENT).peer_identity == PSK_IDENTITY
    assert net.handshake_complete(SERVER).peer_identity == PSK_IDENTITY
    net.client_send(b"ping")
    net.settle()
    assert net.received(SERVER) == [b"ping"]
    if listener == "openssl":
        assert net.server is not None
        assert (net.client.export_keying_material(b"EXPORTER-test", 32)
                == net.server.export_keying_material(b"EXPORTER-test", 32))


def test_wrong_psk_does_not_establish() -> None:
    net = Network(_client(bytes(16)), OpenSslPskListener(PskStore({PSK_IDENTITY: PSK_KEY})))
    net.start()
    net.run()
    assert not net.client.is_established
    assert net.closed_event(CLIENT) is not None


# -- against libcoap's servers over real UDP ---------------------------------------------------


async def _get_over_udp(session: OpenSslPskClientSession, port: int, timeout: float) -> bytes:
    """Drive ``session`` over a UDP socket to 127.0.0.1:port, send one CoAP GET / inside it
    and return the first application data that comes back."""
    from aiocoap import CON, GET, Message

    loop = asyncio.get_running_loop()
    transport, receiver = await loop.create_datagram_endpoint(
        UdpCollector, remote_addr=("127.0.0.1", port))
    deadline = loop.time() + timeout

    def flush() -> None:
        for datagram in session.datagrams_to_send():
            transport.sendto(datagram)

    try:
        session.connect(loop.time())
        flush()
        sent = False
        while loop.time() < deadline:
            timer = session.get_timer()
            wait = min(deadline, timer if timer is not None else deadline) - loop.time()
            try:
                data = await asyncio.wait_for(receiver.queue.get(), max(wait, 0.0))
                session.receive_datagram(data, loop.time())
            except TimeoutError:
                session.handle_timer(loop.time())
            if session.is_established and not sent:
                request = Message(code=GET)
                request.mtype, request.mid, request.token = CON, 0x4242, b"\x07"
                session.send(request.encode())
                sent = True
            flush()
            while (event := session.next_event()) is not None:
                payload = getattr(event, "data", None)
                if payload is not None:
                    return bytes(payload)
            if session.is_closed:
                raise AssertionError(f"session closed: {session.close_error}")
        raise AssertionError("no answer in time")
    finally:
        transport.close()


@pytest.mark.interop
@pytest.mark.parametrize("tool", ["coap-server-openssl", "coap-server-gnutls"])
async def test_openssl_psk_client_against_libcoap_servers(tool: str) -> None:
    from aiocoap import CONTENT, Message

    from tests.conftest import background, free_udp_port, need_program, wait_udp_bound

    need_program(tool)
    port = free_udp_port()
    async with background(tool, "-A", "127.0.0.1", "-p", str(port), "-k", PSK_KEY.decode(),
                          "-h", ""):
        await wait_udp_bound("127.0.0.1", port + 1)  # libcoap serves DTLS on P+1
        answer = Message.decode(await _get_over_udp(_client(), port + 1, 20.0))
    assert answer.code == CONTENT and answer.token == b"\x07"
    assert b"libcoap" in answer.payload
