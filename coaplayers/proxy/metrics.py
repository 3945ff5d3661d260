"""The proxy's metrics, in Prometheus text format on a small HTTP endpoint.

Built on ``prometheus_client`` so that several worker processes (``coap-proxy --workers N``)
give one scrape: with ``PROMETHEUS_MULTIPROC_DIR`` set (the supervisor sets it for its
workers), every process writes its values to files there and :class:`MultiProcessMetrics`
sums them. Layer 1 registers its DTLS session and handshake counters in the same registry
(``ProxyNode.metrics``), so one scrape shows both layers. The wrappers keep the small API the
proxy uses (``inc(**labels)``, ``set``, ``observe``, gauges read from a function).
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

# No "_created" sample per counter and histogram: the names stay as they were.
prometheus_client.disable_created_metrics()

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The folder of a multi-process scrape, when this process is one of its workers."""
    return os.environ.get(MULTIPROC_ENV) or None


_CHILDREN_LIMIT = 1024  # label combinations remembered per metric (then it starts over)


class _Wrapped:
    def __init__(self, metric: Any, labelnames: Sequence[str]) -> None:
        self.metric = metric
        self.name = metric._name
        self.labelnames = tuple(labelnames)
        # Label values -> child: prometheus_client's ``labels()`` checks and formats its
        # arguments on every call, several times per request on the proxy's path.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, labels: dict[str, str]) -> Any:
        if not self.labelnames:
            if labels:
                raise ValueError(f"{self.name}: no labels, got {sorted(labels)}")
            return self.metric
        key = tuple(labels.items())
        child = self._children.get(key)
        if child is not None:
            return child
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels must be {self.labelnames}, got {sorted(labels)}")
        child = self.metric.labels(**{k: str(v) for k, v in labels.items()})
        if len(self._children) >= _CHILDREN_LIMIT:
            self._children.clear()
        self._children[key] = child
        return child

    def _samples(self, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
        out: dict[tuple[tuple[str, str], ...], float] = {}
        for family in self.metric.collect():
            for sample in family.samples:
                if sample.name == family.name + suffix or (
                        not suffix and sample.name in (family.name, family.name + "_total")):
                    out[tuple(sorted(sample.labels.items()))] = sample.value
        return out


class Counter(_Wrapped):
    """``batched`` (a worker of several): increments add up in the process and reach the
    shared files on :meth:`flush` (the node flushes every half second, and when it stops),
    instead of a locked write to a memory-mapped file for each one, several per request."""

    def __init__(self, metric: Any, labelnames: Sequence[str], batched: bool = False,
                 flushes: Sequence[Callable[[], None]] = ()) -> None:
        super().__init__(metric, labelnames)
        self._pending: dict[Any, float] | None = {} if batched else None
        self._flushes = flushes  # the registry's (MetricsRegistry.flushes)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        child = self._child(labels)
        pending = self._pending
        if pending is None or amount < 0:  # (prometheus_client refuses a negative amount)
            child.inc(amount)
        else:
            pending[child] = pending.get(child, 0.0) + amount

    def flush(self) -> None:
        pending = self._pending
        if pending:
            due = list(pending.items())
            pending.clear()
            for child, amount in due:
                child.inc(amount)

    def get(self, **labels: str) -> float:
        for flush in self._flushes:
            flush()
        self.flush()
        return self._samples().get(tuple(sorted((k, str(v)) for k, v in labels.items())), 0.0)


class Gauge(_Wrapped):
    def __init__(self, metric: Any, labelnames: Sequence[str],
                 func: Callable[[], float] | None) -> None:
        super().__init__(metric, labelnames)
        self.func = func

    def set(self, value: float, **labels: str) -> None:
        self._child(labels).set(value)

    def refresh(self) -> None:
        if self.func is not None:
            self.metric.set(self.func())


class Histogram(_Wrapped):
    def __init__(self, metric: Any, buckets: Sequence[float]) -> None:
        super().__init__(metric, ())
        self.buckets = (*sorted(buckets), math.inf)

    def observe(self, value: float, **labels: str) -> None:
        self._child(labels).observe(value)

    def cumulative(self) -> list[int]:
        """Observations <= each bucket bound (the ``_bucket`` samples), +Inf last."""
        counts: list[int] = []
        for family in self.metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    counts.append(int(sample.value))
        return counts


class MetricsRegistry:
    """Named metrics rendered together; registering a name twice returns the first metric.

    In a worker of a multi-process proxy (``PROMETHEUS_MULTIPROC_DIR`` set), gauges read from
    a function, and the counters' increments, are written by :meth:`refresh` (the node calls
    it periodically and when it stops), since the scraping process cannot call into the
    workers.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, Any] = {}
        self.multiprocess = multiprocess_dir() is not None
        # Called before every scrape and refresh: code that counts in plain integers on a
        # hot path (the proxy's fast path) adds them to the metrics there.
        self.flushes: list[Callable[[], None]] = []

    def _get(self, name: str, kind: type) -> Any:
        existing = self._metrics.get(name)
        if existing is not None and not isinstance(existing, kind):
            raise ValueError(f"metric {name} already registered as another kind")
        return existing

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        m = self._get(name, Counter)
        if m is None:
            m = self._metrics[name] = Counter(prometheus_client.Counter(
                name, help, labelnames, registry=self.registry), labelnames,
                batched=self.multiprocess, flushes=self.flushes)
        return m

    def gauge(
        self, name: str, help: str, labelnames: Sequence[str] = (),
        func: Callable[[], float] | None = None,
    ) -> Gauge:
        m = self._get(name, Gauge)
        if m is None:
            # Across workers: the sum of the live processes' values.
            metric = prometheus_client.Gauge(name, help, labelnames, registry=self.registry,
                                             multiprocess_mode="livesum")
            if func is not None and not self.multiprocess:
                metric.set_function(func)
            m = self._metrics[name] = Gauge(metric, labelnames, func)
            if self.multiprocess:
                m.refresh()
        return m

    def histogram(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> Histogram:
        m = self._get(name, Histogram)
        if m is None:
            m = self._metrics[name] = Histogram(prometheus_client.Histogram(
                name, help, labelnames, registry=self.registry, buckets=buckets), buckets)
        return m

    def refresh(self) -> None:
        """Write the function-read gauges' values and the counters' increments since the last
        time (multi-process workers)."""
        for flush in self.flushes:
            flush()
        for m in self._metrics.values():
            if isinstance(m, Gauge):
                m.refresh()
            elif isinstance(m, Counter):
                m.flush()

    def render(self) -> str:
        if self.multiprocess:
            self.refresh()
        else:
            for flush in self.flushes:
                flush()
        return generate_latest(self.registry).decode()


class MultiProcessMetrics:
    """The scrape of a multi-process proxy: every worker's files in ``path``, summed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=path)

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def process_gone(self, pid: int) -> None:
        """A worker ended: its live gauges leave the sums."""
        multiprocess.mark_process_dead(pid, self.path)


class MetricsServer:
    """A minimal HTTP/1.0 responder for ``GET /metrics``; meant for a local port only."""

    def __init__(self, registry: MetricsRegistry | MultiProcessMetrics) -> None:
        self.registry = registry
        self._server: asyncio.base_events.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self.address

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while True:  # drain the headers; bounded by the timeout and the stream limit
                h = await asyncio.wait_for(reader.readline(), 5)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] in (
                "/metrics", "/"
            ):
                body = self.registry.render().encode()
                status = "200 OK"
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found\n", "404 Not Found", "text/plain"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
