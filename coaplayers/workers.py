"""``--workers N``: one program on every core, as N processes sharing its UDP ports.

The supervisor (the process the operator started) runs no protocol itself. It starts worker
0 with the program's own arguments, reads the addresses it bound (port 0 resolved), then
starts workers 1..N-1 on exactly those addresses, one after the other, so that worker i is
the i-th socket of each port's SO_REUSEPORT group (coap-server steers datagrams by that
index, :mod:`coaplayers.steering`). It prints the addresses and ``ready`` as a single process
would, passes SIGINT/SIGTERM on, and ends every worker and exits 1 when one dies on its own
(a supervisor such as systemd or Kubernetes restarts the whole; a worker's sessions would not
survive a restart of that worker anyway).

A worker knows it is one from ``COAPLAYERS_WORKER`` (``i/N``) in its environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .errors import LocalError

WORKER_ENV = "COAPLAYERS_WORKER"
MAX_WORKERS = 64


def parse_workers(text: str | int) -> int:
    """``auto`` (the cores this process may run on) or 1..64; ValueError otherwise."""
    if text == "auto":
        try:
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
        except AttributeError:  # not Linux
            return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"workers must be a number or 'auto', not {text!r}") from None
    if not 1 <= n <= MAX_WORKERS:
        raise ValueError(f"workers must be 1 to {MAX_WORKERS}")
    return n


def worker_cpus() -> list[int]:
    """The CPUs this process may run on, in order; empty where affinity is not supported.

    Pinning each worker to one of them (``--pin-workers``) keeps it on one core's caches
    where the workers have the cores to themselves; where they share them with other busy
    processes, each still finds its caches cold after another ran, pinned or not
    (docs/BENCHMARKS.md, "2 workers against 1")."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return []


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """This process's place among the workers (``index`` of ``count``)."""

    index: int
    count: int


def worker_role() -> WorkerRole | None:
    """This process's role when a supervisor started it, else None."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, _, count = value.partition("/")
    return WorkerRole(int(index), int(count))


def without_flag(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """``argv`` without the given value-taking flags (``--flag V`` and ``--flag=V``)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        if any(arg.startswith(f + "=") for f in flags):
            continue
        out.append(arg)
    return out


class Supervisor:
    """Runs ``command`` N times as workers (see module docstring)."""

    def __init__(
        self, program: str, command: Sequence[str], count: int, *,
        env: dict[str, str] | None = None, ready_word: str = "ready",
        on_exit: Callable[[int], None] | None = None, pin: bool = False,
    ) -> None:
        self.program = program
        # --pin-workers: worker i runs on the i-th CPU this process may use (round robin).
        self.cpus = worker_cpus() if pin else []
        self.command = list(command)
        self.count = count
        self.env = dict(os.environ if env is None else env)
        self.ready_word = ready_word
        self.on_exit = on_exit  # called with each worker's pid when it has ended
        self.procs: list[asyncio.subprocess.Process] = []
        self.bound: list[str] = []
        self.extra: list[str] = []  # worker 0's other lines before "ready" (not "listening")

    async def _start(self, index: int, argv: list[str], timeout: float) -> list[str]:
        env = {**self.env, WORKER_ENV: f"{index}/{self.count}"}
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            env=env)
        self.procs.append(proc)
        if self.cpus:
            # Set before the interpreter has started a thread: every thread inherits it.
            with contextlib.suppress(OSError):
                os.sched_setaffinity(proc.pid, {self.cpus[index % len(self.cpus)]})
        assert proc.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    raise WorkerFailed(f"worker {index} exited ({await proc.wait()}) at start")
                line = raw.decode(errors="replace").strip()
                if line == self.ready_word:
                    break
                lines.append(line)
        asyncio.get_running_loop().create_task(_drain(proc.stdout))
        return lines

    async def start(self, timeout: float = 60.0) -> None:
        first = await self._start(0, self.command, timeout)
        self.bound = [line.split()[-1] for line in first if line.startswith("listening ")]
        self.extra = [line for line in first if not line.startswith("listening ")]
        rest = without_flag(self.command, ["--listen"])
        for uri in self.bound:
            rest += ["--listen", uri]
        for i in range(1, self.count):
            await self._start(i, rest, timeout)

    async def wait(self, stop: asyncio.Event) -> int:
        """Until ``stop`` is set (0) or a worker ends on its own (1); then end them all."""
        waits = {asyncio.ensure_future(p.wait()): p for p in self.procs}
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({*waits, stopper}, return_when=asyncio.FIRST_COMPLETED)
        status = 0
        if stopper not in done:
            dead = next(waits[d] for d in done)
            print(f"{self.program}: worker {self.procs.index(dead)} (pid {dead.pid}) exited"
                  f" ({dead.returncode}); stopping the others", file=sys.stderr, flush=True)
            status = 1
        stopper.cancel()
        await self.stop()
        return status

    async def stop(self, timeout: float = 20.0) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), timeout)
            except TimeoutError:
                p.kill()
                await p.wait()
            if self.on_exit is not None:
                self.on_exit(p.pid)


async def serve_supervised(
    supervisor: Supervisor, *, ready: Callable[[], Awaitable[list[str]]] | None = None,
    ready_word: str | None = None,
) -> int:
    """Start the workers, print their addresses (then ``ready``'s lines and ``ready_word``),
    wait for SIGINT/SIGTERM or a worker's death, stop them all. The exit status: 0 after a
    signal, 1 when a worker failed."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await supervisor.start()
        except (WorkerFailed, TimeoutError) as exc:
            print(f"{supervisor.program}: {exc or 'a worker did not start in time'}",
                  file=sys.stderr, flush=True)
            return 1
        lines = [f"listening {uri}" for uri in supervisor.bound]
        if ready is not None:
            lines += await ready()
        if ready_word is not None:
            lines.append(ready_word)
        print("\n".join(lines), flush=True)
        return await supervisor.wait(stop)
    finally:
        await supervisor.stop()


class WorkerFailed(LocalError, RuntimeError):
    """A worker could not start (its stderr, shared with ours, says why)."""


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


def self_command(module: str, argv: Sequence[str]) -> list[str]:
    """How to run this program again: its module under this interpreter, minus --workers."""
    return [sys.executable, "-m", module, *without_flag(argv, ["--workers"])]
