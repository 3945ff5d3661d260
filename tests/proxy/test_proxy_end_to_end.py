"""Layer 0 and OSCORE through coap-proxy (issue 4, must-show 2).

The real programs: coap-client -> (coaps, Layer 1 PSK) -> coap-proxy -> coap-relay (records every
byte the proxy forwards) -> coap-server. The proxy's log and the capture show routing options,
never the inner plaintext.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiocoap
import pytest

from coaplayers.layer0.profile import is_layer0_path
from coaplayers_tools.relay import Direction, read_capture
from tests.conftest import run_program

from .conftest import _read_until, _stop, start_proxy

BIN = Path(sys.executable).parent


async def _start(*argv: str, ready: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        line = (await _read_until(proc, ready, 20))[-1]
    except BaseException:
        await _stop(proc)
        raise
    return proc, line.split()[-1]


@pytest.mark.parametrize("mode", ["dtls-psk", "dtls-cert", "oscore"])
async def test_end_to_end_modes_through_coap_proxy_hide_the_plaintext(
    tmp_path: Path, mode: str
) -> None:
    creds = tmp_path / "creds"
    rc, _, err = await run_program(str(BIN / "coap-keys"), str(creds))
    assert rc == 0, err
    marker = f"inner-secret-{os.urandom(4).hex()}"
    server, server_uri = await _start(
        str(BIN / "coap-server"), "--config", str(creds / "server.toml"),
        "--listen", "coap://127.0.0.1:0", ready="listening",
    )
    capture = tmp_path / "hop2.capture"
    relay = proxy = None
    try:
        relay, relay_addr = await _start(
            str(BIN / "coap-relay"), "--listen", "127.0.0.1:0",
            "--upstream", server_uri.removeprefix("coap://"), "--record", str(capture),
            ready="127.0.0.1",
        )
        proxy = await start_proxy(
            tmp_path, "--listen", "coaps://127.0.0.1:0",
            "--psk-file", str(creds / "proxy-psk.json"),
        )
        psk = json.loads((creds / "psk.json").read_text())
        hop1 = json.loads((creds / "client-hop.json").read_text())
        hop_creds = tmp_path / "hop.json"
        hop_creds.write_text(json.dumps({"coaps://127.0.0.1*": next(iter(hop1.values()))}))
        cert = ["--e2e-ca", str(creds / "e2e-ca.pem"), "--e2e-cert",
                str(creds / "client-e2e.pem"), "--e2e-key", str(creds / "client-e2e.key")]
        e2e = {
            "dtls-psk": ["--layer0", "dtls", "--e2e-psk-identity", psk["e2e"]["identity"],
                         "--e2e-psk", psk["e2e"]["key"]],
            "dtls-cert": ["--layer0", "dtls", *cert],
            "oscore": ["--layer0", "oscore", *cert],
        }[mode]
        rc, out, err = await run_program(
            str(BIN / "coap-client"), "-m", "post", "-e", marker, "-B", "30",
            "-P", proxy.listen[0], "--credentials", str(hop_creds), *e2e,
            f"coap://{relay_addr}/echo", timeout=60,
        )
    finally:
        for p in (proxy.proc if proxy else None, relay, server):
            if p is not None:
                await _stop(p)
    assert rc == 0, err
    assert out.decode().strip() == marker  # the server got the plaintext and echoed it
    forwarded = read_capture(capture)
    assert any(d.direction is Direction.UP for d in forwarded)
    assert not any(marker.encode() in d.data for d in forwarded)  # never in clear past the proxy
    # What the proxy routed on: outer options only (the tunnel path or, for OSCORE, no path).
    outer = [aiocoap.Message.decode(d.data) for d in forwarded if d.direction is Direction.UP]
    if mode == "oscore":
        assert any(m.opt.oscore is not None and not m.opt.uri_path for m in outer)
    else:
        assert all(is_layer0_path(m.opt.uri_path) for m in outer)
    log = proxy.log_file.read_text() if proxy.log_file else ""
    exchanges = [json.loads(line) for line in log.splitlines() if '"exchange"' in line]
    assert exchanges and all(e["identity"] == hop1_identity(hop1) for e in exchanges)
    assert marker not in log


def hop1_identity(hop1: dict[str, dict[str, dict[str, dict[str, str]]]]) -> str:
    entry = next(iter(hop1.values()))["dtls"]["client-identity"]
    return entry["ascii"]
