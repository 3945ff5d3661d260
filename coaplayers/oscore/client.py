"""Client side: an aiocoap request interface that protects requests with our contexts.

It is aiocoap's ``TransportOSCORE`` with three changes:

* Contexts come from a :class:`ClientContexts` map of its own, not from the aiocoap
  Context's ``client_credentials``. A stock credentials map returns one object per URI
  pattern, and both aiocoap's OSCORE transport and its DTLS transports ask that map for the
  same request URI, so one URI could not have an OSCORE context *and* DTLS credentials
  (OSCORE over a ``coaps://`` hop). Keeping OSCORE contexts apart removes the clash.
* Requests are protected with :class:`~coaplayers.oscore.context.SecurityContext`, whose
  outer message keeps Proxy-Scheme and Uri-Port, so requests work through forward proxies.
* Answers that mean "this context is dead" become
  :class:`~coaplayers.oscore.errors.RehandshakeRequired` (also passed to an
  ``on_rehandshake`` callback), and other unprotected answers become
  :class:`~coaplayers.oscore.errors.UnprotectedErrorResponse`, instead of aiocoap's
  generic "not a protected message".

Install it with :func:`attach`; requests whose URI origin has a context are then protected
transparently (``await ctx.request(Message(code=GET, uri=...)).response``), including
block-wise transfers (inner, RFC 8613 Section 4.1.3.4) and Observe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import aiocoap
from aiocoap import oscore as _aiooscore
from aiocoap.message import UndecidedRemote
from aiocoap.transports.oscore import OSCOREAddress, TransportOSCORE

from .. import _aiocoap
from ..layer0.profile import is_layer0_path
from ..message import echo_asked, request_through, with_echo
from .context import SecurityContext
from .errors import (
    RehandshakeReason,
    RehandshakeRequired,
    SequenceNumbersExhausted,
    UnprotectedErrorResponse,
    UnprotectedRequestRefused,
)
from .server import CONTEXT_NOT_FOUND, DECRYPTION_FAILED

log = logging.getLogger("coaplayers.oscore.client")


_DEFAULT_PORTS = {"coap": 5683, "coaps": 5684, "coap+tcp": 5683, "coaps+tcp": 5684,
                  "http": 80, "https": 443}

RehandshakeCallback = Callable[[RehandshakeRequired], None]


def origin_of(uri: str) -> str:
    """``scheme://host:port`` of a CoAP URI, lower-cased, default port made explicit.

    Contexts belong to the origin server (RFC 8613 is end to end), so the key ignores the
    path and which proxy the request goes through.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not scheme or not host:
        raise ValueError(f"not an absolute CoAP URI: {uri!r}")
    port = parts.port if parts.port is not None else _DEFAULT_PORTS.get(scheme)
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def classify_unprotected(response: aiocoap.Message) -> RehandshakeReason | None:
    """Which unprotected OSCORE error answers mean "run a new handshake"."""
    payload = bytes(response.payload)
    if response.code == aiocoap.UNAUTHORIZED and payload.startswith(CONTEXT_NOT_FOUND.encode()):
        return RehandshakeReason.CONTEXT_NOT_FOUND
    if response.code == aiocoap.BAD_REQUEST and payload.startswith(DECRYPTION_FAILED.encode()):
        return RehandshakeReason.DECRYPTION_FAILED
    return None


class ClientContexts:
    """Origin -> security context, for the client. Layer 0 sets an entry after each handshake."""

    def __init__(self) -> None:
        self._by_origin: dict[str, SecurityContext] = {}
        # (Proxy-Scheme, remote scheme, remote hostinfo, Uri-Host, Uri-Port) -> origin
        self._origins: dict[tuple[Any, ...], str] = {}

    def set(self, uri: str, context: SecurityContext) -> None:
        """Use ``context`` for every request to the origin of ``uri`` (path is ignored)."""
        self._by_origin[origin_of(uri)] = context

    def remove(self, uri: str) -> SecurityContext | None:
        return self._by_origin.pop(origin_of(uri), None)

    def get(self, uri: str) -> SecurityContext | None:
        return self._by_origin.get(origin_of(uri))

    def get_origin(self, origin: str) -> SecurityContext | None:
        """Like :meth:`get` for an origin already in :func:`origin_of` form (no parsing)."""
        return self._by_origin.get(origin)

    def __len__(self) -> int:
        return len(self._by_origin)

    def for_request(self, message: aiocoap.Message) -> SecurityContext | None:
        """The context for an outgoing request, by its request URI's origin.

        For a request through a forward proxy (Proxy-Scheme/Uri-Host/Uri-Port set, remote
        is the proxy), that is the origin server's URI, not the proxy's.

        Layer 0 messages (``/.well-known/atls``, ``/~<session>``) are never protected: they
        carry the handshake that keys (or re-keys) the context, and the server serves Layer 0
        outside OSCORE. Protecting them with the context being replaced would make a
        re-keying handshake impossible.
        """
        opt = message.opt
        remote = message.remote
        if (
            type(remote) is UndecidedRemote
            and opt.proxy_uri is None
            and opt.uri_path_abbrev is None
            and not hasattr(message, "_original_request_uri")
        ):
            # The common case (a request not sent yet, through a proxy or not): the origin
            # depends only on these fields, so it is computed once per combination rather
            # than by building the request URI and parsing it again for every request
            # (docs/BENCHMARKS.md). The path test needs no URI either:
            # Uri-Path options are the unquoted segments.
            key = (opt.proxy_scheme, remote.scheme, remote.hostinfo, opt.uri_host,
                   opt.uri_port)
            origin = self._origins.get(key)
            if origin is None:
                origin = self._origin_of_message(message)
                if origin is None:
                    return None
                if len(self._origins) >= 256:
                    self._origins.clear()
                self._origins[key] = origin
            if is_layer0_path(opt.uri_path):
                return None
            return self._by_origin.get(origin)
        try:
            uri = message.get_request_uri()
        except Exception:  # e.g. no remote and no Uri-Host yet
            return None
        segments = tuple(unquote(s) for s in urlsplit(uri).path.split("/")[1:])
        if is_layer0_path(segments):
            return None
        try:
            return self._by_origin.get(origin_of(uri))
        except ValueError:
            return None

    @staticmethod
    def _origin_of_message(message: aiocoap.Message) -> str | None:
        try:
            return origin_of(message.get_request_uri())
        except Exception:  # e.g. no remote and no Uri-Host yet, or not absolute
            return None


class OscoreClientTransport(TransportOSCORE):
    """aiocoap request interface for OSCORE with :class:`ClientContexts` (see module doc).

    :param context: the aiocoap client Context; protected messages are sent through it.
    :param contexts: the origin -> SecurityContext map.
    :param on_rehandshake: called with the RehandshakeRequired error (context dead, sequence
        numbers exhausted); the same error is raised to whoever awaits the response. The
        low-watermark signal (``SEQUENCE_NUMBERS_LOW``) comes from the context's own
        ``on_rekey_needed`` instead, since the request still succeeds.
    """

    def __init__(
        self,
        context: aiocoap.Context,
        contexts: ClientContexts,
        on_rehandshake: RehandshakeCallback | None = None,
    ) -> None:
        super().__init__(context, _Wire(context))
        self.contexts = contexts
        self.on_rehandshake = on_rehandshake

    async def fill_or_recognize_remote(self, message: aiocoap.Message) -> bool:
        if isinstance(message.remote, OSCOREAddress):
            # Follow-up requests (block-wise, re-registration) reuse a response's remote.
            return isinstance(message.remote.security_context, SecurityContext)
        if message.opt.oscore is not None:
            return False  # already protected: this is our own outer message
        context = self.contexts.for_request(message)
        if context is None:
            return False
        message.remote = OSCOREAddress(context, message.remote)
        return True

    async def recognize_remote(self, message: aiocoap.Message) -> bool:
        """First pass of aiocoap's two-pass interface choice (its development branch)."""
        return isinstance(message.remote, OSCOREAddress) and isinstance(
            message.remote.security_context, SecurityContext)

    async def determine_remote(self, message: aiocoap.Message) -> OSCOREAddress | None:
        """Second pass of aiocoap's two-pass interface choice (its development branch)."""
        if isinstance(message.remote, OSCOREAddress) or message.opt.oscore is not None:
            return None
        context = self.contexts.for_request(message)
        return None if context is None else OSCOREAddress(context, message.remote)

    def refusal(self, message: aiocoap.Message) -> UnprotectedRequestRefused | None:
        """Why ``message``, handed to a plain transport, must not be sent: it is not an
        OSCORE message and its origin has a context (or it was addressed for OSCORE)."""
        if message.opt.oscore is not None:
            return None
        if (isinstance(message.remote, OSCOREAddress)
                or self.contexts.for_request(message) is not None):
            return UnprotectedRequestRefused(message)
        return None

    def declines(self, message: aiocoap.Message) -> bool:
        """True when :meth:`fill_or_recognize_remote` is sure to refuse ``message`` without a
        look at its URI: a message already protected (its outer message, on its way to the
        wire). A request context may then reuse an address it resolved for the same host
        (``coaplayers.layer1.ServerContext``) instead of asking every interface again."""
        return message.opt.oscore is not None and not isinstance(message.remote, OSCOREAddress)

    def request(self, request: Any) -> None:
        # No task name: formatting the request's repr for it costs CPU on every request.
        task = self.loop.create_task(self._request_mapping_errors(request))
        tasks = _aiocoap.oscore_transport_tasks(self)
        tasks.add(task)

        def done(t: Any, _request: Any = request) -> None:
            tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                _request.add_exception(exc)

        task.add_done_callback(done)

    async def _request_mapping_errors(self, request: Any) -> None:
        secctx = request.request.remote.security_context
        try:
            await _aiocoap.oscore_transport_run(self, request)
        except _MAPPED as e:
            self._map_error(e, getattr(request.request, "oscore_request_piv", None), secctx)

    async def exchange_one(
        self, message: aiocoap.Message, secctx: SecurityContext, hop: Any,
        routing: Routing | None = None,
    ) -> aiocoap.Message:
        """Protect ``message`` (one block, no Observe) with ``secctx``, send it to ``hop``
        (the origin, or a forward proxy with ``routing``: the outer options to set or, for
        None, remove), and return the unprotected answer (an inner Block2 is left to the
        caller). ``message`` keeps its options and remote.

        What :meth:`request` does through aiocoap's ``TransportOSCORE._request``, minus the
        machinery around it: that coroutine's task, the wire's request object and aiocoap's
        send task. The protected request is handed to the request interface that the
        context resolved for the hop (``find_remote_and_interface``, which a
        ``coaplayers.layer1.ServerContext`` keeps for a while; :meth:`declines` lets it),
        and still goes through aiocoap's message layer (retransmission, Layer 1). Errors are
        those of :meth:`request`; an Echo challenge (RFC 8613 Appendix B.1.2) is answered
        once, as aiocoap does.
        """
        sent: list[Any] = []  # the request's identifiers, once protected
        try:
            return await self._exchange_one(message, secctx, hop, routing, sent)
        except _MAPPED as e:
            piv = sent[-1].partial_iv if sent else None
            self._map_error(e, piv, secctx)

    async def _exchange_one(
        self, message: aiocoap.Message, secctx: Any, hop: Any,
        routing: Routing | None, sent: list[Any],
    ) -> aiocoap.Message:
        context = _aiocoap.oscore_transport_wire(self).context
        echo = None
        while True:
            protected, request_id = secctx.protect(
                message if echo is None else message.copy(echo=echo)
            )
            sent.append(request_id)
            if routing is not None:
                apply_routing(protected, routing)
            protected.remote = hop
            interface = await context.find_remote_and_interface(protected)
            try:
                answer = await request_through(context, interface, protected).response
                outer_echo = echo_asked(protected, answer)
                if outer_echo is not None:  # our address verified first (RFC 9175, the 3x rule)
                    answer = await request_through(
                        context, interface, with_echo(protected, outer_echo)).response
            except aiocoap.error.NetworkError:
                forget = getattr(context, "forget_resolution", None)
                if forget is not None and isinstance(hop, UndecidedRemote):
                    forget(hop)
                raise
            block2 = answer.opt.block2
            if block2 is not None and block2.more:
                # Outer Block2 (a proxy fragmented the protected answer): aiocoap completes it.
                answer = await _aiocoap.complete_block2(context, protected, answer, log)
            unprotected = _aiooscore.verify_start(answer)
            secctx = secctx.context_from_response(unprotected)
            response, _ = secctx.unprotect(answer, request_id)
            if echo is None and response.code == aiocoap.UNAUTHORIZED and response.opt.echo:
                log.info("Answering the server's 4.01 Unauthorized / Echo (RFC 8613 B.1.2)")
                echo = response.opt.echo
                continue
            response.remote = OSCOREAddress(secctx, answer.remote)
            return response

    def _map_error(self, error: Exception, piv: bytes | None, secctx: Any) -> NoReturn:
        """Raise what an OSCORE failure means to our callers (see the module doc); ``piv`` is
        the Partial IV the refused request went out with."""
        if isinstance(error, _aiooscore.NotAProtectedMessage):
            plain = error.plain_message
            reason = classify_unprotected(plain)
            if reason is None:
                raise UnprotectedErrorResponse(plain) from None
            self._signal(RehandshakeRequired(reason, secctx, plain, request_piv=piv))
        if isinstance(error, SequenceNumbersExhausted):
            self._signal(error)
        self._signal(SequenceNumbersExhausted(secctx))  # ContextUnavailable

    def _signal(self, error: RehandshakeRequired) -> NoReturn:
        log.info("OSCORE context %r needs a new handshake: %s", error.security_context,
                 error.reason.value)
        if self.on_rehandshake is not None:
            try:
                self.on_rehandshake(error)
            except Exception:
                log.exception("on_rehandshake callback failed")
        raise error


Routing = Sequence[tuple[int, list[Any] | None]]
"""Options a request through a forward proxy gets (number, option objects; None: removed)."""


def apply_routing(message: aiocoap.Message, routing: Routing) -> None:
    """Set ``routing``'s options on ``message``, replacing (or removing) any of those numbers,
    as aiocoap's option setters would (aiocoap's Options keeps a list per option number in
    ``_options``; the option objects are immutable and shared)."""
    options = _aiocoap.option_lists(message.opt)
    for number, values in routing:
        if values is None:
            options.pop(number, None)
        else:
            options[number] = list(values)


_MAPPED = (_aiooscore.NotAProtectedMessage, SequenceNumbersExhausted,
           _aiooscore.ContextUnavailable)

ONE_BLOCK = 1024
"""Protected messages up to this payload size go out as one message without aiocoap's
block-wise runner (every remote takes 1024-byte blocks unless a server asked for less)."""


class _Wire:
    """The context as the OSCORE transport sends protected messages through it.

    aiocoap's ``Context.request`` runs each request in a block-wise task of its own, which
    looks the request interface up a second time; a protected request of one block without
    Observe needs neither (1 task, 1 loop iteration and 1 Layer 1 address lookup saved per
    request; the CPU this saves: docs/BENCHMARKS.md). Its answer is still completed by
    aiocoap's block-wise code when it comes in outer Block2 blocks. Everything else goes
    to ``Context.request``.

    Both answer an outer 4.01 + Echo (a proxy or server that has not verified our address
    holds a large answer behind it: RFC 9175 section 2.4, the 3x rule) by sending the
    protected request again, once, with that Echo value, as
    :meth:`OscoreClientTransport.exchange_one` does: aiocoap's OSCORE transport would take
    the unprotected 4.01 for the server's answer.
    """

    def __init__(self, context: aiocoap.Context) -> None:
        self.context = context
        self.loop = context.loop

    def request(self, message: aiocoap.Message, handle_blockwise: bool = True) -> Any:
        if (
            not handle_blockwise
            or message.opt.observe is not None
            or message.opt.block1 is not None
            or message.opt.block2 is not None
            or len(message.payload) > ONE_BLOCK
        ):
            return _EchoAnswered(self.context, message, handle_blockwise)
        return _OneBlockRequest(self.context, message)


class _EchoAnswered:
    """``.response`` and ``.observation`` of ``Context.request``, with an outer 4.01 + Echo
    answered once (see :class:`_Wire`); the observation is the repeated request's then."""

    def __init__(self, context: aiocoap.Context, message: aiocoap.Message,
                 handle_blockwise: bool) -> None:
        self._context = context
        self._message = message
        self._blockwise = handle_blockwise
        self._inner = context.request(message, handle_blockwise=handle_blockwise)
        self.response: asyncio.Future[aiocoap.Message] = context.loop.create_future()
        self._task = context.loop.create_task(self._run())
        self.response.add_done_callback(self._given_up)

    @property
    def observation(self) -> Any:
        return self._inner.observation

    def _given_up(self, response: asyncio.Future[aiocoap.Message]) -> None:
        if response.cancelled():
            self._task.cancel()
            self._inner.response.cancel()

    async def _run(self) -> None:
        try:
            answer = await self._inner.response
            echo = echo_asked(self._message, answer)
            if echo is not None:
                log.info("Answering a proxy's 4.01 / Echo (RFC 9175, the 3x rule)")
                self._inner = self._context.request(with_echo(self._message, echo),
                                                    handle_blockwise=self._blockwise)
                answer = await self._inner.response
        except Exception as exc:
            if not self.response.done():
                self.response.set_exception(exc)
            return
        if not self.response.done():
            self.response.set_result(answer)


class _OneBlockRequest:
    """``.response`` (and no ``.observation``) of a one-block request, as aiocoap gives."""

    observation = None

    def __init__(self, context: aiocoap.Context, message: aiocoap.Message) -> None:
        self._context = context
        self._message = message
        self.response: asyncio.Future[aiocoap.Message] = context.loop.create_future()
        self._inner = context.request(message, handle_blockwise=False)
        self._inner.response.add_done_callback(self._answered)
        self.response.add_done_callback(self._given_up)
        self._task: asyncio.Task[None] | None = None
        self._echoed = False

    def _given_up(self, response: asyncio.Future[aiocoap.Message]) -> None:
        if response.cancelled():
            self._inner.response.cancel()
            if self._task is not None:
                self._task.cancel()

    def _answered(self, inner: asyncio.Future[aiocoap.Message]) -> None:
        if self.response.done():
            return
        if inner.cancelled():
            self.response.cancel()
            return
        exc = inner.exception()
        if exc is not None:
            self.response.set_exception(exc)
            return
        answer = inner.result()
        echo = None if self._echoed else echo_asked(self._message, answer)
        if echo is not None:  # see _Wire: once
            log.info("Answering a proxy's 4.01 / Echo (RFC 9175, the 3x rule)")
            self._echoed = True
            self._inner = self._context.request(with_echo(self._message, echo),
                                                handle_blockwise=False)
            self._inner.response.add_done_callback(self._answered)
            return
        answer.opt.block1 = None  # as aiocoap's block-wise runner leaves it
        block2 = answer.opt.block2
        if block2 is None or not block2.more:
            answer.opt.block2 = None
            self.response.set_result(answer)
            return
        # Outer Block2 (a proxy fragmented the protected answer): aiocoap completes it.
        self._task = self._context.loop.create_task(self._complete(answer))

    async def _complete(self, first: aiocoap.Message) -> None:
        try:
            whole = await _aiocoap.complete_block2(self._context, self._message, first, log)
        except Exception as exc:
            if not self.response.done():
                self.response.set_exception(exc)
            return
        if not self.response.done():
            self.response.set_result(whole)


def attach(
    context: aiocoap.Context,
    contexts: ClientContexts | None = None,
    on_rehandshake: RehandshakeCallback | None = None,
) -> OscoreClientTransport:
    """Put an :class:`OscoreClientTransport` in front of ``context``'s request interfaces.

    In front, so that it sees requests before aiocoap's own OSCORE transport (which keeps
    working for contexts placed in ``client_credentials``) and before plain transports.
    Returns the transport; its ``contexts`` attribute is the map to fill.

    Fail closed: every other request interface of ``context`` (also those added later)
    refuses a request whose origin has a context in ``contexts`` with
    :class:`~coaplayers.oscore.errors.UnprotectedRequestRefused`, so that a request meant
    for OSCORE never leaves in the clear, whichever interface aiocoap hands it to.
    """
    transport = OscoreClientTransport(
        context, contexts if contexts is not None else ClientContexts(), on_rehandshake
    )
    context.request_interfaces.insert(0, transport)
    _aiocoap.guard_request_interfaces(context, transport.refusal, spare=TransportOSCORE)
    return transport
