"""Parts 3 and 4 of issue 8: NAT rebinding on the client's hop, proxy and server restarts."""

from __future__ import annotations

import asyncio
import os

import pytest
from aiocoap import GET, POST, Message
from aiocoap.numbers.codes import Code

from coaplayers.layer0 import SessionLost
from coaplayers.layer0_modes import Layer0ClientOptions, open_requester
from coaplayers_tools.relay import FaultRelay

from .conftest import App, Keys, T, layer0_channel, oscore_message, oscore_requester, uri

pytestmark = pytest.mark.slow


async def get_nonce(ch, tag: str) -> None:  # type: ignore[no-untyped-def]
    resp = await asyncio.wait_for(
        ch.request(Message(code=GET, uri_path=["nonce"], uri_query=[tag])).response, T
    )
    assert resp.code == Code.CONTENT and resp.payload == b"nonce " + tag.encode()


async def test_nat_rebinding_on_the_client_hop_keeps_the_layer0_session(
    app: App, creds: Keys, start_proxy, client_contexts
) -> None:
    """Layer 1 (coaps, PSK) from client to proxy through a NAT that rebinds between requests."""
    proxy = await start_proxy("--psk", creds.hop1_psk_arg(), scheme="coaps")
    (ctx,) = await client_contexts(1)
    async with FaultRelay(upstream=proxy.address) as nat:
        ch = layer0_channel(ctx, app.uri, creds.e2e_psk_client(), uri(nat.address, "coaps"))
        await get_nonce(ch, "before")
        path = ch.session_path
        layer1_before = ctx.layer1.stats["handshakes_ok"]
        assert layer1_before == 1
        for round_ in range(3):
            (new_port,) = nat.rebind().values()
            await get_nonce(ch, f"after-rebind-{round_}")
            # The proxy saw the client come from a new port each time ...
            assert nat.stats.rebinds == round_ + 1 and new_port
        # ... Layer 1 noticed (the proxy has no session for that address) and re-handshook,
        assert ctx.layer1.stats["handshakes_ok"] == layer1_before + 3
        # while the Layer 0 session went on unchanged: no new end-to-end handshake.
        assert ch.handshakes == 1 and ch.session_path == path
        assert app.handshakes == 1
        await ch.close()


async def test_proxy_restart_keeps_layer0_sessions_and_oscore_contexts(
    app: App, creds: Keys, start_proxy, client_contexts
) -> None:
    proxy = await start_proxy()
    ctx_l0, ctx_os = await client_contexts(2)
    ch = layer0_channel(ctx_l0, app.uri, creds.e2e_psk_client(), proxy.uri)
    osc = oscore_requester(ctx_os, app.uri, creds, proxy.uri)

    async def oscore_get(tag: str) -> None:
        resp = await asyncio.wait_for(
            osc.request(oscore_message(app.uri, GET, f"nonce?{tag}")).response, T
        )
        assert resp.code == Code.CONTENT and resp.payload == b"nonce " + tag.encode()

    await get_nonce(ch, "l0-1")
    await oscore_get("os-1")
    context = osc.security_context
    assert app.handshakes == 2  # one Layer 0 session, one for OSCORE keying

    for n in range(2):
        await proxy.restart()
        await get_nonce(ch, f"l0-after-restart-{n}")
        await oscore_get(f"os-after-restart-{n}")

    assert proxy.starts == 3
    assert ch.handshakes == 1 and osc.keyings == 1
    assert osc.security_context is context
    assert app.handshakes == 2, "the proxy restart cost an end-to-end handshake"
    await ch.close()
    await osc.close()


async def test_server_restart_leads_to_new_handshakes_and_no_wrong_answer(
    app: App, creds: Keys, start_proxy, client_contexts
) -> None:
    proxy = await start_proxy()
    ctx_l0, ctx_os = await client_contexts(2)
    ch = layer0_channel(ctx_l0, app.uri, creds.e2e_psk_client(), proxy.uri)
    osc = oscore_requester(ctx_os, app.uri, creds, proxy.uri)
    succeeded = 0

    async def count(mode: str, tag: str) -> bool:
        nonlocal succeeded
        nonce = f"{tag}-{os.urandom(3).hex()}".encode()
        if mode == "l0":
            req = ch.request(Message(code=POST, uri_path=["count"], payload=nonce))
        else:
            req = osc.request(oscore_message(app.uri, POST, "count", nonce))
        try:
            resp = await asyncio.wait_for(req.response, T)
        except SessionLost:
            return False  # a POST is not resent by itself after the server lost the session
        assert resp.code == Code.CHANGED and resp.payload.split()[0] == nonce
        succeeded += 1
        return True

    assert await count("l0", "l0-1") and await count("os", "os-1")
    for n in range(2):
        await app.restart()
        # Layer 0: the GET is resent on a new session by itself (idempotent).
        await get_nonce(ch, f"after-server-restart-{n}")
        assert ch.handshakes == 2 + n
        # OSCORE: "Security context not found", a new keying, the request once more.
        assert await count("os", f"os-after-{n}")
        assert osc.keyings == 2 + n
        assert await count("l0", f"l0-after-{n}")
    # A POST when the server has just lost the session: refused, never executed.
    await app.restart()
    assert not await count("l0", "l0-lost")
    assert await count("l0", "l0-next")  # and the next request handshakes again
    assert app.count == succeeded
    assert len(set(app.executed)) == len(app.executed)
    await ch.close()
    await osc.close()


async def test_coap_client_oscore_mode_rekeys_after_server_restart(
    app: App, creds: Keys, start_proxy, client_contexts
) -> None:
    """The OSCORE requester exactly as coap-client builds it
    (coaplayers.layer0_modes.open_requester): it re-keys by itself after each server restart
    (it crashed in resumption until 3332ce1)."""
    proxy = await start_proxy()
    (ctx,) = await client_contexts(1)
    requester = await open_requester(
        ctx, proxy=proxy.uri, target=app.uri + "/count",
        e2e=Layer0ClientOptions(mode="oscore", certificate=creds.e2e_client_cert()),
    )
    try:
        for n in range(2):
            msg = oscore_message(app.uri, POST, "count", b"n%d" % n)
            resp = await asyncio.wait_for(requester.request(msg).response, T)
            assert resp.code == Code.CHANGED and resp.payload == b"n%d %d" % (n, n + 1)
            await app.restart()
    finally:
        await requester.close()
