"""The per-message costs behind the code's shortcuts, measured in this process.

Several modules stand in for an aiocoap call on the request path (docs/BENCHMARKS.md, "Costs
behind the code"). This times, with ``timeit`` on one core, each shortcut next to the aiocoap
call it replaces, on the same input, so that the figures in the docs can be regenerated
(``coap-bench --costs``) rather than carried in docstrings. Only calls that run without a
network are here; the savings measured as CPU per request in a full run are in the main
table.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from typing import Any

from aiocoap import Message
from aiocoap import oscore as aiooscore
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code

from coaplayers.message import copy_request
from coaplayers.oscore import SecurityContext

SECRET = bytes(range(1, 17))
SALT = bytes.fromhex("9e7ca92223786340")


def _request() -> Message:
    m = Message(code=Code.POST, uri="coap://127.0.0.1:5683/sensors/temperature?unit=c",
                payload=b"x" * 32)
    m.opt.content_format = 0
    m.opt.accept = 0
    return m


def _pair() -> tuple[SecurityContext, SecurityContext]:
    common: dict[str, Any] = {"master_secret": SECRET, "master_salt": SALT}
    client = SecurityContext(sender_id=b"\x01", recipient_id=b"", **common)
    server = SecurityContext(sender_id=b"", recipient_id=b"\x01", peer="bench", **common)
    return client, server


def _best_us(fn: Callable[[], object], number: int) -> float:
    """Microseconds per call: the best of three runs of ``number`` calls."""
    return 1e6 * min(timeit.repeat(fn, number=number, repeat=3)) / number


def _unprotect_us(general: bool, number: int) -> float:
    """Microseconds per unprotect of fresh requests (each sequence number once, in order)."""
    unprotect = aiooscore.CanUnprotect.unprotect if general else SecurityContext.unprotect

    def once() -> float:
        client, server = _pair()
        protected = [client.protect(_request())[0] for _ in range(number)]
        for m in protected:
            m.direction = Direction.INCOMING  # as received
        it = iter(protected)
        return timeit.timeit(lambda: unprotect(server, next(it)), number=number)

    return 1e6 * min(once() for _ in range(3)) / number


def measure(number: int = 2000) -> dict[str, dict[str, float]]:
    """Per shortcut: ``ours`` and ``aiocoap`` in microseconds per call.

    aiocoap's general ``protect`` and ``unprotect`` run here on this project's context class,
    so they call its message split and nonce, not aiocoap's: those rows show what the
    written-out steps save on top of the two.
    """
    request = _request()
    client, _ = _pair()
    general_client, _ = _pair()
    out = {
        "copy a request (message.copy_request)": {
            "ours": _best_us(lambda: copy_request(request), number),
            "aiocoap": _best_us(request.copy, number),
        },
        "protect a request (SecurityContext.protect)": {
            "ours": _best_us(lambda: client.protect(request), number),
            "aiocoap": _best_us(
                lambda: aiooscore.CanProtect.protect(general_client, request), number),
        },
        "unprotect a request (SecurityContext.unprotect)": {
            "ours": _unprotect_us(False, number),
            "aiocoap": _unprotect_us(True, number),
        },
    }
    return out


def render(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'per call, one core':58} {'ours us':>8} {'aiocoap us':>10} {'saved':>6}"]
    for name, row in results.items():
        saved = 1 - row["ours"] / row["aiocoap"] if row["aiocoap"] else 0.0
        lines.append(f"{name:58} {row['ours']:8.1f} {row['aiocoap']:10.1f} {saved:6.0%}")
    return "\n".join(lines)
