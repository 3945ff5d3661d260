"""Part 8 of issue 8 (keys): the keys of one layer never authenticate at the other.

The credential set is the one coap-keys writes: a hop-by-hop CA and an end-to-end CA, and
separate PSKs for each hop and for end to end (the same device identity at both layers, so
only the key tells them apart). Each case is paired with a control that succeeds with the
right layer's key, so a refusal cannot come from a broken set-up.
"""

from __future__ import annotations

import asyncio

import aiocoap
import pytest
from aiocoap import GET, Message
from aiocoap.numbers.codes import Code

from coaplayers import dtls, layer1
from coaplayers.layer0 import HandshakeFailed, Layer0Client, Layer0Config

from .conftest import App, FastTuning, Keys

FAIL_BOUND = 30.0


async def layer0_get(ctx: layer1.LayeredContext, app: App, credentials: object) -> aiocoap.Message:
    config = Layer0Config(transport_tuning=FastTuning(), handshake_timeout=10.0)
    ch = Layer0Client(ctx.context, app.uri, credentials, config=config)  # type: ignore[arg-type]
    try:
        req = ch.request(Message(code=GET, uri_path=["nonce"], uri_query=["k"]))
        return await asyncio.wait_for(req.response, FAIL_BOUND)
    finally:
        await ch.close()


def hop_cert(creds: Keys) -> dtls.CertificateCredentials:
    """The proxy's Layer 1 certificate (hop CA), trusting the end-to-end CA."""
    return dtls.CertificateCredentials.from_files(
        creds.path("proxy.pem"), creds.path("proxy.key"), creds.path("e2e-ca.pem"),
        server_name="app-server",
    )


async def test_hop_keys_never_open_a_layer0_session(app: App, creds: Keys, client_contexts):
    (ctx,) = await client_contexts(1)
    ok = await layer0_get(ctx, app, creds.e2e_psk_client())  # control: the end-to-end PSK
    assert ok.code == Code.CONTENT and ok.payload == b"nonce k"
    assert app.handshakes == 1

    hop_ident, hop_key = creds.psk["hop1"]
    assert hop_ident == creds.psk["e2e"][0]  # same identity: only the key differs
    with pytest.raises(HandshakeFailed):
        await layer0_get(ctx, app, dtls.PskClientCredentials(hop_ident, hop_key))

    # A certificate from the hop CA as the client's Layer 0 certificate.
    with pytest.raises(HandshakeFailed):
        await layer0_get(ctx, app, hop_cert(creds))
    # A client that trusts only the hop CA does not accept the server's end-to-end certificate.
    trusting_hop_ca = dtls.CertificateCredentials.from_files(
        creds.path("client-e2e.pem"), creds.path("client-e2e.key"), creds.path("hop-ca.pem"),
        server_name="app-server",
    )
    with pytest.raises(HandshakeFailed):
        await layer0_get(ctx, app, trusting_hop_ca)
    ok = await layer0_get(ctx, app, creds.e2e_client_cert())  # control: end-to-end certificate
    assert ok.code == Code.CONTENT
    assert app.handshakes == 2  # only the two controls ever completed
    assert app.gets == 2


async def layer1_request(port: int, credentials: layer1.ClientCredentials,
                         handshake_timeout: float = 8.0) -> aiocoap.Message:
    ctx = await layer1.create_context(
        client_credentials=credentials,
        limits=layer1.Layer1Limits(handshake_timeout=handshake_timeout),
    )
    try:
        msg = Message(code=GET, uri=f"coaps://127.0.0.1:{port}/anything",
                      transport_tuning=FastTuning())
        return await asyncio.wait_for(ctx.context.request(msg).response, FAIL_BOUND)
    finally:
        await ctx.shutdown()


def psk_map(ident: bytes, key: bytes) -> layer1.ClientCredentials:
    cc = layer1.ClientCredentials()
    cc.add_psk("coaps://127.0.0.1*", ident, key)
    return cc


def cert_map(credentials: dtls.CertificateCredentials) -> layer1.ClientCredentials:
    cc = layer1.ClientCredentials()
    cc.add_certificate("coaps://127.0.0.1*", credentials)
    return cc


async def test_end_to_end_keys_never_open_a_layer1_hop(creds: Keys, start_proxy) -> None:
    psk_proxy = await start_proxy("--psk", creds.hop1_psk_arg(), scheme="coaps")
    # control: the hop PSK gets an answer from the proxy (any CoAP answer: the hop is open)
    answer = await layer1_request(psk_proxy.port, psk_map(*creds.psk["hop1"]))
    assert answer.code.is_response()
    # A wrong PSK fails only by timing out (the proxy drops the Finished it cannot decrypt):
    # a short handshake timeout, since a loopback handshake takes milliseconds.
    with pytest.raises((aiocoap.error.NetworkError, TimeoutError)):
        await layer1_request(psk_proxy.port, psk_map(*creds.psk["e2e"]), handshake_timeout=3.0)

    cert_proxy = await start_proxy(
        "--cert", creds.path("proxy.pem"), "--key", creds.path("proxy.key"),
        "--ca", creds.path("hop-ca.pem"), scheme="coaps",
    )
    hop_client = dtls.CertificateCredentials.from_files(  # a hop-CA certificate for the client
        creds.path("server-hop.pem"), creds.path("server-hop.key"), creds.path("hop-ca.pem")
    )
    answer = await layer1_request(cert_proxy.port, cert_map(hop_client))  # control
    assert answer.code.is_response()
    # The client's end-to-end certificate (e2e CA) at the hop: refused by the proxy.
    e2e_client = dtls.CertificateCredentials.from_files(
        creds.path("client-e2e.pem"), creds.path("client-e2e.key"), creds.path("hop-ca.pem")
    )
    with pytest.raises((aiocoap.error.NetworkError, TimeoutError)):
        await layer1_request(cert_proxy.port, cert_map(e2e_client))
    # A client that trusts only the end-to-end CA refuses the proxy's hop certificate.
    trusting_e2e_ca = dtls.CertificateCredentials.from_files(
        creds.path("server-hop.pem"), creds.path("server-hop.key"), creds.path("e2e-ca.pem")
    )
    with pytest.raises((aiocoap.error.NetworkError, TimeoutError)):
        await layer1_request(cert_proxy.port, cert_map(trusting_e2e_ca))
