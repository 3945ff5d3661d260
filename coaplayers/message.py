"""CoAP message helpers the layers share, where aiocoap has none: a shallow copy of a message,
a one-block request handed to its interface without aiocoap's tasks, and aiocoap's
error-mapping pipe without its per-call import."""

from __future__ import annotations

import functools
from typing import Any

import aiocoap
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe
from aiocoap.protocol import Request
from aiocoap.util import hostportsplit

from . import _aiocoap

split_hostinfo = functools.lru_cache(maxsize=1024)(hostportsplit)
"""aiocoap's ``hostportsplit``, remembered: requests parse the same few origins over and over."""


def copy_request(message: Message) -> Message:
    """A copy of ``message`` whose options can be changed without touching the original.

    Like aiocoap's ``Message.copy()`` but shallow: the option lists are new, the option
    objects are shared. aiocoap never changes an option object in place (its setters
    replace options), so this is enough, and it avoids ``copy.deepcopy`` of every option
    (its cost per request: docs/BENCHMARKS.md, "Costs behind the code").
    """
    new = Message(code=message.code, payload=message.payload,
                  transport_tuning=message.transport_tuning)
    new.mtype = message.mtype
    new.mid = message.mid
    new.token = message.token
    new.remote = message.remote
    new.direction = message.direction
    _aiocoap.set_option_lists(new.opt, {number: list(values) for number, values
                                        in _aiocoap.option_lists(message.opt).items()})
    return new


def echo_asked(request: Message, answer: Message) -> bytes | None:
    """The Echo value an unprotected 4.01 asks ``request`` to be repeated with (RFC 9175), if
    it was not sent with one already.

    A proxy or server asks this of an address it has not verified yet before it sends a large
    answer there (docs/SECURITY.md, the 3x rule); the repeated request reaches the server as
    the first, since the asker did not forward or process the original.
    """
    if (answer.code == Code.UNAUTHORIZED and request.opt.echo is None
            and answer.opt.oscore is None):
        echo: bytes | None = answer.opt.echo
        return echo
    return None


def with_echo(request: Message, echo: bytes) -> Message:
    """``request`` to send again with ``echo``: a new message ID and token, the rest as is."""
    again = copy_request(request)
    again.mid = None
    again.token = None
    again.opt.echo = echo
    return again


def request_through(context: aiocoap.Context, interface: Any,
                    message: aiocoap.Message) -> Request:
    """Hand ``message`` (its remote already resolved, e.g. by ``find_remote_and_interface``)
    to ``interface`` now, as aiocoap's ``Context.request(message, handle_blockwise=False)``
    would from a task of its own: for one-block exchanges (coap-proxy's upstream requests,
    Layer 0's outer ones) that task, and aiocoap's block-wise runner, only cost time."""
    pipe = Pipe(message, context.log)
    request = Request(pipe, context.loop, context.log)
    if request.observation is None:
        request.response.add_done_callback(functools.partial(_unlink, request))
    try:
        interface.request(pipe)
    except Exception as exc:  # as aiocoap's own send task does
        pipe.add_exception(exc)
    return request


def _unlink(request: Request, response: Any) -> None:
    """Break aiocoap's ``Request`` reference cycle once a one-answer request is answered.

    The request keeps a partial of its pipe holding the event callback,
    a closure over the request) for cancelling before the answer; afterwards it is unused,
    but the cycle keeps the request, its pipe and both messages alive until the garbage
    collector finds them: ~25 objects per exchange, which made gen-0 collections promote
    in-flight state and gen-1 collections slow under load (coap-bench, 50 clients).
    """
    if not response.cancelled():  # (cancelling uses it, before the answer)
        _aiocoap.release_request(request)


error_answer = _aiocoap.error_answer
error_to_message = _aiocoap.error_to_message
_aiocoap.install_pipe_fix()
_aiocoap.install_send_error_fix()

__all__ = ["copy_request", "echo_asked", "error_answer", "error_to_message", "request_through",
           "split_hostinfo", "with_echo"]
