"""The log bound (coaplayers.loglimit) without processes: repeats, the token bucket, the
summary and one-line tracebacks, driven by a hand-set clock."""

from __future__ import annotations

import io
import logging

import pytest

from coaplayers.loglimit import LogLimiter, LogLimits


@pytest.fixture
def logged():  # type: ignore[no-untyped-def]
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    now = [0.0]
    limiter = LogLimiter(handler, LogLimits(rate=10, burst=20, repeats=3, window=10),
                         clock=lambda: now[0])
    handler.addFilter(limiter)
    log = logging.getLogger("test.loglimit")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield log, out, now, limiter
    log.removeHandler(handler)


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_repeated_warnings_are_counted_and_summarised(logged) -> None:  # type: ignore[no-untyped-def]
    log, out, now, limiter = logged
    for port in range(1000):
        log.warning("Ignoring unparsable message from %s", ("192.0.2.1", port))
    log.warning("another kind")
    assert len(lines(out)) == 4
    now[0] = 10.0
    log.warning("another kind")  # a new window: the last one's summary first
    shown = lines(out)
    assert len(shown) == 6
    assert shown[4] == ("WARNING held back 997 log lines in 10 s (most: 997 x"
                        " 'Ignoring unparsable message from %s' from test.loglimit)")
    assert limiter.suppressed == 997


def test_all_lines_together_are_bounded_by_the_bucket(logged) -> None:  # type: ignore[no-untyped-def]
    log, out, now, limiter = logged
    for i in range(1000):
        log.info("request %d", i)  # different lines, each allowed by the repeat rule
    assert len(lines(out)) == 20  # the burst
    now[0] = 1.0
    for i in range(1000):
        log.info("request %d", i)
    assert len(lines(out)) == 30  # one second at the rate
    limiter.flush(now[0])
    assert "held back 1970 log lines" in lines(out)[-1]


def test_a_traceback_becomes_one_line(logged) -> None:  # type: ignore[no-untyped-def]
    log, out, _, _ = logged
    try:
        raise ValueError("bad block")
    except ValueError:
        log.exception("An exception occurred while rendering a resource")
    assert lines(out) == [
        "ERROR An exception occurred while rendering a resource (ValueError: bad block)"]


def test_rate_zero_bounds_nothing() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(LogLimiter(handler, LogLimits(rate=0, tracebacks=True)))
    log = logging.getLogger("test.loglimit.open")
    log.propagate = False
    log.addHandler(handler)
    for _ in range(100):
        log.warning("same")
    assert len(lines(out)) == 100
    with pytest.raises(ValueError):
        LogLimits(rate=-1)


def test_proxy_exchange_lines_have_a_bucket_of_their_own() -> None:
    import json

    from coaplayers.proxy.accesslog import AccessLog

    out = io.StringIO()
    access = AccessLog(stream=out, exchange_rate=10)
    for i in range(100):
        access.exchange({"event": "exchange", "n": i})
    access.close()
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    shown = [e["n"] for e in entries if e["event"] == "exchange"]
    assert 10 <= len(shown) <= 12 and shown == list(range(len(shown)))  # the burst (+ refill)
    assert entries[-1]["event"] == "exchanges_held_back"
    assert entries[-1]["count"] == 100 - len(shown)


def test_install_bounds_basic_handlers_once_and_leaves_others_alone() -> None:
    from coaplayers.loglimit import install_log_limits

    root = logging.getLogger()
    mine = logging.StreamHandler(io.StringIO())
    other = logging.NullHandler()
    root.addHandler(mine)
    root.addHandler(other)
    try:
        assert [lim.handler for lim in install_log_limits()] == [mine]
        assert install_log_limits() == []  # already bounded
        assert not other.filters
    finally:
        root.removeHandler(mine)
        root.removeHandler(other)
