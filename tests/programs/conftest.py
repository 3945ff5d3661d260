"""The installed programs as real processes: coap-keys, coap-server, coap-proxy, coap-client.

Long-running programs start once per session (session-scoped fixtures) and are read up to the
lines they print when ready (``listening URI`` for coap-server, ``ready`` for coap-proxy); every
wait is bounded and nothing sleeps to synchronise. Clients run with asyncio so that a test can
start many at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import LOOPBACK_ALLOWED, proxy_command

BIN = Path(sys.executable).parent
CLIENT = str(BIN / "coap-client")
SERVER = str(BIN / "coap-server")
PROXY = str(BIN / "coap-proxy")
KEYS = str(BIN / "coap-keys")

# Layer 1 PSKs the shared application server accepts besides coap-keys' hop-2 key.
PSK_TEXT = ("dev", "secret")
PSK_HEX = ("hexdev", "0x6b6579")  # the key is b"key"
PSK_HEX_AS_TEXT = "key"


@dataclass
class Result:
    rc: int
    out: bytes
    err: bytes
    seconds: float

    @property
    def stdout(self) -> str:
        return self.out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    def one_line_error(self) -> str:
        """The single stderr line a failure must print (asserts there is exactly one)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one stderr line, got: {self.stderr!r}"
        assert "Traceback" not in self.stderr
        return lines[0]


async def run(*argv: str, timeout: float = 40.0, stdin: bytes | None = None,
              cwd: str | Path | None = None) -> Result:
    """Run a program to completion with a bound on the wait."""
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out, err, time.monotonic() - start)


async def client(*argv: str, timeout: float = 40.0, stdin: bytes | None = None,
                 cwd: str | Path | None = None) -> Result:
    return await run(CLIENT, *argv, timeout=timeout, stdin=stdin, cwd=cwd)


def run_on_pty(argv: list[str], *, timeout: float = 40.0) -> tuple[int, bytes]:
    """Run with stdout and stderr on a pseudo-terminal; returns the exit status and what the
    terminal showed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        else:
            raise TimeoutError(f"{argv[0]} still running after {timeout} s")
        rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, bytes(shown)


@dataclass
class Running:
    """A started long-running program and what it printed when ready."""

    proc: subprocess.Popen[bytes]
    lines: list[str]
    err_file: Path
    uris: list[str] = field(default_factory=list)
    log_file: Path | None = None

    def uri(self, scheme: str, host: str = "127.0.0.1") -> str:
        for u in self.uris:
            if u.startswith(f"{scheme}://{host}:") or u.startswith(f"{scheme}://[{host}]:"):
                return u
        raise LookupError(f"no {scheme}://{host} listener in {self.uris}")

    @property
    def stderr(self) -> str:
        return self.err_file.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.proc.returncode


def start(argv: list[str], err_file: Path, *, until: str | None = None, lines: int = 1,
          timeout: float = 20.0) -> Running:
    """Start a program and read its stdout up to a line starting with ``until`` (or ``lines``
    lines). Fails with the program's stderr if it exits or stays silent."""
    err = open(err_file, "wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    err.close()
    assert proc.stdout is not None
    got: list[str] = []
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            if until is None and len(got) >= lines:
                break
            if until is not None and got and got[-1].startswith(until):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{argv[0]} printed only {got} within {timeout} s: "
                                   f"{err_file.read_text(errors='replace')[-800:]}")
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"{argv[0]} exited ({proc.wait()}) after printing {got}: "
                                   f"{err_file.read_text(errors='replace')[-800:]}")
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                got.append(line.decode().strip())
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    run = Running(proc, got, err_file)
    run.uris = [line.split()[-1] for line in got if line.startswith(("listening ", "listen "))]
    return run


def start_server(tmp: Path, *args: str, name: str = "server") -> Running:
    """coap-server; it prints one ``listening URI`` line per --listen."""
    listens = max(1, sum(1 for a in args if a == "--listen"))
    return start([SERVER, *args], tmp / f"{name}-{os.urandom(3).hex()}.err", lines=listens)


def start_proxy(tmp: Path, *args: str, name: str = "proxy", loopback: bool = True) -> Running:
    """coap-proxy (tests/conftest.py's command); forward proxying reaches the tests' loopback
    servers (``loopback``) unless ``args`` say which upstreams it may reach (``--allow``)."""
    command = proxy_command(tmp, *args, name=name, allow=LOOPBACK_ALLOWED if loopback else ())
    run = start(command.argv, command.err_file, until="ready")
    run.log_file = command.log_file
    return run


@dataclass
class Keys:
    """A credential set made by coap-keys, and the PSKs it chose."""

    dir: Path
    psk: dict[str, dict[str, str]]

    def __truediv__(self, name: str) -> Path:
        return self.dir / name

    @property
    def e2e_psk(self) -> list[str]:
        e2e = self.psk["e2e"]
        return ["--e2e-psk-identity", e2e["identity"], "--e2e-psk", e2e["key"]]

    @property
    def e2e_rpk(self) -> list[str]:
        return ["--e2e-rpk-key", str(self / "client-rpk.key"),
                "--e2e-rpk-server-key", str(self / "server-rpk.pub")]

    @property
    def e2e_cert(self) -> list[str]:
        return ["--e2e-ca", str(self / "e2e-ca.pem"), "--e2e-cert", str(self / "client-e2e.pem"),
                "--e2e-key", str(self / "client-e2e.key")]


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys") / "creds"
    done = subprocess.run([KEYS, str(folder)], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return Keys(folder, json.loads((folder / "psk.json").read_text()))


def app_server_args(keys: Keys) -> list[str]:
    """The application server every client test talks to: plain and coaps listeners, Layer 1
    PSKs (text, hex, coap-keys' hop-2 file) and a certificate, Layer 0 PSK, certificates and
    raw public keys side by side."""
    e2e = keys.psk["e2e"]
    return [
        "--listen", "coap://127.0.0.1:0", "--listen", "coaps://127.0.0.1:0",
        "--psk", ":".join(PSK_TEXT), "--psk", ":".join(PSK_HEX),
        "--psk-file", str(keys / "server-psk.json"),
        "--cert", str(keys / "server-hop.pem"), "--key", str(keys / "server-hop.key"),
        "--e2e-psk", f"{e2e['identity']}:{e2e['key']}",
        "--e2e-cert", str(keys / "server-e2e.pem"), "--e2e-key", str(keys / "server-e2e.key"),
        "--e2e-ca", str(keys / "e2e-ca.pem"),
        "--e2e-rpk-key", str(keys / "server-rpk.key"),
        "--e2e-rpk-trust", str(keys / "client-rpk.pub"),
        "-v",
    ]


@pytest.fixture(scope="session")
def app(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("app")
    server = start_server(tmp, *app_server_args(keys), name="app")
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test shows the end of the shared programs' stderr: they log every request and
    handshake, which is what tells a hung or dead server from a client bug."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name in ("app", "proxy"):
        running = getattr(item, "funcargs", {}).get(name)
        if isinstance(running, Running):
            state = "running" if running.proc.poll() is None else f"exited {running.proc.poll()}"
            report.sections.append((f"{name} ({state}) stderr, last 4000 characters",
                                    running.stderr[-4000:]))


@pytest.fixture(autouse=True)
def _shared_programs_still_run(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, the shared coap-server and coap-proxy it used must still be running:
    if one died, this test fails naming it (the report hook above adds its stderr) instead
    of every later test failing on "peer unreachable"."""
    yield
    for name in ("app", "proxy"):
        if name not in request.fixturenames:
            continue
        running: Running = request.getfixturevalue(name)
        rc = running.proc.poll()
        if rc is not None:
            pytest.fail(f"the shared {name} process exited ({rc}) during this test")


@pytest.fixture(scope="session")
def proxy(keys: Keys, app: Running, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Running]:
    """coap-proxy with a plain and a coaps listener (coap-keys' hop-1 PSK file), reaching the
    application server's coaps listener with coap-keys' hop-2 upstream credentials."""
    tmp = tmp_path_factory.mktemp("proxy")
    run = start_proxy(
        tmp, "--listen", "coap://127.0.0.1:0", "--listen", "coaps://127.0.0.1:0",
        "--psk-file", str(keys / "proxy-psk.json"),
        "--upstream-credentials", str(keys / "proxy-upstream.json"),
    )
    try:
        yield run
    finally:
        run.stop()


