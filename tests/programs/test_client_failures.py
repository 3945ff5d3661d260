"""coap-client fails fast and names the hop: closed ports (ICMP), a proxy that is not running,
a proxy that answers 5.04 for a dead server, an observation whose path died; and a block-wise
download with its progress bar through a proxy."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import pytest

from coaplayers.programs.server.resources import Firmware
from tests.conftest import free_udp_port

from .conftest import CLIENT, Keys, Running, client, run_on_pty, start_proxy, start_server

pytestmark = pytest.mark.slow


async def test_closed_coaps_port_fails_at_once(app: Running) -> None:
    """ICMP port unreachable ends a Layer 1 handshake at once, as it ends a coap:// request
    (it used to wait for the handshake timeout, 30 s by default)."""
    port = free_udp_port()
    coaps, coap = await asyncio.gather(
        client("-u", "dev", "-k", "secret", f"coaps://127.0.0.1:{port}/hello"),
        client(f"coap://127.0.0.1:{port}/hello"),
    )
    for r in (coaps, coap):
        assert r.rc == 6, r
        assert r.seconds < 8, r.seconds
    assert "nothing listens on that port" in coaps.one_line_error()
    assert "the server is not running there" in coaps.one_line_error()
    assert "unreachable" in coap.one_line_error()


async def test_proxy_not_running_fails_at_once_naming_the_proxy(app: Running) -> None:
    port = free_udp_port()
    uri = app.uri("coap") + "/hello"
    plain, dtls_hop, e2e = await asyncio.gather(
        client("-P", f"coap://127.0.0.1:{port}", uri),
        client("-P", f"coaps://127.0.0.1:{port}", "-u", "dev", "-k", "secret", uri),
        client("-P", f"coap://127.0.0.1:{port}", "--layer0", "dtls", "--e2e-psk-identity", "a",
               "--e2e-psk", "b", uri),
    )
    for r in (plain, dtls_hop, e2e):
        assert r.rc == 6, r
        assert r.seconds < 10, r.seconds
        assert "proxy" in r.one_line_error(), r.stderr
    assert f"the proxy coap://127.0.0.1:{port}" in plain.stderr
    assert "the proxy is not running there" in dtls_hop.stderr


async def test_proxy_answering_5_04_names_the_server_hop(keys: Keys, tmp_path: Path) -> None:
    """The server behind the proxy is down: the proxy's 5.04 (or 5.02) is about that hop."""
    proxy = start_proxy(tmp_path, "--listen", "coap://127.0.0.1:0", "--upstream-timeout", "2")
    try:
        dead = f"coap://127.0.0.1:{free_udp_port()}/hello"
        r = await client("-P", proxy.uri("coap"), dead)
    finally:
        proxy.stop()
    assert r.rc == 5, r
    line = r.one_line_error()
    assert re.match(r"coap-client: 5\.0[24] ", line), line
    assert f"the proxy {proxy.uri('coap')}" in line and "server of " + dead in line


def test_progress_bar_through_a_proxy_on_a_terminal(app: Running, proxy: Running, keys: Keys,
                                                    tmp_path: Path) -> None:
    """Block by block through the proxy with the progress bar (stderr a terminal): aiocoap's
    proxy forwarder used to drop handle_blockwise, so each "block" came back re-assembled
    and the download failed at the last block."""
    out = tmp_path / "fw.bin"
    rc, shown = run_on_pty([CLIENT, "-P", proxy.uri("coaps"), "--credentials",
                            str(keys / "client-hop.json"), "-o", str(out),
                            app.uri("coaps") + "/firmware"], timeout=60)
    text = shown.decode(errors="replace")
    assert rc == 0, text[-500:]
    assert out.read_bytes() == Firmware().image
    assert re.findall(r"\] 65536/65536 bytes 100%", text)


async def test_observation_through_a_stopped_proxy_is_noticed(keys: Keys, tmp_path: Path
                                                              ) -> None:
    """-s 20 while the proxy stops: after the last notification's Max-Age plus a margin the
    client registers again, finds the proxy gone and exits 6 saying so (it used to stay
    silent for the rest of the 20 s and exit 0)."""
    server = start_server(tmp_path, "--listen", "coap://127.0.0.1:0", name="obs-server")
    proxy = start_proxy(tmp_path, "--listen", "coap://127.0.0.1:0", name="obs-proxy")
    try:
        proc = await asyncio.create_subprocess_exec(
            CLIENT, "-s", "20", "-w", "-o", "-", "-P", proxy.uri("coap"),
            server.uri("coap") + "/sensors/temperature",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert first.endswith(b" C\n")
        proxy.stop(signal.SIGKILL)
        stopped = time.monotonic()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        took = time.monotonic() - stopped
    finally:
        server.stop()
        if proxy.proc.poll() is None:
            proxy.stop()
    assert proc.returncode == 6, err
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "observation of" in lines[0], err
    assert "registering again failed" in lines[0] and "proxy" in lines[0], lines[0]
    # Max-Age 2 s plus the 2 s margin, not the rest of -s 20.
    assert took < 12, took

