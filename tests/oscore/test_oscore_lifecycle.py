"""Lifecycle: sequence numbers, persistence ahead (RFC 8613 B.1), replay, and the signals
that tell Layer 0 to run a new handshake. Network parts use real UDP sockets."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Message
from aiocoap.message import Direction
from aiocoap.numbers.codes import GET

from coaplayers.oscore import (
    ClientContexts,
    ContextFile,
    ContextStore,
    PersistenceError,
    RehandshakeReason,
    RehandshakeRequired,
    SecurityContext,
    SequenceNumbersExhausted,
    UnprotectedErrorResponse,
    attach,
)

from .support import oscore_server, static_pair, udp_exchange

TIMEOUT = 10.0


def _request(path: str = "hello") -> Message:
    m = Message(code=GET, uri_path=[path])
    m.direction = Direction.OUTGOING
    return m


def _piv(ctx: SecurityContext) -> int:
    _, request_id = ctx.protect(_request())
    return int.from_bytes(request_id.partial_iv, "big")


# -- sequence numbers (no network) -----------------------------------------------------


def test_sequence_numbers_are_never_reused() -> None:
    ctx, _ = static_pair()
    pivs = [_piv(ctx) for _ in range(50)]
    assert pivs == list(range(50))
    assert ctx.sender_sequence_number == 50


def test_rekey_threshold_signals_once_and_hard_limit_stops() -> None:
    fired: list[SecurityContext] = []
    ctx, _ = static_pair(rekey_threshold=3, sequence_limit=5, on_rekey_needed=fired.append)
    assert [_piv(ctx) for _ in range(3)] == [0, 1, 2]
    assert fired == [ctx] and ctx.needs_rekey
    assert [_piv(ctx) for _ in range(3)] == [3, 4, 5]
    assert fired == [ctx]  # once only
    assert ctx.remaining_sequence_numbers == 0
    with pytest.raises(SequenceNumbersExhausted) as info:
        ctx.protect(_request())
    assert info.value.reason is RehandshakeReason.SEQUENCE_NUMBERS_EXHAUSTED
    assert ctx.sender_sequence_number == 6  # nothing consumed by the failed attempt


# -- persistence (files, no network) -------------------------------------------------------


def test_persist_ahead_restart_continues_from_stored_mark(tmp_path: Path) -> None:
    path = tmp_path / "ctx.json"
    # Either end can be persisted; this one carries a peer name, which must survive.
    server, ctx = static_pair(peer="p")
    store = ContextFile.save(path, ctx, ahead=10)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text())["next_sequence_number"] == 10
    assert store.writes == 1

    used = [_piv(ctx) for _ in range(10)]  # 0..9: all covered by the first write
    assert store.writes == 1
    used.append(_piv(ctx))  # 10 needs a new mark, written before use
    assert store.writes == 2
    assert json.loads(path.read_text())["next_sequence_number"] == 20
    assert not [p for p in tmp_path.iterdir() if p.name != "ctx.json"]  # no temp files left

    # "Crash" now and restart from the file: numbers continue at the stored mark.
    restored = ContextFile(path, ahead=10).load()
    first_after = _piv(restored)
    assert first_after == 20 > max(used)
    assert restored.sender_key == ctx.sender_key and restored.peer == "p"
    # The restored context still talks to the peer.
    protected, _ = restored.protect(_request())
    protected.mtype, protected.mid, protected.token = aiocoap.CON, 1, b""
    inner, _ = server.unprotect(Message.decode(protected.encode()))
    assert inner.opt.uri_path == ("hello",)


def test_context_file_refuses_loose_permissions_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / "ctx.json"
    ctx, _ = static_pair()
    ContextFile.save(path, ctx)
    os.chmod(path, 0o644)
    with pytest.raises(PersistenceError, match="group or others"):
        ContextFile(path).load()
    os.chmod(path, 0o600)
    path.write_text('{"format": "coaplayers-oscore-context-1", "next_sequence_number": 3}')
    with pytest.raises(PersistenceError, match="corrupt"):
        ContextFile(path).load()
    with pytest.raises(PersistenceError, match="no context file"):
        ContextFile(tmp_path / "missing.json").load()


# -- over real UDP ----------------------------------------------------------------------


async def test_replayed_request_is_rejected_with_4_01() -> None:
    client_sc, server_sc = static_pair()
    store = ContextStore()
    store.add(server_sc)
    async with oscore_server(store) as (port, _):
        protected, _ = client_sc.protect(_request())
        protected.mtype, protected.mid, protected.token = aiocoap.CON, 0x7001, b"\x05\x06"
        datagram = protected.encode()

        first = await udp_exchange(port, datagram, TIMEOUT)
        assert first is not None
        answer = Message.decode(first)
        assert answer.code == aiocoap.CHANGED  # outer code of a protected 2.05
        assert answer.opt.oscore is not None
        inner, _ = client_sc.unprotect(answer, _)
        assert inner.payload == b"hello client-1"

        # The same bytes again, from another socket (so CoAP deduplication, which is keyed
        # on the sender's address, does not hide the replay from OSCORE).
        second = await udp_exchange(port, datagram, TIMEOUT)
        assert second is not None
        rejected = Message.decode(second)
        assert rejected.code == aiocoap.UNAUTHORIZED
        assert rejected.payload == b"Replay detected"
        assert rejected.opt.oscore is None
        assert rejected.opt.max_age is None  # proxies relay it (aiocoap-proxy rejects Max-Age)


async def test_context_not_found_asks_for_a_new_handshake(client: aiocoap.Context) -> None:
    client_sc, server_sc = static_pair()
    store = ContextStore()
    store.add(server_sc)
    signals: list[RehandshakeRequired] = []
    contexts = ClientContexts()
    attach(client, contexts, on_rehandshake=signals.append)
    async with oscore_server(store) as (port, _):
        uri = f"coap://127.0.0.1:{port}/hello"
        contexts.set(uri, client_sc)
        ok = await asyncio.wait_for(client.request(Message(code=GET, uri=uri)).response,
                                    TIMEOUT)
        assert ok.payload == b"hello client-1"

        assert store.remove(server_sc)  # as after a server restart or eviction
        with pytest.raises(RehandshakeRequired) as info:
            await asyncio.wait_for(client.request(Message(code=GET, uri=uri)).response,
                                   TIMEOUT)
        assert info.value.reason is RehandshakeReason.CONTEXT_NOT_FOUND
        assert info.value.security_context is client_sc
        assert info.value.response.code == aiocoap.UNAUTHORIZED
        assert signals == [info.value]

        # Layer 0 would now run a handshake; simulate its result and retry successfully.
        new_client, new_server = static_pair(client_id=b"\x02")
        store.add(new_server)
        contexts.set(uri, new_client)
        ok = await asyncio.wait_for(client.request(Message(code=GET, uri=uri)).response,
                                    TIMEOUT)
        assert ok.payload == b"hello client-1"
        assert ok.remote.security_context is new_client


async def test_wrong_keys_ask_for_a_new_handshake(client: aiocoap.Context) -> None:
    client_sc, _ = static_pair()
    _, other_server = static_pair()
    other_server.recipient_key = bytes(16)  # same kid, different keys
    store = ContextStore()
    store.add(other_server)
    contexts = ClientContexts()
    attach(client, contexts)
    async with oscore_server(store) as (port, _):
        uri = f"coap://127.0.0.1:{port}/hello"
        contexts.set(uri, client_sc)
        with pytest.raises(RehandshakeRequired) as info:
            await asyncio.wait_for(client.request(Message(code=GET, uri=uri)).response,
                                   TIMEOUT)
        assert info.value.reason is RehandshakeReason.DECRYPTION_FAILED


async def test_exhausted_context_sends_nothing_and_signals(client: aiocoap.Context) -> None:
    client_sc, server_sc = static_pair(sequence_limit=0)
    store = ContextStore()
    store.add(server_sc)
    signals: list[RehandshakeRequired] = []
    contexts = ClientContexts()
    attach(client, contexts, on_rehandshake=signals.append)
    async with oscore_server(store) as (port, _):
        uri = f"coap://127.0.0.1:{port}/hello"
        contexts.set(uri, client_sc)
        await asyncio.wait_for(client.request(Message(code=GET, uri=uri)).response, TIMEOUT)
        with pytest.raises(SequenceNumbersExhausted):
            await asyncio.wait_for(client.request(Message(code=GET, uri=uri)).response,
                                   TIMEOUT)
        assert [s.reason for s in signals] == [RehandshakeReason.SEQUENCE_NUMBERS_EXHAUSTED]
        # The server saw exactly one request: its replay window holds only number 0.
        window = server_sc.recipient_replay_window
        assert not window.is_valid(0) and window.is_valid(1)


async def test_restored_server_context_recovers_via_echo(
    client: aiocoap.Context, tmp_path: Path
) -> None:
    """Server restart with a persisted context: the replay window is unknown, so the first
    request is answered 4.01 + Echo (RFC 8613 B.1.2); the client repeats it with the Echo
    value by itself and succeeds. A replay of the pre-restart request stays rejected."""
    client_sc, server_sc = static_pair()
    ContextFile.save(tmp_path / "server.json", server_sc)
    old, _ = client_sc.protect(_request())
    old.mtype, old.mid, old.token = aiocoap.CON, 0x0101, b"\x01"
    restored = ContextFile(tmp_path / "server.json").load()
    assert restored.echo_recovery is not None

    store = ContextStore()
    store.add(restored)
    contexts = ClientContexts()
    attach(client, contexts)
    async with oscore_server(store) as (port, _):
        # The captured pre-restart request: the unknown window makes the server answer
        # with a protected 4.01 + Echo instead of processing it.
        raw = await udp_exchange(port, old.encode(), TIMEOUT)
        assert raw is not None
        answer = Message.decode(raw)
        assert answer.opt.oscore is not None
        uri = f"coap://127.0.0.1:{port}/hello"
        contexts.set(uri, client_sc)
        seq_before = client_sc.sender_sequence_number
        ok = await asyncio.wait_for(client.request(Message(code=GET, uri=uri)).response,
                                    TIMEOUT)
        assert ok.code == aiocoap.CONTENT and ok.payload == b"hello client-1"
        assert client_sc.sender_sequence_number == seq_before + 2  # request + Echo retry
        assert restored.recipient_replay_window.is_initialized()
        # Now the window is known again: the old request is a replay.
        raw = await udp_exchange(port, old.encode(), TIMEOUT)
        assert raw is not None and Message.decode(raw).code == aiocoap.UNAUTHORIZED
        assert Message.decode(raw).payload == b"Replay detected"


async def test_unprotected_error_from_elsewhere_is_typed(client: aiocoap.Context) -> None:
    """A 4.01 that is not 'context not found' (here: a replay answer) is not a re-handshake
    signal, but it is reported as a typed error carrying the message."""
    from coaplayers.oscore.client import classify_unprotected

    m = Message(code=aiocoap.UNAUTHORIZED, payload=b"Replay detected")
    assert classify_unprotected(m) is None
    err = UnprotectedErrorResponse(m)
    assert err.response is m and "Replay detected" in str(err)
