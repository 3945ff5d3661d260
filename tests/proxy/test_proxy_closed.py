"""coap-proxy is closed by default (issue 16, part 2), shown against the real program: no
request forgery into local UDP services, no coaps:// upstream under the proxy's credentials for
a plain request, and what an operator sees when it refuses (4.03, metric, log line)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiocoap
from aiocoap import GET, POST, Message
from aiocoap.numbers import codes

from tests.conftest import free_udp_port

from .conftest import _read_until, _stop, http_get, metric, start_proxy
from .test_proxy_layer1 import HOP2, upstream_credentials

SERVER = str(Path(sys.executable).with_name("coap-server"))


class Sink(asyncio.DatagramProtocol):
    """A local UDP service that must not hear from the proxy."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.received.append(data)


async def ask(ctx: aiocoap.Context, proxy_port: int, target: str, payload: bytes = b"",
              code: aiocoap.numbers.codes.Code = GET) -> Message:
    m = Message(code=code, payload=payload, uri=f"coap://127.0.0.1:{proxy_port}")
    m.opt.proxy_uri = target
    return await asyncio.wait_for(ctx.request(m).response, 15)


async def test_forward_proxying_reaches_no_local_port_by_default(
    tmp_path: Path, client: aiocoap.Context
) -> None:
    loop = asyncio.get_running_loop()
    port = free_udp_port()
    transport, sink = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", port))
    try:
        # The defaults, as shipped (plus a short upstream timeout, so that the old behaviour,
        # forwarding and waiting, shows quickly as 5.04 instead of 4.03).
        proxy = await start_proxy(tmp_path, "--upstream-timeout", "1", "--metrics",
                                  "127.0.0.1:0", allow=())
        opened = await start_proxy(tmp_path, "--allow", "*", "--upstream-timeout", "1")
        try:
            answer = await ask(client, proxy.port, f"coap://127.0.0.1:{port}/x",
                               b"DELETE FROM users", POST)
            star = await ask(client, opened.port, f"coap://localhost:{port}/x", b"x", POST)
            star_literal = await ask(client, opened.port, f"coap://[::1]:{port}/x", b"x", POST)
            assert proxy.metrics is not None
            text = await http_get(proxy.metrics)
        finally:
            await _stop(proxy.proc)
            await _stop(opened.proc)
    finally:
        transport.close()
    assert answer.code == codes.FORBIDDEN, answer
    assert answer.payload.decode() == f"upstream 127.0.0.1:{port} (loopback address) is not allowed"
    # '*' opens public addresses, not loopback: neither by name (checked once resolved) nor
    # as a literal.
    assert star.code == codes.FORBIDDEN and b"resolved to an address" in star.payload, star
    assert star_literal.code == codes.FORBIDDEN, star_literal
    assert sink.received == []
    assert metric(text, 'coap_proxy_errors_total{kind="not_allowed"}') == 1
    refused = [e for e in proxy.log_lines() if e.get("reason") == "not_allowed"]
    assert len(refused) == 1 and refused[0]["code"] == "4.03"
    assert "DELETE" not in proxy.log_file.read_text()  # payloads are never logged
    warnings = [e["message"] for e in proxy.log_lines() if e["event"] == "warning"]
    assert any("reaches no upstream" in w for w in warnings), warnings
    warnings = [e["message"] for e in opened.log_lines() if e["event"] == "warning"]
    assert any("open to any upstream address" in w for w in warnings), warnings


async def test_plain_request_does_not_borrow_the_proxys_layer1_credentials(
    tmp_path: Path, client: aiocoap.Context
) -> None:
    server = await asyncio.create_subprocess_exec(
        SERVER, "--listen", "coaps://127.0.0.1:0", "--psk", f"{HOP2[0]}:{HOP2[1]}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        server_uri = (await _read_until(server, "listening", 20))[-1].split()[-1]
        creds = upstream_credentials(tmp_path, int(server_uri.rsplit(":", 1)[1]))
        proxy = await start_proxy(tmp_path, "--upstream-credentials", str(creds),
                                  "--allow", "127.0.0.1", "--route", f"/hello={server_uri}")
        try:
            forged = await ask(client, proxy.port, server_uri + "/hello")
            # A route is the operator saying that this upstream serves whoever reaches it.
            routed = await asyncio.wait_for(client.request(Message(
                code=GET, uri=f"coap://127.0.0.1:{proxy.port}/hello")).response, 15)
        finally:
            await _stop(proxy.proc)
    finally:
        await _stop(server)
    assert forged.code == codes.FORBIDDEN, (forged, forged.payload)
    assert b"Layer 1" in forged.payload
    assert routed.code == codes.CONTENT and b"layer 1 peer proxy" in routed.payload, routed
    reasons = [e.get("reason") for e in proxy.log_lines() if e["event"] == "exchange"]
    assert reasons == ["layer1_required", None]
