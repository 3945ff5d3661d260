"""A replayed ClientHello does not end an established coaps session (RFC 6347 4.2.8).

The session ID of a resumable session and the cookie a client echoed both travel in the clear,
and a cookie binds to the client's address only. So whoever saw a handshake and can send from
the client's address could start a new handshake there at will. The server must keep the
established session until the new handshake completes (the client's Finished proves that the
client itself is there).

Real UDP sockets, the Layer 1 transport on both sides, certificates (OpenSSL: cookies and
resumption without a cookie). The attacker's datagram is sent from the client's own socket:
another socket cannot be bound to that address and port while the client holds it, and a
forged source address would put the very same bytes on the wire as this does.
"""

from __future__ import annotations

import asyncio
import socket

import aiocoap
import aiocoap.resource as resource
import pytest

from coaplayers import dtls
from coaplayers.dtls import records
from coaplayers.layer1 import ClientCredentials, Layer1Limits, create_context
from tests.conftest import until

T = 10.0


class Ticker(resource.ObservableResource):
    def __init__(self) -> None:
        super().__init__()
        self.value = 0

    def bump(self) -> None:
        self.value += 1
        self.updated_state()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=b"%d" % self.value)


def _session_id_and_cookie(hello: bytes) -> tuple[bytes, bytes]:
    at = records.HEADER_LEN + 12 + 2 + 32
    session_id = hello[at + 1 : at + 1 + hello[at]]
    at += 1 + hello[at]
    return session_id, hello[at + 1 : at + 1 + hello[at]]


@pytest.mark.parametrize("replayed", ["resumption", "cookie"])
async def test_an_observation_survives_a_replayed_client_hello(demo_pki, replayed: str) -> None:  # type: ignore[no-untyped-def]
    p = demo_pki
    site = resource.Site()
    ticker = Ticker()
    site.add_resource(["tick"], ticker)
    server_cert = dtls.CertificateCredentials(
        [p["server"].certificate], p["server"].private_key, [p["ca"].certificate]
    )
    # The new handshake the replay starts gives up soon (and must not take anything with it).
    srv = await create_context(site, listen=["coaps://127.0.0.1:0"], certificate=server_cert,
                               limits=Layer1Limits(handshake_timeout=2.0))
    creds = ClientCredentials()
    creds.add_certificate("coaps://*", dtls.CertificateCredentials(
        [p["client"].certificate], p["client"].private_key, [p["ca"].certificate],
        server_name="127.0.0.1",
    ))
    cli = await create_context(client_credentials=creds)
    hellos: list[bytes] = []
    answers = asyncio.Queue[bytes]()
    try:
        uri = srv.bound[0] + "/tick"
        first = await asyncio.wait_for(
            cli.context.request(aiocoap.Message(code=aiocoap.GET, uri=uri)).response, T)
        assert first.payload == b"0"
        endpoint = cli.layer1._client_endpoints[socket.AF_INET]
        send, receive = endpoint.sendto, endpoint.datagram_received

        def capture(data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
            if records.client_hello_random(data) is not None:
                hellos.append(data)
            send(data, addr)

        def note(data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
            answers.put_nowait(data)
            receive(data, addr)

        endpoint.sendto = capture  # type: ignore[method-assign]
        endpoint.datagram_received = note  # type: ignore[method-assign]
        # The client starts over as it does when it believes the server lost its session:
        # a resumption (ClientHello offering the session ID, no cookie) while the server
        # still holds the established session; or, with its resumption state forgotten,
        # a full handshake through the cookie exchange.
        peer = next(iter(cli.layer1._peers.values()))
        if replayed == "cookie":
            cli.layer1._tickets = dtls.TicketStore()
        cli.layer1._rehandshake(peer)
        observed = cli.context.request(aiocoap.Message(code=aiocoap.GET, uri=uri, observe=0))
        assert (await asyncio.wait_for(observed.response, T)).payload == b"0"
        assert srv.layer1.session_count == 1
        assert srv.layer1.stats["handshakes_ok"] == 2
        (server_peer,) = srv.layer1._peers.values()
        assert server_peer.remote.peer is server_peer  # the new session took over the remote
        assert server_peer.remote.peer_identity == "device-1"
        if replayed == "resumption":
            (hello,) = hellos
            session_id, cookie = _session_id_and_cookie(hello)
            assert session_id and not cookie
        else:
            hello = hellos[-1]
            session_id, cookie = _session_id_and_cookie(hello)
            assert not session_id and cookie
        notifications = observed.observation.__aiter__()
        ticker.bump()
        assert (await asyncio.wait_for(notifications.__anext__(), T)).payload == b"1"

        # the attack: the captured ClientHello again, from the client's address
        while not answers.empty():
            answers.get_nowait()
        endpoint.raw_socket.sendto(hello, srv.layer1.bound_addresses[0])
        answer = await asyncio.wait_for(answers.get(), T)  # the server has taken it in
        assert records.content_type(answer) == records.CONTENT_HANDSHAKE
        assert srv.layer1.half_open_count == 1  # the replay's handshake, beside the session
        ticker.bump()
        assert (await asyncio.wait_for(notifications.__anext__(), T)).payload == b"2"
        await asyncio.wait_for(until(lambda: srv.layer1.half_open_count == 0), T)
        assert srv.layer1.stats["handshakes_failed"] == 1
        ticker.bump()
        assert (await asyncio.wait_for(notifications.__anext__(), T)).payload == b"3"
        again = await asyncio.wait_for(
            cli.context.request(aiocoap.Message(code=aiocoap.GET, uri=uri)).response, T)
        assert again.payload == b"3"
        assert srv.layer1.stats["handshakes_ok"] == 2 and cli.layer1.stats["handshakes_ok"] == 2
        assert list(srv.layer1._peers.values()) == [server_peer]
        assert server_peer.remote.peer_identity == "device-1"
        observed.observation.cancel()
    finally:
        await cli.shutdown()
        await srv.shutdown()
