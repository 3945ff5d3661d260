"""coap-server as a subprocess: its flags, resources, signals and configuration errors."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
from pathlib import Path

import pytest

from coaplayers.programs.server.resources import FIRMWARE_SIZE, Firmware

from .conftest import SERVER, Keys, Running, client, run, start_server


async def test_help_has_flags_and_examples() -> None:
    r = await run(SERVER, "--help")
    assert r.rc == 0
    for flag in ("--listen", "--psk", "--psk-file", "--cert", "--key", "--ca", "--e2e-psk",
                 "--e2e-cert", "--e2e-key", "--e2e-ca", "--e2e-required", "--config", "-v"):
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}[\s\],]", r.stdout), flag
    examples = r.stdout[r.stdout.index("examples:"):].splitlines()[1:4]
    assert all(line.strip().startswith("coap-server ") for line in examples), examples
    assert "Exit status" in r.stdout


async def test_listen_is_repeatable_and_reports_real_ports(tmp_path: Path) -> None:
    server = start_server(
        tmp_path, "--listen", "coap://127.0.0.1:0", "--listen", "coap://[::1]:0",
        "--listen", "coaps://127.0.0.1:0", "--listen", "coaps://[::1]:0", "--psk", "dev:secret",
    )
    try:
        assert [u.split("://")[0] for u in server.uris] == ["coap", "coap", "coaps", "coaps"]
        ports = [int(u.rsplit(":", 1)[1]) for u in server.uris]
        assert all(p > 0 for p in ports) and len(set(ports)) == 4
        assert server.uris[1].startswith("coap://[::1]:")
        results = await asyncio.gather(*(
            client(*(["-u", "dev", "-k", "secret"] if u.startswith("coaps") else []),
                   u + "/hello") for u in server.uris
        ))
    finally:
        assert server.stop() == 0
    for r in results:
        assert r.rc == 0 and r.stdout.startswith("Hello from coap-server"), r.stderr
    assert "layer 1 peer dev" in results[2].stdout and "layer 1 peer dev" in results[3].stdout


async def test_bind_failure_exits_1(tmp_path: Path) -> None:
    r = await run(SERVER, "--listen", "coap://192.0.2.1:5683", timeout=20)
    assert r.rc == 1 and "cannot listen on coap://192.0.2.1:5683" in r.one_line_error()


async def test_psk_and_psk_file_and_open_key_file_warning(tmp_path: Path) -> None:
    psk_file = tmp_path / "psk.json"
    psk_file.write_text(json.dumps({"file-dev": "0x66696c65"}))  # b"file"
    psk_file.chmod(0o644)
    server = start_server(tmp_path, "--listen", "coaps://127.0.0.1:0", "--psk", "dev:secret",
                          "--psk", "dev2:0x6b6579", "--psk-file", str(psk_file))
    try:
        uri = server.uri("coaps") + "/hello"
        results = await asyncio.gather(
            client("-u", "dev", "-k", "secret", uri),
            client("-u", "dev2", "-k", "key", uri),
            client("-u", "file-dev", "-k", "file", uri),
            client("-u", "stranger", "-k", "secret", "-B", "4", uri),
        )
    finally:
        assert server.stop() == 0
    for r, who in zip(results[:3], ("dev", "dev2", "file-dev"), strict=True):
        assert r.rc == 0 and f"layer 1 peer {who}" in r.stdout, r.stderr
    assert results[3].rc == 7
    assert re.search(r"coap-server: warning: key file .*psk\.json is accessible by other users "
                     r"\(mode 644\); run: chmod 600", server.stderr)


async def test_certificate_with_client_ca(tmp_path: Path, keys: Keys) -> None:
    key = tmp_path / "server.key"
    key.write_bytes((keys / "server-hop.key").read_bytes())
    key.chmod(0o640)
    server = start_server(tmp_path, "--listen", "coaps://127.0.0.1:0",
                          "--cert", str(keys / "server-hop.pem"), "--key", str(key),
                          "--ca", str(keys / "hop-ca.pem"))
    try:
        uri = server.uri("coaps") + "/hello"
        ca = ["--ca", str(keys / "hop-ca.pem")]
        good, anonymous = await asyncio.gather(
            client(*ca, "--cert", str(keys / "proxy.pem"), "--key", str(keys / "proxy.key"),
                   "-v", uri),
            client(*ca, "-B", "5", uri),
        )
    finally:
        assert server.stop() == 0
    assert good.rc == 0 and "layer 1 peer proxy" in good.stdout, good.stderr
    assert "mode certificate" in good.stderr
    assert anonymous.rc == 7
    assert "warning: key file" in server.stderr and "(mode 640)" in server.stderr


async def test_e2e_required(tmp_path: Path, keys: Keys) -> None:
    """Plain requests get 4.01; Layer 0 DTLS (PSK and certificates) and OSCORE succeed."""
    e2e = keys.psk["e2e"]
    server = start_server(
        tmp_path, "--listen", "coap://127.0.0.1:0",
        "--e2e-psk", f"{e2e['identity']}:{e2e['key']}",
        "--e2e-cert", str(keys / "server-e2e.pem"), "--e2e-key", str(keys / "server-e2e.key"),
        "--e2e-ca", str(keys / "e2e-ca.pem"), "--e2e-required",
    )
    try:
        uri = server.uri("coap") + "/echo"
        post = ["-m", "post", "-e", "protected"]
        plain, psk, cert, oscore = await asyncio.gather(
            client(*post, uri),
            client(*post, "--layer0", "dtls", *keys.e2e_psk, uri),
            client(*post, "--layer0", "dtls", *keys.e2e_cert, uri),
            client(*post, "--layer0", "oscore", *keys.e2e_cert, uri),
        )
    finally:
        assert server.stop() == 0
    assert plain.rc == 4 and "4.01 Unauthorized" in plain.one_line_error()
    for r in (psk, cert, oscore):
        assert r.rc == 0 and r.stdout == "protected\n", r.stderr


async def test_e2e_credentials_each_authenticate(app: Running, keys: Keys) -> None:
    """The shared server's --e2e-psk, --e2e-cert/--e2e-key and --e2e-ca: the client names the
    server's end-to-end certificate; the server names the client's, or its PSK identity;
    Layer 0 is optional without --e2e-required."""
    uri = app.uri("coap") + "/hello"
    plain, psk, cert = await asyncio.gather(
        client(uri),
        client("--layer0", "dtls", *keys.e2e_psk, uri),
        client("--layer0", "dtls", *keys.e2e_cert, "-v", uri),
    )
    assert plain.rc == 0 and "(mode plain)" in plain.stdout
    assert psk.rc == 0 and "mode layer0-dtls, layer 0 peer device-1" in psk.stdout
    assert cert.rc == 0 and "mode layer0-dtls, layer 0 peer device-1" in cert.stdout
    assert "peer app-server" in cert.stderr  # the --e2e-cert the server presented


async def test_verbose_logs_what_the_application_received(app: Running, keys: Keys) -> None:
    marker = "log-marker-" + "x" * 426  # 437 bytes: one block, a size no other test sends
    r = await client("-m", "post", "-e", marker, "--layer0", "dtls", *keys.e2e_psk,
                     app.uri("coap") + "/echo")
    assert r.rc == 0
    lines = [line for line in app.stderr.splitlines() if f" {len(marker)} bytes" in line]
    assert lines and re.search(r"INFO POST /echo \(mode layer0-dtls, layer 0 peer device-1\)",
                               lines[-1])
    assert "log-marker" not in app.stderr  # sizes, never payloads


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    server = start_server(tmp_path, "--listen", "coap://127.0.0.1:0", "--listen",
                          "coaps://127.0.0.1:0", "--psk", "a:b")
    assert server.stop(sig) == 0
    assert "Traceback" not in server.stderr and server.stderr.strip() == ""


async def test_bad_configuration_exits_2_with_one_clear_line(tmp_path: Path, keys: Keys) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("listen = 5\n")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('lissen = ["coap://127.0.0.1:0"]\n')
    notbool = tmp_path / "notbool.toml"
    notbool.write_text('e2e-required = "yes"\n')
    cases = [
        (["--psk", "nocolon"], "IDENTITY:KEY"),
        (["--psk", "a:0xzz"], "not valid hex"),
        (["--psk-file", str(tmp_path / "missing.json")], "cannot read PSK file"),
        (["--cert", str(keys / "server-hop.pem")], "--cert and --key must be given together"),
        (["--cert", str(tmp_path / "no.pem"), "--key", str(keys / "proxy.key")],
         "cannot read certificate file"),
        (["--cert", str(keys / "server-hop.pem"), "--key", str(keys / "proxy.key")],
         "is not the private key of the certificate"),
        (["--e2e-cert", str(keys / "server-e2e.pem")],
         "--e2e-cert and --e2e-key must be given together"),
        (["--listen", "https://127.0.0.1:0"], "scheme must be coap or coaps"),
        (["--listen", "coaps://127.0.0.1:0"], "needs server credentials"),
        (["--e2e-required"], "--e2e-required needs end-to-end credentials"),
        (["--config", str(tmp_path / "missing.toml")], "cannot read configuration"),
        (["--config", str(bad_toml)], "'listen' must be a string or a list"),
        (["--config", str(unknown)], "unknown configuration key 'lissen'"),
        (["--config", str(notbool)], "'e2e-required' must be true or false"),
        (["--listen"], "expected one argument"),
    ]
    results = await asyncio.gather(*(run(SERVER, *argv, timeout=30) for argv, _ in cases))
    for (argv, words), r in zip(cases, results, strict=True):
        assert r.rc == 2, (argv, r)
        assert words in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr
        if argv != ["--listen"]:
            assert r.one_line_error().startswith("coap-server: ")


async def test_config_file_with_relative_paths_and_flags_winning(
    tmp_path: Path, keys: Keys
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "psk.json").write_text(json.dumps({"file-dev": "file-key"}))
    (folder / "psk.json").chmod(0o600)
    e2e = keys.psk["e2e"]
    (folder / "server.toml").write_text(
        'listen = ["coaps://127.0.0.1:0", "coap://127.0.0.1:0"]\n'
        'psk-file = "psk.json"\n'
        'psk = ["dev:from-file"]\n'
        f'e2e-psk = ["{e2e["identity"]}:{e2e["key"]}"]\n'
        "e2e-required = true\n"
        "verbose = 1\n"
    )
    # --psk on the command line replaces the file's psk list; --listen replaces its listeners.
    server = start_server(tmp_path, "--config", str(folder / "server.toml"),
                          "--listen", "coaps://127.0.0.1:0", "--psk", "dev:from-flag")
    try:
        assert len(server.uris) == 1 and server.uris[0].startswith("coaps://")
        uri = server.uri("coaps") + "/hello"
        flag_psk, file_psk_file, file_psk, e2e_ok = await asyncio.gather(
            client("-u", "dev", "-k", "from-flag", uri),
            client("-u", "file-dev", "-k", "file-key", uri),
            client("-u", "dev", "-k", "from-file", "-B", "3", uri),
            client("-u", "dev", "-k", "from-flag", "--layer0", "dtls", *keys.e2e_psk, uri),
        )
    finally:
        assert server.stop() == 0
    assert flag_psk.rc == 4 and "4.01" in flag_psk.stderr  # e2e-required from the file
    assert file_psk_file.rc == 4  # psk-file (relative to the file's folder) was loaded
    assert file_psk.rc == 7  # the flag's --psk replaced the file's
    assert e2e_ok.rc == 0 and "layer 0 peer device-1" in e2e_ok.stdout, e2e_ok.stderr
    assert "coap-server.requests INFO GET /hello" in server.stderr  # verbose = 1


async def test_resources(app: Running, tmp_path: Path) -> None:
    uri = app.uri("coap")
    fw = tmp_path / "fw.bin"
    hello, now, wkc, post, put, empty_post, firmware, verbose_fw = await asyncio.gather(
        client("-v", uri + "/hello"),
        client(uri + "/time"),
        client(uri + "/.well-known/core"),
        client("--pretty", "-m", "post", "-t", "application/cbor", "-f", "-", uri + "/echo",
               stdin=b"\xa1\x61a\x01"),
        client("-m", "put", "-t", "41", "-e", "<x/>", "-v", uri + "/echo"),
        client("-m", "post", "-v", uri + "/echo"),
        client("-o", str(fw), uri + "/firmware"),
        client("-v", "-o", "/dev/null", uri + "/firmware"),
    )
    assert hello.rc == 0 and hello.stdout.startswith("Hello from coap-server")
    assert re.search(r"Content-Format: 0 \(text/plain", hello.stderr)
    assert now.rc == 0 and re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:]{8}\+00:00\n", now.stdout)
    for path in ("</hello>", "</time>", "</echo>", "</sensors/temperature>", "</firmware>"):
        assert path in wkc.stdout
    assert post.rc == 0 and post.stdout.strip() == '{"a": 1}'  # CBOR kept, shown as diagnostic
    assert put.rc == 0 and put.stdout == "<x/>\n" and "Content-Format: 41" in put.stderr
    assert "response: 2.04 Changed" in put.stderr
    assert empty_post.rc == 0 and "Content-Format" not in empty_post.stderr
    assert firmware.rc == 0 and fw.stat().st_size == FIRMWARE_SIZE >= 64 * 1024
    assert fw.read_bytes() == Firmware().image
    assert "Size2: 65536" in verbose_fw.stderr  # announced total of a block-wise body
    # Observable, changing every second.
    obs = await client("-s", "2.5", "-w", "-o", "-", uri + "/sensors/temperature")
    values = obs.stdout.splitlines()
    assert obs.rc == 0 and len(values) >= 3
    assert all(a != b for a, b in itertools.pairwise(values))


async def test_oscore_state_keeps_clients_across_a_restart(tmp_path: Path, keys: Keys) -> None:
    """--oscore-state: the OSCORE context derived at keying is on disk (owner-only); after a
    restart on the same port the same client goes on without a new handshake."""
    import aiocoap

    from coaplayers import dtls, layer1
    from coaplayers.layer0_modes import OscoreModeRequester
    from tests.conftest import free_udp_port

    state = tmp_path / "oscore-state"
    argv = ["--listen", f"coap://127.0.0.1:{free_udp_port()}", "-v",
            "--e2e-cert", str(keys / "server-e2e.pem"), "--e2e-key", str(keys / "server-e2e.key"),
            "--e2e-ca", str(keys / "e2e-ca.pem"), "--oscore-state", str(state)]
    server = start_server(tmp_path, *argv)
    ctx = await layer1.create_context()
    try:
        target = server.uri("coap") + "/echo"
        requester = OscoreModeRequester(ctx, target, None, dtls.CertificateCredentials.from_files(
            keys / "client-e2e.pem", keys / "client-e2e.key", keys / "e2e-ca.pem"))

        async def post(text: bytes) -> bytes:
            message = aiocoap.Message(code=aiocoap.POST, uri=target, payload=text)
            response = await asyncio.wait_for(requester.request(message).response, 30)
            assert response.code == aiocoap.CHANGED, response
            return bytes(response.payload)

        assert await post(b"before") == b"before"
        (saved,) = state.iterdir()
        assert saved.stat().st_mode & 0o077 == 0
        assert server.stop() == 0
        server = start_server(tmp_path, *argv)  # same port, same folder
        assert await post(b"after") == b"after"
        assert requester.requester.keyings == 1  # no new handshake
        assert "restored 1 OSCORE context(s)" in server.stderr
    finally:
        await ctx.shutdown()
        assert server.stop() == 0
