"""What coap-client adds under aiocoap's message layer: libcoap's -v 7 message dump, -l's
dropped datagrams and -T's first token.

aiocoap has no hook for these, so the context's message managers and token managers get
per-instance wrappers (aiocoap 0.4.17: the message manager's send path through
:func:`coaplayers._aiocoap.wrap_sending`, ``dispatch_message`` and ``TokenManager.next_token``).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from typing import Any

import aiocoap

from coaplayers import _aiocoap

from .options import ClientConfig
from .output import option_name, option_value


def describe_message(message: aiocoap.Message) -> str:
    """One line per message, in the spirit of libcoap's debug dump."""
    options = ", ".join(f"{option_name(o.number)}:{option_value(o)}"
                        for o in message.opt.option_list())
    mtype = getattr(message.mtype, "name", message.mtype)
    mid = message.mid if message.mid is not None else "-"
    return (f"v:1 t:{mtype} c:{message.code} i:{mid} {{{message.token.hex()}}}"
            f" [ {options + ' ' if options else ''}] :: {len(message.payload)} bytes")


def loss_filter(spec: str) -> Callable[[int], bool]:
    """-l: which outgoing datagrams (numbered from 1) to drop, as libcoap's debugging aid."""
    if spec.endswith("%"):
        share = float(spec[:-1]) / 100
        return lambda n: random.random() < share
    dropped: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        dropped.update(range(int(low), int(high or low) + 1))
    return lambda n: n in dropped


def install(context: aiocoap.Context, config: ClientConfig) -> None:
    drop: Callable[[int], bool] | None = loss_filter(config.loss) if config.loss else None
    sent = [0]
    token = [config.token]
    for ri in context.request_interfaces:
        if token[0] is not None and hasattr(ri, "next_token"):
            _first_token(ri, token)
        mm = _aiocoap.message_manager_of(ri)
        if mm is None:
            continue
        _wrap(mm, config.dump, drop, sent)


def _first_token(tm: Any, token: list[bytes | None]) -> None:
    """libcoap 4.3 starts its token counter at -T's value and sends the next one: so does
    this (same length, big-endian, wrapping)."""
    following = tm.next_token

    def next_token() -> bytes:
        if token[0] is not None:
            given, token[0] = token[0], None
            value = (int.from_bytes(given, "big") + 1) % (1 << (8 * len(given)))
            return value.to_bytes(len(given), "big")
        return following()  # type: ignore[no-any-return]

    tm.next_token = next_token


def _wrap(mm: Any, dump: bool, drop: Callable[[int], bool] | None, sent: list[int]) -> None:
    dispatch = mm.dispatch_message

    def wrap(send: Callable[[aiocoap.Message], None]) -> Callable[[aiocoap.Message], None]:
        def send_via_transport(message: aiocoap.Message) -> None:
            sent[0] += 1
            if drop is not None and drop(sent[0]):
                if dump:
                    _show("dropped (-l)", message)
                return
            if dump:
                _show("sent", message)
            send(message)

        return send_via_transport

    def dispatch_message(message: aiocoap.Message) -> None:
        if dump:
            _show("received", message)
        dispatch(message)

    _aiocoap.wrap_sending(mm, wrap)
    mm.dispatch_message = dispatch_message


def _show(what: str, message: aiocoap.Message) -> None:
    remote = getattr(message.remote, "hostinfo", message.remote)
    print(f"coap-client: {what} {remote}: {describe_message(message)}", file=sys.stderr,
          flush=True)
