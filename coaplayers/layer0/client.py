"""The client side of Layer 0: a client of one origin server, used like an aiocoap context.

``Layer0Client(context, "coap://server", credentials, proxy="coap://proxy")`` sends nothing
until the first request; then it runs the end-to-end DTLS handshake through whatever outer
transport and proxies ``context`` reaches, and carries each inner request in one record. Its
:meth:`Layer0Client.request` mirrors aiocoap's: it returns an object whose ``response`` is
awaited and whose ``observation`` (for Observe requests) is iterated.

What it does by itself, so applications need not:

* block-wise inside Layer 0 (512-byte inner blocks), in both directions;
* Observe inside Layer 0: notifications are fetched with long-polling pulls, each a small
  record that acknowledges what the previous pulls delivered (the server keeps a notification
  until then), because not every proxy forwards outer observations (aiocoap 0.4.17's forward
  proxy cannot);
* a new handshake when the server answers 4.04 (it forgot the session), and resending the
  request if its method is idempotent (the server never decrypted it, but a lost answer after
  a server crash cannot be told apart, so POST is only resent when the client allows it);
* registering active observations again after such a new handshake (the server lost them
  with the session), unless ``Layer0Config.reregister_observations`` is off;
* resumption with the OpenSSL backend (a :class:`~coaplayers.dtls.TicketStore`, shareable).

The protocol lives in the sans-I/O :class:`~.clientcore.Layer0ClientCore`; this module is its
asyncio shell: it sends the outer requests the core asks for through ``context``, reports
their outcome, runs the core's timer on ``loop.time()``, and turns the core's events into
futures and observation queues.

It never hands the application anything that did not authenticate: an altered or replayed
answer raises :class:`~coaplayers.layer0.errors.ResponseRejected`, a refused request
:class:`~coaplayers.layer0.errors.RecordRejected`.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiocoap
from aiocoap import Message
from aiocoap.message import UndecidedRemote
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import OpaqueOption
from OpenSSL import SSL

from ..dtls import HandshakeComplete, TicketStore
from ..message import echo_asked, request_through, with_echo
from . import profile
from .clientcore import (
    FINAL_FLIGHT_WINDOW,
    ClientCredentials,
    Closed,
    Connected,
    Event,
    HandshakeDone,
    Layer0ClientCore,
    Layer0Config,
    Notification,
    ObservationEnded,
    OuterAnswer,
    OuterRequest,
    RequestFailed,
    ResponseReceived,
)
from .errors import OuterError
from .profile import CONTENT_FORMAT, WELL_KNOWN_PATH

__all__ = [
    "FINAL_FLIGHT_WINDOW",
    "Layer0Client",
    "Layer0Config",
    "Layer0Observation",
    "Layer0Request",
]

log = logging.getLogger(__name__)


class Layer0Observation:
    """Notifications of one inner observation; iterate with ``async for``.

    Ends with :class:`StopAsyncIteration` after :meth:`cancel` or a final notification, and raises
    the Layer 0 error that ended it otherwise (e.g. :class:`SessionLost`).
    """

    def __init__(self, cancel: Callable[[], None]) -> None:
        self._cancel = cancel
        self._queue: asyncio.Queue[Message | BaseException | None] = asyncio.Queue()
        self.cancelled = False

    def cancel(self) -> None:
        """Stop observing; the server is told with an Observe: 1 request (best effort)."""
        if not self.cancelled:
            self.cancelled = True
            self._cancel()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        return item


class Layer0Request:
    """One application request on a Layer 0 client: ``await req.response``; ``req.observation``."""

    def __init__(self, response: asyncio.Future[Message],
                 observation: Layer0Observation | None) -> None:
        self.response = response
        self.observation = observation


class Layer0Client:
    """A Layer 0 (end-to-end DTLS) client of ``origin`` (``coap://host[:port]`` or ``coaps://...``).

    ``context`` is any aiocoap client context; it carries the outer messages (plain CoAP, or
    Layer 1 when the origin or proxy URI is ``coaps://``). ``credentials`` are Layer 0's own:
    :class:`PskClientCredentials` (tinydtls), :class:`CertificateCredentials` (OpenSSL) or
    :class:`RawPublicKeyCredentials` (GnuTLS, RFC 7250: its ``trusted`` keys pin the server).
    ``proxy`` is a forward proxy's URI (``coap://proxy:5683``). ``tickets`` keeps resumption
    state (OpenSSL only); to resume across Layer 0 clients, share one store and one ``ssl_context``
    (from :func:`coaplayers.dtls.build_context`): OpenSSL resumes only within one context.
    ``exporter``: the sessions must offer the TLS exporter (the OSCORE mode keys from it), so
    PSK handshakes run on OpenSSL rather than tinydtls, which has none.
    """

    def __init__(
        self,
        context: aiocoap.Context,
        origin: str,
        credentials: ClientCredentials,
        *,
        proxy: str | None = None,
        config: Layer0Config | None = None,
        tickets: TicketStore | None = None,
        ssl_context: SSL.Context | None = None,
        exporter: bool = False,
    ) -> None:
        parsed = urllib.parse.urlsplit(origin)
        if parsed.scheme in ("http", "https") and parsed.hostname and proxy is None:
            # ATLS's HTTP binding: the outer exchanges cross a CoAP-to-HTTP proxy unread.
            raise ValueError(f"an {parsed.scheme}:// origin needs a CoAP-to-HTTP cross-proxy")
        if parsed.scheme not in ("coap", "coaps", "coap+tcp", "coaps+tcp", "http", "https") or (
                not parsed.hostname):
            raise ValueError(f"origin must be a coap:// or coaps:// URI with a host: {origin!r}")
        self._ctx = context
        self.origin = f"{parsed.scheme}://{parsed.netloc}"
        self._scheme = parsed.scheme
        self._host = parsed.hostname
        self._port = parsed.port
        self._proxy = UndecidedRemote.from_pathless_uri(proxy) if proxy else None
        self.config = config or Layer0Config()
        self._core = Layer0ClientCore(
            self.origin, credentials, self.config,
            first_hop=f"the proxy {proxy}" if proxy else self.origin,
            tickets=tickets, ssl_context=ssl_context, exporter=exporter,
        )
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._observations: dict[int, Layer0Observation] = {}
        self._exchanges: dict[int, asyncio.Task[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pumping = False
        self._closing: asyncio.Future[None] | None = None
        self.on_handshake: list[Callable[[Layer0Client, HandshakeComplete], None]] = []
        """Called after every completed handshake: the OSCORE mode's hook (see exporter)."""

    # ------------------------------------------------------------------ public API

    def request(self, message: Message) -> Layer0Request:
        """Send ``message`` (code, Uri-Path, options, payload) to the origin inside Layer 0."""
        loop = asyncio.get_running_loop()
        rid = self._core.request(message, loop.time())  # Layer0Closed once closed
        response: asyncio.Future[Message] = loop.create_future()
        self._futures[rid] = response
        observation = None
        if message.opt.observe == 0:
            observation = Layer0Observation(lambda: self._cancel_observation(rid))
            self._observations[rid] = observation
        self._pump()
        return Layer0Request(response, observation)

    async def connect(self) -> HandshakeComplete:
        """Handshake now rather than on the first request."""
        loop = asyncio.get_running_loop()
        rid = self._core.connect(loop.time())
        done: asyncio.Future[HandshakeComplete] = loop.create_future()
        self._futures[rid] = done
        self._pump()
        return await done

    @property
    def established(self) -> bool:
        return self._core.established

    @property
    def session_path(self) -> tuple[str, ...] | None:
        return self._core.session_path

    @property
    def kind(self) -> str:
        """The credential kind of the end-to-end sessions: ``psk``, ``certificate`` or ``rpk``."""
        return self._core.kind

    @property
    def false_start(self) -> str | None:
        """``yes`` if the last full handshake carried our first request with our Finished
        (RFC 7918), else why not; ``None`` after a resumption."""
        return self._core.false_start

    @property
    def handshakes(self) -> int:
        """Completed handshakes (full or resumed) over the client's life."""
        return self._core.handshakes

    @property
    def reregistrations(self) -> int:
        """Observations registered again after the server lost their session."""
        return self._core.reregistrations

    @property
    def last_handshake(self) -> HandshakeComplete | None:
        return self._core.last_handshake

    @property
    def alpn(self) -> bytes | None:
        """An ALPN protocol (RFC 7301) to offer in the next handshakes (every backend but
        tinydtls). A server that agrees answers the request it stands for with its last flight and
        ends the session (Layer0Site.fold): the OSCORE mode's keying (docs/OSCORE-KEYING.md 9.1)."""
        return self._core.alpn

    @alpn.setter
    def alpn(self, value: bytes | None) -> None:
        self._core.alpn = value

    @property
    def folded(self) -> Message | None:
        """That answer (the server's inner message with the empty token), from the last
        handshake; ``None`` if it carried none."""
        return self._core.folded

    @property
    def agreed_alpn(self) -> bytes | None:
        """The ALPN protocol the current session's handshake agreed on (see :attr:`alpn`)."""
        return self._core.agreed_alpn

    def export_keying_material(
        self, label: bytes, length: int, context: bytes | None = None
    ) -> bytes:
        """RFC 5705 exporter of the current session (OpenSSL and GnuTLS backends)."""
        return self._core.export_keying_material(label, length, context)

    def forget_session(self) -> None:
        """Drop the session locally without telling the server (tests, key rollover)."""
        self._core.forget_session()
        self._pump()

    async def close(self) -> None:
        """End the session with close_notify (DELETE), stop polling and fail what is pending."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
            self._core.close(asyncio.get_running_loop().time())
            self._pump()
        try:
            await asyncio.shield(self._closing)
        finally:
            for task in list(self._exchanges.values()):
                task.cancel()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    async def __aenter__(self) -> Layer0Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ the core's I/O

    def _cancel_observation(self, rid: int) -> None:
        self._core.cancel_observation(rid, asyncio.get_running_loop().time())
        self._pump()

    def _pump(self) -> None:
        """Carry out what the core asks for: events, outer requests, cancellations, timer."""
        if self._pumping:
            return  # a callback called back into the client: the loop below picks it up
        self._pumping = True
        try:
            core = self._core
            while True:
                event = core.next_event()
                if event is not None:
                    self._dispatch(event)
                    continue
                requests = core.outer_requests_to_send()
                for xid in core.exchanges_to_cancel():
                    task = self._exchanges.pop(xid, None)
                    if task is not None:
                        task.cancel()
                if not requests:
                    break
                for outer in requests:
                    self._exchanges[outer.xid] = asyncio.create_task(
                        self._exchange(outer), name="Layer 0 outer exchange")
            self._arm_timer()
        finally:
            self._pumping = False

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, ResponseReceived | Connected):
            future = self._futures.pop(event.request, None)
            if future is not None and not future.done():
                future.set_result(event.response if isinstance(event, ResponseReceived)
                                  else event.handshake)
        elif isinstance(event, RequestFailed):
            future = self._futures.pop(event.request, None)
            if future is not None and not future.done():
                future.set_exception(event.error)
        elif isinstance(event, Notification):
            observation = self._observations.get(event.request)
            if observation is not None:
                observation._queue.put_nowait(event.message)
        elif isinstance(event, ObservationEnded):
            observation = self._observations.pop(event.request, None)
            if observation is not None:
                observation._queue.put_nowait(event.error)
        elif isinstance(event, HandshakeDone):
            for callback in list(self.on_handshake):
                try:
                    callback(self, event.handshake)
                except Exception:
                    log.exception("Layer 0 client: an on_handshake callback failed")
        elif isinstance(event, Closed) and self._closing is not None:
            if not self._closing.done():
                self._closing.set_result(None)

    async def _exchange(self, outer: OuterRequest) -> None:
        """One outer exchange for the core; cancelled when the core stops waiting for it."""
        try:
            response = await self._post(outer.code, outer.path, outer.payload, outer.pad_to)
        except Exception as exc:
            error = exc if isinstance(exc, OuterError) else OuterError(
                f"outer exchange failed: {type(exc).__name__}: {exc}")
            if error is not exc:
                error.__cause__ = exc
            self._exchanges.pop(outer.xid, None)
            self._core.outer_failed(outer.xid, error, asyncio.get_running_loop().time(),
                                    refused=_refused(error))
        else:
            self._exchanges.pop(outer.xid, None)
            answer = OuterAnswer(response.code, bytes(response.payload),
                                 tuple(response.opt.location_path))
            self._core.outer_answer(outer.xid, answer, asyncio.get_running_loop().time())
        self._pump()

    def _arm_timer(self) -> None:
        """Wake the core at its next deadline. An armed timer that is due no later stays: its
        early call finds nothing due, costs less than moving it on every answer (each outer
        exchange's bound is a deadline), and arms the next one."""
        when = self._core.get_timer()
        if when is None or (self._timer_at is not None and self._timer_at <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        at, self._timer, self._timer_at = self._timer_at, None, None
        now = asyncio.get_running_loop().time()
        # The loop may call back a little before ``at`` (its clock resolution).
        self._core.handle_timer(now if at is None else max(now, at))
        self._pump()

    # ------------------------------------------------------------------ outer side

    def _outer(self, code: Code, path: tuple[str, ...], payload: bytes) -> Message:
        kwargs = {}
        if self.config.transport_tuning is not None:
            kwargs["transport_tuning"] = self.config.transport_tuning
        msg = Message(code=code, payload=payload, **kwargs)
        if payload and path == WELL_KNOWN_PATH:
            # Only the entry resource takes other payloads than records (it refuses them);
            # the session resource's are records by definition: 3 bytes saved per request.
            msg.opt.content_format = CONTENT_FORMAT
        if self._proxy is None:
            msg.remote = UndecidedRemote.from_pathless_uri(self.origin)
            msg.opt.uri_path = path
        else:
            msg.remote = self._proxy
            msg.opt.uri_path = path
            if self.config.use_proxy_uri:
                quoted = "/".join(urllib.parse.quote(p, safe="") for p in path)
                msg.opt.proxy_uri = f"{self.origin}/{quoted}"
                msg.opt.uri_path = ()
            else:
                msg.opt.proxy_scheme = self._scheme
                msg.opt.uri_host = self._host
                if self._port is not None:
                    msg.opt.uri_port = self._port
        return msg

    async def _post(self, code: Code, path: tuple[str, ...], payload: bytes,
                    pad_to: int = 0) -> Message:
        msg = self._outer(code, path, payload)
        if pad_to:
            # The largest token the exchange may get (8 bytes) counts in the size.
            size = len(msg.copy(mtype=aiocoap.CON, mid=0, token=bytes(8)).encode())
            if size + 4 < pad_to:
                msg.opt.add_option(OpaqueOption(profile.PADDING_OPTION,
                                                bytes(pad_to - size - 4)))
        try:
            response = await self._send_outer(msg)
        except (aiocoap.error.Error, OSError, TimeoutError) as exc:
            raise OuterError(f"outer exchange failed: {type(exc).__name__}: {exc}") from exc
        b2 = response.opt.block2
        if b2 is not None and b2.more:
            raise OuterError(
                "the outer answer came in blocks (a proxy split it): Layer 0 answers are at"
                f" most {profile.MAX_DATAGRAM} bytes and need no outer block-wise transfer"
            )
        return response

    async def _send_outer(self, msg: Message) -> Message:
        """One outer exchange: at most one block (MAX_DATAGRAM), so it needs neither
        aiocoap's block-wise runner nor its send task (see request_through)."""
        interface = await self._ctx.find_remote_and_interface(msg)
        response = await request_through(self._ctx, interface, msg).response
        echo = echo_asked(msg, response)
        if echo is not None:  # a proxy verifying our address first (RFC 9175, the 3x rule)
            response = await request_through(self._ctx, interface, with_echo(msg, echo)).response
        return response



def _refused(exc: OuterError) -> bool:
    """An outer exchange that failed at once (an ICMP error), not by a timeout."""
    cause = exc.__cause__
    if isinstance(cause, TimeoutError | aiocoap.error.TimeoutError):
        return False
    return isinstance(cause, OSError | aiocoap.error.NetworkError)
