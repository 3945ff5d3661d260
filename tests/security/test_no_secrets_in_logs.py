"""Issue 8, part 8 (logs): a full run of the three programs leaks no key and no payload.

coap-keys makes the credentials; coap-server runs with -v, coap-proxy with its JSON-lines log
file, coap-client with -v, through the proxy: Layer 1 PSK on both hops alone, then Layer 0
DTLS (PSK, and raw public keys) and the OSCORE mode (keyed by a Layer 0 certificate handshake)
end to end. Every
stdout, stderr and log file is then searched for each PSK (text, hex either case, raw bytes),
each private key's PEM body, and a payload marker. The client writes the response payload to
a file (-o), which is output, not a log.

Also: a PSK file readable by others makes coap-server warn, naming the fix.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_udp_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MARKER = "PAYLOAD-MARKER-" + secrets.token_hex(6)
MODES = ("layer1", "layer1-rpk", "layer0-dtls", "layer0-rpk", "oscore")


def program(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in the venv")
    return str(path)


def wait_for_line(proc: subprocess.Popen[bytes], stream: str, needle: bytes, timeout: float,
                  seen: bytearray) -> bytes:
    """Read ``stream`` of ``proc`` until a line holds ``needle``; bounded by ``timeout``."""
    pipe = getattr(proc, stream)
    deadline = time.monotonic() + timeout
    while True:
        for line in seen.split(b"\n"):
            if needle in line:
                return line
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            raise AssertionError(f"no {needle!r} from {proc.args[0]} within {timeout} s: "
                                 f"{bytes(seen)[-500:]!r}")
        ready, _, _ = select.select([pipe], [], [], remaining)
        if ready:
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk and proc.poll() is not None:
                continue
            seen += chunk


def stop(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    proc.terminate()
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
    return out, err


@dataclass
class Run:
    folder: Path
    logs: dict[str, bytes] = field(default_factory=dict)
    outputs: dict[str, bytes] = field(default_factory=dict)
    """What the client wrote with -o, per mode (proof that each mode really carried the payload)."""


def secrets_of(keys: Path) -> dict[str, list[bytes]]:
    """Every secret coap-keys wrote, in each form it could take in a log."""
    found: dict[str, list[bytes]] = {}
    for entry, value in json.loads((keys / "psk.json").read_text()).items():
        hex_key = value["key"][2:]
        raw = bytes.fromhex(hex_key)
        found[f"psk {entry}"] = [hex_key.lower().encode(), hex_key.upper().encode(), raw,
                                 repr(raw).encode()[2:-1], raw.hex(":").encode()]
    for pem in sorted(keys.glob("*.key")):
        body = [ln for ln in pem.read_text().splitlines() if ln and not ln.startswith("-----")]
        # each base64 line of the PEM body on its own, and the body as one string
        found[f"private key {pem.name}"] = [ln.encode() for ln in body if len(ln) >= 16] + [
            "".join(body).encode()
        ]
    return found


def client(run: Run, name: str, *args: str) -> None:
    out_file = run.folder / f"{name}.payload"
    proc = subprocess.run(
        [program("coap-client"), *args, "-v", "-B", "30", "-m", "post", "-e", MARKER,
         "-o", str(out_file), f"coaps://127.0.0.1:{run.server_port}/echo"],  # type: ignore[attr-defined]
        capture_output=True, timeout=60, cwd=run.folder,
    )
    run.logs[f"coap-client {name} stdout"] = proc.stdout
    run.logs[f"coap-client {name} stderr"] = proc.stderr
    assert proc.returncode == 0, (name, proc.stderr[-800:])
    run.outputs[name] = out_file.read_bytes()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    folder = tmp_path_factory.mktemp("no-secrets")
    server_port, proxy_port = free_udp_port(), free_udp_port()
    keys = folder / "keys"
    made = subprocess.run(
        [program("coap-keys"), str(keys), "--server-port", str(server_port),
         "--proxy-port", str(proxy_port)], capture_output=True, timeout=60,
    )
    assert made.returncode == 0, made.stderr
    run = Run(folder)
    run.server_port = server_port  # type: ignore[attr-defined]
    run.keys = keys  # type: ignore[attr-defined]
    server = subprocess.Popen(
        [program("coap-server"), "--config", str(keys / "server.toml"), "-v",
         "--listen", f"coaps://127.0.0.1:{server_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=folder,
    )
    proxy_log = folder / "proxy.jsonl"
    proxy = subprocess.Popen(
        [program("coap-proxy"), "--config", str(keys / "proxy.toml"),
         "--listen", f"coaps://127.0.0.1:{proxy_port}", "--log-file", str(proxy_log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=folder,
    )
    server_out, proxy_out = bytearray(), bytearray()
    try:
        wait_for_line(server, "stdout", b"listening coaps://", 30, server_out)
        wait_for_line(proxy, "stdout", b"ready", 30, proxy_out)
        via = ["-P", f"coaps://127.0.0.1:{proxy_port}"]
        client(run, "layer1", *via, "--credentials", str(keys / "client-hop.json"))
        client(run, "layer1-rpk", *via, "--credentials", str(keys / "client-hop-rpk.json"))
        # client.toml holds every end-to-end kind; --e2e-auth picks one per run.
        client(run, "layer0-dtls", "--config", str(keys / "client.toml"), "--layer0", "dtls",
               "--e2e-auth", "psk")
        client(run, "layer0-rpk", "--config", str(keys / "client.toml"), "--layer0", "dtls",
               "--e2e-auth", "rpk")
        client(run, "oscore", "--config", str(keys / "client.toml"), "--layer0", "oscore",
               "--e2e-auth", "cert")
    finally:
        s_out, s_err = stop(server)
        p_out, p_err = stop(proxy)
    run.logs["coap-server stdout"] = bytes(server_out) + s_out
    run.logs["coap-server stderr"] = s_err
    run.logs["coap-proxy stdout"] = bytes(proxy_out) + p_out
    run.logs["coap-proxy stderr"] = p_err
    run.logs["coap-proxy log file"] = proxy_log.read_bytes()
    yield run


def test_every_mode_carried_the_payload_and_was_logged(full_run: Run) -> None:
    """The run did what it claims: each mode delivered the marker, and the logs are not empty
    (an empty log would pass every search below)."""
    assert full_run.outputs == {m: MARKER.encode() for m in MODES}
    server_log = full_run.logs["coap-server stderr"]
    assert b"layer1 handshake" in server_log  # -v logs at INFO
    assert b"established (psk" in server_log and b"established (x509" in server_log
    assert b"established (rpk" in server_log
    exchanges = [json.loads(line) for line in full_run.logs["coap-proxy log file"].splitlines()
                 if b'"exchange"' in line]
    paths = {e["routing"].get("uri_path") for e in exchanges}
    assert "/echo" in paths  # Layer 1 only: the proxy sees the path
    assert any(p and p.startswith("/.well-known/atls") for p in paths)  # Layer 0
    assert None in paths  # OSCORE: Uri-Path travels encrypted, the proxy never sees it
    for mode in MODES:
        assert b"response: 2.04" in full_run.logs[f"coap-client {mode} stderr"]


def test_no_key_appears_in_any_log(full_run: Run) -> None:
    keys = full_run.keys  # type: ignore[attr-defined]
    found = secrets_of(keys)
    # the search itself works: each secret is found where it is stored
    stored = b"".join(p.read_bytes() for p in sorted(keys.iterdir()) if p.is_file())
    # 3 PSKs; 2 CA, 4 certificate and 5 raw-public-key private keys (2 end to end, 3 Layer 1)
    assert len(found) == 3 + 11 and all(any(f in stored for f in forms) for forms in found.values())
    leaks = [
        (what, log_name)
        for what, forms in secrets_of(full_run.keys).items()  # type: ignore[attr-defined]
        for log_name, text in full_run.logs.items()
        if any(form in text for form in forms)
    ]
    assert leaks == []


@pytest.mark.parametrize("log_name", [
    "coap-proxy stdout", "coap-proxy stderr", "coap-proxy log file", "coap-server stdout",
    *(f"coap-client {m} {s}" for m in MODES for s in ("stdout", "stderr")),
])
def test_no_payload_appears_in_the_logs(full_run: Run, log_name: str) -> None:
    assert MARKER.encode() not in full_run.logs[log_name]


def test_no_payload_appears_in_the_server_log(full_run: Run) -> None:
    assert MARKER.encode() not in full_run.logs["coap-server stderr"]


def test_psk_file_readable_by_others_is_warned_about(tmp_path: Path) -> None:
    psk_file = tmp_path / "psk.json"
    psk_file.write_text(json.dumps({"dev": "0x" + secrets.token_hex(16)}))
    psk_file.chmod(0o644)
    server = subprocess.Popen(
        [program("coap-server"), "--psk-file", str(psk_file), "--listen", "coaps://127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    seen = bytearray()
    try:
        line = wait_for_line(server, "stderr", b"accessible by other users", 30, seen)
    finally:
        stop(server)
    text = line.decode()
    assert str(psk_file) in text and "mode 644" in text and f"chmod 600 {psk_file}" in text
    assert not re.search(r"[0-9a-f]{32}", text)  # the warning names the file, never the key
    psk_file.chmod(0o600)
    quiet = subprocess.Popen(
        [program("coap-server"), "--psk-file", str(psk_file), "--listen", "coaps://127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    seen = bytearray()
    try:
        wait_for_line(quiet, "stdout", b"listening", 30, seen)
    finally:
        _, err = stop(quiet)
    assert b"accessible by other users" not in err
