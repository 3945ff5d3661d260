"""CoAP message helpers the layers share, where aiocoap has none: a shallow copy of a message,
a one-block request handed to its interface without aiocoap's tasks, and aiocoap's
error-mapping pipe without its per-call import."""

from __future__ import annotations

import functools
import logging
from typing import Any

import aiocoap
from aiocoap import Message, error
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe
from aiocoap.protocol import Request


def copy_request(message: Message) -> Message:
    """A copy of ``message`` whose options can be changed without touching the original.

    Like aiocoap's ``Message.copy()`` but shallow: the option lists are new, the option
    objects are shared. aiocoap never changes an option object in place (its setters
    replace options), so this is enough, and it avoids ``copy.deepcopy`` of every option
    (about 35 us of CPU per request in coap-bench).
    """
    new = Message(code=message.code, payload=message.payload,
                  transport_tuning=message.transport_tuning)
    new.mtype = message.mtype
    new.mid = message.mid
    new.token = message.token
    new.remote = message.remote
    new.direction = message.direction
    # aiocoap's Options keeps a list of option objects per option number in ``_options``.
    new.opt._options = {number: list(values) for number, values in message.opt._options.items()}
    return new


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

    The request keeps ``_stop_interest`` (a partial of its pipe holding the event callback,
    a closure over the request) for cancelling before the answer; afterwards it is unused,
    but the cycle keeps the request, its pipe and both messages alive until the garbage
    collector finds them: ~25 objects per exchange, which made gen-0 collections promote
    in-flight state and gen-1 collections slow under load (coap-bench, 50 clients).
    """
    if not response.cancelled():  # (cancelling uses it, before the answer)
        request._stop_interest = _nothing


def _nothing() -> None:
    pass


def error_answer(exc: BaseException, log: logging.Logger) -> Message:
    """The answer aiocoap's ``error_to_message`` gives for an exception of a renderer: a
    ``RenderableError``'s own message (4.04 and the like), else 5.00; logged as aiocoap does."""
    if isinstance(exc, error.RenderableError):
        # the repr() here is quite important for garbage collection (aiocoap's note)
        log.info("Render request raised a renderable error (%s), responding accordingly.",
                 repr(exc))
        try:
            msg = exc.to_message()
            if msg is None:
                raise ValueError(f"Exception to_message failed to produce a message on {exc!r}")
            return msg  # type: ignore[no-any-return]
        except Exception as e2:
            log.error("Rendering the renderable exception failed: %r", e2, exc_info=e2)
    else:
        log.error("An exception occurred while rendering a resource: %r", exc, exc_info=exc)
    return Message(code=Code.INTERNAL_SERVER_ERROR)


def error_to_message(old_pr: Pipe, log: logging.Logger) -> Pipe:
    """aiocoap's ``aiocoap.pipe.error_to_message`` (0.4.17; recheck on upgrades), unchanged
    in what it does: a new pipe for the responder whose answers go to ``old_pr``, whose
    exceptions become a terminal answer there (:func:`error_answer`), and whose loss of
    interest is forwarded.

    Copied because aiocoap's runs ``from .message import Message`` on every call: an import
    statement per rendered request, ~2-3 us of CPU each, and a server renders through one
    or two of these per request.
    """
    next_pr = Pipe(old_pr.request, log)

    def on_event(event: Any) -> bool:
        if event.message is not None:
            old_pr.add_response(event.message, event.is_last)
            return not event.is_last
        old_pr.add_response(error_answer(event.exception, log), is_last=True)
        return False

    remove_interest = next_pr.on_event(on_event)
    old_pr.on_interest_end(remove_interest)
    return next_pr


def _add_event_after_end(pipe: Pipe, event: Any) -> bool:
    """aiocoap 0.4.17's ``Pipe._add_event`` logs an exception added to an ended pipe with
    ``log.error(..., exception=...)``, which ``logging`` refuses with a TypeError: raised
    inside whatever delivered the event (a rendering task, the message layer handling a
    datagram), it was seen in coap-proxy's log next to "Task was destroyed but it is
    pending!" around a client that rejected an answer. Logged here instead; True if handled.
    Retire once aiocoap's ``_add_event`` passes ``exc_info``."""
    if pipe._event_callbacks is not False or event.exception is None:
        return False
    pipe.log.info("Discarded exception in %r added after %r has ended", event, pipe,
                  exc_info=event.exception)
    return True


def _install_pipe_fix() -> None:
    original = Pipe._add_event
    if getattr(original, "_coaplayers", False):
        return

    def _add_event(self: Pipe, event: Any) -> None:
        if not _add_event_after_end(self, event):
            original(self, event)

    _add_event._coaplayers = True  # type: ignore[attr-defined]
    Pipe._add_event = _add_event  # type: ignore[method-assign]


_install_pipe_fix()

__all__ = ["copy_request", "error_answer", "error_to_message", "request_through"]
