"""Part 2 of issue 8: duplicated and reordered datagrams on both hops never make the server act
twice on one request, and never deliver a stale answer as a fresh one.

POST /count increments the server's counter and answers with the request's nonce; the test
asserts that the final count equals the number of requests the client saw succeed, that no
nonce was executed twice, and that every answer carries its own request's nonce.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from aiocoap import POST, Message
from aiocoap.numbers.codes import Code

from coaplayers.layer0 import Layer0Error
from coaplayers.oscore import OscoreError
from coaplayers_tools.relay import FaultRelay, Faults

from .conftest import App, Keys, T, layer0_channel, oscore_message, oscore_requester, uri

pytestmark = pytest.mark.slow
N = 40
FAULTS = {"duplicate": 0.3, "reorder": 0.3}


async def test_duplicates_and_reordering_never_act_twice_nor_answer_stale(
    app: App, creds: Keys, start_proxy, client_contexts
) -> None:
    (ctx,) = await client_contexts(1)
    # Behind the proxy a client has one CON request outstanding at a time (RFC 7252 4.7,
    # NSTART), so few datagrams of one flow follow each other within the default hold: a
    # datagram held back there waits long enough for the next one (a retransmission, often:
    # the proxy's first comes after 0.1-0.15 s, conftest's ACK_TIMEOUT).
    hop2_faults = Faults(seed=5, reorder_hold=0.2, **FAULTS)
    async with FaultRelay(upstream=app.address, faults=hop2_faults) as hop2:
        proxy = await start_proxy()
        async with FaultRelay(upstream=proxy.address, faults=Faults(seed=6, **FAULTS)) as hop1:
            origin, via = uri(hop2.address), uri(hop1.address)
            ch = layer0_channel(ctx, origin, creds.e2e_psk_client(), via)
            osc = oscore_requester(ctx, origin, creds, via)
            ok = failed = 0
            nonces: list[bytes] = []

            async def post(i: int, mode: str) -> None:
                nonlocal ok, failed
                nonce = f"{mode}-{i}-{os.urandom(4).hex()}".encode()
                nonces.append(nonce)
                if mode == "l0":
                    req = ch.request(Message(code=POST, uri_path=["count"], payload=nonce))
                else:
                    req = osc.request(oscore_message(origin, POST, "count", nonce))
                try:
                    resp = await asyncio.wait_for(req.response, T)
                except (Layer0Error, OscoreError, TimeoutError):
                    failed += 1  # allowed: a request the client saw fail; never a wrong answer
                    return
                assert resp.code == Code.CHANGED
                answered, _, count = resp.payload.partition(b" ")
                assert answered == nonce, "an answer to another request was delivered"
                assert int(count) <= app.count
                ok += 1

            for i in range(N):
                await post(i, "l0")
                await post(i, "os")
                # Several requests in flight on one session too (their datagrams interleave).
                await asyncio.gather(
                    *(post(N + 3 * i + k, mode) for k in range(3) for mode in ("l0", "os"))
                )
            await ch.close()
            await osc.close()
            s1, s2 = hop1.stats, hop2.stats
            print(f"succeeded {ok}, failed {failed};", "hop 1:", s1.format(), "hop 2:", s2.format())
    assert app.count == ok, f"server acted {app.count} times for {ok} successful requests"
    assert len(set(app.executed)) == len(app.executed), "one request was executed twice"
    assert set(app.executed) <= set(nonces)
    assert failed <= (8 * N) // 20, f"{failed} of {8 * N} requests failed"
    for s in (s1, s2):
        assert s.up.duplicated > 0 and s.down.duplicated > 0, s.format()
        assert s.up.reordered + s.down.reordered > 0, s.format()
