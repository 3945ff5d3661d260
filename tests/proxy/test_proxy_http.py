"""coap-proxy as a CoAP-to-HTTP cross-proxy, with real HTTP origins behind it and real CoAP
clients in front: Python's http.server (GET, files), a uvicorn-served ASGI origin for the
other methods and headers, libcoap's coap-client and aiocoap as clients."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import OpaqueOption

from coaplayers.proxy.config import ProxyConfig
from tests.conftest import need_program, run_program

from .conftest import ROOT, Running, _read_until, _stop, start_proxy

pytestmark = pytest.mark.slow


def allow(*hosts: str) -> list[str]:
    """``--allow`` for the proxy where it has an allow-list (forward proxying closed)."""
    if "allow" not in {f.name for f in dataclasses.fields(ProxyConfig)}:
        return []
    return [a for h in hosts for a in ("--allow", h)]


@pytest.fixture
async def files(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """Python's stock http.server on a folder: (base URL, folder)."""
    folder = tmp_path / "www"
    folder.mkdir()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-u", "-m", "http.server", "-b", "127.0.0.1", "0", "-d", str(folder),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        line = (await _read_until(proc, "Serving HTTP", 20))[-1]
        port = line.split(" port ")[1].split()[0]
        yield f"http://127.0.0.1:{port}", folder
    finally:
        await _stop(proc)


async def start_origin_http(tmp: Path, *tls: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.proxy.http_origin", "127.0.0.1", "0", *tls,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=open(tmp / f"origin-{os.urandom(3).hex()}.err", "wb"))
    line = (await _read_until(proc, "listen ", 20))[-1]
    return proc, line.split()[1]


@pytest.fixture
async def web(tmp_path: Path) -> AsyncIterator[str]:
    proc, url = await start_origin_http(tmp_path)
    try:
        yield url
    finally:
        await _stop(proc)


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[Running]:
    # no-such-host.invalid: allowed, so that its failure to resolve is what the test sees.
    run = await start_proxy(tmp_path, *allow("127.0.0.1", "no-such-host.invalid"),
                            "--http-max-body", "8192",
                            "--upstream-timeout", "2")
    try:
        yield run
    finally:
        await _stop(run.proc)


@pytest.fixture
async def ctx() -> AsyncIterator[aiocoap.Context]:
    c = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield c
    finally:
        await c.shutdown()


def via(proxy: Running, url: str, code: Code = Code.GET, payload: bytes = b"",
        **options: object) -> Message:
    """A request for ``url`` sent to ``proxy`` with Proxy-Uri."""
    msg = Message(code=code, payload=payload, uri=f"coap://{proxy.hostport}", **options)
    msg.opt.proxy_uri = url
    return msg


async def ask(ctx: aiocoap.Context, msg: Message) -> Message:
    return await asyncio.wait_for(ctx.request(msg).response, 15)


@pytest.mark.interop
async def test_libcoap_client_reads_files_from_python_http_server(
        files: tuple[str, Path], proxy: Running, tmp_path: Path) -> None:
    base, folder = files
    (folder / "a.txt").write_text("hello http\n")
    big = os.urandom(3000).hex().encode()  # 6000 bytes: six Block2 slices
    (folder / "big.bin").write_bytes(big)
    client = need_program("coap-client-notls")
    out = tmp_path / "out"
    for name, expected in (("a.txt", b"hello http\n"), ("big.bin", big)):
        out.unlink(missing_ok=True)
        rc, _, err = await run_program(client, "-m", "get", "-P", f"coap://{proxy.hostport}",
                                       "-o", str(out), f"{base}/{name}")
        assert rc == 0, err
        assert out.read_bytes() == expected
    rc, stdout, _ = await run_program(client, "-v", "6", "-m", "get", "-P",
                                      f"coap://{proxy.hostport}", f"{base}/missing")
    assert b"c:4.04" in stdout
    # curl, an HTTP client, reads from the same server what came through the proxy.
    curl = need_program("curl")
    rc, direct, _ = await run_program(curl, "-s", "--fail", f"{base}/big.bin")
    assert rc == 0 and direct == big
    lines = [e for e in proxy.log_lines() if e.get("event") == "exchange"]
    assert any(e["upstream"] == f"{base}/big.bin" and e["code"] == "2.05" for e in lines)


async def test_aiocoap_client_gets_text_and_blocks(
        files: tuple[str, Path], proxy: Running, ctx: aiocoap.Context) -> None:
    base, folder = files
    body = os.urandom(2500).hex().encode()
    (folder / "t.txt").write_bytes(body)
    response = await ask(ctx, via(proxy, f"{base}/t.txt"))
    assert response.code == Code.CONTENT
    assert response.payload == body
    assert response.opt.content_format == 0  # text/plain
    assert response.opt.max_age == 0  # http.server says nothing about freshness


async def test_methods_codes_location_and_headers(
        web: str, proxy: Running, ctx: aiocoap.Context) -> None:
    made = await ask(ctx, via(proxy, f"{web}/items", Code.POST, b"x", content_format=0))
    assert made.code == Code.CREATED
    assert tuple(made.opt.location_path) == ("items", "7")
    assert tuple(made.opt.location_query) == ("v=1",)
    assert (await ask(ctx, via(proxy, f"{web}/items/7", Code.PUT, b"y"))).code == Code.CHANGED
    assert (await ask(ctx, via(proxy, f"{web}/items/7", Code.DELETE))).code == Code.DELETED
    assert (await ask(ctx, via(proxy, f"{web}/nothing"))).code == Code.NOT_FOUND
    echoed = await ask(ctx, via(proxy, f"{web}/echo?a=1&b=x%20y", Code.POST, b"{}",
                                content_format=50, accept=50))
    assert echoed.code == Code.CHANGED and echoed.payload == b"{}"
    assert echoed.opt.content_format == 50
    last = json.loads((await ask(ctx, via(proxy, f"{web}/last"))).payload)
    assert last["method"] == "POST" and last["query"] == "a=1&b=x%20y"
    assert last["headers"]["content-type"] == "application/json"
    assert last["headers"]["accept"] == "application/json"
    busy = await ask(ctx, via(proxy, f"{web}/busy"))
    assert busy.code == Code.SERVICE_UNAVAILABLE and busy.opt.max_age == 7
    moved = await ask(ctx, via(proxy, f"{web}/redirect"))
    assert moved.code == Code.BAD_GATEWAY


async def test_etag_and_max_age_validate_across(
        web: str, proxy: Running, ctx: aiocoap.Context) -> None:
    first = await ask(ctx, via(proxy, f"{web}/etag"))
    assert first.code == Code.CONTENT and first.payload == b"tagged"
    assert first.opt.max_age == 30
    assert first.opt.etag is not None and len(first.opt.etag) <= 8
    again = await ask(ctx, via(proxy, f"{web}/etag", etag=first.opt.etag))
    assert again.code == Code.VALID
    assert again.opt.etag == first.opt.etag
    last = json.loads((await ask(ctx, via(proxy, f"{web}/last"))).payload)
    assert last["headers"]["if-none-match"] == '"v1-abcdef"'  # the origin's own tag


async def test_block1_bodies_are_reassembled_and_bounded(
        web: str, proxy: Running, ctx: aiocoap.Context) -> None:
    body = os.urandom(3000)
    echoed = await ask(ctx, via(proxy, f"{web}/echo", Code.POST, body, content_format=42))
    assert echoed.code == Code.CHANGED
    assert echoed.payload == body  # up in Block1, down in Block2
    last = json.loads((await ask(ctx, via(proxy, f"{web}/last"))).payload)
    assert bytes.fromhex(last["body"]) == body
    too_big = await ask(ctx, via(proxy, f"{web}/echo", Code.POST, os.urandom(9000)))
    assert too_big.code == Code.REQUEST_ENTITY_TOO_LARGE


async def test_what_http_cannot_carry_is_refused(
        web: str, proxy: Running, ctx: aiocoap.Context) -> None:
    fetch = await ask(ctx, via(proxy, f"{web}/echo", Code.FETCH, b"q"))
    assert fetch.code == Code.METHOD_NOT_ALLOWED
    odd_format = await ask(ctx, via(proxy, f"{web}/echo", Code.POST, b"z",
                                    content_format=12345))
    assert odd_format.code == Code.UNSUPPORTED_CONTENT_FORMAT
    critical = via(proxy, f"{web}/echo")
    critical.opt.add_option(OpaqueOption(2049, b"\x01"))  # critical, safe to forward, unknown
    assert (await ask(ctx, critical)).code == Code.BAD_OPTION
    observed = await ask(ctx, via(proxy, f"{web}/etag", observe=0))
    assert observed.code == Code.CONTENT and observed.opt.observe is None


async def test_a_uri_host_that_would_change_the_url_is_refused(
        web: str, proxy: Running, ctx: aiocoap.Context) -> None:
    port = int(web.rsplit(":", 1)[1])
    for host in ("127.0.0.1/etag?", "user@127.0.0.1", "127.0.0.1:80#"):
        msg = Message(code=Code.GET, uri=f"coap://{proxy.hostport}", uri_path=["etag"])
        msg.opt.proxy_scheme = "http"
        msg.opt.uri_host = host
        msg.opt.uri_port = port
        answer = await ask(ctx, msg)
        assert answer.code == Code.BAD_REQUEST, (host, answer)
    last = json.loads((await ask(ctx, via(proxy, f"{web}/last"))).payload)
    assert last == {}  # none of them reached the origin


async def test_upstream_failures(web: str, proxy: Running, ctx: aiocoap.Context) -> None:
    slow = await ask(ctx, via(proxy, f"{web}/slow"))
    assert slow.code == Code.GATEWAY_TIMEOUT
    closed = await ask(ctx, via(proxy, "http://127.0.0.1:9/"))
    assert closed.code == Code.GATEWAY_TIMEOUT and closed.payload == b"upstream unreachable"
    unknown = await ask(ctx, via(proxy, "http://no-such-host.invalid/"))
    assert unknown.code == Code.BAD_GATEWAY and unknown.payload == b"cannot resolve upstream"


async def test_https_upstreams_are_verified(
        tmp_path: Path, demo_pki: dict, ctx: aiocoap.Context) -> None:
    cert, key, ca = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    cert.write_bytes(demo_pki["server"].cert_pem())
    key.write_bytes(demo_pki["server"].key_pem())
    ca.write_bytes(demo_pki["ca"].cert_pem())
    origin, url = await start_origin_http(tmp_path, str(cert), str(key))
    trusting = await start_proxy(tmp_path, *allow("127.0.0.1"), "--http-ca", str(ca))
    default = await start_proxy(tmp_path, *allow("127.0.0.1"))
    try:
        ok = await ask(ctx, via(trusting, f"{url}/etag"))
        assert ok.code == Code.CONTENT and ok.payload == b"tagged"
        refused = await ask(ctx, via(default, f"{url}/etag"))
        assert refused.code == Code.BAD_GATEWAY
        assert refused.payload == b"upstream certificate not trusted"
    finally:
        for proc in (origin, trusting.proc, default.proc):
            await _stop(proc)


async def test_http_targets_obey_the_allow_list(
        web: str, tmp_path: Path, ctx: aiocoap.Context) -> None:
    """Forward proxying to http:// is decided like coap://: only allowed upstreams, and never
    loopback unless named (the proxy's allow-list, closed by default)."""
    if not allow("x"):
        pytest.skip("this coap-proxy has no allow-list")
    elsewhere = await start_proxy(tmp_path, "--allow", "192.0.2.1")
    try:
        refused = await ask(ctx, via(elsewhere, f"{web}/etag"))
        assert refused.code == Code.FORBIDDEN
        wildcard = await start_proxy(tmp_path, "--allow", "*")
        try:  # '*' does not open loopback
            assert (await ask(ctx, via(wildcard, f"{web}/etag"))).code == Code.FORBIDDEN
        finally:
            await _stop(wildcard.proc)
    finally:
        await _stop(elsewhere.proc)


async def test_reverse_routes_to_http_origins(
        web: str, tmp_path: Path, ctx: aiocoap.Context) -> None:
    """A prefix route mounts an HTTP origin: the prefix is replaced going up and a 201's
    Location comes back under the prefix as Location-Path."""
    run = await start_proxy(tmp_path, "--no-forward", "--route", f"/web={web}/")
    try:
        base = f"coap://{run.hostport}/web"
        got = await ask(ctx, Message(code=Code.GET, uri=f"{base}/etag"))
        assert got.code == Code.CONTENT and got.payload == b"tagged"
        made = await ask(ctx, Message(code=Code.POST, uri=f"{base}/items", payload=b"x"))
        assert made.code == Code.CREATED
        assert tuple(made.opt.location_path) == ("web", "items", "7")
        last = json.loads((await ask(ctx, Message(code=Code.GET, uri=f"{base}/last"))).payload)
        assert last["path"] == "/items" and last["method"] == "POST"
    finally:
        await _stop(run.proc)


async def test_a_name_allowed_by_prefix_is_checked_at_the_address_it_resolves_to(
        web: str, tmp_path: Path, ctx: aiocoap.Context) -> None:
    """A name admitted only through a prefix (or '*') is resolved once, checked, and the
    connection goes to that address with the name kept as Host."""
    if not allow("x"):
        pytest.skip("this coap-proxy has no allow-list")
    port = web.rsplit(":", 1)[1]
    by_prefix = await start_proxy(tmp_path, "--allow", "127.0.0.0/8")
    anywhere = await start_proxy(tmp_path, "--allow", "*")
    try:
        ok = await ask(ctx, via(by_prefix, f"http://localhost:{port}/etag"))
        assert ok.code == Code.CONTENT and ok.payload == b"tagged", ok
        last = json.loads((await ask(ctx, via(by_prefix, f"{web}/last"))).payload)
        assert last["headers"]["host"] == f"localhost:{port}"
        refused = await ask(ctx, via(anywhere, f"http://localhost:{port}/etag"))
        assert refused.code == Code.FORBIDDEN
    finally:
        for run in (by_prefix, anywhere):
            await _stop(run.proc)


async def test_an_unverified_client_gets_at_most_three_times_its_request(
        files: tuple[str, Path], tmp_path: Path, ctx: aiocoap.Context) -> None:
    """The 3x rule (RFC 9175 2.4) on the HTTP path: a large HTTP answer goes to a plain
    client whose address is not verified in blocks that fit three times its request, and the
    whole body still arrives block by block."""
    if not allow("x"):
        pytest.skip("this coap-proxy has no 3x rule")
    base, folder = files
    body = os.urandom(3000).hex().encode()
    (folder / "big.txt").write_bytes(body)
    run = await start_proxy(tmp_path, amplification=True)
    try:
        msg = via(run, f"{base}/big.txt")
        request = ctx.request(msg, handle_blockwise=False)
        answer = await asyncio.wait_for(request.response, 15)
        sent = len(msg.encode())
        assert answer.code == Code.CONTENT
        assert answer.opt.block2 is not None and answer.opt.block2.more
        assert len(answer.payload) + 40 <= 3 * sent, (len(answer.payload), sent)
        whole = await ask(ctx, via(run, f"{base}/big.txt"))
        assert whole.payload == body
    finally:
        await _stop(run.proc)
