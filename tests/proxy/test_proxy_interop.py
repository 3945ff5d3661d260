"""End to end through a real coap-proxy: libcoap's client (Proxy-Uri) and aiocoap's client
(Proxy-Scheme), to libcoap's coap-server and to an aiocoap origin (the echo fixture)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiocoap
import pytest
from aiocoap import GET, POST, Message

from tests.conftest import background, free_udp_port, need_program, run_program, wait_udp_bound

from .conftest import Running, start_proxy

pytestmark = pytest.mark.interop


def proxy_scheme_request(proxy: Running, code: aiocoap.numbers.Code, host: str, port: int,
                         path: list[str], payload: bytes = b"") -> Message:
    """What aiocoap's client sends to a forward proxy: Proxy-Scheme + Uri-Host/Port/Path."""
    m = Message(code=code, payload=payload, uri=f"coap://{proxy.hostport}/")
    m.opt.proxy_scheme = "coap"
    m.opt.uri_host = host
    m.opt.uri_port = port
    m.opt.uri_path = path
    return m


async def test_libcoap_client_get_through_proxy_to_libcoap_server(
    tmp_path: Path, proxies: list[Running]
) -> None:
    client = need_program("coap-client-notls")
    server = need_program("coap-server-notls")
    port = free_udp_port()
    async with background(server, "-A", "127.0.0.1", "-p", str(port)):
        await wait_udp_bound("127.0.0.1", port)
        proxies.append(proxy := await start_proxy(tmp_path))
        out = tmp_path / "time.out"
        await run_program(
            client, "-B", "10", "-o", str(out), "-P", f"coap://{proxy.hostport}",
            f"coap://127.0.0.1:{port}/time", timeout=20,
        )
        # coap-client exits 0 even on 5.xx: judge by the output file.
        assert out.exists() and out.read_bytes().strip(), "no payload came back"
        text = out.read_text()
        assert any(ch.isdigit() for ch in text), text
        out2 = tmp_path / "root.out"
        await run_program(client, "-B", "10", "-o", str(out2), "-P",
                          f"coap://{proxy.hostport}", f"coap://127.0.0.1:{port}/", timeout=20)
        assert b"libcoap" in out2.read_bytes() or b"CoAP" in out2.read_bytes()
    lines = [e for e in proxy.log_lines() if e["event"] == "exchange"]
    assert any(e["routing"].get("proxy_uri", "").endswith("/time")  # type: ignore[union-attr]
               and e["code"] == "2.05" for e in lines)


async def test_libcoap_client_post_3000_bytes_byte_identical(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    client = need_program("coap-client-notls")
    proxies.append(proxy := await start_proxy(tmp_path))
    data = os.urandom(3000)
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    await run_program(
        client, "-m", "post", "-f", str(src), "-o", str(out), "-B", "10",
        "-P", f"coap://{proxy.hostport}", f"coap://{origin.hostport}/echo", timeout=20,
    )
    assert out.exists(), "no response payload"
    assert out.read_bytes() == data
    # libcoap used Block1 (and Block2 for the answer); each block was relayed as it came.
    blocks = [e for e in proxy.log_lines() if e["event"] == "exchange"
              and "block1" in e["routing"]]  # type: ignore[operator]
    assert len(blocks) >= 3


async def test_libcoap_client_get_3000_bytes_block2(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    from .echo_server import BIG

    client = need_program("coap-client-notls")
    proxies.append(proxy := await start_proxy(tmp_path))
    out = tmp_path / "big.out"
    await run_program(client, "-B", "10", "-o", str(out), "-P", f"coap://{proxy.hostport}",
                      f"coap://{origin.hostport}/big", timeout=20)
    assert out.read_bytes() == BIG


async def test_aiocoap_client_proxy_scheme_get_and_post(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path))
    host, port = origin.hostport.rsplit(":", 1)
    r = await asyncio.wait_for(client.request(
        proxy_scheme_request(proxy, GET, host, int(port), ["some", "path"])).response, 10)
    assert r.code == aiocoap.CONTENT
    report = json.loads(r.payload)
    assert report["path"] == ["some", "path"]
    # Hop-Limit inserted with 16 (RFC 8768), Uri-Host omitted for an IP literal.
    assert [16, "10"] in report["options"]
    assert report["uri_host"] is None

    data = os.urandom(3000)
    r = await asyncio.wait_for(client.request(
        proxy_scheme_request(proxy, POST, host, int(port), ["echo"], data)).response, 10)
    assert r.code == aiocoap.CHANGED
    assert r.payload == data


async def test_aiocoap_client_proxy_uri_and_observe(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    """Proxy-Uri from aiocoap too (aiocoap's own proxy refuses it), and Observe relayed."""
    proxies.append(proxy := await start_proxy(tmp_path))
    m = Message(code=GET, uri=f"coap://{proxy.hostport}/")
    m.opt.proxy_uri = f"coap://{origin.hostport}/a?x=1"
    r = await asyncio.wait_for(client.request(m).response, 10)
    assert r.code == aiocoap.CONTENT
    assert json.loads(r.payload)["query"] == ["x=1"]

    host, port = origin.hostport.rsplit(":", 1)
    m = proxy_scheme_request(proxy, GET, host, int(port), ["obs"])
    m.opt.observe = 0
    req = client.request(m)
    first = await asyncio.wait_for(req.response, 10)
    assert first.opt.observe is not None
    seen = [int(first.payload)]

    async def collect() -> None:
        async for n in req.observation:
            seen.append(int(n.payload))
            if len(seen) == 4:
                return

    await asyncio.wait_for(collect(), 10)
    assert seen == sorted(seen) and len(set(seen)) == 4
    req.observation.cancel()


async def test_two_libcoap_clients_concurrent_block1_posts_do_not_mix(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    """Each client gets its own upstream socket, so the origin never mixes their blocks."""
    client = need_program("coap-client-notls")
    proxies.append(proxy := await start_proxy(tmp_path))
    datas = [os.urandom(3000) for _ in range(4)]
    outs = [tmp_path / f"out{i}.bin" for i in range(4)]
    for i, d in enumerate(datas):
        (tmp_path / f"in{i}.bin").write_bytes(d)
    await asyncio.gather(*(
        run_program(client, "-m", "post", "-b", "64", "-f", str(tmp_path / f"in{i}.bin"),
                    "-o", str(outs[i]), "-B", "20", "-P", f"coap://{proxy.hostport}",
                    f"coap://{origin.hostport}/echo", timeout=30)
        for i in range(4)
    ))
    for d, out in zip(datas, outs, strict=True):
        assert out.exists() and out.read_bytes() == d
