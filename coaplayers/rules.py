"""Request rules of RFC 7252 and RFC 7967 that aiocoap's resource tree leaves to the server.

aiocoap renders a request whatever critical options it carries, answers whatever
Content-Format the resource chose regardless of Accept, and copies No-Response only onto
answers a resource returns (not onto 4.04, 4.05 or 5.00 answers made from exceptions).
:class:`RulesSite` wraps a site and applies, per request:

- an unrecognised critical option (RFC 7252 5.4.1): 4.02 Bad Option naming the numbers for
  a CON request; a NON request is rejected silently;
- Accept (RFC 7252 5.10.4): a successful answer with a payload in another Content-Format
  becomes 4.06 Not Acceptable;
- No-Response (RFC 7967): every answer of a class the client suppressed, the server's own
  errors included, carries the option, so aiocoap's message layer sends nothing (NON) or an
  empty ACK (CON) instead.

coap-server wraps its innermost site with it, so the rules apply to plain requests and to the
inner requests of Layer 0 and OSCORE alike. The pure helpers are shared with coap-proxy.
"""

from __future__ import annotations

import logging
from typing import Any

from aiocoap import NON, Message
from aiocoap.numbers import OptionNumber, codes
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe

from . import _aiocoap
from .message import error_answer

Opt = OptionNumber

# Critical options the server acts on (aiocoap's routing, block-wise, OSCORE, Accept).
# Conditional requests (If-Match, If-None-Match), Q-Block1 and EDHOC are not implemented, so
# they are answered 4.02 as RFC 7252 5.4.1 asks of options a server does not understand.
SERVER_CRITICAL = frozenset(
    {
        Opt.URI_HOST, Opt.URI_PORT, Opt.URI_PATH, Opt.URI_QUERY, Opt.OSCORE, Opt.ACCEPT,
        Opt.BLOCK1, Opt.BLOCK2, Opt.PROXY_URI, Opt.PROXY_SCHEME,
    }
)

NO_RESPONSE_ALL = 0x02 | 0x08 | 0x10  # RFC 7967: 2.xx, 4.xx and 5.xx suppressed


def unknown_critical(message: Message, known: frozenset[int] = SERVER_CRITICAL) -> list[int]:
    """Numbers of critical options (odd numbers) in ``message`` outside ``known``."""
    bad = [n for n in _aiocoap.option_lists(message.opt) if n & 1 and n not in known]
    return sorted(int(n) for n in bad)


def suppressed(no_response: int | None, code: Code) -> bool:
    """Whether RFC 7967's No-Response value ``no_response`` suppresses an answer ``code``."""
    if not no_response:
        return False
    return bool(no_response & (1 << (code.class_ - 1)))


def not_acceptable(request: Message, response: Message) -> bool:
    """A successful answer with a payload in another format than the request's Accept."""
    accept = request.opt.accept
    return (
        accept is not None and response.code.is_successful() and bool(response.payload)
        and response.opt.content_format != accept
    )


class RulesSite:
    """A site that applies the rules of the module docstring around another site."""

    def __init__(self, site: Any, log: logging.Logger | None = None) -> None:
        self.site = site
        self.log = log or logging.getLogger("coaplayers.rules")

    def __getattr__(self, name: str) -> Any:
        # get_resources_as_linkheader, add_resource, ...: the wrapped site's
        return getattr(self.site, name)

    async def render_to_pipe(self, pipe: Pipe) -> None:
        request: Message = pipe.request
        bad = unknown_critical(request)
        if bad:
            text = "unknown critical option " + ",".join(map(str, bad))
            answer = Message(code=codes.BAD_OPTION, payload=text.encode())
            if request.mtype == NON:
                answer.opt.no_response = NO_RESPONSE_ALL  # a NON is rejected silently
            elif suppressed(request.opt.no_response, answer.code):
                answer.opt.no_response = request.opt.no_response
            pipe.add_response(answer, is_last=True)
            return
        if request.opt.accept is None and not request.opt.no_response:
            await self.site.render_to_pipe(pipe)
            return
        inner = self._filtering_pipe(pipe)
        try:
            await self.site.render_to_pipe(inner)
        except Exception as exc:
            inner.add_exception(exc)

    def _filtering_pipe(self, outer: Pipe) -> Pipe:
        """A pipe for the wrapped site whose answers (exceptions rendered as aiocoap would)
        reach ``outer`` after Accept and No-Response are applied."""
        request: Message = outer.request
        inner = Pipe(request, self.log)
        no_response = request.opt.no_response

        def on_event(event: Any) -> bool:
            last = event.is_last
            msg = event.message
            if msg is None:
                msg, last = error_answer(event.exception, self.log), True
            elif not_acceptable(request, msg):
                msg, last = Message(code=codes.NOT_ACCEPTABLE), True
            if suppressed(no_response, msg.code):
                msg.opt.no_response = no_response
            outer.add_response(msg, is_last=last)
            return not last

        outer.on_interest_end(inner.on_event(on_event))
        return inner
