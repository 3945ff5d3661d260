"""coap-proxy with Layer 1 on both sides: libcoap's DTLS client through the proxy to libcoap's
DTLS server and to our coap-server (issue 4, must-show 1)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import background, free_udp_port, need_program, run_program, wait_udp_bound

from .conftest import _read_until, _stop, start_proxy

pytestmark = pytest.mark.interop

HOP1 = ("dev1", "hop1-secret")  # client <-> proxy
HOP2 = ("proxy", "hop2-secret")  # proxy <-> upstream server
SERVER = str(Path(sys.executable).with_name("coap-server"))


def upstream_credentials(tmp: Path, port: int) -> Path:
    path = tmp / "upstream.json"
    path.write_text(json.dumps({
        f"coaps://127.0.0.1:{port}*": {"dtls": {
            "psk": {"ascii": HOP2[1]}, "client-identity": {"ascii": HOP2[0]},
        }},
    }))
    path.chmod(0o600)
    return path


async def libcoap_through_proxy(tmp: Path, proxy_port: int, target: str, payload: bytes | None
                                ) -> bytes:
    client = need_program("coap-client-openssl")
    out = tmp / f"out-{os.urandom(3).hex()}"
    args = [client, "-B", "20", "-u", HOP1[0], "-k", HOP1[1], "-o", str(out),
            "-P", f"coaps://127.0.0.1:{proxy_port}"]
    if payload is not None:
        infile = tmp / "payload.bin"
        infile.write_bytes(payload)
        args += ["-m", "post", "-f", str(infile)]
    await run_program(*args, target, timeout=40)
    # libcoap's client exits 0 on errors: judge by the output file.
    return out.read_bytes() if out.exists() else b""


async def test_libcoap_dtls_client_through_proxy_to_libcoap_dtls_server(tmp_path: Path) -> None:
    server = need_program("coap-server-openssl")
    port = free_udp_port()
    async with background(server, "-A", "127.0.0.1", "-p", str(port), "-k", HOP2[1], "-h", ""):
        await wait_udp_bound("127.0.0.1", port + 1)
        creds = upstream_credentials(tmp_path, port + 1)
        proxy = await start_proxy(
            tmp_path, "--listen", "coaps://127.0.0.1:0", "--psk", f"{HOP1[0]}:{HOP1[1]}",
            "--upstream-credentials", str(creds),
        )
        try:
            body = await libcoap_through_proxy(
                tmp_path, proxy.port, f"coaps://127.0.0.1:{port + 1}/", None
            )
        finally:
            await _stop(proxy.proc)
    assert b"libcoap" in body
    exchanges = [e for e in proxy.log_lines() if e["event"] == "exchange"]
    assert exchanges and exchanges[0]["identity"] == HOP1[0]  # Layer 1 identity is logged


async def test_libcoap_dtls_client_through_proxy_to_our_server_get_and_3000_byte_post(
    tmp_path: Path,
) -> None:
    server_proc = await asyncio.create_subprocess_exec(
        SERVER, "--listen", "coaps://127.0.0.1:0", "--psk", f"{HOP2[0]}:{HOP2[1]}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        line = (await _read_until(server_proc, "listening", 20))[-1]
        server_uri = line.split()[-1]
        port = int(server_uri.rsplit(":", 1)[1])
        creds = upstream_credentials(tmp_path, port)
        proxy = await start_proxy(
            tmp_path, "--listen", "coaps://127.0.0.1:0", "--psk", f"{HOP1[0]}:{HOP1[1]}",
            "--upstream-credentials", str(creds),
        )
        try:
            hello = await libcoap_through_proxy(tmp_path, proxy.port, server_uri + "/hello", None)
            big = os.urandom(1500).hex().encode()  # 3,000 bytes (text, so libcoap keeps it whole)
            echoed = await libcoap_through_proxy(tmp_path, proxy.port, server_uri + "/echo", big)
        finally:
            await _stop(proxy.proc)
    finally:
        await _stop(server_proc)
    # The server saw the proxy's Layer 1 identity, not the client's: hop by hop.
    assert hello.strip() == b"Hello from coap-server (mode plain, layer 1 peer proxy)"
    assert echoed == big
    metrics_free = [e for e in proxy.log_lines() if e["event"] == "exchange"]
    assert all(e["identity"] == HOP1[0] for e in metrics_free)
    assert not any(big[:32].decode() in json.dumps(e) for e in proxy.log_lines())
