"""coap-proxy's response cache (RFC 7252 5.6-5.7) with real peers: aiocoap-fileserver (ETags),
libcoap's client, aiocoap's client, and the aiocoap origin of these tests."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import aiocoap
import pytest
from aiocoap import FETCH, GET, POST, Message
from aiocoap.numbers import codes
from aiocoap.optiontypes import OpaqueOption, UintOption

from tests.conftest import background, free_udp_port, need_program, run_program, wait_udp_bound

from .conftest import Running, http_get, metric, start_proxy

pytestmark = pytest.mark.interop


def exchanges(proxy: Running) -> list[dict[str, object]]:
    return [e for e in proxy.log_lines() if e["event"] == "exchange"]


def upstream_count(proxy: Running, suffix: str) -> int:
    """Exchanges for a target that reached the upstream (not answered from the cache)."""
    return sum(1 for e in exchanges(proxy)
               if str(e.get("upstream", "")).endswith(suffix) and e.get("cache") != "hit")


async def ask(client: aiocoap.Context, proxy: Running, target: str, code: aiocoap.Code = GET,
              **options: object) -> Message:
    m = Message(code=code, uri=f"coap://{proxy.hostport}/", **options)  # type: ignore[arg-type]
    m.opt.proxy_uri = target
    return await asyncio.wait_for(client.request(m).response, 10)


async def test_fileserver_is_asked_once_for_many_reads(
    tmp_path: Path, proxies: list[Running], client: aiocoap.Context
) -> None:
    fileserver = str(Path(sys.executable).with_name("aiocoap-fileserver"))
    root = tmp_path / "served"
    root.mkdir()
    (root / "hello.txt").write_text("hello\n")
    port = free_udp_port()
    # UDP only: its default TCP listener on the same port number (not checked free) can fail
    # to bind, and the fileserver then exits (tests/layer0/conftest.py, ProxyProcess.env).
    env = dict(os.environ, AIOCOAP_SERVER_TRANSPORT="udp6", AIOCOAP_CLIENT_TRANSPORT="udp6")
    async with background(fileserver, "--bind", f"127.0.0.1:{port}", str(root), env=env):
        await wait_udp_bound("127.0.0.1", port)
        proxies.append(proxy := await start_proxy(tmp_path, "--metrics", "127.0.0.1:0"))
        target = f"coap://127.0.0.1:{port}/hello.txt"
        first = await ask(client, proxy, target)
        rest = await asyncio.gather(*(ask(client, proxy, target) for _ in range(19)))
        # libcoap's client through the same proxy is served from the cache too
        out = tmp_path / "lc.out"
        await run_program(need_program("coap-client-notls"), "-B", "5", "-o", str(out),
                          "-P", f"coap://{proxy.hostport}", target, timeout=20)
    assert first.code == codes.CONTENT and first.payload == b"hello\n"
    etag = first.opt.etag
    for r in rest:
        assert (r.code, r.payload, r.opt.etag) == (codes.CONTENT, b"hello\n", etag)
        assert r.opt.max_age is not None and r.opt.max_age <= 60  # the remaining freshness
    assert out.read_bytes() == b"hello\n"
    assert upstream_count(proxy, "/hello.txt") == 1
    text = await http_get(proxy.metrics)  # type: ignore[arg-type]
    assert metric(text, 'coap_proxy_cache_total{result="hit"}') == 20
    assert metric(text, 'coap_proxy_cache_total{result="miss"}') == 1
    assert metric(text, "coap_proxy_cache_entries") == 1


async def test_freshness_validation_and_client_etags(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path))
    target = f"coap://{origin.hostport}/etag?1"  # Max-Age 1, ETag e1
    first = await ask(client, proxy, target)
    assert (first.code, first.payload, first.opt.etag) == (codes.CONTENT, b"tagged body", b"e1")
    # A client holding the ETag of a fresh entry gets 2.03 from the proxy itself.
    held = await ask(client, proxy, target, etags=[b"e1"])
    assert held.code == codes.VALID and held.opt.etag == b"e1" and not held.payload
    assert upstream_count(proxy, "/etag?1") == 1
    # Once stale, the proxy validates with its ETag and serves its copy on 2.03.
    deadline = time.monotonic() + 6
    while not any(e.get("cache") == "validated" for e in exchanges(proxy)):
        assert time.monotonic() < deadline, exchanges(proxy)
        again = await ask(client, proxy, target)
        assert (again.code, again.payload) == (codes.CONTENT, b"tagged body")
        await asyncio.sleep(0.25)  # Max-Age is time: poll it, bounded by the deadline
    assert upstream_count(proxy, "/etag?1") == 2  # the miss and one validation


async def test_what_is_never_cached_and_what_splits_the_key(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path))
    o = origin.hostport
    # Max-Age 0: asked every time
    for _ in range(2):
        await ask(client, proxy, f"coap://{o}/etag?0")
    assert upstream_count(proxy, "/etag?0") == 2
    # OSCORE-protected (even a FETCH answered 2.05 without Max-Age): every one goes upstream
    for _ in range(2):
        m = Message(code=FETCH, uri=f"coap://{proxy.hostport}/", payload=b"ciphertext")
        m.opt.proxy_uri = f"coap://{o}/oscore"
        m.opt.add_option(OpaqueOption(9, b"\x09\x00\x42"))
        r = await asyncio.wait_for(client.request(m).response, 10)
        assert r.code == codes.CONTENT
    assert upstream_count(proxy, "/oscore") == 2
    # Accept is part of the key, a NoCacheKey option (Size1, 60) is not
    await ask(client, proxy, f"coap://{o}/key", accept=50)
    await ask(client, proxy, f"coap://{o}/key", accept=0)
    m = Message(code=GET, uri=f"coap://{proxy.hostport}/", accept=50)
    m.opt.proxy_uri = f"coap://{o}/key"
    m.opt.add_option(UintOption(60, 5))
    await asyncio.wait_for(client.request(m).response, 10)
    assert upstream_count(proxy, "/key") == 2
    # A successful POST to a target drops what is cached for it
    await ask(client, proxy, f"coap://{o}/echo")
    await ask(client, proxy, f"coap://{o}/echo")
    assert upstream_count(proxy, "/echo") == 1
    await ask(client, proxy, f"coap://{o}/echo", code=POST, payload=b"new")
    await ask(client, proxy, f"coap://{o}/echo")
    assert upstream_count(proxy, "/echo") == 3


async def test_cache_is_bounded_by_entries_and_can_be_turned_off(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    proxies.append(small := await start_proxy(tmp_path, "--cache-entries", "3",
                                              "--metrics", "127.0.0.1:0"))
    o = origin.hostport
    for i in range(5):
        await ask(client, small, f"coap://{o}/n{i}")
    await ask(client, small, f"coap://{o}/n4")  # still there
    await ask(client, small, f"coap://{o}/n0")  # evicted (least recently used)
    assert upstream_count(small, "/n4") == 1 and upstream_count(small, "/n0") == 2
    text = await http_get(small.metrics)  # type: ignore[arg-type]
    assert metric(text, "coap_proxy_cache_entries") == 3
    proxies.append(off := await start_proxy(tmp_path, "--cache-entries", "0"))
    for _ in range(2):
        await ask(client, off, f"coap://{o}/n0")
    assert upstream_count(off, "/n0") == 2


async def test_concurrent_misses_go_upstream_once(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    """Twenty clients asking at once for what is not cached yet cost the origin one GET (the
    origin takes 0.3 s to answer, so the others arrive while the first is upstream however the
    machine schedules them)."""
    proxies.append(proxy := await start_proxy(tmp_path))
    ctxs = [await aiocoap.Context.create_client_context(transports=["udp6"]) for _ in range(20)]
    try:
        answers = await asyncio.gather(*(ask(c, proxy, f"coap://{origin.hostport}/slow?0.3")
                                         for c in ctxs))
    finally:
        for c in ctxs:
            await c.shutdown()
    assert {(a.code, a.payload) for a in answers} == {(codes.CONTENT, b"slow done")}
    assert upstream_count(proxy, "/slow?0.3") == 1
    assert sum(1 for e in exchanges(proxy) if e.get("coalesced")) >= 1
