"""Helpers for the deployment tests: bounded waits on processes and commands, package set-up."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def program(name: str) -> str:
    """The venv's console script (tests run with the venv's python)."""
    return str(BIN / name)


def run(
    argv: Sequence[str], *, timeout: float, check: bool = False, env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end with a bound; on check=True a failure shows its output."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str,
             interval: float = 0.1) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Background:
    """A long-running program whose stdout lines are collected by a reader thread."""

    def __init__(self, argv: Sequence[str], *, stderr_file: Path, cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.stderr_file = stderr_file
        self._err = stderr_file.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=self._err, stdin=subprocess.DEVNULL,
            text=True, env=env, cwd=cwd,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, prefix: str, timeout: float) -> str:
        """Block until a stdout line starts with ``prefix`` (bounded); fail if the program ends."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.argv[0]}...: no {prefix!r} line within {timeout} s; "
                    f"stdout {self.lines!r}; stderr {self.stderr()!r}"
                )
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=5)
                raise AssertionError(
                    f"{' '.join(self.argv)} exited {self.proc.returncode} before printing "
                    f"{prefix!r}; stdout {self.lines!r}; stderr {self.stderr()!r}"
                )
            self.lines.append(line)

    def stderr(self) -> str:
        self._err.flush()
        return self.stderr_file.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._err.close()


def ensure_debian_packages(packages: Sequence[str]) -> str | None:
    """apt-get install what is missing (idempotent); returns a reason string if that failed."""
    missing = [
        p for p in packages
        if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0
    ]
    if not missing:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"missing Debian packages {missing} and no root apt-get to install them"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    update = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True,
                            env=env, timeout=300)
    install = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if install.returncode != 0:
        return (f"apt-get install {' '.join(missing)} failed: "
                f"{(update.stderr + install.stderr)[-800:]}")
    return None


@contextlib.contextmanager
def namespaces(
    names: Sequence[str], links: Sequence[tuple[str, str, str, str]],
    addresses: Sequence[tuple[str, str, Sequence[str]]],
) -> Iterator[None]:
    """Network namespaces ``names`` joined by veth pairs ``(ns_a, dev_a, ns_b, dev_b)``, both
    ends born inside their namespaces (nothing left in the host's), with ``(ns, dev,
    [address, ...])`` (/24 each); all removed afterwards, even when the test fails."""
    made: list[str] = []

    def sh(*argv: str) -> None:
        run(argv, timeout=10, check=True)

    try:
        for name in names:
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        for ns_a, dev_a, ns_b, dev_b in links:
            sh("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth",
               "peer", "name", dev_b, "netns", ns_b)
        for name, dev, addrs in addresses:
            for addr in addrs:
                sh("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", name, "link", "set", dev, "up")
        yield
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not [ns for ns in made if ns in left], f"namespaces left behind: {left}"
