"""Closed-loop load: N clients, each sending its next request when the last one was answered.

Every mode is measured the same way: a warm-up (not counted), then a fixed window in which
each answered request counts once and its latency is kept. The CPU time the processes used
during the window is read from /proc, so that CPU per request (less sensitive to what else
runs on the machine than wall-clock rates) is reported next to the rates.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from .clients import BenchClient
from .procs import TaskStats, cpu_of, task_stats

REQUEST_TIMEOUT = 30.0


@dataclass
class LoadResult:
    clients: int
    seconds: float
    completed: int
    errors: int
    latencies: list[float]
    cpu: dict[str, float]  # process name -> CPU seconds used during the window
    # With precise=True: process name -> (voluntary, involuntary) context switches.
    switches: dict[str, tuple[int, int]] | None = None

    @property
    def rps(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        k = min(len(data) - 1, max(0, round(p / 100 * (len(data) - 1))))
        return data[k]

    def as_dict(self) -> dict[str, Any]:
        per_req = {
            name: (1e6 * sec / self.completed if self.completed else None)
            for name, sec in self.cpu.items()
        }
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 3),
            "completed": self.completed,
            "errors": self.errors,
            "rps": self.rps,
            "p50_ms": 1000 * self.percentile(50),
            "p99_ms": 1000 * self.percentile(99),
            "cpu_us_per_request": per_req,
        }


async def run_load(
    clients: list[BenchClient], *, duration: float, warmup: float, pids: dict[str, int],
    rate: float | None = None, precise: bool = False,
) -> LoadResult:
    """``rate``: the clients together send at most this many requests per second (each paced
    on a fixed schedule), to compare configurations at the same load rather than each at the
    most it does. ``precise``: CPU from the per-thread schedstat (nanoseconds), and context
    switches counted."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + warmup
    measure_to = measure_from + duration
    latencies: list[float] = []
    completed = 0
    errors = 0
    cpu_start: dict[str, float] = {}
    cpu_end: dict[str, float] = {}
    stats_start: dict[str, TaskStats] = {}
    stats_end: dict[str, TaskStats] = {}

    def read_cpu(into: dict[str, float]) -> None:
        stats = stats_start if into is cpu_start else stats_end
        for name, pid in pids.items():
            try:
                if precise:
                    stats[name] = task_stats(pid)
                    into[name] = stats[name].cpu
                else:
                    into[name] = cpu_of(pid)
            except OSError:
                pass
        into["client (coap-bench)"] = time.process_time()

    async def marks() -> None:
        await asyncio.sleep(max(0.0, measure_from - loop.time()))
        read_cpu(cpu_start)
        await asyncio.sleep(max(0.0, measure_to - loop.time()))
        read_cpu(cpu_end)

    async def one(client: BenchClient, index: int) -> None:
        nonlocal completed, errors
        period = len(clients) / rate if rate else 0.0
        due = start + period * index / len(clients)  # spread over one period
        while True:
            if period:
                await asyncio.sleep(max(0.0, due - loop.time()))  # pacing, not a wait
                due += period
            t0 = loop.time()
            if t0 >= measure_to:
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await client.post()
            except Exception:  # counted; the loop goes on
                errors += 1
                await asyncio.sleep(0.05)
                continue
            t1 = loop.time()
            if measure_from <= t1 < measure_to:
                completed += 1
                if t0 >= measure_from:
                    latencies.append(t1 - t0)

    tasks = [asyncio.create_task(one(c, i)) for i, c in enumerate(clients)]
    marker = asyncio.create_task(marks())
    try:
        await asyncio.wait(
            [*tasks, marker], timeout=warmup + duration + REQUEST_TIMEOUT + 5
        )
    finally:
        for t in (*tasks, marker):
            t.cancel()
        await asyncio.gather(*tasks, marker, return_exceptions=True)
    cpu = {k: cpu_end[k] - cpu_start[k] for k in cpu_end if k in cpu_start}
    switches = {k: (stats_end[k].voluntary - stats_start[k].voluntary,
                    stats_end[k].involuntary - stats_start[k].involuntary)
                for k in stats_end if k in stats_start} if precise else None
    return LoadResult(len(clients), duration, completed, errors, latencies, cpu, switches)


async def open_clients(factory: Any, count: int, parallel: int = 10) -> list[BenchClient]:
    """``count`` clients from ``await factory()``, at most ``parallel`` handshaking at once."""
    sem = asyncio.Semaphore(parallel)

    async def make() -> BenchClient:
        async with sem:
            async with asyncio.timeout(60):
                client = await factory()
                await client.post()  # handshakes (Layer 1, Layer 0, OSCORE keying) now
                return client

    results = await asyncio.gather(*(make() for _ in range(count)), return_exceptions=True)
    clients = [r for r in results if isinstance(r, BenchClient)]
    failures = [r for r in results if not isinstance(r, BenchClient)]
    if failures:
        for c in clients:
            await c.close()
        raise RuntimeError(f"{len(failures)} of {count} clients failed to start: {failures[0]!r}")
    return clients
