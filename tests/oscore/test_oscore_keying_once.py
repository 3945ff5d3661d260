"""OSCORE keying: once per Layer 0 session, and only on a full handshake (docs/OSCORE-KEYING.md
sections 1 and 9.1).

Two keyings on one session would give two server contexts with the same Sender Key and Common
IV, both starting at sequence number 0, so the server's own Partial IVs (notifications, Echo
answers) would repeat nonces. Real UDP on loopback, the Layer 0 server and client in process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import aiocoap.resource as resource
import pytest
from aiocoap.numbers.codes import Code

from coaplayers.dtls import CertificateCredentials, TicketStore, build_context
from coaplayers.layer0 import Layer0Client, Layer0Site, Policy
from coaplayers.oscore import ContextStore
from coaplayers.oscore.mode import (
    ALREADY_KEYED,
    KEYING_PATH,
    NEEDS_FULL_HANDSHAKE,
    PARAMETERS_CONTENT_FORMAT,
    KeyingResource,
)
from coaplayers.oscore.params import OscoreParameters
from tests.conftest import free_udp_port
from tests.oscore.support import certificate_pair

T = 15.0


@pytest.fixture(scope="module")
def creds() -> dict[str, CertificateCredentials]:
    return certificate_pair("keying-once CA")


@pytest.fixture
async def origin(creds: dict[str, CertificateCredentials]) -> AsyncIterator[tuple[str, Any]]:
    store = ContextStore()
    site = resource.Site()
    site.add_resource(list(KEYING_PATH), KeyingResource(store))
    layer0 = Layer0Site(site, creds["server"], policy=Policy.build(protected=()))
    port = free_udp_port()
    ctx = await aiocoap.Context.create_server_context(layer0, bind=("127.0.0.1", port))
    try:
        yield f"coap://127.0.0.1:{port}", store
    finally:
        layer0.close()
        await ctx.shutdown()


@pytest.fixture
async def client() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context()
    yield ctx
    await ctx.shutdown()


async def _key(channel: Layer0Client) -> aiocoap.Message:
    msg = aiocoap.Message(code=aiocoap.POST, uri_path=KEYING_PATH)
    return await asyncio.wait_for(channel.request(msg).response, T)


async def test_a_session_keys_one_context_only(origin, client, creds) -> None:  # type: ignore[no-untyped-def]
    uri, store = origin
    channel = Layer0Client(client, uri, creds["client"])
    first = await _key(channel)
    assert first.code == Code.CHANGED
    assert first.opt.content_format == PARAMETERS_CONTENT_FORMAT
    params = OscoreParameters.from_cbor(first.payload)
    assert store.get(params.client_id) is not None
    second = await _key(channel)
    assert (second.code, second.payload) == (Code.CONFLICT, ALREADY_KEYED)
    assert len(store) == 1
    assert channel.handshakes == 1  # the same session both times
    await channel.close()
    # a new session keys again, a context of its own
    other = Layer0Client(client, uri, creds["client"])
    again = await _key(other)
    assert again.code == Code.CHANGED
    assert OscoreParameters.from_cbor(again.payload).client_id != params.client_id
    assert len(store) == 2
    await other.close()


async def test_a_resumed_session_keys_nothing(origin, client, creds) -> None:  # type: ignore[no-untyped-def]
    uri, store = origin
    tickets = TicketStore()
    shared = build_context(creds["client"], server=False)
    full = Layer0Client(client, uri, creds["client"], tickets=tickets, ssl_context=shared)
    assert (await asyncio.wait_for(full.connect(), T)).resumed is False
    await full.close()
    resumed = Layer0Client(client, uri, creds["client"], tickets=tickets, ssl_context=shared)
    assert (await asyncio.wait_for(resumed.connect(), T)).resumed is True
    answer = await _key(resumed)
    assert (answer.code, answer.payload) == (Code.FORBIDDEN, NEEDS_FULL_HANDSHAKE)
    assert len(store) == 0
    await resumed.close()
