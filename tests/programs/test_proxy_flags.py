"""coap-proxy flags that tests/proxy does not run as a subprocess yet: coaps listeners with
--psk / --psk-file / --cert / --key / --ca, --upstream-credentials, --route and --config, and
the signals that stop it."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from .conftest import Keys, Running, client, start_proxy


async def test_coaps_listener_with_psk_flag_psk_file_and_upstream_credentials(
    app: Running, keys: Keys, tmp_path: Path
) -> None:
    proxy = start_proxy(
        tmp_path, "--listen", "coaps://127.0.0.1:0", "--psk", "gw-dev:0x6777",
        "--psk-file", str(keys / "proxy-psk.json"),
        "--upstream-credentials", str(keys / "proxy-upstream.json"),
    )
    try:
        via = ["-P", proxy.uri("coaps")]
        by_flag, by_file, to_coaps, wrong = await asyncio.gather(
            client(*via, "-u", "gw-dev", "-k", "gw", app.uri("coap") + "/hello"),
            client(*via, "--credentials", str(keys / "client-hop.json"),
                   app.uri("coap") + "/hello"),
            client(*via, "-u", "gw-dev", "-k", "gw", app.uri("coaps") + "/hello"),
            client(*via, "-u", "gw-dev", "-k", "nope", "-B", "3", app.uri("coap") + "/hello"),
        )
    finally:
        assert proxy.stop(signal.SIGINT) == 0
    assert by_flag.rc == 0 and by_flag.stdout.startswith("Hello"), by_flag.stderr
    assert by_file.rc == 0, by_file.stderr
    # Hop 2 authenticated with --upstream-credentials (coap-keys' hop-2 PSK, identity proxy).
    assert to_coaps.rc == 0 and "layer 1 peer proxy" in to_coaps.stdout, to_coaps.stderr
    assert wrong.rc == 7 and "wrong key" in wrong.one_line_error()
    assert proxy.log_file is not None
    log = [json.loads(line) for line in proxy.log_file.read_text().splitlines()]
    identities = {e.get("identity") for e in log if e.get("event") == "exchange"}
    assert {"gw-dev", keys.psk["hop1"]["identity"]} <= identities


async def test_coaps_listener_with_certificate_and_client_ca(
    app: Running, keys: Keys, tmp_path: Path
) -> None:
    proxy = start_proxy(
        tmp_path, "--listen", "coaps://127.0.0.1:0", "--cert", str(keys / "proxy.pem"),
        "--key", str(keys / "proxy.key"), "--ca", str(keys / "hop-ca.pem"),
    )
    try:
        via = ["-P", proxy.uri("coaps"), "--ca", str(keys / "hop-ca.pem")]
        mine = ["--cert", str(keys / "server-hop.pem"), "--key", str(keys / "server-hop.key")]
        good, anonymous, no_upstream_creds = await asyncio.gather(
            client(*via, *mine, "-v", app.uri("coap") + "/hello"),
            client(*via, "-B", "4", app.uri("coap") + "/hello"),
            client(*via, *mine, "-B", "20", app.uri("coaps") + "/hello"),
        )
    finally:
        assert proxy.stop(signal.SIGTERM) == 0
    assert good.rc == 0, good.stderr
    assert "peer proxy, mode certificate" in good.stderr  # the proxy's --cert
    assert anonymous.rc == 7 and "client certificate" in anonymous.one_line_error()
    # Without --upstream-credentials the proxy cannot open hop 2 to a coaps server.
    assert no_upstream_creds.rc == 5, no_upstream_creds
    assert no_upstream_creds.one_line_error().startswith("coap-client: 5.")


async def test_reverse_routes(app: Running, tmp_path: Path) -> None:
    proxy = start_proxy(
        tmp_path, "--listen", "coap://127.0.0.1:0", "--no-forward",
        "--route", f"/hello={app.uri('coap')}",
        "--route", f"/t={app.uri('coap')}/sensors/temperature",
    )
    try:
        base = proxy.uri("coap")
        hello, temp, none, forward = await asyncio.gather(
            client(base + "/hello"),
            client(base + "/t"),
            client(base + "/firmware"),
            client("-P", base, app.uri("coap") + "/hello"),
        )
    finally:
        assert proxy.stop() == 0
    assert hello.rc == 0 and hello.stdout.startswith("Hello from coap-server")
    assert temp.rc == 0 and temp.stdout.strip().endswith(" C")  # prefix replaced by the path
    assert none.rc == 5 and "5.05" in none.one_line_error()  # no route
    assert forward.rc == 5 and "5.05" in forward.one_line_error()  # --no-forward


async def test_config_file_keys_relative_paths_and_flags_winning(
    app: Running, keys: Keys, tmp_path: Path
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "psk.json").write_text(json.dumps({"file-dev": "file-key"}))
    (folder / "psk.json").chmod(0o600)
    (folder / "up.json").write_text((keys / "proxy-upstream.json").read_text())
    (folder / "up.json").chmod(0o600)
    (folder / "proxy.toml").write_text(
        'listen = ["coap://127.0.0.1:0"]\n'
        'psk = ["dev:secret"]\n'
        'psk-file = "psk.json"\n'
        'upstream-credentials = "up.json"\n'
        "forward = false\n"
        "[routes]\n"
        f'"/hello" = "{app.uri("coaps")}"\n'
    )
    # The flag's --listen replaces the file's plain listener with a coaps one.
    proxy = start_proxy(tmp_path, "--config", str(folder / "proxy.toml"),
                        "--listen", "coaps://127.0.0.1:0")
    try:
        assert len(proxy.uris) == 1 and proxy.uris[0].startswith("coaps://127.0.0.1:")
        uri = proxy.uri("coaps") + "/hello"
        psk, file_psk = await asyncio.gather(
            client("-u", "dev", "-k", "secret", uri),
            client("-u", "file-dev", "-k", "file-key", uri),
        )
    finally:
        assert proxy.stop() == 0
    # Routed by the file's [routes] to the coaps server with the file's upstream credentials.
    assert psk.rc == 0 and "layer 1 peer proxy" in psk.stdout, psk.stderr
    assert file_psk.rc == 0, file_psk.stderr
