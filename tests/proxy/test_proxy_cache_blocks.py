"""Readers coap-proxy has not verified (plain UDP, no Echo yet) are served from its cache too:
the 3x rule makes the proxy answer them in small Block2 blocks, and those blocks are cut from
one whole representation fetched upstream once (RFC 7252 5.6, RFC 7959 2.4), with its ETag.
Real readers: aiocoap's client and libcoap's coap-client-notls, each from its own address."""

from __future__ import annotations

import asyncio
import math
import socket
from pathlib import Path

import aiocoap
import pytest
from aiocoap import GET, Message
from aiocoap.numbers import codes

from tests.conftest import need_program, run_program

from .conftest import Running, http_get, metric, start_proxy
from .echo_server import DOC, DOC_ETAG

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def exchange(port: int, data: bytes) -> bytes:
    """The answer to one request sent from a fresh socket (an empty ACK first skipped)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(data, ("127.0.0.1", port))
        while Message.decode(answer := s.recvfrom(4096)[0]).code == codes.EMPTY:
            pass
        return answer


async def origin_doc_gets(client: aiocoap.Context, origin: Running) -> int:
    """How many GETs of /doc (each block one) reached the origin, asked of it directly."""
    m = Message(code=GET, uri=f"coap://{origin.hostport}/docgets")
    return int((await asyncio.wait_for(client.request(m).response, 10)).payload)


async def aiocoap_read(proxy: Running, target: str) -> Message:
    """One stock aiocoap reader, on a socket (so an address) of its own."""
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        m = Message(code=GET, uri=f"coap://{proxy.hostport}/")
        m.opt.proxy_uri = target
        return await asyncio.wait_for(ctx.request(m).response, 20)
    finally:
        await ctx.shutdown()


async def libcoap_read(proxy: Running, target: str, out: Path, *blocks: str) -> bytes:
    await run_program(need_program("coap-client-notls"), "-B", "15", *blocks, "-o", str(out),
                      "-P", f"coap://{proxy.hostport}", target, timeout=30)
    return out.read_bytes() if out.exists() else b""


async def test_unverified_readers_are_served_blocks_cut_from_one_cached_answer(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path, "--metrics", "127.0.0.1:0",
                                              amplification=True))
    target = f"coap://{origin.hostport}/doc"  # 300 bytes, ETag, Max-Age 60
    before = await origin_doc_gets(client, origin)
    readers = 16
    # aiocoap's readers ask for the whole answer; libcoap's either too or (-b 32) for the
    # first 32-byte block; every one then follows the blocks the proxy cuts (RFC 7959 2.4).
    got_aiocoap = await asyncio.gather(*(aiocoap_read(proxy, target) for _ in range(10)))
    got_libcoap = await asyncio.gather(
        *(libcoap_read(proxy, target, tmp_path / f"lc{i}.out") for i in range(3)),
        *(libcoap_read(proxy, target, tmp_path / f"lcb{i}.out", "-b", "32") for i in range(3)),
    )
    upstream = await origin_doc_gets(client, origin) - before
    assert upstream <= math.ceil(readers / 10), f"{upstream} upstream GETs for {readers} readers"
    for answer in got_aiocoap:
        assert (answer.code, answer.payload, answer.opt.etag) == (codes.CONTENT, DOC, DOC_ETAG)
    for body in got_libcoap:
        assert body == DOC
    # The 3x rule held: the readers were unverified, their answers were cut small, and a
    # reader's first datagram, served from the cache now, is within 3 times its request.
    text = await http_get(proxy.metrics)  # type: ignore[arg-type]
    # (the 13 readers that asked for the whole answer; 32-byte blocks fit as they are)
    assert metric(text, 'coap_proxy_amplification_total{action="cut"}') >= 13
    assert metric(text, 'coap_proxy_amplification_total{action="challenged"}') == 0
    assert metric(text, 'coap_proxy_cache_total{result="hit"}') >= readers
    probe = Message(code=GET)
    probe.mtype, probe.mid, probe.token = aiocoap.CON, 0x1234, b"\x01\x02\x03\x04"
    probe.opt.proxy_uri = target
    sent = probe.encode()
    datagram = await asyncio.to_thread(exchange, proxy.port, sent)
    assert len(datagram) <= 3 * len(sent)
    answer = Message.decode(datagram)
    block = answer.opt.block2
    assert answer.code == codes.CONTENT and answer.opt.etag == DOC_ETAG
    assert block is not None and block.block_number == 0 and block.more
    assert answer.payload == DOC[:block.size]
    assert await origin_doc_gets(client, origin) - before == upstream
