"""Counters in Prometheus text format on a small HTTP endpoint.

A registry of our own (a few dozen lines) instead of a new dependency: the proxy needs counters,
gauges and one histogram, and Layer 1 registers its DTLS session and handshake counters in the
same registry (``ProxyNode.metrics``) so that one scrape shows both layers.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
from collections.abc import Callable, Sequence

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)

    def _key(self, labels: dict[str, str]) -> LabelValues:
        names = self.labelnames
        if len(labels) == len(names):
            try:
                return tuple([str(labels[n]) for n in names])
            except KeyError:
                pass
        raise ValueError(f"{self.name}: labels must be {names}, got {sorted(labels)}")

    def samples(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(s + "\n" for s in self.samples())


class Counter(Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self.values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.labelnames, k)} {_num(v)}"
            for k, v in sorted(self.values.items())
        ]


class Gauge(Metric):
    kind = "gauge"

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (),
        func: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(name, help, labelnames)
        self.values: dict[LabelValues, float] = {}
        self.func = func

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = value

    def samples(self) -> list[str]:
        if self.func is not None:
            return [f"{self.name} {_num(self.func())}"]
        return [
            f"{self.name}{_labels(self.labelnames, k)} {_num(v)}"
            for k, v in sorted(self.values.items())
        ]


class Histogram(Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = (*sorted(buckets), math.inf)
        # Per label set: how many observations fell in each bucket alone (not cumulative);
        # the cumulative counts Prometheus wants are summed when rendering.
        self.counts: dict[LabelValues, list[int]] = {}
        self.sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels) if labels or self.labelnames else ()
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = [0] * len(self.buckets)
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[key] = self.sums.get(key, 0.0) + value

    def cumulative(self, **labels: str) -> list[int]:
        """Observations <= each bucket bound (the ``_bucket`` samples), +Inf last."""
        counts = self.counts.get(self._key(labels), [0] * len(self.buckets))
        return list(itertools.accumulate(counts))

    def samples(self) -> list[str]:
        out = []
        for key, alone in sorted(self.counts.items()):
            counts = list(itertools.accumulate(alone))
            for bound, c in zip(self.buckets, counts, strict=True):
                le = f'le="{_num(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {c}")
            lab = _labels(self.labelnames, key)
            out.append(f"{self.name}_sum{lab} {_num(self.sums[key])}")
            out.append(f"{self.name}_count{lab} {counts[-1]}")
        return out


class MetricsRegistry:
    """Named metrics rendered together; registering a name twice returns the first metric."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def _add(self, metric: Metric) -> Metric:
        existing = self._metrics.get(metric.name)
        if existing is not None:
            if type(existing) is not type(metric):
                raise ValueError(f"metric {metric.name} already registered as {existing.kind}")
            return existing
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        m = self._add(Counter(name, help, labelnames))
        assert isinstance(m, Counter)
        return m

    def gauge(
        self, name: str, help: str, labelnames: Sequence[str] = (),
        func: Callable[[], float] | None = None,
    ) -> Gauge:
        m = self._add(Gauge(name, help, labelnames, func))
        assert isinstance(m, Gauge)
        return m

    def histogram(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> Histogram:
        m = self._add(Histogram(name, help, buckets, labelnames))
        assert isinstance(m, Histogram)
        return m

    def render(self) -> str:
        return "".join(m.render() for m in self._metrics.values())


class MetricsServer:
    """A minimal HTTP/1.0 responder for ``GET /metrics``; meant for a local port only."""

    def __init__(self, registry: MetricsRegistry) -> None:
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
