"""OSCORE through a real forward proxy (aiocoap-proxy --forward, its own process).

Stock aiocoap 0.4.17 drops Proxy-Scheme and Uri-Port from the OSCORE outer message, so the
proxy cannot tell where to forward; coaplayers' SecurityContext keeps them outer (RFC 8613
Section 4.1.3.3). Client and server are aiocoap contexts on real loopback UDP sockets, the
server wraps an ordinary Site in OscoreSite, the client uses OscoreClientTransport.
"""

from __future__ import annotations

import asyncio
import os

import aiocoap
import pytest
from aiocoap import Message
from aiocoap import oscore as aiooscore
from aiocoap.message import Direction
from aiocoap.numbers.codes import GET, POST
from aiocoap.proxy.client import ProxyForwarder

from coaplayers.oscore import ClientContexts, ContextStore, SecurityContext, attach

from .support import aiocoap_proxy, oscore_server, static_pair

pytestmark = pytest.mark.slow

TIMEOUT = 10.0


def test_stock_aiocoap_outer_message_lacks_proxy_scheme_and_uri_port() -> None:
    """The bug being fixed, shown without a network: same request, stock vs. ours."""
    ours, _ = static_pair()

    class Stock(aiooscore.CanProtect, aiooscore.CanUnprotect, aiooscore.SecurityContextUtils):
        def post_seqnoincrease(self) -> None:
            pass

    stock = Stock()
    for name in ("sender_id", "recipient_id", "id_context", "alg_aead", "hashfun",
                 "sender_key", "recipient_key", "common_iv"):
        setattr(stock, name, getattr(ours, name))
    stock.sender_sequence_number = 0

    def request() -> Message:
        m = Message(code=GET, uri_host="127.0.0.1", uri_port=5999, proxy_scheme="coap",
                    uri_path=["hello"])
        m.direction = Direction.OUTGOING
        return m

    stock_outer, _ = stock.protect(request())
    our_outer, _ = ours.protect(request())
    assert stock_outer.opt.proxy_scheme is None and stock_outer.opt.uri_port is None
    assert our_outer.opt.proxy_scheme == "coap"
    assert our_outer.opt.uri_port == 5999
    assert our_outer.opt.uri_host == "127.0.0.1"
    # Class U options are outside the AAD: the ciphertext is the same.
    assert our_outer.payload == stock_outer.payload
    # ...and nothing of the request leaks into the outer message in clear.
    assert our_outer.opt.uri_path == ()


def _setup(client: aiocoap.Context, peer: str = "device-42") -> tuple[
    SecurityContext, ContextStore, ClientContexts
]:
    client_sc, server_sc = static_pair(peer=peer)
    store = ContextStore(max_contexts=4)
    store.add(server_sc)
    contexts = ClientContexts()
    attach(client, contexts)
    return client_sc, store, contexts


async def test_get_and_3000_byte_post_through_aiocoap_proxy(client: aiocoap.Context) -> None:
    client_sc, store, contexts = _setup(client)
    async with aiocoap_proxy() as proxy_port, oscore_server(store) as (port, _):
        base = f"coap://127.0.0.1:{port}"
        contexts.set(base, client_sc)
        via_proxy = ProxyForwarder(f"coap://127.0.0.1:{proxy_port}", client)

        seq_before = client_sc.sender_sequence_number
        resp = await asyncio.wait_for(
            via_proxy.request(Message(code=GET, uri=f"{base}/hello")).response, TIMEOUT
        )
        assert resp.code == aiocoap.CONTENT, resp
        # The resource learnt the peer identity from the OSCORE context.
        assert resp.payload == b"hello device-42"
        # It really was OSCORE: the response came through our context.
        assert resp.remote.security_context is client_sc
        assert client_sc.sender_sequence_number == seq_before + 1

        # 3,000-byte POST, echoed back (inner block-wise both ways, RFC 8613 4.1.3.4).
        body = os.urandom(3000)
        resp = await asyncio.wait_for(
            via_proxy.request(Message(code=POST, uri=f"{base}/echo", payload=body)).response,
            TIMEOUT,
        )
        assert resp.code == aiocoap.CHANGED, resp
        assert resp.payload == body
        assert resp.remote.security_context is client_sc


async def test_stock_aiocoap_proxy_fails_observe_even_without_oscore(
    client: aiocoap.Context,
) -> None:
    """Why the Observe test uses aiocoap_proxy_observefix.py: the unmodified program
    answers a plain CoAP Observe request with 5.00. When this test starts failing, aiocoap
    has fixed the bug and the launcher can go."""
    async with aiocoap_proxy() as proxy_port, oscore_server(ContextStore()) as (port, _):
        via_proxy = ProxyForwarder(f"coap://127.0.0.1:{proxy_port}", client)
        resp = await asyncio.wait_for(
            via_proxy.request(
                Message(code=GET, uri=f"coap://127.0.0.1:{port}/obs", observe=0)
            ).response,
            TIMEOUT,
        )
        assert resp.code == aiocoap.INTERNAL_SERVER_ERROR


async def test_observe_three_notifications_through_aiocoap_proxy(
    client: aiocoap.Context,
) -> None:
    client_sc, store, contexts = _setup(client)
    async with aiocoap_proxy(observe_fix=True) as proxy_port, oscore_server(store) as (
        port,
        counter,
    ):
        base = f"coap://127.0.0.1:{port}"
        contexts.set(base, client_sc)
        via_proxy = ProxyForwarder(f"coap://127.0.0.1:{proxy_port}", client)

        obs_request = via_proxy.request(Message(code=GET, uri=f"{base}/obs", observe=0))
        first = await asyncio.wait_for(obs_request.response, TIMEOUT)
        assert first.code == aiocoap.CONTENT, first
        assert first.payload == b"count 0"
        assert first.remote.security_context is client_sc
        assert first.opt.observe is not None
        notifications = aiter(obs_request.observation)
        seen = []
        for i in range(1, 4):
            counter.bump()
            note = await asyncio.wait_for(anext(notifications), TIMEOUT)
            assert note.payload == f"count {i}".encode()
            assert note.remote.security_context is client_sc
            seen.append(note.opt.observe)
        # Each notification carries its own (increasing) Partial IV.
        assert seen == sorted(seen) and len(set(seen)) == 3
        obs_request.observation.cancel()


async def test_without_fix_the_proxy_cannot_forward(client: aiocoap.Context) -> None:
    """Control experiment: with the outer options removed again, the same request through
    the same proxy fails. This keeps the end-to-end test honest about what it shows."""
    client_sc, server_sc = static_pair()
    store = ContextStore()
    store.add(server_sc)
    contexts = ClientContexts()
    attach(client, contexts)

    def stock_split(message: Message, request_id: object) -> tuple[Message, bytes]:
        return aiooscore.CanProtect._split_message(client_sc, message, request_id)

    client_sc._split_message = stock_split  # type: ignore[method-assign]

    async with aiocoap_proxy() as proxy_port, oscore_server(store) as (port, _):
        contexts.set(f"coap://127.0.0.1:{port}", client_sc)
        via_proxy = ProxyForwarder(f"coap://127.0.0.1:{proxy_port}", client)
        with pytest.raises(Exception) as info:
            await asyncio.wait_for(
                via_proxy.request(Message(code=GET, uri=f"coap://127.0.0.1:{port}/hello"))
                .response,
                TIMEOUT,
            )
        # The proxy answers unprotected (it never reached the server).
        assert not isinstance(info.value, TimeoutError)
