"""Shared fixtures: free ports, a demo PKI, and subprocess helpers with bounded waits."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from coaplayers import pki

# Programs the tests start inherit this: a crash in native code (tinydtls, OpenSSL, GnuTLS)
# prints the Python stack to their stderr, which the program tests show when they fail.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
# What programs keep between runs (coap-client's OSCORE contexts) goes to a folder of this test
# session, never to the user's own state folder.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="coaplayers-tests-state-")


_STARTED = pytest.StashKey[float]()
_FLAGGED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A test that outlived its timeout fails, even if it "passed".

    pytest-timeout's signal method raises its failure where the alarm finds the thread; inside
    a ``__del__`` (or anything else that swallows exceptions) the failure is lost and the test
    passes after hanging until the alarm (a real deadlock was hidden that way once).
    """
    outcome = yield
    report = outcome.get_result()
    if call.when == "setup":
        item.stash[_STARTED] = call.start  # the alarm runs from here (setup, call, teardown)
    if not report.passed or item.stash.get(_FLAGGED, False):
        return
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(
        item.config.getini("timeout") or 0
    )
    elapsed = call.stop - item.stash.get(_STARTED, call.start)
    if limit and elapsed >= limit:
        item.stash[_FLAGGED] = True
        report.outcome = "failed"
        report.longrepr = (
            f"the test ran {elapsed:.0f} s up to its {call.when}, beyond its {limit:.0f} s"
            " timeout; the timeout's failure was swallowed where it fired (e.g. inside __del__)"
        )


class UdpCollector(asyncio.DatagramProtocol):
    """Queues every datagram its socket receives (``queue``); ICMP errors are ignored (a
    peer still starting)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        pass


def free_udp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def fingerprint(key: object) -> str:
    """How coaplayers names a raw public key: the first 16 bytes of the SHA-256 of its DER
    SubjectPublicKeyInfo, in hex. Computed here with ``cryptography`` and ``hashlib``, not
    by the library under test. ``key``: a private or public key, or a PEM file of either."""
    import hashlib
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization

    if isinstance(key, Path):
        pem = key.read_bytes()
        key = (serialization.load_pem_public_key(pem) if b"PUBLIC KEY" in pem.split(b"\n")[0]
               else serialization.load_pem_private_key(pem, None))
    public = key.public_key() if hasattr(key, "public_key") else key
    der = public.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()[:16].hex()


PROXY = str(Path(sys.executable).with_name("coap-proxy"))
LOOPBACK_ALLOWED = ("--allow", "127.0.0.1", "--allow", "::1")


@dataclass(frozen=True)
class ProxyCommand:
    """How the tests start coap-proxy, and the files it writes."""

    argv: list[str]
    log_file: Path  # the JSON access log (one line per exchange)
    err_file: Path  # its stderr, shown when a test fails


def proxy_command(
    tmp: Path, *args: str, name: str = "proxy", program: Sequence[str] = (PROXY,),
    listen: str | None = None, allow: tuple[str, ...] = LOOPBACK_ALLOWED,
    amplification: bool = True,
) -> ProxyCommand:
    """coap-proxy (or ``program``, another command running it) with its log in ``tmp``.

    ``listen`` is added unless ``args`` name --listen or --config. The tests' upstreams are
    on loopback, which forward proxying reaches only when allowed: ``allow`` unless ``args``
    have --allow (``allow=()`` keeps the default, nothing). ``amplification=False`` turns the
    3x rule off, for origins whose cut answers would not fit together in blocks. Both ways of
    starting it (tests/programs, synchronously for session fixtures; tests/proxy and
    tests/faults, with asyncio) read it up to its ``ready`` line.
    """
    tag = os.urandom(3).hex()
    log = tmp / f"{name}-{tag}.jsonl"
    argv = [*program, "--log-file", str(log), *args]
    if listen is not None and "--listen" not in args and "--config" not in args:
        argv += ["--listen", listen]
    if "--allow" not in args:
        argv += allow
    if not amplification and "--amplification-factor" not in args:
        argv += ["--amplification-factor", "0"]
    return ProxyCommand(argv, log, tmp / f"{name}-{tag}.err")


def need_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian libcoap3-bin; scripts/setup installs it)")
    return path


@pytest.fixture(scope="session")
def demo_pki() -> dict[str, pki.Issued]:
    ca = pki.make_ca()
    return {
        "ca": ca,
        "server": pki.issue(ca, "server.test", names=["server.test", "127.0.0.1", "::1"]),
        "client": pki.issue(ca, "device-1"),
        "other_ca": pki.make_ca("another CA"),
    }


async def run_program(
    *argv: str, timeout: float = 30.0, stdin: bytes | None = None
) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


@asynccontextmanager
async def background(
    *argv: str, env: dict[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run a program for the duration of a block; kill it afterwards."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        yield proc
    finally:
        await stop_process(proc, 5)


async def stop_process(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> None:
    """Terminate a process and wait for it; kill it if it outlives ``timeout``."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def wait_udp_bound(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until some process has bound a UDP port (polls the kernel's socket table)."""
    deadline = asyncio.get_running_loop().time() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"nothing bound {host}:{port} within {timeout} s")
        await asyncio.sleep(0.05)


async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``predicate`` on the event loop until it holds; TimeoutError after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def argv(*parts: str | int) -> Sequence[str]:
    return [str(p) for p in parts]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(os.environ["XDG_STATE_HOME"], ignore_errors=True)
