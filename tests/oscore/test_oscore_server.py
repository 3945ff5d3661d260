"""Server side: the bounded context store, the Site wrapper, peer identity, and interop
with aiocoap's own (independently configured) OSCORE contexts in both directions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Message
from aiocoap import oscore as aiooscore
from aiocoap.numbers.codes import GET, POST
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

from coaplayers.oscore import (
    ClientContexts,
    ContextStore,
    OscoreParameters,
    RehandshakeReason,
    RehandshakeRequired,
    Role,
    SecurityContext,
    attach,
    derive_context,
    split_exporter,
)

from ..conftest import free_udp_port
from .support import build_site, oscore_server, static_pair

TIMEOUT = 10.0


def _ctx(client_id: bytes) -> SecurityContext:
    return static_pair(client_id=client_id)[1]


# -- ContextStore (no network) -------------------------------------------------------------


def test_store_is_bounded_and_evicts_least_recently_used() -> None:
    store = ContextStore(max_contexts=3)
    a, b, c, d = (_ctx(bytes([i])) for i in range(1, 5))
    for ctx in (a, b, c):
        assert store.add(ctx) == []
    assert store.find_oscore({aiooscore.COSE_KID: b"\x01"}) is a  # a is now most recent
    assert store.add(d) == [b]  # b was least recently used
    assert len(store) == 3 and b not in store and a in store and d in store
    assert store.evictions == 1
    with pytest.raises(KeyError):
        store.find_oscore({aiooscore.COSE_KID: b"\x02"})
    with pytest.raises(KeyError):
        store.find_oscore({})  # no kid at all


def test_store_add_replaces_same_id_and_remove_is_exact() -> None:
    store = ContextStore()
    old, new = _ctx(b"\x09"), _ctx(b"\x09")
    store.add(old)
    store.add(new)
    assert len(store) == 1 and store.get(b"\x09") is new
    assert not store.remove(old)  # the stale object does not remove its successor
    assert store.remove(new) and len(store) == 0


def test_store_distinguishes_id_contexts() -> None:
    store = ContextStore()
    plain = _ctx(b"\x01")
    with_ctx = static_pair(client_id=b"\x01", id_context=b"\xaa")[1]
    with_ctx.id_context = b"\xaa"
    store.add(plain)
    store.add(with_ctx)
    assert store.find_oscore({aiooscore.COSE_KID: b"\x01"}) is plain
    assert store.find_oscore({aiooscore.COSE_KID: b"\x01",
                              aiooscore.COSE_KID_CONTEXT: b"\xaa"}) is with_ctx


def test_allocate_client_id_is_unique_and_never_the_server_id() -> None:
    store = ContextStore(server_id=b"\x00", max_contexts=200)
    seen = set()
    for _ in range(128):  # 1-byte IDs: 255 candidates besides the server's own
        cid = store.allocate_client_id(length=1)
        assert cid != b"\x00" and cid not in seen
        seen.add(cid)
        store.add(static_pair(client_id=cid, server_id=b"\x00")[1])
    with pytest.raises(RuntimeError):
        store.allocate_client_id(length=1)  # half the space in use: refuse


def test_client_ids_are_as_short_as_the_number_of_contexts_allows() -> None:
    store = ContextStore(server_id=b"", max_contexts=200)
    lengths = []
    for _ in range(70):
        cid = store.allocate_client_id()
        lengths.append(len(cid))
        store.add(static_pair(client_id=cid, server_id=b"")[1])
    assert lengths == [1] * 64 + [2] * 6  # 1 byte until the 1-byte space is a quarter full


# -- the wrapped site over real UDP -----------------------------------------------------------


async def test_plain_requests_pass_and_require_oscore_blocks(client: aiocoap.Context) -> None:
    async with oscore_server(ContextStore()) as (port, _):
        resp = await asyncio.wait_for(
            client.request(Message(code=GET, uri=f"coap://127.0.0.1:{port}/hello")).response,
            TIMEOUT,
        )
        assert resp.payload == b"hello anonymous"
    async with oscore_server(ContextStore(), require_oscore=True) as (port, _):
        resp = await asyncio.wait_for(
            client.request(Message(code=GET, uri=f"coap://127.0.0.1:{port}/hello")).response,
            TIMEOUT,
        )
        assert resp.code == aiocoap.UNAUTHORIZED


async def test_eviction_leads_the_client_to_a_new_handshake(client: aiocoap.Context) -> None:
    store = ContextStore(max_contexts=1)
    first_client, first_server = static_pair(client_id=b"\x01")
    store.add(first_server)
    contexts = ClientContexts()
    attach(client, contexts)
    async with oscore_server(store) as (port, _):
        uri = f"coap://127.0.0.1:{port}/hello"
        contexts.set(uri, first_client)
        resp = await asyncio.wait_for(client.request(Message(code=GET, uri=uri)).response,
                                      TIMEOUT)
        assert resp.payload == b"hello client-1"
        store.add(static_pair(client_id=b"\x02", peer="other")[1])  # evicts the first
        with pytest.raises(RehandshakeRequired) as info:
            await asyncio.wait_for(client.request(Message(code=GET, uri=uri)).response,
                                   TIMEOUT)
        assert info.value.reason is RehandshakeReason.CONTEXT_NOT_FOUND


# -- interop with aiocoap's own OSCORE contexts -------------------------------------------------


def _aiocoap_context_dir(base: Path, sender: bytes, recipient: bytes, secret: bytes,
                         salt: bytes) -> str:
    """An aiocoap FilesystemSecurityContext directory: the way an independent OSCORE peer
    would be configured from the exported parameters (secret, salt, IDs), nothing shared
    with coaplayers' objects."""
    base.mkdir()
    (base / "secret.json").write_text(json.dumps({
        "sender-id_hex": sender.hex(), "recipient-id_hex": recipient.hex(),
        "secret_hex": secret.hex(), "salt_hex": salt.hex(),
    }))
    return str(base)


EXPORTER = bytes(range(200, 232))  # stands in for the Layer 0 exporter output


async def test_aiocoap_oscore_client_talks_to_our_server(tmp_path: Path) -> None:
    # A stock aiocoap client: its own OSCORE transport, contexts in client_credentials.
    client = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
    params = OscoreParameters(client_id=b"\x21", server_id=b"\x01")
    store = ContextStore()
    store.add(derive_context(EXPORTER, params, Role.SERVER, peer="aiocoap-peer"))
    material = split_exporter(EXPORTER, params)
    peer_ctx = aiooscore.FilesystemSecurityContext(_aiocoap_context_dir(
        tmp_path / "peer", params.client_id, params.server_id,
        material.master_secret, material.master_salt))
    try:
        async with oscore_server(store) as (port, _):
            client.client_credentials[f"coap://127.0.0.1:{port}/*"] = peer_ctx
            resp = await asyncio.wait_for(
                client.request(Message(code=GET, uri=f"coap://127.0.0.1:{port}/hello"))
                .response, TIMEOUT)
            assert resp.payload == b"hello aiocoap-peer"
            assert resp.remote.security_context is peer_ctx
            body = bytes(range(256)) * 8
            resp = await asyncio.wait_for(
                client.request(Message(code=POST, uri=f"coap://127.0.0.1:{port}/echo",
                                       payload=body)).response, TIMEOUT)
            assert resp.payload == body
    finally:
        peer_ctx._destroy()
        await client.shutdown()


async def test_our_client_talks_to_aiocoap_oscore_server(
    client: aiocoap.Context, tmp_path: Path
) -> None:
    params = OscoreParameters(client_id=b"\x33", server_id=b"")
    material = split_exporter(EXPORTER, params)
    peer_ctx = aiooscore.FilesystemSecurityContext(_aiocoap_context_dir(
        tmp_path / "peer", params.server_id, params.client_id,
        material.master_secret, material.master_salt))
    site, _ = build_site()
    creds = aiocoap.credentials.CredentialsMap()
    creds[":peer"] = peer_ctx
    port = free_udp_port()
    server = await aiocoap.Context.create_server_context(
        OscoreSiteWrapper(site, creds), bind=("127.0.0.1", port), transports=["udp6"])
    try:
        contexts = ClientContexts()
        attach(client, contexts)
        ours = derive_context(EXPORTER, params, Role.CLIENT)
        contexts.set(f"coap://127.0.0.1:{port}", ours)
        resp = await asyncio.wait_for(
            client.request(Message(code=GET, uri=f"coap://127.0.0.1:{port}/hello")).response,
            TIMEOUT)
        assert resp.code == aiocoap.CONTENT
        assert resp.payload == b"hello anonymous"  # aiocoap's wrapper has no peer names
        assert resp.remote.security_context is ours
        assert ours.sender_sequence_number == 1
    finally:
        await server.shutdown()
        peer_ctx._destroy()


async def test_oscore_context_and_dtls_credentials_for_the_same_uri(tmp_path: Path) -> None:
    """A stock credentials map holds one object per URI pattern, which aiocoap's OSCORE and
    DTLS transports would both be handed. With OSCORE contexts in ClientContexts, the
    Layer 1 credentials stay in client_credentials for the very same URI, untouched."""
    client = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
    client_sc, server_sc = static_pair(peer="both")
    store = ContextStore()
    store.add(server_sc)
    try:
        async with oscore_server(store) as (port, _):
            uri = f"coap://127.0.0.1:{port}/hello"
            dtls = aiocoap.credentials.DTLS(psk=b"hop-key", client_identity=b"hop-id")
            client.client_credentials[f"coap://127.0.0.1:{port}/*"] = dtls
            contexts = ClientContexts()
            attach(client, contexts)
            contexts.set(uri, client_sc)
            resp = await asyncio.wait_for(client.request(Message(code=GET, uri=uri)).response,
                                          TIMEOUT)
            assert resp.payload == b"hello both"
            assert resp.remote.security_context is client_sc
            probe = Message(code=GET, uri=uri)
            assert client.client_credentials.credentials_from_request(probe) is dtls
    finally:
        await client.shutdown()


# -- ContextStore with a state directory (server restarts) ----------------------------------


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_store_state_dir_survives_a_restart_and_follows_removal(tmp_path: Path) -> None:
    state = tmp_path / "oscore"
    store = ContextStore(state_dir=state)
    a, b = _ctx(b"\x01"), _ctx(b"\x02")
    store.add(a)
    store.add(b)
    assert (state.stat().st_mode & 0o777) == 0o700
    assert _files(state) == ["01.none.json", "02.none.json"]
    a.sender_sequence_number = 500  # as if it had sent notifications
    a.new_sequence_number()  # reserved on disk before use

    again = ContextStore(state_dir=state)  # the restarted server
    assert again.restored == 2 and len(again) == 2
    restored = again.get(b"\x01")
    assert restored is not None and restored is not a
    assert (restored.recipient_key, restored.sender_key, restored.common_iv) == (
        a.recipient_key, a.sender_key, a.common_iv)
    assert restored.peer == a.peer
    assert restored.sender_sequence_number > 500  # never a number the old process may have used
    assert restored.echo_recovery is not None  # window unknown: 4.01 + Echo first

    assert again.remove(restored)
    assert _files(state) == ["02.none.json"]


def test_store_state_dir_eviction_and_replacement(tmp_path: Path) -> None:
    state = tmp_path / "oscore"
    store = ContextStore(max_contexts=1, state_dir=state)
    first, second = _ctx(b"\x01"), _ctx(b"\x02")
    store.add(first)
    assert store.add(second) == [first]
    assert _files(state) == ["02.none.json"] and first.store is None
    newer = _ctx(b"\x02")  # a new handshake gave the client the same ID
    store.add(newer)
    assert second.store is None  # detached: its late use cannot overwrite newer's file
    second.sender_sequence_number = 10_000
    second.new_sequence_number()
    restored = ContextStore(state_dir=state).get(b"\x02")
    assert restored is not None and restored.sender_sequence_number < 10_000


def test_store_state_dir_skips_what_is_not_a_context_of_this_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "oscore"
    ContextStore(state_dir=state).add(_ctx(b"\x03"))
    garbage = state / "junk.json"
    garbage.write_text("not json")
    garbage.chmod(0o600)
    other = ContextStore(server_id=b"\x77", state_dir=state)  # another server's directory
    assert other.restored == 0 and len(other) == 0
    assert "not restored" in caplog.text and "not one of this server's" in caplog.text
    assert ContextStore(state_dir=state).restored == 1


async def test_restarted_server_keeps_its_oscore_clients(
    client: aiocoap.Context, tmp_path: Path
) -> None:
    """With a state directory, a server restart does not cost the client a new handshake:
    its context is restored, and the first request goes through after an Echo round."""
    state = tmp_path / "oscore"
    client_sc, server_sc = static_pair(client_id=b"\x05")
    ContextStore(state_dir=state).add(server_sc)
    contexts = ClientContexts()
    attach(client, contexts)
    for start in (1, 2):  # the second store is the restarted server's
        store = ContextStore(state_dir=state)
        assert store.restored == 1
        async with oscore_server(store) as (port, _):
            uri = f"coap://127.0.0.1:{port}/hello"
            contexts.set(uri, client_sc)
            before = client_sc.sender_sequence_number
            resp = await asyncio.wait_for(
                client.request(Message(code=GET, uri=uri)).response, TIMEOUT
            )
            assert resp.payload == b"hello client-1", start
            assert client_sc.sender_sequence_number == before + 2  # request + Echo answer


def test_store_state_dir_shared_by_replicas_and_workers(tmp_path: Path) -> None:
    """One folder for a replica set's replicas and a server's workers: each store restores
    only the contexts its own number and index would be handed (one writer per kid)."""
    state = tmp_path / "oscore"
    writer = ContextStore(state_dir=state)
    for kid in (b"\x10", b"\x11", b"\x12", b"\x13", b"\x20", b"\x21"):  # replicas 1 and 2
        writer.add(_ctx(kid))
    one = ContextStore(state_dir=state, replica=1)
    assert sorted(c.recipient_id for c in one) == [b"\x10", b"\x11", b"\x12", b"\x13"]
    even = ContextStore(state_dir=state, replica=1, worker=(0, 2))
    odd = ContextStore(state_dir=state, replica=1, worker=(1, 2))
    assert sorted(c.recipient_id for c in even) == [b"\x10", b"\x12"]
    assert sorted(c.recipient_id for c in odd) == [b"\x11", b"\x13"]
    assert all(odd.allocate_client_id()[-1] % 2 == 1 for _ in range(20))
