"""JSON-lines logging: one line per forwarded exchange, plus the proxy's own events.

Each line is a JSON object with ``ts`` (Unix time) and ``event``. Payloads and key material are
never passed in, so they cannot end up in a log; only outer routing options, codes, sizes and
latencies are (see ``site.routing_fields``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO


class JsonLinesFormatter(logging.Formatter):
    """Formats records carrying a ``fields`` dict as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"ts": round(record.created, 6)}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            data.update(fields)
        else:
            data["event"] = "log"
            data["level"] = record.levelname.lower()
            data["logger"] = record.name
            data["message"] = record.getMessage()
        return json.dumps(data, separators=(",", ":"), default=str)


_dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode


EXCHANGE_LINE_RATE = 2000.0
"""Exchange lines per second at most (a burst of as many): well above what one proxy forwards
in coap-bench, far below what fills a disk."""


class AccessLog:
    """Where exchange and event lines go (a file in append mode, or a stream).

    Exchange lines, one per request, are written straight to the handler's stream (one write
    and one flush each, so a reader sees a line as soon as its answer is sent) instead of
    through a ``LogRecord`` and a formatter; they are the same JSON objects. Events and
    aiocoap's own messages go through ``logging``.
    """

    def __init__(self, path: str | None = None, stream: TextIO | None = None,
                 exchange_rate: float = EXCHANGE_LINE_RATE) -> None:
        # Exchange lines: a token bucket of exchange_rate lines per second (as many at
        # once; 0: no bound), so that a flood of requests cannot fill the disk; what it
        # holds back is counted in an "exchanges_held_back" event before the next line.
        self._rate = exchange_rate
        self._tokens = exchange_rate
        self._refilled = time.monotonic()
        self._held = 0
        # One of coap-proxy's workers: its index in every exchange line (after "ts").
        self.tag = ""
        self.logger = logging.getLogger(f"coaplayers.proxy.access.{id(self):x}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        handler: logging.Handler
        if path is not None:
            handler = logging.FileHandler(path, encoding="utf-8")
        else:
            handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonLinesFormatter())
        # Its stream is open from here on (no delay=True): exchange() writes to it directly.
        self.handler: logging.StreamHandler[Any] = handler
        self.logger.addHandler(handler)

    def exchange(self, entry: dict[str, Any]) -> None:
        if self._rate:
            now = time.monotonic()
            self._tokens = min(self._rate, self._tokens + (now - self._refilled) * self._rate)
            self._refilled = now
            if self._tokens < 1:
                self._held += 1
                return
            self._tokens -= 1
            if self._held:
                held, self._held = self._held, 0
                self.event("exchanges_held_back", count=held)
        # Same line as JsonLinesFormatter's: "ts" first, then the entry's fields in order.
        body = _dumps(entry)
        line = ('{"ts":' + repr(round(time.time(), 6)) + self.tag
                + ("," + body[1:] if entry else "}") + "\n")
        handler = self.handler
        handler.acquire()
        try:
            stream = handler.stream
            stream.write(line)
            stream.flush()
        except (OSError, ValueError):  # a full disk or a closed stream must not stop proxying
            pass
        finally:
            handler.release()

    def event(self, event: str, **fields: Any) -> None:
        self.logger.info(event, extra={"fields": {"event": event, **fields}})

    def close(self) -> None:
        if self._held:
            held, self._held = self._held, 0
            self.event("exchanges_held_back", count=held)
        self.logger.removeHandler(self.handler)
        self.handler.close()
