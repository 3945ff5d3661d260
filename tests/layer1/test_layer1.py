"""Layer 1 (coaps://) against real peers: libcoap's clients and servers, and ourselves."""

from __future__ import annotations

import asyncio
import os
import random
import time

import aiocoap
import aiocoap.resource as resource
import psutil
import pytest

from coaplayers import dtls
from coaplayers.layer1 import (
    ClientCredentials,
    Layer1Error,
    Layer1Limits,
    create_context,
    layer1_identity,
)
from tests.conftest import (
    background,
    free_udp_port,
    need_program,
    run_program,
    until,
    wait_udp_bound,
)

KEY = "secretPSK"
IDENT = "dev1"


class Hello(resource.Resource):
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        ident = layer1_identity(request)
        who = ident.decode() if isinstance(ident, bytes) else str(ident)
        return aiocoap.Message(payload=f"hello {who}".encode())


class Echo(resource.Resource):
    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED, payload=request.payload)


def site() -> resource.Site:
    s = resource.Site()
    s.add_resource(["hello"], Hello())
    s.add_resource(["echo"], Echo())
    return s


def psk_creds(key: str = KEY, ident: str = IDENT, pattern: str = "coaps://*") -> ClientCredentials:
    creds = ClientCredentials()
    creds.load_from_dict(
        {pattern: {"dtls": {"psk": {"ascii": key}, "client-identity": {"ascii": ident}}}}
    )
    return creds


async def get(ctx, uri: str, timeout: float = 20.0) -> aiocoap.Message:  # type: ignore[no-untyped-def]
    req = aiocoap.Message(code=aiocoap.GET, uri=uri)
    return await asyncio.wait_for(ctx.context.request(req).response, timeout)


async def refused(cli, uri: str, *, within: float = 5.0, stop=()) -> Layer1Error:  # type: ignore[no-untyped-def]
    """GET ``uri`` with ``cli``, which must fail at Layer 1 within ``within`` seconds (a refusal,
    not the end of the request's own timeout); ``cli`` and the ``stop`` contexts are shut down
    afterwards either way."""
    t0 = time.monotonic()
    try:
        with pytest.raises(Layer1Error) as info:
            await get(cli, uri, timeout=15)
    finally:
        for ctx in (cli, *stop):
            await ctx.shutdown()
    assert time.monotonic() - t0 < within
    return info.value


@pytest.fixture
async def psk_server():  # type: ignore[no-untyped-def]
    store = dtls.PskStore({IDENT.encode(): KEY.encode()})
    srv = await create_context(site(), listen=["coaps://127.0.0.1:0"], psk_store=store)
    yield srv
    await srv.shutdown()


@pytest.mark.interop
@pytest.mark.parametrize("tool", ["coap-client-openssl", "coap-client-gnutls"])
async def test_libcoap_clients_get_from_our_server(psk_server, tool: str) -> None:  # type: ignore[no-untyped-def]
    need_program(tool)
    uri = psk_server.bound[0] + "/hello"
    _, out, err = await run_program(tool, "-u", IDENT, "-k", KEY, "-B", "10", uri)
    assert out.strip() == b"hello dev1", (out, err)
    # libcoap closes with close_notify when it exits: the session is freed at once.
    layer1 = psk_server.layer1
    await asyncio.wait_for(until(lambda: layer1.session_count == 0), 5)


@pytest.mark.interop
@pytest.mark.parametrize("tool", ["coap-server-openssl", "coap-server-gnutls"])
async def test_our_client_gets_from_libcoap_servers(tool: str) -> None:
    need_program(tool)
    port = free_udp_port()
    async with background(tool, "-A", "127.0.0.1", "-p", str(port), "-k", KEY, "-h", ""):
        await wait_udp_bound("127.0.0.1", port + 1)  # libcoap serves DTLS on P+1
        cli = await create_context(client_credentials=psk_creds())
        try:
            resp = await get(cli, f"coaps://127.0.0.1:{port + 1}/")
        finally:
            await cli.shutdown()
    assert resp.code == aiocoap.CONTENT
    assert b"libcoap" in resp.payload


async def test_certificate_mode_both_sides_authenticated(demo_pki) -> None:  # type: ignore[no-untyped-def]
    p = demo_pki
    server_cert = dtls.CertificateCredentials(
        [p["server"].certificate], p["server"].private_key, [p["ca"].certificate]
    )
    srv = await create_context(site(), listen=["coaps://127.0.0.1:0"], certificate=server_cert)
    creds = ClientCredentials()
    creds.add_certificate(
        "coaps://*",
        dtls.CertificateCredentials(
            [p["client"].certificate], p["client"].private_key, [p["ca"].certificate],
            server_name="127.0.0.1",
        ),
    )
    cli = await create_context(client_credentials=creds)
    try:
        resp = await get(cli, srv.bound[0] + "/hello")
        big = os.urandom(3000)
        echo = await asyncio.wait_for(
            cli.context.request(
                aiocoap.Message(code=aiocoap.POST, uri=srv.bound[0] + "/echo", payload=big)
            ).response,
            20,
        )
        server_identity = resp.remote.peer_identity
    finally:
        await cli.shutdown()
        await srv.shutdown()
    assert resp.payload == b"hello device-1"  # the server authenticated the client certificate
    assert echo.payload == big
    assert server_identity == "server.test"  # and the client the server's


async def test_wrong_psk_fails_in_bounded_time_naming_the_cause(psk_server) -> None:  # type: ignore[no-untyped-def]
    cli = await create_context(
        client_credentials=psk_creds(key="wrong"), limits=Layer1Limits(handshake_timeout=3)
    )
    err = await refused(cli, psk_server.bound[0] + "/hello", within=10)
    assert isinstance(err.cause, dtls.HandshakeTimeout)
    assert "wrong key" in str(err)


async def test_unknown_identity_is_refused_quickly(psk_server) -> None:  # type: ignore[no-untyped-def]
    cli = await create_context(client_credentials=psk_creds(ident="stranger"))
    err = await refused(cli, psk_server.bound[0] + "/hello")
    assert isinstance(err.cause, dtls.AuthenticationFailed)
    assert "unknown PSK identity" in str(err)


async def test_untrusted_certificate_is_refused(demo_pki) -> None:  # type: ignore[no-untyped-def]
    p = demo_pki
    srv = await create_context(
        site(),
        listen=["coaps://127.0.0.1:0"],
        certificate=dtls.CertificateCredentials(
            [p["server"].certificate], p["server"].private_key, [p["ca"].certificate]
        ),
    )
    creds = ClientCredentials()
    creds.add_certificate(
        "coaps://*",
        dtls.CertificateCredentials(
            [p["client"].certificate], p["client"].private_key, [p["other_ca"].certificate]
        ),
    )
    cli = await create_context(client_credentials=creds)
    err = await refused(cli, srv.bound[0] + "/hello", stop=[srv])
    assert isinstance(err.cause, dtls.AuthenticationFailed)
    assert "not trusted" in str(err)


async def test_server_restart_between_requests_rehandshakes_by_itself() -> None:
    store = dtls.PskStore({IDENT.encode(): KEY.encode()})
    srv = await create_context(site(), listen=["coaps://127.0.0.1:0"], psk_store=store)
    uri = srv.bound[0]
    port = int(uri.rsplit(":", 1)[1])
    cli = await create_context(client_credentials=psk_creds())
    try:
        first = await get(cli, uri + "/hello")
        await srv.shutdown()  # all server state is gone
        srv = await create_context(site(), listen=[f"coaps://127.0.0.1:{port}"], psk_store=store)
        second = await get(cli, uri + "/hello", timeout=30)
    finally:
        await cli.shutdown()
        await srv.shutdown()
    assert first.payload == second.payload == b"hello dev1"
    assert cli.layer1.stats["handshakes_ok"] == 2


async def test_server_calls_back_a_client_over_its_session(psk_server) -> None:  # type: ignore[no-untyped-def]
    """Devices behind NAT: the server reaches the client over the client's own session."""

    class Status(resource.Resource):
        async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
            return aiocoap.Message(payload=b"device ok")

    device_site = resource.Site()
    device_site.add_resource(["status"], Status())
    device = await create_context(device_site, client_credentials=psk_creds())
    try:
        resp = await get(device, psk_server.bound[0] + "/hello")
        # The server addresses the device at the address its request came from.
        back_uri = resp.remote.uri_base  # type: ignore[union-attr]
        assert back_uri.startswith("coaps://")
        client_addr = next(p.remote for p in psk_server.layer1._peers.values())
        answer = await asyncio.wait_for(
            psk_server.context.request(
                aiocoap.Message(code=aiocoap.GET, uri=client_addr.uri_base + "/status")
            ).response,
            10,
        )
    finally:
        await device.shutdown()
    assert answer.payload == b"device ok"
    assert psk_server.layer1.stats["handshakes_ok"] == 1  # no second handshake was needed


async def test_binding_port_zero_wildcard_and_ipv6() -> None:
    store = dtls.PskStore({IDENT.encode(): KEY.encode()})
    srv = await create_context(
        site(), listen=["coaps://[::]:0", "coaps://0.0.0.0:0", "coap://[::1]:0"], psk_store=store
    )
    try:
        assert all(not u.endswith(":0") for u in srv.bound), srv.bound
        wild6, wild4, plain6 = srv.bound
        port6 = int(wild6.rsplit(":", 1)[1])
        cli = await create_context(client_credentials=psk_creds())
        try:
            r6 = await get(cli, f"coaps://[::1]:{port6}/hello")
            r4 = await get(cli, f"coaps://127.0.0.1:{port6}/hello")  # "::" serves IPv4 too
            r4b = await get(cli, wild4.replace("0.0.0.0", "127.0.0.1") + "/hello")
            rp = await get(cli, plain6 + "/hello")
        finally:
            await cli.shutdown()
    finally:
        await srv.shutdown()
    assert r6.payload == r4.payload == r4b.payload == b"hello dev1"
    assert rp.payload == b"hello None"  # plain CoAP carries no Layer 1 identity


async def test_idle_costs_nothing_and_idle_timeout_closes(psk_server) -> None:  # type: ignore[no-untyped-def]
    cli = await create_context(
        client_credentials=psk_creds(), limits=Layer1Limits(idle_timeout=0.5)
    )
    try:
        await get(cli, psk_server.bound[0] + "/hello")
        peers = list(cli.layer1._peers.values())
        assert len(peers) == 1
        assert peers[0].timer is None  # no retransmission timer on an established session
        assert peers[0].session.get_timer() is None
        # The idle timer closes the session with close_notify; the server frees its side.
        await asyncio.wait_for(until(lambda: cli.layer1.session_count == 0), 5)
        await asyncio.wait_for(until(lambda: psk_server.layer1.session_count == 0), 5)
    finally:
        await cli.shutdown()


async def test_session_limit_evicts_least_recently_used() -> None:
    store = dtls.PskStore({IDENT.encode(): KEY.encode()})
    srv = await create_context(
        site(), listen=["coaps://127.0.0.1:0"], psk_store=store,
        limits=Layer1Limits(max_sessions=3),
    )
    clients = [await create_context(client_credentials=psk_creds()) for _ in range(5)]
    try:
        for c in clients:
            assert (await get(c, srv.bound[0] + "/hello")).payload == b"hello dev1"
        assert srv.layer1.session_count <= 3
        assert srv.layer1.stats["sessions_evicted"] >= 2
        # An evicted client is served again (it re-handshakes by itself).
        again = await get(clients[0], srv.bound[0] + "/hello", timeout=30)
        assert again.payload == b"hello dev1"
    finally:
        for c in clients:
            await c.shutdown()
        await srv.shutdown()


async def test_garbage_and_mutated_datagrams_do_not_hurt(psk_server) -> None:  # type: ignore[no-untyped-def]
    """10,000 random and mutated datagrams: no crash, bounded memory, legit client served."""
    import socket

    host, port = "127.0.0.1", int(psk_server.bound[0].rsplit(":", 1)[1])
    cli = await create_context(client_credentials=psk_creds())
    rng = random.Random(7)
    # Real handshake records to mutate.
    hello = bytes.fromhex(
        "16fefd0000000000000000003b010000002f000000000000002ffefd"
    ) + os.urandom(32) + b"\x00\x00\x00\x02\xc0\xa8\x01\x00"
    proc = psutil.Process()
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
    for s in socks:
        s.setblocking(False)
    try:
        await get(cli, psk_server.bound[0] + "/hello")
        rss_before = proc.memory_info().rss
        for i in range(10_000):
            kind = i % 3
            if kind == 0:
                data = os.urandom(rng.randrange(0, 300))
            elif kind == 1:
                b = bytearray(hello)
                for _ in range(rng.randrange(1, 6)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
                data = bytes(b)
            else:
                data = hello[: rng.randrange(len(hello))] + os.urandom(rng.randrange(0, 40))
            try:
                socks[i % len(socks)].sendto(data, (host, port))
            except BlockingIOError:
                pass
            # One datagram per loop turn: asyncio reads one datagram per readiness event,
            # so a faster local flood only measures the kernel's socket buffer.
            await asyncio.sleep(0)
            if i % 500 == 0:
                # A legitimate client is served during the storm.
                r = await get(cli, psk_server.bound[0] + "/hello", timeout=20)
                assert r.payload == b"hello dev1"
        r = await get(cli, psk_server.bound[0] + "/hello", timeout=20)
        assert r.payload == b"hello dev1"
        grown = proc.memory_info().rss - rss_before
        assert grown < 30 * 1024 * 1024, f"RSS grew by {grown} bytes"
        assert psk_server.layer1.session_count <= 1 + 0  # garbage created no sessions
    finally:
        for s in socks:
            s.close()
        await cli.shutdown()


async def _start_server_process(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).with_name("coap-server"))
    proc = await asyncio.create_subprocess_exec(
        exe, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line.startswith(b"listening "), line
    return proc, line.split()[-1].decode()


async def test_real_server_program_restart_and_certificates(demo_pki, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The coap-server program in certificate mode, restarted between two requests."""
    p = demo_pki
    files = {}
    for name, issued in (("server", p["server"]), ("client", p["client"])):
        (tmp_path / f"{name}.pem").write_bytes(issued.cert_pem())
        key = tmp_path / f"{name}.key"
        key.write_bytes(issued.key_pem())
        key.chmod(0o600)
        files[name] = (str(tmp_path / f"{name}.pem"), str(key))
    (tmp_path / "ca.pem").write_bytes(p["ca"].cert_pem())
    args = ["--cert", files["server"][0], "--key", files["server"][1],
            "--ca", str(tmp_path / "ca.pem")]
    proc, uri = await _start_server_process("--listen", "coaps://127.0.0.1:0", *args)
    creds = ClientCredentials()
    creds.add_certificate("coaps://*", dtls.CertificateCredentials.from_files(
        files["client"][0], files["client"][1], tmp_path / "ca.pem", server_name="127.0.0.1"))
    cli = await create_context(client_credentials=creds)
    try:
        first = await get(cli, uri + "/hello")
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0  # SIGTERM stops it cleanly
        port = uri.rsplit(":", 1)[1]
        proc, _ = await _start_server_process("--listen", f"coaps://127.0.0.1:{port}", *args)
        second = await get(cli, uri + "/hello", timeout=30)
    finally:
        await cli.shutdown()
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
    assert b"layer 1 peer device-1" in first.payload
    assert second.payload == first.payload
    assert cli.layer1.stats["handshakes_ok"] == 2  # a new handshake, by itself
