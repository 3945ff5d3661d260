"""A bound on what remote peers can make a program log.

Most log lines of a server or proxy are caused by what peers send (an unparsable datagram, a
failed handshake, a request a resource chokes on), so a peer that sends them in a loop would
otherwise fill the disk at the speed of the network, and with tracebacks. Every program
installs :class:`LogLimiter` on its handlers (:func:`install_log_limits`):

* a token bucket bounds all lines together (``rate`` per second, ``burst`` at once);
* warnings and errors of one kind (same logger, level and message template, whatever the
  arguments: the peer's address changes, the template does not) are shown ``repeats`` times
  per ``window`` and then counted;
* what was held back is summarised in one line when the window ends (on the next line
  logged, or at exit);
* a traceback becomes one line (``... (ValueError: ...)``) unless ``tracebacks`` is on
  (the programs turn it on with ``-vv``).

A logging filter, so it needs no event loop and no thread of its own.
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LogLimits:
    """``rate`` 0 turns the bound off (for debugging on a trusted network)."""

    rate: float = 50.0
    burst: int = 500
    repeats: int = 10
    window: float = 10.0
    tracebacks: bool = False

    def __post_init__(self) -> None:
        if self.rate < 0 or self.burst < 1 or self.repeats < 1 or self.window <= 0:
            raise ValueError("log limits: rate >= 0, burst and repeats >= 1, window > 0")


_SUMMARY = "_coaplayers_log_summary"


class LogLimiter(logging.Filter):
    """The bound of :class:`LogLimits` on one handler (which also writes its summaries)."""

    def __init__(self, handler: logging.Handler, limits: LogLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.handler = handler
        self.limits = limits or LogLimits()
        self.clock = clock
        now = clock()
        self._tokens = float(self.limits.burst)
        self._refilled = now
        self._window_start = now
        self._seen: dict[tuple[str, int, str], int] = {}  # this window's warnings, per kind
        self._held: dict[tuple[str, int, str], int] = {}  # this window's held-back lines
        self.suppressed = 0  # in all, since start

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY, False):
            return True
        limits = self.limits
        if limits.rate == 0:
            self._one_line(record)
            return True
        now = self.clock()
        if now - self._window_start >= limits.window:
            self.flush(now)
        key = (record.name, record.levelno, str(record.msg))
        if record.levelno >= logging.WARNING:
            seen = self._seen.get(key, 0) + 1
            if len(self._seen) < 1024 or key in self._seen:
                self._seen[key] = seen
            if seen > limits.repeats:
                return self._hold(key)
        self._tokens = min(float(limits.burst),
                           self._tokens + (now - self._refilled) * limits.rate)
        self._refilled = now
        if self._tokens < 1:
            return self._hold(key)
        self._tokens -= 1
        self._one_line(record)
        return True

    def _hold(self, key: tuple[str, int, str]) -> bool:
        self.suppressed += 1
        if len(self._held) < 1024 or key in self._held:
            self._held[key] = self._held.get(key, 0) + 1
        else:
            self._held[("", 0, "other lines")] = self._held.get(("", 0, "other lines"), 0) + 1
        return False

    def _one_line(self, record: logging.LogRecord) -> None:
        if self.limits.tracebacks or not (record.exc_info or record.stack_info):
            return
        exc = record.exc_info[1] if record.exc_info else None
        text = record.getMessage()
        if exc is not None:
            text += f" ({type(exc).__name__}: {exc})" if str(exc) else f" ({type(exc).__name__})"
        record.msg, record.args = text, None
        record.exc_info = record.exc_text = record.stack_info = None

    def flush(self, now: float | None = None) -> None:
        """Write the summary of what this window held back, and start a new window."""
        now = self.clock() if now is None else now
        held, self._held, self._seen = self._held, {}, {}
        seconds = now - self._window_start
        self._window_start = now
        if not held:
            return
        total = sum(held.values())
        (name, _, template), most = max(held.items(), key=lambda item: item[1])
        record = logging.makeLogRecord({
            "name": "coaplayers.log", "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": "held back %d log lines in %.0f s (most: %d x %r from %s)",
            "args": (total, seconds, most, template[:100], name or "-"), _SUMMARY: True,
        })
        self.handler.handle(record)


def install_log_limits(limits: LogLimits | None = None,
            handlers: Iterable[logging.Handler] | None = None) -> list[LogLimiter]:
    """Bound the given handlers (default: the root logger's stream and file handlers, as
    ``logging.basicConfig`` makes them; others, such as a test runner's capture, are left
    alone). Without any root handler, one is added that prints what logging's last resort
    would (warnings and errors, the message only), bounded. A handler is bounded once."""
    root = logging.getLogger()
    if handlers is None:
        if not root.handlers:
            fallback = logging.StreamHandler()
            fallback.setLevel(logging.WARNING)
            root.addHandler(fallback)
        handlers = [h for h in root.handlers
                    if type(h) in (logging.StreamHandler, logging.FileHandler)]
    targets = [h for h in handlers if not any(isinstance(f, LogLimiter) for f in h.filters)]
    limiters = []
    for handler in targets:
        limiter = LogLimiter(handler, limits)
        handler.addFilter(limiter)
        limiters.append(limiter)
    atexit.register(_flush_all, limiters)
    return limiters


def _flush_all(limiters: list[LogLimiter]) -> None:
    for limiter in limiters:
        try:
            limiter.flush()
        except Exception:  # at exit, a closed stream must not add a traceback of its own
            pass


__all__ = ["LogLimiter", "LogLimits", "install_log_limits"]
