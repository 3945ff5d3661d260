"""coap-client as a subprocess: every flag of issue 6, the output rules and the exit statuses.

The peers are the real coap-server and coap-proxy (session fixtures in conftest.py).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import socket
import time
from pathlib import Path

import cbor2
import pytest

from coaplayers.programs.server.resources import Firmware

from .conftest import (
    CLIENT,
    PSK_HEX,
    PSK_HEX_AS_TEXT,
    PSK_TEXT,
    Keys,
    Running,
    client,
    run_on_pty,
    start_proxy,
    start_server,
)

IMAGE = Firmware().image


async def test_help_lists_every_flag_examples_and_exit_statuses() -> None:
    r = await client("--help")
    assert r.rc == 0
    for flag in ("-m", "-e", "-f", "-t", "-A", "-o", "-s", "-B", "-P", "-u", "-k", "-v",
                 "--credentials", "--ca", "--cert", "--key", "--layer0", "--e2e-psk-identity",
                 "--e2e-psk", "--e2e-ca", "--e2e-cert", "--e2e-key", "--config"):
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}[\s\],]", r.stdout), flag
    assert "{delete,fetch,get,ipatch,patch,post,put}" in r.stdout
    examples = r.stdout[r.stdout.index("examples:"):].splitlines()[1:6]
    assert all(line.strip().startswith("coap-client ") for line in examples[:3]), examples
    status = r.stdout[r.stdout.index("exit status"):]
    for code, what in (("0", "2.xx"), ("4", "4.xx"), ("5", "5.xx"), ("6", "timeout"),
                       ("7", "security"), ("2", "usage")):
        assert re.search(rf"\b{code}\b[^;]*{re.escape(what)}", status), (code, what)


async def test_each_method_reaches_the_server(app: Running) -> None:
    """POST and PUT are echoed; /echo answers 4.05 to the others, so -m must have been sent
    as given (and 4.xx exits 4 with the code on stderr, nothing on stdout)."""
    uri = app.uri("coap") + "/echo"
    methods = ["get", "post", "put", "delete", "fetch", "patch", "ipatch"]
    results = await asyncio.gather(
        *(client("-m", m, "-e", f"payload-{m}", "-B", "20", uri) for m in methods)
    )
    for method, r in zip(methods, results, strict=True):
        if method in ("post", "put"):
            assert r.rc == 0, r.stderr
            assert r.stdout == f"payload-{method}\n"  # libcoap's newline at the end
        else:
            assert r.rc == 4, (method, r)
            assert r.stdout == ""
            assert r.one_line_error().startswith("coap-client: 4.05 Method Not Allowed")
    # /hello answers GET: the default method is GET and -m get is the same.
    plain, explicit = await asyncio.gather(
        client(app.uri("coap") + "/hello"), client("-m", "get", app.uri("coap") + "/hello"))
    assert plain.rc == explicit.rc == 0
    assert plain.stdout.startswith("Hello from coap-server") and explicit.stdout == plain.stdout


async def test_payload_from_text_file_and_stdin(app: Running, tmp_path: Path) -> None:
    uri = app.uri("coap") + "/echo"
    data = bytes(range(256)) * 8  # 2 KiB of binary: block-wise upload, exact bytes back
    f = tmp_path / "payload.bin"
    f.write_bytes(data)
    text, from_file, from_stdin, both = await asyncio.gather(
        client("-m", "post", "-e", "from -e", uri),
        client("-m", "put", "-f", str(f), "-t", "octet", uri),
        client("-m", "post", "-f", "-", "-t", "42", uri, stdin=data[::-1]),
        client("-m", "post", "-e", "x", "-f", str(f), uri),
    )
    assert text.rc == 0 and text.stdout == "from -e\n"
    # Binary to a pipe as received, then libcoap's newline at the end.
    assert from_file.rc == 0 and from_file.out == data + b"\n"
    assert from_stdin.rc == 0 and from_stdin.out == data[::-1] + b"\n"
    assert both.rc == 2 and "-e and -f" in both.stderr


async def test_content_format_by_name_and_number_and_how_output_is_rendered(
    app: Running,
) -> None:
    uri = app.uri("coap") + "/echo"
    doc = {"sensor": "t1", "values": [21.5, 22]}
    as_json = json.dumps(doc, separators=(",", ":"))
    cbor = cbor2.dumps({"a": [1, 2], "b": "x"})
    r_json, r_json_num, r_cbor, r_text, r_verbose = await asyncio.gather(
        client("--pretty", "-m", "post", "-t", "json", "-e", as_json, uri),
        client("--pretty", "-m", "post", "-t", "application/json", "-e", as_json, uri),
        client("--pretty", "-m", "post", "-t", "60", "-f", "-", uri, stdin=cbor),
        client("--pretty", "-m", "post", "-t", "text/plain", "-e", "plain text", uri),
        client("-m", "put", "-t", "50", "-e", "[1]", "-v", uri),
    )
    # --pretty: JSON pretty-printed (indented), same document.
    assert r_json.rc == 0 and r_json.stdout == json.dumps(doc, indent=2) + "\n"
    assert r_json_num.stdout == r_json.stdout
    # CBOR in diagnostic notation.
    assert r_cbor.rc == 0 and r_cbor.stdout.strip() == '{"a": [1, 2], "b": "x"}'
    # Text as is.
    assert r_text.stdout == "plain text\n"
    # The Content-Format went out as a number and came back (the server echoes it).
    assert r_verbose.rc == 0 and re.search(r"Content-Format: 50\b", r_verbose.stderr)
    # Without --pretty (and not on a terminal): the bytes as received, like libcoap.
    raw_json, raw_cbor = await asyncio.gather(
        client("-m", "post", "-t", "json", "-e", as_json, uri),
        client("-m", "post", "-t", "60", "-f", "-", uri, stdin=cbor))
    assert raw_json.out == as_json.encode() + b"\n" and raw_cbor.out == cbor + b"\n"
    bad = await client("-m", "post", "-t", "no/such-format", "-e", "x", uri)
    assert bad.rc == 2 and "Content-Format" in bad.one_line_error()


async def test_accept_by_name_and_number(app: Running) -> None:
    uri = app.uri("coap") + "/time"
    text, as_json, as_cbor, as_number, refused = await asyncio.gather(
        client(uri), client("--pretty", "-A", "json", uri),
        client("--pretty", "-A", "cbor", uri),
        client("-A", "50", "-v", uri), client("-A", "41", uri),
    )
    assert text.rc == 0 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00\n", text.stdout)
    assert as_json.rc == 0 and "time" in json.loads(as_json.stdout)
    assert as_json.stdout.startswith("{\n  ")  # pretty-printed
    assert as_cbor.rc == 0 and as_cbor.stdout.startswith('{"time": "')
    assert as_number.rc == 0 and re.search(r"Content-Format: 50\b", as_number.stderr)
    assert refused.rc == 4 and "4.06" in refused.one_line_error()


async def test_output_file_pipe_and_terminal(app: Running, tmp_path: Path) -> None:
    uri = app.uri("coap") + "/firmware"
    out = tmp_path / "fw.bin"
    to_file, to_pipe = await asyncio.gather(client("-o", str(out), uri), client(uri))
    assert to_file.rc == 0 and to_file.out == b"" and out.read_bytes() == IMAGE
    # Binary goes to a pipe untouched, and then libcoap's newline; -o - writes it exactly.
    assert to_pipe.rc == 0 and to_pipe.out == IMAGE + b"\n"
    exact = await client("-o", "-", uri)
    assert exact.rc == 0 and exact.out == IMAGE
    # On a terminal: binary is refused with one line, and block-wise shows a progress bar.
    (rc, shown), (rc_o, shown_o) = await asyncio.gather(
        asyncio.to_thread(run_on_pty, [CLIENT, uri]),
        asyncio.to_thread(run_on_pty, [CLIENT, "-o", str(tmp_path / "fw2.bin"), uri]),
    )
    assert rc == 0
    text = shown.decode(errors="replace")
    assert "65536 bytes of binary payload not shown on a terminal" in text
    assert len(shown) < 20000 and IMAGE[:64] not in shown
    assert rc_o == 0 and (tmp_path / "fw2.bin").read_bytes() == IMAGE
    progress = re.findall(r"\[([#-]{30})\] (\d+)/65536 bytes", shown_o.decode(errors="replace"))
    assert len(progress) >= 16, shown_o[:300]  # one update per block
    received = [int(n) for _, n in progress]
    assert received == sorted(received) and received[-1] == 65536
    assert progress[-1][0] == "#" * 30
    # Text on a terminal is shown, and no progress bar for a single-block answer (over Layer 1:
    # a plain client's address not yet verified gets even /hello in small blocks, the 3x rule).
    rc_t, shown_t = await asyncio.to_thread(
        run_on_pty, [CLIENT, "-u", PSK_TEXT[0], "-k", PSK_TEXT[1], app.uri("coaps") + "/hello"])
    assert rc_t == 0 and b"Hello from coap-server" in shown_t and b"bytes" not in shown_t


async def test_observe_prints_each_notification(app: Running) -> None:
    t0 = time.monotonic()
    r = await client("-s", "2.6", "-w", "-o", "-", app.uri("coap") + "/sensors/temperature")
    assert r.rc == 0, r.stderr
    lines = r.stdout.splitlines()
    assert 3 <= len(lines) <= 5, lines  # the first answer, then one per second
    assert all(re.fullmatch(r"\d+\.\d\d C", line) for line in lines), lines
    assert all(a != b for a, b in itertools.pairwise(lines)), lines  # it changes
    assert 2.4 < time.monotonic() - t0 < 15


async def test_observe_stops_cleanly_on_sigint(app: Running) -> None:
    proc = await asyncio.create_subprocess_exec(
        CLIENT, "-s", "60", "-w", "-o", "-", app.uri("coap") + "/sensors/temperature",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert first.decode().endswith(" C\n")
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 130
    assert b"Traceback" not in err


async def test_timeout_exit_status_and_message() -> None:
    """-B against a port nobody answers (a socket that reads nothing) and a closed port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        coap, coaps, e2e, icmp = await asyncio.gather(
            client("-B", "1.5", f"coap://127.0.0.1:{port}/hello"),
            client("-B", "1.5", "-u", "dev", "-k", "x", f"coaps://127.0.0.1:{port}/hello"),
            client("-B", "1.5", "--layer0", "dtls", "--e2e-psk-identity", "a", "--e2e-psk", "b",
                   f"coap://127.0.0.1:{port}/hello"),
            client("-B", "5", f"coap://127.0.0.1:{closed}/hello"),
        )
    for r in (coap, coaps, e2e, icmp):
        assert r.rc == 6, r
        assert r.out == b""
        line = r.one_line_error()
        assert "no answer" in line or "no DTLS answer" in line, line
    for r in (coap, coaps, e2e):
        assert 1.2 < r.seconds < 12, r.seconds  # -B bounds the wait
    assert "unreachable" in icmp.stderr


def test_silent_layer0_server_is_exit_6_naming_the_hop() -> None:
    """The 60 s end-to-end case of the test above, classified without waiting: a handshake
    that never got a CoAP answer is "no answer" (6), not a security failure (7)."""
    from coaplayers.layer0 import HandshakeFailed, NoAnswer
    from coaplayers.programs.client.main import classify

    try:
        try:
            raise TimeoutError
        except TimeoutError as exc:
            raise NoAnswer("no answer from coap://192.0.2.1:5683 within 60 s") from exc
    except NoAnswer as silent:
        rc, line = classify(silent)
    assert rc == 6
    assert line.startswith("no answer from coap://192.0.2.1:5683 within 60 s: is the server")
    rc, line = classify(HandshakeFailed("no Layer 0 handshake within 60 s: the path loses"))
    assert rc == 7 and line.startswith("end-to-end security failure")


async def test_through_proxy_plain_and_coaps(app: Running, proxy: Running, keys: Keys) -> None:
    plain, coaps_hop, to_coaps, plain_to_coaps = await asyncio.gather(
        client("-P", proxy.uri("coap"), "-v", "-m", "post", "-e", "via proxy",
               app.uri("coap") + "/echo"),
        client("-P", proxy.uri("coaps"), "--credentials", str(keys / "client-hop.json"), "-v",
               app.uri("coap") + "/hello"),
        client("-P", proxy.uri("coaps"), "--credentials", str(keys / "client-hop.json"),
               app.uri("coaps") + "/hello"),
        client("-P", proxy.uri("coap"), app.uri("coaps") + "/hello"),
    )
    assert plain.rc == 0 and plain.stdout == "via proxy\n"
    assert f"layer 1: hop {proxy.uri('coap').removeprefix('coap://')}, mode none" in plain.stderr
    assert coaps_hop.rc == 0, coaps_hop.stderr
    # The server saw the proxy (plain hop 2); the first hop was Layer 1 PSK with the proxy.
    assert coaps_hop.stdout.startswith("Hello from coap-server (mode plain)")
    # -v names the first hop (the proxy); a PSK identity is labelled as such (it is ours).
    hop = proxy.uri("coaps").removeprefix("coaps://")
    assert f"layer 1: hop {hop}, psk identity device-1, mode psk" in coaps_hop.stderr
    # Hop 2 over coaps with the proxy's upstream credentials: the server names the proxy.
    assert to_coaps.rc == 0 and "layer 1 peer proxy" in to_coaps.stdout, to_coaps.stderr
    # ... for a client that authenticated at Layer 1 only: a plain request does not borrow them.
    assert plain_to_coaps.rc == 4 and "4.03" in plain_to_coaps.one_line_error()


async def test_layer1_psk_text_and_hex_and_wrong_key(app: Running) -> None:
    uri = app.uri("coaps") + "/hello"
    text, hexkey, hex_as_text, wrong, half = await asyncio.gather(
        client("-u", PSK_TEXT[0], "-k", PSK_TEXT[1], uri),
        client("-u", PSK_HEX[0], "-k", PSK_HEX[1], uri),
        client("-u", PSK_HEX[0], "-k", PSK_HEX_AS_TEXT, uri),
        client("-u", PSK_TEXT[0], "-k", "wrong", "-B", "3", uri),
        client("-u", PSK_TEXT[0], uri),
    )
    assert text.rc == 0 and "layer 1 peer dev" in text.stdout
    assert hexkey.rc == 0 and "layer 1 peer hexdev" in hexkey.stdout
    assert hex_as_text.rc == 0  # 0x6b6579 is the text "key"
    assert wrong.rc == 7
    assert "wrong key" in wrong.one_line_error()
    assert half.rc == 2 and "-u and -k" in half.stderr


async def test_credentials_file(app: Running, tmp_path: Path) -> None:
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"coaps://127.0.0.1*": {"dtls": {
        "psk": {"ascii": PSK_TEXT[1]}, "client-identity": {"ascii": PSK_TEXT[0]}}}}))
    creds.chmod(0o600)
    r = await client("--credentials", str(creds), app.uri("coaps") + "/hello")
    assert r.rc == 0 and "layer 1 peer dev" in r.stdout, r.stderr


async def test_ca_authenticates_the_server_certificate(app: Running, keys: Keys) -> None:
    uri = app.uri("coaps") + "/hello"
    trusted, untrusted = await asyncio.gather(
        client("--ca", str(keys / "hop-ca.pem"), "-v", uri),
        client("--ca", str(keys / "e2e-ca.pem"), "-B", "5", uri),
    )
    assert trusted.rc == 0, trusted.stderr
    assert re.search(r"layer 1: .*peer app-server-hop, mode certificate, cipher ECDHE-ECDSA",
                     trusted.stderr)
    assert untrusted.rc == 7
    assert "not trusted" in untrusted.one_line_error()


async def test_client_certificate_against_a_server_that_requires_one(
    keys: Keys, tmp_path: Path
) -> None:
    server = start_server(
        tmp_path, "--listen", "coaps://127.0.0.1:0", "--cert", str(keys / "server-hop.pem"),
        "--key", str(keys / "server-hop.key"), "--ca", str(keys / "hop-ca.pem"),
    )
    try:
        uri = server.uri("coaps") + "/hello"
        ca = ["--ca", str(keys / "hop-ca.pem")]
        with_cert, without, foreign = await asyncio.gather(
            client(*ca, "--cert", str(keys / "proxy.pem"), "--key", str(keys / "proxy.key"), uri),
            client(*ca, "-B", "5", uri),
            client(*ca, "--cert", str(keys / "client-e2e.pem"),
                   "--key", str(keys / "client-e2e.key"), "-B", "5", uri),
        )
    finally:
        assert server.stop() == 0
    assert with_cert.rc == 0 and "layer 1 peer proxy" in with_cert.stdout, with_cert.stderr
    assert without.rc == 7 and "client certificate" in without.one_line_error()
    # A certificate from the other layer's CA opens nothing here.
    assert foreign.rc == 7 and "rejected our certificate" in foreign.one_line_error()


async def test_end_to_end_modes(app: Running, proxy: Running, keys: Keys) -> None:
    uri = app.uri("coap") + "/echo"
    post = ["-m", "post", "-e", "inner secret", "-v"]
    psk, cert, oscore, via_proxy = await asyncio.gather(
        client(*post, "--layer0", "dtls", *keys.e2e_psk, uri),
        # --no-keep: a full handshake, whatever earlier runs kept for resumption.
        client(*post, "--layer0", "dtls", *keys.e2e_cert, "--no-keep", uri),
        client(*post, "--layer0", "oscore", *keys.e2e_cert, uri),
        client(*post, "--layer0", "oscore", *keys.e2e_cert, "-P", proxy.uri("coaps"),
               "--credentials", str(keys / "client-hop.json"), uri),
    )
    for r in (psk, cert, oscore, via_proxy):
        assert r.rc == 0, r.stderr
        assert r.stdout == "inner secret\n"
    assert re.search(r"layer 0: mode dtls psk, psk identity device-1, cipher TLS_PSK", psk.stderr)
    assert re.search(r"layer 0: mode dtls certificate, peer app-server, cipher ECDHE", cert.stderr)
    # RFC 7918 False Start: the certificate run's request went with its Finished; the PSK
    # suite has no forward secrecy, and -v says so.
    assert "false start yes" in cert.stderr, cert.stderr
    assert "false start TLS_PSK_WITH_AES_128_CCM_8 has no forward-secret key exchange" in (
        psk.stderr), psk.stderr
    assert re.search(r"layer 0: mode oscore .*peer app-server", oscore.stderr)
    # Through the proxy, -v shows both layers: the first hop's PSK session too.
    assert re.search(r"layer 0: mode oscore", via_proxy.stderr)
    assert re.search(r"layer 1: hop 127\.0\.0\.1:\d+, psk identity device-1, mode psk",
                     via_proxy.stderr)
    # Observe and block-wise inside Layer 0 as well (coap-server renders inner requests
    # eagerly: an observation keeps its rendering going in a task).
    fw, obs, obs_dtls = await asyncio.gather(
        client("--layer0", "dtls", *keys.e2e_psk, "-o", "-", app.uri("coap") + "/firmware"),
        client("--layer0", "oscore", *keys.e2e_cert, "-s", "1.6", "-w", "-o", "-",
               app.uri("coap") + "/sensors/temperature"),
        client("--layer0", "dtls", *keys.e2e_psk, "-s", "1.6", "-w", "-o", "-",
               app.uri("coap") + "/sensors/temperature"),
    )
    assert fw.rc == 0 and fw.out == IMAGE
    assert obs.rc == 0 and len(obs.stdout.splitlines()) >= 2
    assert obs_dtls.rc == 0 and len(obs_dtls.stdout.splitlines()) >= 2, obs_dtls.stderr


async def test_end_to_end_failures_name_the_cause(app: Running, keys: Keys) -> None:
    uri = app.uri("coap") + "/hello"
    e2e = keys.psk["e2e"]
    wrong_psk, untrusted, no_client_cert, no_mode, oscore_psk = await asyncio.gather(
        client("--layer0", "dtls", "--e2e-psk-identity", e2e["identity"], "--e2e-psk", "wrong",
               "-B", "8", uri),
        client("--layer0", "dtls", "--e2e-ca", str(keys / "hop-ca.pem"), "-B", "8", uri),
        client("--layer0", "oscore", "--e2e-ca", str(keys / "e2e-ca.pem"), "-B", "8", uri),
        client(*keys.e2e_psk, uri),
        client("--layer0", "oscore", "--e2e-psk-identity", e2e["identity"], "--e2e-psk", "wrong",
               "--no-keep", "-B", "8", uri),
    )
    assert wrong_psk.rc == 7
    assert "wrong" in wrong_psk.one_line_error() and "key" in wrong_psk.stderr
    assert untrusted.rc == 7 and "not trusted" in untrusted.one_line_error()
    assert no_client_cert.rc == 7 and "client certificate" in no_client_cert.one_line_error()
    assert no_mode.rc == 2 and "--layer0" in no_mode.one_line_error()
    # The OSCORE mode keys from a PSK too: a wrong one is named as in the DTLS mode.
    assert oscore_psk.rc == 7, oscore_psk.stderr
    assert "wrong" in oscore_psk.one_line_error() and "key" in oscore_psk.stderr


async def test_unknown_host_and_usage_errors() -> None:
    unknown, no_uri, bad_uri, bad_method, bad_config, http = await asyncio.gather(
        client("-B", "10", "coap://no-such-host.invalid/hello"),
        client(),
        client("coap://[::1"),
        client("-m", "jump", "coap://127.0.0.1/x"),
        client("--config", "/nonexistent/client.toml", "coap://127.0.0.1/x"),
        client("http://127.0.0.1/x"),
    )
    assert unknown.rc == 1 and "cannot resolve" in unknown.one_line_error()
    assert no_uri.rc == 2 and "URI is required" in no_uri.stderr
    assert bad_uri.rc == 2 and "URI" in bad_uri.one_line_error()
    assert bad_method.rc == 2 and "jump" in bad_method.stderr
    assert bad_config.rc == 2 and "cannot read configuration" in bad_config.one_line_error()
    assert http.rc == 2 and "needs a CoAP-to-HTTP cross-proxy" in http.stderr


async def test_config_file_and_flags_win(app: Running, proxy: Running, keys: Keys,
                                         tmp_path: Path) -> None:
    """Keys are the long flag names (or the option names of short flags); relative paths are
    resolved against the file's folder; a flag on the command line wins over the file."""
    (tmp_path / "hop.json").write_text((keys / "client-hop.json").read_text())
    (tmp_path / "e2e-ca.pem").write_text((keys / "e2e-ca.pem").read_text())
    (tmp_path / "c.pem").write_text((keys / "client-e2e.pem").read_text())
    (tmp_path / "c.key").write_text((keys / "client-e2e.key").read_text())
    (tmp_path / "c.key").chmod(0o600)
    cfg = tmp_path / "client.toml"
    cfg.write_text(
        'method = "post"\n'
        'text = "from the file"\n'
        'content-format = "text/plain"\n'
        f'proxy = "{proxy.uri("coaps")}"\n'
        'credentials = "hop.json"\n'
        'e2e = "oscore"\n'
        'e2e-ca = "e2e-ca.pem"\n'
        'e2e-cert = "c.pem"\n'
        'e2e-key = "c.key"\n'
        "timeout = 20\n"
    )
    uri = app.uri("coap") + "/echo"
    from_file, flag_wins, e2e_flag_wins = await asyncio.gather(
        client("--config", str(cfg), "-v", uri, cwd="/"),
        client("--config", str(cfg), "-e", "from the flag", "-m", "put", uri, cwd="/"),
        client("--config", str(cfg), "--layer0", "dtls", "-v", uri, cwd="/"),
    )
    assert from_file.rc == 0, from_file.stderr
    assert from_file.stdout == "from the file\n"
    assert "layer 0: mode oscore" in from_file.stderr and "layer 1: hop" in from_file.stderr
    assert flag_wins.rc == 0 and flag_wins.stdout == "from the flag\n"
    assert e2e_flag_wins.rc == 0 and "layer 0: mode dtls certificate" in e2e_flag_wins.stderr
    # Short flags without a long name by their option names; "key" is --key, the PSK is psk-key.
    l1 = tmp_path / "l1.toml"
    l1.write_text(f'identity = "{PSK_TEXT[0]}"\npsk-key = "{PSK_TEXT[1]}"\nverbose = 6\n')
    r = await client("--config", str(l1), app.uri("coaps") + "/hello")
    assert r.rc == 0 and "layer 1 peer dev" in r.stdout and "response: 2.05" in r.stderr
    bad = tmp_path / "bad.toml"
    for body, word in (('methd = "get"\n', "unknown configuration key 'methd'"),
                       ('method = "jump"\n', "must be one of"),
                       ("timeout = [1]\n", "must be a number"),
                       ("method = \n", "not valid TOML")):
        bad.write_text(body)
        r = await client("--config", str(bad), uri)
        assert r.rc == 2 and word in r.one_line_error(), (body, r.stderr)


@pytest.mark.parametrize("key_mode", [0o644])
async def test_key_file_readable_by_others_warns(app: Running, keys: Keys, tmp_path: Path,
                                                 key_mode: int) -> None:
    key = tmp_path / "client-e2e.key"
    key.write_bytes((keys / "client-e2e.key").read_bytes())
    key.chmod(key_mode)
    r = await client("--layer0", "dtls", "--e2e-ca", str(keys / "e2e-ca.pem"),
                     "--e2e-cert", str(keys / "client-e2e.pem"), "--e2e-key", str(key),
                     app.uri("coap") + "/hello")
    assert r.rc == 0
    assert f"warning: key file {key} is accessible by other users (mode 644)" in r.stderr
    assert len(r.stderr.splitlines()) == 1


async def test_observing_a_resource_that_cannot_be_observed_prints_its_answer_and_ends(
    app: Running, keys: Keys
) -> None:
    """RFC 7641 3.1: an answer without Observe means we are not on the list: -s prints it
    and ends (it once failed with aiocoap's "ClientObservation cancelled twice" in the OSCORE
    mode, and re-registered for the whole -s duration in the others)."""
    uri = app.uri("coap") + "/hello"
    runs = await asyncio.gather(
        client("-s", "120", "-w", "-o", "-", uri, timeout=30),
        client("--layer0", "dtls", *keys.e2e_psk, "-s", "120", "-w", "-o", "-", uri, timeout=30),
        client("--layer0", "oscore", *keys.e2e_cert, "--no-keep", "-s", "120", "-w", "-o", "-",
               uri, timeout=30),
    )
    for r in runs:
        assert r.rc == 0, r.stderr
        assert r.stdout.startswith("Hello") and "Traceback" not in r.stderr, r.stderr


async def test_a_proxy_refusing_the_destination_is_not_reported_as_the_server(
    app: Running, keys: Keys, tmp_path: Path
) -> None:
    """coap-proxy's own 4.03 (the destination is not on its allow-list) carries no DTLS
    alert: the Layer 0 handshake says the proxy refused, not the server."""
    proxy = start_proxy(tmp_path, "--listen", "coap://127.0.0.1:0", loopback=False)
    try:
        r = await client("--layer0", "dtls", *keys.e2e_psk, "-P", proxy.uri("coap"),
                         "-B", "8", app.uri("coap") + "/hello")
    finally:
        proxy.stop()
    error = r.one_line_error()
    assert r.rc == 4 and "4.03" in error and "a proxy refused" in error, r.stderr
    assert "server refused" not in error and "--e2e-psk" not in error, r.stderr
