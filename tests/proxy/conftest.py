"""Fixtures for the proxy tests: the origin server and coap-proxy as real processes.

Each process prints what it bound on stdout; the helpers read those lines with a bound on every
wait, so no test sleeps to synchronise. Logs go to files (a full stderr pipe would stall the
proxy under load).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiocoap
import pytest

from tests.conftest import LOOPBACK_ALLOWED, PROXY, proxy_command
from tests.conftest import stop_process as _stop

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Running:
    """A started process and what it reported."""

    proc: asyncio.subprocess.Process
    listen: list[str] = field(default_factory=list)
    metrics: str | None = None
    log_file: Path | None = None
    stderr_file: Path | None = None

    @property
    def hostport(self) -> str:
        return self.listen[0].split("://", 1)[1]

    @property
    def port(self) -> int:
        return int(self.listen[0].rsplit(":", 1)[1])

    def log_lines(self) -> list[dict[str, object]]:
        assert self.log_file is not None
        return [json.loads(line) for line in self.log_file.read_text().splitlines() if line]

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)


async def _read_until(proc: asyncio.subprocess.Process, last: str, timeout: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"process did not print {last!r} within {timeout} s: {lines}")
        raw = await asyncio.wait_for(proc.stdout.readline(), remaining)
        if not raw:
            raise RuntimeError(f"process exited ({await proc.wait()}) before {last!r}: {lines}")
        line = raw.decode().strip()
        lines.append(line)
        if line.startswith(last):
            return lines


async def start_origin(tmp: Path) -> Running:
    err = tmp / f"origin-{os.urandom(3).hex()}.err"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.proxy.echo_server", "127.0.0.1", "0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=open(err, "wb"),
    )
    lines = await _read_until(proc, "listen ", 20)
    return Running(proc, [lines[-1].split()[1]], stderr_file=err)


async def start_proxy(
    tmp: Path, *args: str, listen: str = "coap://127.0.0.1:0",
    program: Sequence[str] = (PROXY,), env: Mapping[str, str] | None = None,
    allow: tuple[str, ...] = LOOPBACK_ALLOWED, amplification: bool = False,
) -> Running:
    """coap-proxy (tests/conftest.py's command) once it printed ``ready``.

    The 3x rule is off unless ``amplification``: the origin here reports each request's
    options in its answer, so the blocks a cut answer is fetched in would not fit together
    (test_amplification.py tests the rule with origins that answer alike).
    """
    command = proxy_command(tmp, *args, program=program, listen=listen, allow=allow,
                            amplification=amplification)
    proc = await asyncio.create_subprocess_exec(
        *command.argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=open(command.err_file, "wb"),
    )
    try:
        lines = await _read_until(proc, "ready", 20)
    except BaseException:
        await _stop(proc)
        raise
    run = Running(proc, log_file=command.log_file, stderr_file=command.err_file)
    for line in lines:
        word, _, value = line.partition(" ")
        if word == "listening":
            run.listen.append(value)
        elif word == "metrics":
            run.metrics = value
    return run


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[Running]:
    run = await start_origin(tmp_path)
    try:
        yield run
    finally:
        await _stop(run.proc)


@pytest.fixture
async def proxies(tmp_path: Path) -> AsyncIterator[list[Running]]:
    """Append started proxies (``await start_proxy(...)``) to this list; all are stopped."""
    started: list[Running] = []
    try:
        yield started
    finally:
        for run in started:
            await _stop(run.proc)


@pytest.fixture
async def client() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield ctx
    finally:
        await ctx.shutdown()


async def http_get(url: str, timeout: float = 5.0) -> str:
    """A plain HTTP/1.0 GET (the metrics endpoint), bounded."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host.strip("[]"), int(port)), timeout
    )
    writer.write(f"GET /{path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200"), head
    return body


async def poll_metric(proxy: Running, name: str, want: float, timeout: float = 10.0) -> None:
    """Wait (bounded) until a metric sample of ``proxy`` has the wanted value."""
    assert proxy.metrics is not None
    deadline = asyncio.get_running_loop().time() + timeout
    while (value := metric(await http_get(proxy.metrics), name)) != want:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{name} = {value}, not {want} within {timeout} s")
        await asyncio.sleep(0.02)


def metric(text: str, name: str) -> float:
    """The value of one sample line (name including labels) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
