"""The one-machine demo: one short story per mode, told by the three parties that took part.

All on loopback, all real processes::

    coap-client ==hop 1: coaps==> coap-proxy --hop 2: coap--> tap (coap-relay) --> coap-server

In every mode the client sends the same ``POST /echo`` with a marker in its payload. Each
scene shows what the client sent and got back, what the proxy forwarded (the tap on hop 2)
and what the server's application received (``coap-server -v``), and whether the marker
crossed the proxy in clear; a summary ends the run.

The last two scenes are the Layered DTLS draft's Figure 2: the proxy speaks CoAP to the client
and HTTP to a second coap-server listening on http://, through a TCP tap that records the HTTP
hop; Layer 0 and OSCORE cross the change of protocol unread.

The last scene loses a proxy: the client keys OSCORE through proxy A, A is killed, and the
next request through proxy B (as a load balancer would send it) starts a new Layer 1 session
but no new end-to-end handshake: the end-to-end state lives at the two ends.

Hop 2 is plain CoAP on purpose: the proxy ends Layer 1 on both of its sides, so whatever it
forwards it holds in clear, and the tap shows exactly that. Deployed, hop 2 is coaps:// as
well (compose.yaml, docs/DEPLOY.md): that hides it from the wire, not from the proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiocoap

from coaplayers.httpmap import oscore_option
from coaplayers_tools.relay import Direction, read_capture

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
        # Every scene is a first run (a handshake to show), whatever earlier runs of
        # coap-client kept in the user's state folder; the one scene about kept state
        # names a folder of its own.
        if "--state-dir" not in argv:
            argv = ("--no-keep", *argv)
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
        _, http_line = self.start(
            "server-http", "coap-server", "--config", str(creds / "server.toml"),
            "--listen", "http://127.0.0.1:0", "-v",
        )
        self.http_tap = HttpTap(int(http_line.rsplit(":", 1)[1]))
        http_target = f"http://127.0.0.1:{self.http_tap.port}"
        access_log = self.dir / "proxy-access.jsonl"
        proxy_args = [
            "coap-proxy", "--listen", "coaps://127.0.0.1:0",
            "--psk-file", str(creds / "proxy-psk.json"), "--log-file", str(access_log),
            "--rpk-key", str(creds / "proxy-rpk.key"),
            "--rpk-trust", str(creds / "client-hop-rpk.pub"),
            # Forward proxying reaches only what is allowed: the relay in front of the
            # application server and the HTTP tap in front of its web twin.
            *_allow(relay_addr, f"127.0.0.1:{self.http_tap.port}"),
        ]
        proxy_proc, proxy_line = self.start("proxy", *proxy_args)
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
        print(f"  client   coap-client, through the proxy {proxy_uri}")
        print(f"  proxy    {proxy_uri}  hop 1 is coaps (Layer 1 DTLS: PSK or raw public keys)")
        print(f"  tap      {relay_addr}  hop 2, between the proxy and the server")
        print(f"  server   {server_uri}  the application server")
        print(f"  web      {http_line.split()[-1]}  the same server on HTTP (scenes 7-8), its tap"
              f" on {http_target.removeprefix('http://')}")
        print(f"  keys     {creds}  (coap-keys: separate keys per layer)")
        print("  Hop 2 is plain CoAP here on purpose: the proxy ends Layer 1 on both sides, so")
        print("  it holds in clear whatever it forwards, and the tap on hop 2 shows exactly")
        print("  that. Deployed, hop 2 is coaps too (docs/DEPLOY.md): that hides it from the")
        print("  wire, not from the proxy.")
        modes = [
            ("Layer 1 only", "hop-by-hop DTLS only: the proxy decrypts and re-encrypts each hop",
             hop1),
            ("Layer 0 DTLS (PSK)", "end-to-end DTLS inside CoAP payloads, with a pre-shared key",
             [*hop1, "--layer0", "dtls", *e2e_psk]),
            ("Layer 0 DTLS (certificates)", "end-to-end DTLS inside CoAP payloads, X.509 on both"
             " sides", [*hop1, "--layer0", "dtls", *e2e_cert]),
            ("Layer 0 DTLS (raw public keys, RFC 7250)", "end-to-end DTLS inside CoAP payloads,"
             " each side pinning the other's key", [*hop1, "--layer0", "dtls", *e2e_rpk]),
            ("OSCORE mode", "one end-to-end DTLS handshake keys OSCORE (RFC 8613), which then"
             " protects each request", [*hop1, "--layer0", "oscore", *e2e_cert]),
            ("Layer 1 and Layer 0 with raw public keys", "raw public keys at both layers, each"
             " layer with its own key pairs", [*hop1_rpk, "--layer0", "dtls", *e2e_rpk]),
            ("CoAP to HTTP: Layer 0 DTLS (PSK)", "Figure 2: CoAP to the proxy, HTTP on to the"
             " server; the Layer 0 records cross unread",
             [*hop1, "--layer0", "dtls", *e2e_psk]),
            ("CoAP to HTTP: OSCORE mode", "Figure 2 with OSCORE: its option rides the OSCORE"
             " header field (RFC 8613 section 11)", [*hop1, "--layer0", "oscore", *e2e_cert]),
        ]
        outcomes = []
        for number, (title, what, argv) in enumerate(modes, 1):
            print(_banner(f"{number}/{len(modes)} {title}"))
            if title.startswith("CoAP to HTTP"):
                outcome = self.show_mode(what, argv, http_target, self.http_tap, access_log,
                                         self.dir / "server-http.log")
            else:
                outcome = self.show_mode(what, argv, target, UdpTap(capture), access_log,
                                         self.dir / "server.log")
            outcomes.append((title, outcome))
        failures = sum(1 for _, outcome in outcomes if outcome is None)
        print(_banner("summary" if not failures else f"summary: {failures} mode(s) FAILED"))
        print(f"  {'mode':<42} {'requests on hop 2':>17}  marker in clear at the proxy")
        for title, outcome in outcomes:
            if outcome is None:
                print(f"  {title:<42} {'FAILED':>17}")
                continue
            count, clear = outcome
            print(f"  {title:<42} {count:>17}  {'YES' if clear else 'no'}")
        if not failures:
            print("  The proxy routed every request on outer options. With Layer 1 alone it read")
            print(f"  the marker {MARKER!r}, and could have changed it; with Layer 0 and OSCORE it")
            print("  forwarded only ciphertext that it can neither read nor alter unnoticed.")
        carried_on = self.show_proxy_loss(
            proxy_proc, proxy_uri, proxy_args, creds, [*e2e_cert], f"{target}/echo")
        return 1 if failures or not carried_on else 0

    def show_proxy_loss(self, proxy_a: subprocess.Popen[str], proxy_a_uri: str,
                        proxy_args: list[str], creds: Path, e2e: list[str], uri: str) -> bool:
        """The layered design's payoff: a second proxy (as behind a load balancer) takes over
        when the first dies; Layer 1 starts again with it, the end-to-end state does not."""
        access_b = self.dir / "proxy-b-access.jsonl"
        args_b = [a if a != str(self.dir / "proxy-access.jsonl") else str(access_b)
                  for a in proxy_args]
        _, line_b = self.start("proxy-b", *args_b)
        proxy_b_uri = line_b.split()[-1]
        state = self.dir / "client-state"  # what coap-client keeps between runs

        def request(proxy: str, text: str) -> tuple[bool, dict[str, str]]:
            result = self.client("-v", "-m", "post", "-e", text, "-P", proxy, "--credentials",
                                 str(creds / "client-hop.json"), "--layer0", "oscore", *e2e,
                                 "--state-dir", str(state), uri)
            layers = dict(line.strip().partition(": ")[::2]
                          for line in result.stderr.splitlines()
                          if line.strip().startswith(("layer 1: ", "layer 0: ")))
            return result.returncode == 0 and result.stdout.strip() == text, layers

        print(_banner("losing a proxy"))
        print(f"  Two proxies (A {proxy_a_uri}, B {proxy_b_uri}), as behind a load balancer.")
        print("  The client's first request goes through A and keys OSCORE with the server")
        print("  (one end-to-end handshake); then A is killed and the client turns to B.")
        ok_a, via_a = request(proxy_a_uri, "through A")
        proxy_a.kill()
        proxy_a.wait(timeout=10)
        ok_b, via_b = request(proxy_b_uri, "through B")
        for who, layers, ok in (("via A", via_a, ok_a), ("via B", via_b, ok_b)):
            for name in ("layer 1", "layer 0"):
                if name in layers:
                    print(textwrap.fill(layers[name], 100, initial_indent=(
                        f"  client   {who:<7} {name}  " if name == "layer 1" else
                        f"{'':<19}{name}  "), subsequent_indent=" " * 28))
            if not ok:
                print(f"  client   {who}: FAILED")
            if who == "via A":
                print("  proxy A  killed")
        kept = ok_a and ok_b and "kept" in via_b.get("layer 0", "")
        if kept:
            print("  The hop changed and Layer 1 handshook again, with B; the OSCORE context lives")
            print("  at the server and the client, not in a proxy, so it carried on: no new")
            print("  end-to-end handshake. A running client's Layer 0 DTLS session carries on the")
            print("  same way (tests/deploy/test_loadbalancer.py: nginx, two proxies, one killed).")
        else:
            print("  FAILED: the end-to-end state did not carry on through the other proxy")
        return kept

    def show_mode(self, what: str, argv: list[str], target: str, tap: UdpTap | HttpTap,
                  access_log: Path, server_log: Path) -> tuple[int, bool] | None:
        """One scene; returns (requests on hop 2, marker in clear) or None if it failed."""
        print(f"  {what}")
        tap.mark()
        log_before = len(_lines(access_log))
        server_before = len(_lines(server_log))
        payload = f"{MARKER}: 21.5 C"
        result = self.client(
            "-v", "-m", "post", "-e", payload, "-t", "text/plain", *argv, f"{target}/echo"
        )
        ok = result.returncode == 0 and result.stdout.strip() == payload
        print(f"  client   sent     POST /echo {payload!r}")
        layers = dict(line.strip().partition(": ")[::2] for line in result.stderr.splitlines()
                      if line.strip().startswith(("layer 1: ", "layer 0: ")))
        for name in ("layer 1", "layer 0"):  # the hop first, then end to end
            if name in layers:
                details = layers[name].replace(", resumed False", "")
                print(textwrap.fill(details, 100, initial_indent=f"           {name}  ",
                                    subsequent_indent=" " * 20))
        # The proxy: who it took the requests from (hop 1), what it forwarded (hop 2).
        identities = []
        for entry in _lines(access_log)[log_before:]:
            try:
                ident = json.loads(entry).get("identity")
            except ValueError:
                continue
            if ident and ident not in identities:
                identities.append(ident)
        rows, clear = tap.since_mark()
        source = f" from {', '.join(identities)}" if identities else ""
        plural = "" if len(rows) == 1 else "s"
        print(f"  proxy    hop 1: took the client's requests{source} (its Layer 1 identity)")
        print(f"           hop 2: forwarded {len(rows)} {tap.kind}request{plural},"
              " each with its answer:")
        for row in rows:
            print(f"             {row}")
        print(f"           the marker in clear: {'YES' if clear else 'no'}")
        # What the application saw, after Layer 0 / OSCORE were removed (coap-server -v).
        received = [line.split(" INFO ", 1)[-1] for line in _lines(server_log)[server_before:]
                    if " coap-server.requests " in line]
        for number, line in enumerate(received):
            print(f"  {'server' if number == 0 else '':<8} received {line}")
        got = repr(result.stdout.strip()) if result.stdout.strip() else "nothing"
        print(f"  client   got back {got}" + (
            "" if ok else f"   FAILED (exit {result.returncode}): {_last(result.stderr)}"))
        return (len(rows), clear) if ok else None


def _allow(*targets: str) -> list[str]:
    """``--allow`` for each target (coap-proxy's forward proxying is closed by default)."""
    from dataclasses import fields

    from coaplayers.proxy.config import ProxyConfig

    if "allow" not in {f.name for f in fields(ProxyConfig)}:
        return []
    return [a for t in targets for a in ("--allow", t)]


class UdpTap:
    """Hop 2 as coap-relay recorded it: CoAP datagrams."""

    kind = ""

    def __init__(self, capture: Path) -> None:
        self.capture = capture
        self.seen = 0

    def mark(self) -> None:
        self.seen = len(read_capture(self.capture)) if self.capture.exists() else 0

    def since_mark(self) -> tuple[list[str], bool]:
        datagrams = read_capture(self.capture)[self.seen:] if self.capture.exists() else []
        rows = []
        for request, response in _exchanges(datagrams):
            content = _content(request)
            answer = "-> (no answer)"
            if response is not None:
                answer = f"-> {response.code.dotted} {len(response.payload):>4} B"
                if _content(response, request) != content:  # only what the answer adds
                    answer += f"  {_content(response, request)}"
            rows.append(f"{_target(request):<22} {len(request.payload):>4} B  "
                        f"{content:<21} {answer}")
        return rows, any(MARKER.encode() in d.data for d in datagrams)


class HttpTap:
    """Hop 2 of Figure 2: a TCP relay in front of the HTTP server that records both
    directions (threads: the demo itself runs no event loop)."""

    kind = "HTTP "

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.chunks: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.seen = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            for a, b, who in ((conn, up, "up"), (up, conn, "down")):
                threading.Thread(target=self._pump, args=(a, b, who), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, who: str) -> None:
        try:
            while chunk := src.recv(65536):
                with self.lock:
                    self.chunks.append((who, chunk))
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def mark(self) -> None:
        with self.lock:
            self.seen = len(self.chunks)

    def since_mark(self) -> tuple[list[str], bool]:
        with self.lock:
            chunks = self.chunks[self.seen:]
        up = b"".join(c for who, c in chunks if who == "up")
        down = b"".join(c for who, c in chunks if who == "down")
        requests, answers = _http_messages(up), _http_messages(down)
        rows = []
        for i, (head, body) in enumerate(requests):
            method, path = [*head[0].split(" "), "", ""][:2]
            fields = {name.lower(): value for name, _, value in
                      (line.partition(": ") for line in head[1:])}
            kid = None
            if "oscore" in fields:
                try:
                    kid = _oscore_kid(oscore_option(fields["oscore"]))
                except ValueError:
                    kid = None
            if "oscore" in fields:
                what = "OSCORE ciphertext"
            elif body[1:3] in (b"\xfe\xfd", b"\xfe\xff"):  # a record header first
                what = _DTLS.get(body[0], "DTLS records")
            else:  # the handshake tag first (docs/PROTOCOL.md 3.3), or nothing
                what = "DTLS records" if body else "(empty)"
            answer = "-> (no answer)"
            if i < len(answers):
                status, answer_body = answers[i]
                answer = f"-> {status[0].split(' ', 1)[1][:3]} {len(answer_body):>4} B"
            target = f"{method} {path}" + (f" kid {kid}" if kid else "")
            rows.append(f"{target:<22} {len(body):>4} B  {what:<21} {answer}")
        return rows, MARKER.encode() in up + down


def _http_messages(data: bytes) -> list[tuple[list[str], bytes]]:
    """HTTP/1.1 messages (head lines, body) in one direction of a connection's bytes; bodies
    by Content-Length (what the proxy and uvicorn send here)."""
    out = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip() or 0)
        out.append((lines, rest[:length]))
        data = rest[length:]
    return out


def _exchanges(datagrams: list[Any]) -> list[tuple[aiocoap.Message, aiocoap.Message | None]]:
    """The requests the proxy sent on hop 2, each with its answer (matched by token)."""
    requests: list[aiocoap.Message] = []
    answers: dict[bytes, aiocoap.Message] = {}
    for d in datagrams:
        try:
            msg = aiocoap.Message.decode(d.data)
        except Exception:  # not CoAP: nothing the proxy forwarded
            continue
        if d.direction is Direction.UP and msg.code.is_request():
            if all(msg.mid != r.mid for r in requests):  # not a retransmission
                requests.append(msg)
        elif d.direction is Direction.DOWN and msg.code.is_response():
            answers.setdefault(msg.token, msg)
    return [(r, answers.get(r.token)) for r in requests]


def _target(msg: aiocoap.Message) -> str:
    path = "/" + "/".join(msg.opt.uri_path)
    kid = _oscore_kid(msg.opt.oscore)
    return f"{msg.code.name} {path}" + (f" kid {kid}" if kid else "")


def _oscore_kid(value: bytes | None) -> str | None:
    """The kid in an OSCORE option (RFC 8613 6.1), which a proxy sees in every request."""
    if not value:
        return None
    flags, rest = value[0], value[1 + (value[0] & 0x07):]
    if flags & 0x10 and rest:  # kid context: a length byte, then the context
        rest = rest[1 + rest[0]:]
    return rest.hex() if flags & 0x08 else None


_DTLS = {20: "DTLS ChangeCipherSpec", 21: "DTLS alert", 22: "DTLS handshake",
         23: "DTLS application data"}


def _content(msg: aiocoap.Message, request: aiocoap.Message | None = None) -> str:
    """What a payload is, as far as someone holding it without the end-to-end keys can tell."""
    data = msg.payload
    if not data:
        return "(empty)"
    if msg.opt.oscore is not None:
        return "OSCORE ciphertext"
    path = (request or msg).opt.uri_path
    if path and path[0].startswith(("~", ".well-known")):  # Layer 0's paths
        return _DTLS.get(data[0], "DTLS records")
    text = data.decode(errors="replace")
    return repr(text if len(text) <= 24 else text[:21] + "...")


def _last(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


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
