"""Requests from a layer1.create_context context: block-wise and Observe still work, and no
per-request task name formats the request (the reason ServerContext overrides request())."""

from __future__ import annotations

import asyncio

import aiocoap
import aiocoap.resource as resource
import pytest
from aiocoap import Message

from coaplayers import dtls
from coaplayers.layer1 import ClientCredentials, create_context

KEY, IDENT = "ctx-test-key", "ctx-client"


class Echo(resource.Resource):
    async def render_post(self, request: Message) -> Message:
        return Message(code=aiocoap.CHANGED, payload=request.payload)


class Count(resource.ObservableResource):
    def __init__(self) -> None:
        super().__init__()
        self.value = 0

    async def render_get(self, request: Message) -> Message:
        return Message(payload=str(self.value).encode())


def _creds() -> ClientCredentials:
    creds = ClientCredentials()
    creds.add_psk("coaps://*", IDENT.encode(), KEY.encode())
    return creds


async def test_blockwise_and_observe_without_formatting_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    site = resource.Site()
    site.add_resource(["echo"], Echo())
    count = Count()
    site.add_resource(["count"], count)
    store = dtls.PskStore({IDENT.encode(): KEY.encode()})
    server = await create_context(site, listen=["coaps://127.0.0.1:0"], psk_store=store)
    client = await create_context(client_credentials=_creds())
    reprs = 0
    original = Message.__repr__

    def counting_repr(self: Message) -> str:
        nonlocal reprs
        reprs += 1
        return original(self)

    try:
        base = server.bound[0]
        monkeypatch.setattr(Message, "__repr__", counting_repr)
        payload = bytes(range(256)) * 12  # 3 KiB: Block1 and Block2
        response = await asyncio.wait_for(client.context.request(
            Message(code=aiocoap.POST, uri=f"{base}/echo", payload=payload)).response, 20)
        assert response.code == aiocoap.CHANGED and response.payload == payload
        assert reprs == 0

        request = client.context.request(
            Message(code=aiocoap.GET, uri=f"{base}/count", observe=0))
        first = await asyncio.wait_for(request.response, 20)
        assert first.payload == b"0"
        assert request.observation is not None
        count.value = 1
        count.updated_state()
        notification = await asyncio.wait_for(request.observation.__aiter__().__anext__(), 20)
        assert notification.payload == b"1"
        request.observation.cancel()
    finally:
        monkeypatch.undo()
        await client.shutdown()
        await server.shutdown()


async def test_address_resolution_memo_normalizes_literals_and_still_resolves_names() -> None:
    from coaplayers.layer1.transport import MessageInterfaceLayer1

    transport = MessageInterfaceLayer1.__new__(MessageInterfaceLayer1)
    transport._literals = {}
    transport._loop = asyncio.get_running_loop()
    for _ in range(2):  # the second round comes from the memo
        assert await transport._resolve("0:0::1", 5684) == ("::1", 5684)
        assert await transport._resolve("127.0.0.1", 5700) == ("127.0.0.1", 5700)
        host, port = await transport._resolve("localhost", 5684)
        assert port == 5684 and host in ("127.0.0.1", "::1")
    assert transport._literals == {"0:0::1": "::1", "127.0.0.1": "127.0.0.1", "localhost": None}


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _count_resolutions(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every resolution aiocoap itself makes (its find_remote_and_interface for an
    address not resolved yet; it is also called for the resolved one, which costs nothing)."""
    from aiocoap.message import UndecidedRemote

    calls: list[object] = []
    real = aiocoap.Context.find_remote_and_interface

    async def counting(self: aiocoap.Context, message: Message) -> object:
        if type(message.remote) is UndecidedRemote:
            calls.append(message.remote)
        return await real(self, message)

    monkeypatch.setattr(aiocoap.Context, "find_remote_and_interface", counting)
    return calls


async def test_coap_addresses_are_resolved_once_per_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    from coaplayers.layer1.context import ResolvedAddress

    site = resource.Site()
    site.add_resource(["echo"], Echo())
    server = await create_context(site, listen=["coap://127.0.0.1:0"])
    client = await create_context()
    clock = _Clock()
    client.context.clock = clock
    calls = _count_resolutions(monkeypatch)
    try:
        uri = server.bound[0].replace("127.0.0.1", "localhost") + "/echo"
        for i in range(3):
            response = await asyncio.wait_for(client.context.request(
                Message(code=aiocoap.POST, uri=uri, payload=b"%d" % i)).response, 20)
            assert response.code == aiocoap.CHANGED and response.payload == b"%d" % i
        assert len(calls) == 1  # "localhost" looked up once, then remembered
        remembered = client.context._resolved
        assert remembered is not None
        assert [type(v[1]) for v in remembered.values()] == [ResolvedAddress]

        clock.now += client.context.resolve_ttl + 1  # expired: resolved afresh
        response = await asyncio.wait_for(client.context.request(
            Message(code=aiocoap.POST, uri=uri, payload=b"x")).response, 20)
        assert response.payload == b"x" and len(calls) == 2

        client.context.resolve_ttl = 0  # 0: every request resolves
        for _ in range(2):
            await asyncio.wait_for(client.context.request(
                Message(code=aiocoap.POST, uri=uri, payload=b"y")).response, 20)
        assert len(calls) == 4
    finally:
        monkeypatch.undo()
        await client.shutdown()
        await server.shutdown()


async def test_coaps_hosts_keep_their_layer1_remote_across_sessions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A coaps:// host is resolved once per TTL to the Layer 1 transport's own remote for it;
    when its DTLS session is gone, the next request on the kept remote opens a new one."""
    from coaplayers.layer1.transport import Layer1Remote

    site = resource.Site()
    site.add_resource(["echo"], Echo())
    store = dtls.PskStore({IDENT.encode(): KEY.encode()})
    server = await create_context(site, listen=["coaps://127.0.0.1:0"], psk_store=store)
    client = await create_context(client_credentials=_creds())
    calls = _count_resolutions(monkeypatch)
    try:
        uri = server.bound[0] + "/echo"
        for i in range(3):
            response = await asyncio.wait_for(client.context.request(
                Message(code=aiocoap.POST, uri=uri, payload=b"%d" % i)).response, 20)
            assert response.code == aiocoap.CHANGED and response.payload == b"%d" % i
        assert len(calls) == 1
        remembered = client.context._resolved
        assert remembered is not None
        [(interface, remote, _)] = remembered.values()
        assert type(remote) is Layer1Remote and remote.reusable

        transport = interface.token_interface.message_interface
        [peer] = [p for p in transport._peers.values() if p.remote is remote]
        transport._drop_session(peer, None, notify=False)  # as after a peer's close_notify
        response = await asyncio.wait_for(client.context.request(
            Message(code=aiocoap.POST, uri=uri, payload=b"again")).response, 20)
        assert response.payload == b"again" and len(calls) == 1
        assert transport.stats["handshakes_ok"] >= 2
    finally:
        monkeypatch.undo()
        await client.shutdown()
        await server.shutdown()


async def test_an_interface_that_declines_a_request_keeps_resolution_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An interface that says it declines a message (as the OSCORE client transport does for
    one it has protected) does not stop the cache; one that does not say so does."""
    from aiocoap.message import UndecidedRemote

    site = resource.Site()
    site.add_resource(["echo"], Echo())
    server = await create_context(site, listen=["coap://127.0.0.1:0"])
    client = await create_context()
    asked: list[bytes] = []

    class Declines:
        async def fill_or_recognize_remote(self, message: Message) -> bool:
            if type(message.remote) is UndecidedRemote:  # asked to resolve, not to recognise
                asked.append(message.payload)
            return False

        def declines(self, message: Message) -> bool:
            return message.payload.startswith(b"declined")

    client.context.request_interfaces.insert(0, Declines())
    calls = _count_resolutions(monkeypatch)
    try:
        uri = server.bound[0] + "/echo"
        for payload in (b"declined 1", b"declined 2", b"declined 3"):
            response = await asyncio.wait_for(client.context.request(
                Message(code=aiocoap.POST, uri=uri, payload=payload)).response, 20)
            assert response.payload == payload
        assert len(calls) == 1 and asked == [b"declined 1"]
        response = await asyncio.wait_for(client.context.request(
            Message(code=aiocoap.POST, uri=uri, payload=b"asked")).response, 20)
        assert response.payload == b"asked" and asked[-1] == b"asked" and len(calls) == 2
    finally:
        monkeypatch.undo()
        client.context.request_interfaces.pop(0)
        await client.shutdown()
        await server.shutdown()


async def test_no_remembered_address_routes_past_another_request_interface(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With an interface that claims requests by URI (OSCORE's does), every request asks the
    interfaces again: a remembered address would send it past that interface."""
    site = resource.Site()
    site.add_resource(["echo"], Echo())
    server = await create_context(site, listen=["coap://127.0.0.1:0"])
    client = await create_context()
    claimed: list[str] = []

    class Claims:  # claims nothing, but must be asked every time
        async def fill_or_recognize_remote(self, message: Message) -> bool:
            claimed.append(message.get_request_uri())
            return False

    client.context.request_interfaces.insert(0, Claims())
    calls = _count_resolutions(monkeypatch)
    try:
        uri = server.bound[0] + "/echo"
        for _ in range(3):
            response = await asyncio.wait_for(client.context.request(
                Message(code=aiocoap.POST, uri=uri, payload=b"z")).response, 20)
            assert response.code == aiocoap.CHANGED
        assert len(calls) == 3 and len(claimed) >= 3
    finally:
        monkeypatch.undo()
        client.context.request_interfaces.pop(0)
        await client.shutdown()
        await server.shutdown()


async def test_a_request_that_fails_on_the_network_forgets_the_address() -> None:
    import socket

    from aiocoap.numbers.constants import TransportTuning

    class Quick(TransportTuning):
        ACK_TIMEOUT = 0.05
        ACK_RANDOM_FACTOR = 1.0
        MAX_RETRANSMIT = 1

    site = resource.Site()
    site.add_resource(["echo"], Echo())
    server = await create_context(site, listen=["coap://127.0.0.1:0"])
    client = await create_context()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        good = server.bound[0]
        bad = f"coap://127.0.0.1:{silent.getsockname()[1]}"
        ok = await asyncio.wait_for(client.context.request(
            Message(code=aiocoap.POST, uri=good + "/echo", payload=b"a")).response, 20)
        assert ok.payload == b"a"
        with pytest.raises(aiocoap.error.NetworkError):
            await asyncio.wait_for(client.context.request(Message(
                code=aiocoap.POST, uri=bad + "/echo", payload=b"b",
                transport_tuning=Quick())).response, 20)
        remembered = {f"{r.scheme}://{r.hostinfo}" for r, _ in client.context._resolved or {}}
        assert remembered == {good}  # the silent one was dropped, the answering one kept
    finally:
        silent.close()
        await client.shutdown()
        await server.shutdown()


@pytest.mark.parametrize("listen", ["coap://127.0.0.1:0", "coap://[::]:0"])
async def test_a_listener_reads_every_queued_datagram_in_one_wakeup(listen: str) -> None:
    """A busy coap:// listener reads what is queued at once: aiocoap's own reader took one
    datagram per wakeup of the event loop, after a read of the socket's error queue."""
    import fcntl
    import socket
    import struct
    import termios

    server = await create_context(resource.Site(), listen=[listen])
    try:
        sock = server.plain_sockets[0]
        port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.settimeout(5)
            for mid in range(16):  # CoAP pings (empty CON): each is answered with a RST
                raw.sendto(struct.pack("!BBH", 0x40, 0, 0x1000 + mid), ("127.0.0.1", port))
            # One readiness event: the loop's reader for the listener's socket, run once (the
            # selector's key is asyncio's; its data is the (reader, writer) handles).
            reader = loop._selector.get_key(sock.fileno()).data[0]  # type: ignore[attr-defined]
            reader._run()
            queued = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]
            assert queued == 0  # nothing left for another wakeup
            answers = set()
            for _ in range(16):
                data, source = raw.recvfrom(64)
                assert data[0] >> 4 == 0x7 and source[0] == "127.0.0.1"  # RST, from the address
                answers.add(struct.unpack("!H", data[2:4])[0])
            assert answers == {0x1000 + mid for mid in range(16)}
    finally:
        await server.shutdown()
