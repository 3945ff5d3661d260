"""RFC cases a real coap-proxy must get right, each found with an independent peer: No-Response
(RFC 7967) with libcoap's client and server, upstream failures, prefix routes with
aiocoap-fileserver, and a client rejecting an answer (libcoap's RST)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

import aiocoap
import pytest
from aiocoap import GET, NON, POST, Message
from aiocoap.numbers import codes

from tests.conftest import background, free_udp_port, need_program, run_program, wait_udp_bound

from .conftest import Running, http_get, metric, start_proxy

pytestmark = pytest.mark.interop


def exchanges(proxy: Running) -> list[dict[str, object]]:
    return [e for e in proxy.log_lines() if e["event"] == "exchange"]


async def libcoap_get(tmp_path: Path, tag: str, *args: str, wait: int = 3) -> tuple[str, bytes]:
    out = tmp_path / f"{tag}.out"
    _, stdout, stderr = await run_program(need_program("coap-client-notls"), "-B", str(wait),
                                          "-o", str(out), *args, timeout=wait + 15)
    return (stdout + stderr).decode(errors="replace").strip(), (
        out.read_bytes() if out.exists() else b"")


async def test_no_response_is_honoured_and_holds_nothing(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    """libcoap's NON GET with No-Response 26 got a 5.04 after 10 s from the proxy."""
    server = need_program("coap-server-notls")
    port = free_udp_port()
    async with background(server, "-A", "127.0.0.1", "-p", str(port)):
        await wait_udp_bound("127.0.0.1", port)
        proxies.append(proxy := await start_proxy(tmp_path))
        via = ["-P", f"coap://{proxy.hostport}"]
        t0 = time.monotonic()
        results = await asyncio.gather(
            # libcoap's server honours No-Response: silence upstream
            libcoap_get(tmp_path, "lc", "-N", "-O", "258,0x1a", *via,
                        f"coap://127.0.0.1:{port}/"),
            # the aiocoap origin answers anyway: the proxy must drop it
            libcoap_get(tmp_path, "ao", "-N", "-O", "258,0x1a", *via,
                        f"coap://{origin.hostport}/x"),
            # only 4.xx/5.xx suppressed: the 2.05 still comes through
            libcoap_get(tmp_path, "ok", "-N", "-O", "258,0x18", *via,
                        f"coap://{origin.hostport}/x"),
            # success suppressed, errors wanted: a refusal by the proxy itself still comes
            libcoap_get(tmp_path, "err", "-N", "-O", "258,0x02", *via, "ftp://x/"),
        )
        elapsed = time.monotonic() - t0
    (lc, lc_out), (ao, ao_out), (_, ok_out), (err, _) = results
    assert not lc and not lc_out, lc
    assert not ao and not ao_out, ao
    assert ok_out.startswith(b'{"method": "GET"'), ok_out
    assert "5.05" in err, err
    assert elapsed < 8, elapsed  # none of them waited for the upstream timeout
    suppressed = [e for e in exchanges(proxy) if e.get("suppressed")]
    assert len(suppressed) == 2 and all(
        float(e["latency_ms"]) < 1000 for e in suppressed), suppressed  # type: ignore[arg-type]


@pytest.mark.slow
async def test_non_telemetry_with_no_response_at_500_per_second_leaves_others_unaffected(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    """Each suppressed NON request held an in-flight slot for the upstream timeout: about
    26 per second exhausted 256 slots and everyone got 5.03."""
    proxies.append(proxy := await start_proxy(tmp_path, "--max-in-flight", "64",
                                              "--metrics", "127.0.0.1:0"))
    host, port = proxy.hostport.rsplit(":", 1)
    total, rate = 1000, 500
    tele = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tele.setblocking(False)
    tele.bind(("127.0.0.1", 0))

    async def telemetry() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(total):
            m = Message(code=POST, payload=b"t=%d" % i, no_response=0x1a)
            m.mtype, m.mid, m.token = NON, i, i.to_bytes(2, "big")
            m.opt.proxy_uri = f"coap://{origin.hostport}/echo"
            tele.sendto(m.encode(), (host, int(port)))
            ahead = start + (i + 1) / rate - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)  # pacing the sender, not synchronisation

    async def reader() -> list[int]:
        codes_seen = []
        for i in range(20):
            r = await asyncio.wait_for(client.request(Message(
                code=GET, uri=f"coap://{proxy.hostport}/",
                proxy_uri=f"coap://{origin.hostport}/other{i}")).response, 5)
            codes_seen.append(int(r.code))
        return codes_seen

    try:
        _, seen = await asyncio.gather(telemetry(), reader())
        assert seen == [int(codes.CONTENT)] * 20, seen
        deadline = time.monotonic() + 10
        while True:  # the proxy logs each exchange once it is done with it
            done = [e for e in exchanges(proxy) if e.get("suppressed")]
            if len(done) >= total * 0.95 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert len(done) >= total * 0.95, len(done)
        with pytest.raises(BlockingIOError):
            tele.recv(2048)  # nothing came back to the telemetry source
    finally:
        tele.close()
    text = await http_get(proxy.metrics)  # type: ignore[arg-type]
    assert metric(text, 'coap_proxy_errors_total{kind="overloaded"}') == 0
    assert metric(text, "coap_proxy_suppressed_total") >= total * 0.95


async def test_coaps_upstream_without_credentials_is_502_and_closed_port_504_at_once(
    tmp_path: Path, proxies: list[Running]
) -> None:
    """libcoap's client saw a bare 5.00 (no log line) for a coaps:// host no credentials
    matched, and a 5.04 "upstream timeout" after 10 s for a closed coaps:// port."""
    closed = free_udp_port()
    creds = tmp_path / "upstream.json"
    creds.write_text('{"coaps://127.0.0.1*": {"dtls": {"psk": {"ascii": "k"},'
                     ' "client-identity": {"ascii": "proxy"}}}}')
    creds.chmod(0o600)
    # Routes: a plain request reaches a coaps:// upstream only where a route says so.
    proxies.append(proxy := await start_proxy(
        tmp_path, "--upstream-credentials", str(creds), "--metrics", "127.0.0.1:0",
        "--route", f"/nocred=coaps://localhost:{closed}",
        "--route", f"/closed=coaps://127.0.0.1:{closed}"))
    t0 = time.monotonic()
    (nocred, _), (refused, _) = await asyncio.gather(
        libcoap_get(tmp_path, "nocred", f"coap://{proxy.hostport}/nocred/hello"),
        libcoap_get(tmp_path, "closed", f"coap://{proxy.hostport}/closed/hello"),
    )
    assert time.monotonic() - t0 < 5
    assert "5.02" in nocred and "no credentials" in nocred, nocred
    assert "5.04" in refused and "unreachable" in refused, refused
    lines = {e["upstream"]: e for e in exchanges(proxy)}
    assert lines[f"coaps://localhost:{closed}/nocred/hello"]["reason"] == "no_credentials"
    assert lines[f"coaps://127.0.0.1:{closed}/closed/hello"]["reason"] == "unreachable"
    text = await http_get(proxy.metrics)  # type: ignore[arg-type]
    assert metric(text, 'coap_proxy_errors_total{kind="no_credentials"}') == 1


async def test_prefix_routes_mount_an_upstream_both_ways(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    """``--route /files=coap://host:port/`` sent /files/hello.txt upstream unchanged (4.04 from
    aiocoap-fileserver) and ``/.`` sent /./hello.txt (4.00)."""
    fileserver = str(Path(sys.executable).with_name("aiocoap-fileserver"))
    root = tmp_path / "served"
    (root / "d").mkdir(parents=True)
    (root / "hello.txt").write_text("hello from the file server\n")
    (root / "d" / "a.txt").write_text("in d\n")
    port = free_udp_port()
    async with background(fileserver, "--bind", f"127.0.0.1:{port}", str(root)):
        await wait_udp_bound("127.0.0.1", port)
        fs = f"coap://127.0.0.1:{port}"
        proxies.append(proxy := await start_proxy(
            tmp_path, "--no-forward", "--route", f"/files={fs}/", "--route", f"/dot={fs}/.",
            "--route", f"/sub/dir={fs}/d", "--route", f"/api=coap://{origin.hostport}/inner",
        ))
        base = f"coap://{proxy.hostport}"

        async def get(path: str) -> Message:
            return await asyncio.wait_for(
                client.request(Message(code=GET, uri=base + path)).response, 10)

        hello, dot, sub, listing = await asyncio.gather(
            get("/files/hello.txt"), get("/dot/hello.txt"), get("/sub/dir/a.txt"), get("/files/"))
    assert (hello.code, hello.payload) == (codes.CONTENT, b"hello from the file server\n")
    assert (dot.code, dot.payload) == (codes.CONTENT, hello.payload)
    assert (sub.code, sub.payload) == (codes.CONTENT, b"in d\n")
    assert listing.code == codes.CONTENT and b"hello.txt" in listing.payload
    # Coming down, a Location-Path under the mounted path is mapped back under the prefix.
    made = await asyncio.wait_for(client.request(
        Message(code=POST, uri=base + "/api/things/create")).response, 10)
    assert made.code == codes.CREATED
    assert list(made.opt.location_path) == ["api", "things", "made"]
    upstream = {e["upstream"] for e in exchanges(proxy)}
    assert f"{fs}/hello.txt" in upstream and f"{fs}/d/a.txt" in upstream


async def test_client_rejecting_an_answer_with_an_unknown_critical_option(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    """libcoap's client rejects (RST) a separate answer carrying the critical option 65001,
    which the proxy relays as RFC 7252 5.7.1 asks of safe-to-forward options; the proxy must
    take the RST quietly and go on serving (its log once held aiocoap's TypeError there)."""
    proxies.append(proxy := await start_proxy(tmp_path))
    via = ["-P", f"coap://{proxy.hostport}"]
    rejected, after = await asyncio.gather(
        libcoap_get(tmp_path, "crit", *via, f"coap://{origin.hostport}/critopt?1", wait=4),
        libcoap_get(tmp_path, "after", *via, f"coap://{origin.hostport}/x"),
    )
    assert not rejected[1], rejected  # libcoap refused the answer: no payload
    assert after[1].startswith(b'{"method": "GET"'), after
    crit = [e for e in exchanges(proxy) if str(e["upstream"]).endswith("/critopt?1")]
    assert crit and crit[0]["code"] == "2.05"
    log_text = proxy.log_file.read_text()  # type: ignore[union-attr]
    stderr = proxy.stderr_file.read_text()  # type: ignore[union-attr]
    assert "TypeError" not in log_text + stderr and "Traceback" not in stderr
