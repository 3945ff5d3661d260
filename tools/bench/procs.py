"""The processes a run starts: coap-server, coap-proxy, aiocoap-proxy, the baseline server.

Every wait is bounded, every process is started in its own process group and is ended by the
:class:`Processes` registry (SIGTERM, then SIGKILL after a grace period) whatever happens:
normal end, an exception, or Ctrl-C. Ports are ephemeral: programs that can bind port 0 do and
report what they got; the others get a port that was free a moment before (and a retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def program(name: str) -> str:
    """A console command of this environment (the venv's bin folder, else PATH)."""
    candidate = BIN / name
    return str(candidate) if candidate.exists() else name


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def uris(self, word: str) -> list[str]:
        return [ln.split(None, 1)[1] for ln in self.lines if ln.startswith(word + " ")]

    def rss(self) -> int:
        return rss_of(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_of(self.pid)


def rss_of(pid: int | str = "self") -> int:
    """Resident set size in bytes (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_of(pid: int | str = "self") -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class TaskStats:
    """A process's CPU time and context switches (Linux)."""

    cpu: float  # seconds on a CPU, every thread, also those that ended (nanoseconds)
    voluntary: int  # context switches because it waited (a sleep in epoll, say)
    involuntary: int  # context switches because the scheduler preempted it


def task_stats(pid: int) -> TaskStats:
    """:class:`TaskStats` of ``pid``. /proc/PID/stat counts CPU in clock ticks (10 ms), which
    over a window of a few seconds and several processes is off by a per cent or more; the
    process's CPU clock counts nanoseconds. Context switches are summed over the threads that
    are alive (those of an ended thread are lost: a bench's processes keep theirs)."""
    # clock_getcpuclockid(pid): the process-wide scheduler clock (linux/posix-timers.h).
    cpu = time.clock_gettime(((~pid) << 3) | 2)
    voluntary = involuntary = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        involuntary += int(line.split()[1])
        except (OSError, IndexError, ValueError):  # a thread that just ended
            continue
    return TaskStats(cpu, voluntary, involuntary)


class Processes:
    """Starts programs and guarantees they end (use as a context manager)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str], *, until: str | None, timeout: float = 30.0,
              env: dict[str, str] | None = None) -> Proc:
        """Start ``argv``; with ``until``, read stdout lines until one starts with it."""
        log = self.workdir / f"{name}.log"
        popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if until else subprocess.DEVNULL,
            stderr=open(log, "wb"),  # the child owns it
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        proc = Proc(name, popen, log=log)
        self.procs.append(proc)
        if until:
            self._read_until(proc, until, timeout)
        return proc

    def _read_until(self, proc: Proc, until: str, timeout: float) -> None:
        import selectors

        assert proc.popen.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.popen.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{proc.name} did not print {until!r} within {timeout} s"
                                       f" (log: {proc.log})")
                if not sel.select(left):
                    continue
                chunk = os.read(proc.popen.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(
                        f"{proc.name} exited ({proc.popen.wait()}) before {until!r}: "
                        f"{_tail(proc.log)}"
                    )
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    line = raw.decode(errors="replace").strip()
                    proc.lines.append(line)
                    if line.startswith(until):
                        return
        finally:
            sel.close()

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        p = proc.popen
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=grace)
        if p.stdout is not None:
            p.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            try:
                self.stop(proc)
            except Exception:  # keep stopping the others
                pass


def _tail(path: Path | None, n: int = 1500) -> str:
    if path is None or not path.exists():
        return ""
    return path.read_bytes()[-n:].decode(errors="replace")


def coap_ping(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    """Wait until a CoAP endpoint answers an empty CON (ping) with RST; bounded."""
    deadline = time.monotonic() + timeout
    mid = 0x2000
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            mid += 1
            try:
                s.sendto(struct.pack("!BBH", 0x40, 0, mid), (host, port))
                data = s.recv(64)
            except OSError:
                time.sleep(0.05)
                continue
            if data[:1] == b"\x70" and data[2:4] == struct.pack("!H", mid):
                return
    raise RuntimeError(f"nothing answered CoAP pings on {host}:{port} within {timeout} s")


def start_aiocoap_proxy(procs: Processes) -> tuple[Proc, int]:
    env = dict(os.environ, AIOCOAP_SERVER_TRANSPORT="udp6", AIOCOAP_CLIENT_TRANSPORT="udp6")
    for _ in range(5):
        port = free_udp_port()
        proc = procs.start(
            "aiocoap-proxy",
            [program("aiocoap-proxy"), "--forward", "--bind", f"127.0.0.1:{port}"],
            until=None, env=env,
        )
        try:
            coap_ping(port)
            return proc, port
        except RuntimeError:
            procs.stop(proc)
    raise RuntimeError("aiocoap-proxy did not come up")


def start_aiocoap_server(procs: Processes, oscore_dir: Path | None) -> tuple[Proc, int]:
    for _ in range(5):
        port = free_udp_port()
        argv = [sys.executable, "-m", "coaplayers_tools.bench.aioserver", "127.0.0.1", str(port)]
        if oscore_dir is not None:
            argv.append(str(oscore_dir))
        try:
            proc = procs.start("aiocoap-server", argv, until="listening")
        except RuntimeError:
            continue
        return proc, port
    raise RuntimeError("the baseline aiocoap server did not come up")


def start_coap_server(procs: Processes, creds: Path) -> tuple[Proc, str, str]:
    """coap-server with the credential set's configuration, coap:// and coaps:// listeners."""
    proc = procs.start(
        "coap-server",
        [program("coap-server"), "--config", str(creds / "server.toml"),
         "--listen", "coap://127.0.0.1:0", "--listen", "coaps://127.0.0.1:0"],
        until="listening coaps",
    )
    plain = next(u for u in proc.uris("listening") if u.startswith("coap://"))
    secure = next(u for u in proc.uris("listening") if u.startswith("coaps://"))
    return proc, plain, secure


def start_coap_proxy(procs: Processes, creds: Path) -> tuple[Proc, str, str]:
    """coap-proxy with the credential set's configuration, coap:// and coaps:// listeners."""
    proc = procs.start(
        "coap-proxy",
        [program("coap-proxy"), "--config", str(creds / "proxy.toml"),
         "--log-file", str(procs.workdir / "coap-proxy.jsonl"),
         "--listen", "coap://127.0.0.1:0", "--listen", "coaps://127.0.0.1:0",
         # the rig's servers listen on loopback ports chosen at start
         "--allow", "127.0.0.1"],
        until="ready",
    )
    plain = next(u for u in proc.uris("listening") if u.startswith("coap://"))
    secure = next(u for u in proc.uris("listening") if u.startswith("coaps://"))
    return proc, plain, secure


async def to_thread(fn, *args):  # type: ignore[no-untyped-def]
    """Blocking start-up helpers run off the event loop (the loop may own relays)."""
    return await asyncio.to_thread(fn, *args)
