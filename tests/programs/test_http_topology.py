"""Figure 2 of the Layered DTLS draft with the installed programs: coap-client -> coap-proxy
(CoAP to HTTP) -> coap-server listening on http://, plain, Layer 0 (PSK, certificates, raw
public keys) and the OSCORE mode; curl talks to the same listener as a stock HTTP client."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coaplayers.proxy.config import ProxyConfig

from .conftest import Keys, Running, app_server_args, client, run, start_proxy, start_server

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow
MARKER = "Hello from coap-server"


def allow_local() -> list[str]:
    if "allow" not in {f.name for f in dataclasses.fields(ProxyConfig)}:
        return []
    return ["--allow", "127.0.0.1"]


@pytest.fixture(scope="module")
def figure2(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Running, Running]]:
    tmp = tmp_path_factory.mktemp("figure2")
    args = app_server_args(keys)
    args[args.index("coaps://127.0.0.1:0")] = "http://127.0.0.1:0"
    server = start_server(tmp, *args)
    proxy = start_proxy(tmp, "--listen", "coap://127.0.0.1:0", *allow_local())
    try:
        yield server, proxy
    finally:
        proxy.stop()
        server.stop()


async def test_coap_client_reaches_an_http_server_through_the_cross_proxy(
        figure2: tuple[Running, Running], keys: Keys) -> None:
    server, proxy = figure2
    target = server.uri("http") + "/hello"
    via = ["-P", proxy.uri("coap")]
    plain, psk, cert, rpk, oscore = await asyncio.gather(
        client(*via, target),
        client(*via, "--layer0", "dtls", *keys.e2e_psk, target),
        client(*via, "--layer0", "dtls", *keys.e2e_cert, target),
        client(*via, "--layer0", "dtls", *keys.e2e_rpk, target),
        client(*via, "--layer0", "oscore", *keys.e2e_cert, target),
    )
    assert plain.rc == 0 and plain.stdout.strip() == f"{MARKER} (mode plain)", plain
    for result, mode in ((psk, "layer0-dtls"), (cert, "layer0-dtls"), (rpk, "layer0-dtls"),
                         (oscore, "oscore")):
        assert result.rc == 0, result
        assert result.stdout.startswith(f"{MARKER} (mode {mode}, layer 0 peer "), result
    assert proxy.log_file is not None
    log = proxy.log_file.read_text()
    assert '"upstream":"http://127.0.0.1:' in log and '"oscore":true' in log
    assert MARKER not in log  # answers are not logged, protected or not


async def test_an_http_target_without_a_proxy_is_a_usage_error() -> None:
    result = await client("http://127.0.0.1:8080/hello")
    assert result.rc == 2
    assert result.one_line_error() == (
        "coap-client: an http:// target needs a CoAP-to-HTTP cross-proxy: give one with"
        " -P coap://PROXY")


async def test_curl_talks_to_coap_server_over_http(figure2: tuple[Running, Running]) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    server, _ = figure2
    base = server.uri("http")
    got = await run(curl, "-s", "-i", f"{base}/hello")
    assert got.rc == 0
    head, _, body = got.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200 OK")
    assert "content-type: text/plain; charset=utf-8" in head.lower()
    assert body == f"{MARKER} (mode plain)"
    posted = await run(curl, "-s", "-i", "-X", "POST", "--data-binary", "ping",
                       "-H", "content-type: text/plain", f"{base}/echo")
    assert posted.stdout.endswith("\r\n\r\nping")
    # The ATLS entry resource refuses what is not a ClientHello with a defined answer.
    hello = await run(curl, "-s", "-i", "-X", "POST", "--data-binary", "junk",
                      "-H", "content-type: application/atls", f"{base}/.well-known/atls")
    assert hello.stdout.startswith("HTTP/1.1 400 Bad Request")
    odd = await run(curl, "-s", "-i", "-X", "POST", "--data-binary", "x",
                    "-H", "content-type: application/x-unknown", f"{base}/echo")
    assert odd.stdout.startswith("HTTP/1.1 415 Unsupported Media Type")


async def test_deploy_md_web_application_serves_layer0_under_uvicorn(tmp_path: Path) -> None:
    """docs/DEPLOY.md's Python snippet, run by the uvicorn command as the page gives it (port
    0 instead of 8080), answers coap-client's Layer 0 request through coap-proxy."""
    page = (ROOT / "docs" / "DEPLOY.md").read_text()
    source = re.search(r"```python\n(.*?)```", page, re.S)
    assert source is not None and "uvicorn figure2_app:app --port 8080" in page
    (tmp_path / "figure2_app.py").write_text(source[1])
    uvicorn = str(Path(sys.executable).with_name("uvicorn"))
    proc = await asyncio.create_subprocess_exec(
        uvicorn, "figure2_app:app", "--port", "0", cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    proxy = start_proxy(tmp_path, "--listen", "coap://127.0.0.1:0", *allow_local())
    try:
        assert proc.stderr is not None
        url = None
        while url is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            assert line, "uvicorn ended"
            if match := re.search(r"running on (http://\S+)", line):
                url = match[1]
        result = await client("-P", proxy.uri("coap"), "--layer0", "dtls",
                              "--e2e-psk-identity", "dev1", "--e2e-psk", "secret-psk-0123",
                              f"{url}/temperature")
        assert result.rc == 0 and result.stdout.strip() == "21.5 C", result
    finally:
        proxy.stop()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
