"""The one-machine demo: server, proxy and client, each mode, and what every party saw.

Topology (all on loopback, all real processes)::

    coap-client --coaps (Layer 1, PSK)--> coap-proxy --coap--> coap-relay --coap--> coap-server

The second hop is plain CoAP on purpose: the relay records every byte the proxy forwards, which
is exactly what the proxy could read. With Layer 1 only, the request's payload shows up there in
clear; with Layer 0 DTLS and with OSCORE it does not. (In compose.yaml both hops are coaps.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiocoap

from .relay import Direction, read_capture

BIN = Path(sys.executable).parent
MARKER = "demo-marker-7f3a"


def _bin(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


class Demo:
    def __init__(self, workdir: Path, *, verbose: bool = False) -> None:
        self.dir = workdir
        self.verbose = verbose
        self.procs: list[subprocess.Popen[str]] = []

    # ---------------------------------------------------------------- processes

    def start(self, name: str, *argv: str) -> tuple[subprocess.Popen[str], str]:
        """Start a program and return it with the first line it prints (its address)."""
        log = open(self.dir / f"{name}.log", "w")
        proc = subprocess.Popen(
            [_bin(argv[0]), *argv[1:]], stdout=subprocess.PIPE, stderr=log, text=True
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line or proc.poll() is not None:
                break
        if not line:
            raise RuntimeError(
                f"{name} did not start: {(self.dir / f'{name}.log').read_text()[-500:]}"
            )
        return proc, line.strip()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def client(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_bin("coap-client"), *argv], capture_output=True, text=True, timeout=60
        )

    # --------------------------------------------------------------------- run

    def run(self) -> int:
        creds = self.dir / "credentials"
        subprocess.run(
            [_bin("coap-keys"), str(creds), "--server-port", "0", "--proxy-port", "0"],
            check=True, capture_output=True,
        )
        _, server_line = self.start(
            "server", "coap-server", "--config", str(creds / "server.toml"),
            "--listen", "coap://127.0.0.1:0", "-v",
        )
        server_uri = server_line.split()[-1]
        capture = self.dir / "hop2.capture"
        _, relay_line = self.start(
            "relay", "coap-relay", "--listen", "127.0.0.1:0",
            "--upstream", server_uri.removeprefix("coap://"), "--record", str(capture),
        )
        relay_addr = relay_line.split()[-1]
        access_log = self.dir / "proxy-access.jsonl"
        _, proxy_line = self.start(
            "proxy", "coap-proxy", "--listen", "coaps://127.0.0.1:0",
            "--psk-file", str(creds / "proxy-psk.json"), "--log-file", str(access_log),
            "--rpk-key", str(creds / "proxy-rpk.key"),
            "--rpk-trust", str(creds / "client-hop-rpk.pub"),
        )
        proxy_uri = proxy_line.split()[-1]
        target = f"coap://{relay_addr}"
        hop1 = ["-P", proxy_uri, "--credentials", str(creds / "client-hop.json")]
        hop1_rpk = ["-P", proxy_uri, "--credentials", str(creds / "client-hop-rpk.json")]
        psk = json.loads((creds / "psk.json").read_text())
        e2e_psk = ["--e2e-psk-identity", psk["e2e"]["identity"], "--e2e-psk", psk["e2e"]["key"]]
        e2e_cert = ["--e2e-ca", str(creds / "e2e-ca.pem"), "--e2e-cert",
                    str(creds / "client-e2e.pem"), "--e2e-key", str(creds / "client-e2e.key")]
        e2e_rpk = ["--e2e-rpk-key", str(creds / "client-rpk.key"),
                   "--e2e-rpk-server-key", str(creds / "server-rpk.pub")]
        print(_banner("coaplayers demo"))
        print(f"  application server  {server_uri}  (reached through the relay at {relay_addr})")
        print(f"  proxy               {proxy_uri}  (Layer 1 PSK or raw public keys towards"
              " the client)")
        print(f"  credentials         {creds}  (made by coap-keys; one CA per layer)\n")
        modes = [
            ("Layer 1 only", hop1),
            ("Layer 0 DTLS (PSK)", [*hop1, "--e2e", "dtls", *e2e_psk]),
            ("Layer 0 DTLS (certificates)", [*hop1, "--e2e", "dtls", *e2e_cert]),
            ("Layer 0 DTLS (raw public keys, RFC 7250)", [*hop1, "--e2e", "dtls", *e2e_rpk]),
            ("OSCORE mode", [*hop1, "--e2e", "oscore", *e2e_cert]),
            # Raw public keys at both layers, each layer with its own key pairs.
            ("Layer 1 and Layer 0 with raw public keys", [*hop1_rpk, "--e2e", "dtls", *e2e_rpk]),
        ]
        failures = 0
        for title, argv in modes:
            failures += self.show_mode(title, argv, target, capture, access_log)
        print(_banner("done" if not failures else f"{failures} mode(s) FAILED"))
        if not failures:
            print("  The proxy routed every request on outer options only; with Layer 0 and")
            print(f"  OSCORE the marker {MARKER!r} never crossed the proxy in clear, with Layer 1")
            print("  only it did: hop-by-hop security lets the proxy read everything.")
        return 1 if failures else 0

    def show_mode(self, title: str, argv: list[str], target: str, capture: Path,
                  access_log: Path) -> int:
        print(_banner(title))
        seen_before = len(read_capture(capture)) if capture.exists() else 0
        log_before = _lines(access_log)
        server_log = self.dir / "server.log"
        server_before = len(_lines(server_log))
        payload = f"{MARKER}: 21.5 C"
        result = self.client(
            "-v", "-m", "post", "-e", payload, "-t", "text/plain", *argv, f"{target}/echo"
        )
        ok = result.returncode == 0 and result.stdout.strip() == payload
        print("  client sent       POST /echo  payload " + repr(payload))
        print("  client got back   " + (repr(result.stdout.strip()) if result.stdout else "-")
              + ("" if ok else f"   FAILED (exit {result.returncode}): {result.stderr.strip()}"))
        for line in result.stderr.splitlines():
            if line.strip().startswith(("layer", "end-to-end", "oscore")):
                print("                    " + line.strip())
        entries = _lines(access_log)[len(log_before):]
        for entry in entries:
            try:
                rec = json.loads(entry)
            except ValueError:
                continue
            keys = ("method", "code", "route", "upstream", "options", "request_bytes",
                    "response_bytes", "latency_ms", "client_identity")
            shown = {k: rec[k] for k in keys if k in rec}
            print("  proxy logged      " + json.dumps(shown, sort_keys=True))
        datagrams = read_capture(capture)[seen_before:] if capture.exists() else []
        up = [d for d in datagrams if d.direction is Direction.UP]
        clear = any(MARKER.encode() in d.data for d in datagrams)
        print(f"  proxy forwarded   {len(up)} datagrams, {sum(len(d.data) for d in up)} bytes;"
              f" marker in clear: {'YES' if clear else 'no'}")
        for d in up[-2:]:  # the last ones carry the request itself
            try:
                msg = aiocoap.Message.decode(d.data)
            except Exception:
                print(f"    {d.data[:40].hex()}...")
                continue
            opts = ", ".join(
                f"{o.number.name if hasattr(o.number, 'name') else o.number}"
                f"={_short(o.value)}" for o in msg.opt.option_list()
            )
            print(f"    {msg.code} {opts}; payload {len(msg.payload)} bytes"
                  f" {msg.payload[:24].hex()}{'...' if len(msg.payload) > 24 else ''}")
        # What the application saw, after Layer 0 / OSCORE were removed (coap-server -v).
        for line in _lines(server_log)[server_before:]:
            if " coap-server.requests " in line:
                print("  server received   " + line.split(" INFO ", 1)[-1])
        return 0 if ok else 1


def _short(value: object) -> str:
    text = value.hex() if isinstance(value, bytes) else str(value)
    return text if len(text) <= 32 else text[:29] + "..."


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _banner(title: str) -> str:
    return f"\n== {title} " + "=" * max(3, 74 - len(title))


@contextmanager
def _workdir(keep: str | None) -> Iterator[Path]:
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="coaplayers-demo-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="coaplayers-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", metavar="DIR", help="keep credentials, logs and captures in DIR")
    args = p.parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    with _workdir(args.keep) as work:
        demo = Demo(work)
        try:
            return demo.run()
        finally:
            demo.stop_all()


if __name__ == "__main__":
    sys.exit(main())
