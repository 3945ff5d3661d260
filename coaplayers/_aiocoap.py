"""The one place where coaplayers reaches past aiocoap's public API.

Checked against aiocoap 0.4.17 (``CHECKED_AGAINST``; pinned in pyproject.toml) and, for the
request interface choice, against its development branch (commit f867dc4, which splits
``fill_or_recognize_remote`` into ``recognize_remote`` and ``determine_remote`` and drops
``MessageInterfaceUDP6.create_{server,client}_transport_endpoint``). Every other module uses
aiocoap's public names only; ``tests/test_seams.py`` parses the tree and fails on a private
aiocoap name anywhere else, except ``EXCEPTIONS`` below.

What is here, each with why and the upstream change that would retire it:

* fail closed: :func:`guard_request_interfaces` (a request meant for OSCORE never leaves
  through a plain transport);
* transports: :func:`append_transport`, :func:`append_udp6` (no public way to add one);
* rendering and requests without aiocoap's per-request task names (:func:`render_site`,
  :func:`blockwise_request`), :func:`complete_block2`, :func:`request_block_key`,
  :func:`release_request`;
* options as aiocoap stores them (:func:`option_lists`), for copies without deep copies;
* resources: :func:`site_children`, :func:`replace_block_state` (bounded block-wise state);
* the message manager: :func:`replace_duplicate_table`, :func:`send_datagram`,
  :func:`acknowledge_repeated_responses`, :func:`abandon_request`,
  :func:`wrap_sending`, :func:`message_manager_of`, :func:`next_message_id`;
* datagrams below the message layer (coap-proxy's fast path; and coap-server's listeners,
  read in batches): :func:`intercept_datagrams`, :func:`datagram_sender`,
  :func:`reject_malformed_responses`, :func:`end_malformed_response`,
  :func:`udp6_message_manager`;
* the OSCORE transport's internals (:func:`oscore_transport_run` and friends);
* credentials: :func:`credentials_entry_base`, :func:`credentials_map_base`;
* copies of aiocoap functions, changed (:func:`error_to_message`, :func:`error_answer`);
* process-wide patches: :func:`install_pipe_fix`, :func:`install_send_error_fix`,
  :func:`remember_local_multicast`.
"""

from __future__ import annotations

import logging
import socket
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, SupportsIndex

from aiocoap import Message, error
from aiocoap.blockwise import _extract_block_key
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from aiocoap.pipe import Pipe
from aiocoap.protocol import BlockwiseRequest, ClientObservation

from .errors import ICMP_ERRNOS

CHECKED_AGAINST = {"aiocoap": "0.4.17"}
"""Distribution -> the version these workarounds were checked against (tests/test_seams.py
compares it with what is installed)."""

EXCEPTIONS = {
    ("coaplayers/oscore/context.py", "_split_message"):
        "SecurityContext overrides aiocoap's OSCORE hook (called by aiocoap's own protect and"
        " unprotect) and calls it for Proxy-Uri requests. Upstream: public hooks for the outer"
        " options, or class U options kept outer (aiocoap drops Proxy-Scheme and Uri-Port).",
    ("coaplayers/oscore/context.py", "_construct_nonce"):
        "SecurityContext overrides aiocoap's nonce hook with a faster one for its own"
        " (non-group) contexts. Upstream: the same speed in aiocoap's.",
}
"""(file, private aiocoap name) used outside this module, with the reason it stays there."""

Refusal = Callable[[Message], "Exception | None"]
"""Says why a request must not go out through a plain interface (None: it may)."""

_GUARDS = "_coaplayers_guards"


def guard_request_interfaces(context: Any, refusal: Refusal, *, spare: type) -> None:
    """Fail closed: every request interface of ``context`` that is not a ``spare`` (the
    OSCORE transports) refuses a request for which ``refusal`` returns an error: the error
    goes to the requester and nothing is sent. Interfaces added to ``context`` later are
    guarded as they are added.

    Why here: aiocoap picks the interface for a request by asking each in turn
    (``fill_or_recognize_remote`` in 0.4.17, two passes in its development branch); an
    interface that is not asked, or asked after a plain transport claimed the URI, would
    let a request meant for OSCORE leave in the clear without an error. The guard sits where
    every request ends, whatever the choice: the chosen interface's ``request(pipe)``.
    Retire when aiocoap lets a request carry a "must be protected" requirement that its
    plain transports honour (upstream: a security policy on the request, checked by
    ``Context.request``).
    """
    interfaces = context.request_interfaces
    for ri in interfaces:
        _guard(ri, refusal, spare)
    if not isinstance(interfaces, _GuardedList):
        context.request_interfaces = _GuardedList(interfaces)
    context.request_interfaces.guards.append((refusal, spare))


def _guard(ri: Any, refusal: Refusal, spare: type) -> None:
    if isinstance(ri, spare):
        return
    guards: list[Refusal] | None = ri.__dict__.get(_GUARDS)
    if guards is None:
        guards = []
        unguarded = ri.request

        def request(pipe: Any, _guards: list[Refusal] = guards) -> None:
            message = pipe.request
            for refuse in _guards:
                refused = refuse(message)
                if refused is not None:
                    pipe.add_exception(refused)
                    return
            unguarded(pipe)

        # An instance attribute: the interface keeps its type (coaplayers.layer1's
        # ServerContext recognises aiocoap's TokenManager by type) and its other methods.
        ri.request = request
        ri.__dict__[_GUARDS] = guards
    if refusal not in guards:
        guards.append(refusal)


class _GuardedList(list[Any]):
    """``Context.request_interfaces`` that guards interfaces added after the guard was
    installed (aiocoap appends a transport's token manager as it starts; coaplayers and
    aiocoap add interfaces with ``append``, ``insert`` and ``extend`` only)."""

    def __init__(self, items: Iterable[Any]) -> None:
        super().__init__(items)
        self.guards: list[tuple[Refusal, type]] = []

    def _guarded(self, ri: Any) -> Any:
        for refusal, spare in self.guards:
            _guard(ri, refusal, spare)
        return ri

    def append(self, ri: Any) -> None:
        super().append(self._guarded(ri))

    def insert(self, index: SupportsIndex, ri: Any) -> None:
        super().insert(index, self._guarded(ri))

    def extend(self, items: Iterable[Any]) -> None:
        super().extend(self._guarded(ri) for ri in items)


# ----------------------------------------------------------------------- transports
#
# aiocoap 0.4.17 has no public way to add a transport to a Context (create_client_context and
# create_server_context pick them from a name list, with fixed options). Upstream: a public
# ``Context.add_transport``; its development branch also drops
# ``MessageInterfaceUDP6.create_{server,client}_transport_endpoint`` for one
# ``create_transport_endpoint``: only these two functions change then.


async def append_transport(context: Any, make: Callable[[Any], Any]) -> Any:
    """Add the message interface ``make(message_manager)`` (awaitable) to ``context``, with
    aiocoap's message and token managers on top; returns the message interface."""
    made: list[Any] = []

    async def build(mman: Any) -> Any:
        interface = await make(mman)
        made.append(interface)
        return interface

    await context._append_tokenmanaged_messagemanaged_transport(build)
    return made[0]


async def append_udp6(context: Any, bind: tuple[str, int] | None = None) -> Any:
    """Add aiocoap's udp6 transport: a client socket, or a server socket bound to ``bind``
    (no multicast). Returns the message interface (its ``transport`` is the socket's)."""
    from aiocoap.transports.udp6 import MessageInterfaceUDP6

    if bind is None:
        return await append_transport(
            context, lambda mman: MessageInterfaceUDP6.create_client_transport_endpoint(
                mman, log=context.log, loop=context.loop))
    return await append_transport(
        context, lambda mman: MessageInterfaceUDP6.create_server_transport_endpoint(
            mman, log=context.log, loop=context.loop, bind=bind, multicast=[]))


def render_site(context: Any, pipe: Any) -> Any:
    """The coroutine that renders ``pipe``'s request with ``context``'s site (what aiocoap's
    ``Context.render_to_pipe`` runs in a task named after the request). Upstream: a
    ``Context.render_to_pipe`` that takes the task name, or names tasks lazily."""
    return context._render_to_pipe(pipe)


# --------------------------------------------------------------------------- messages


def option_lists(opt: Any) -> dict[int, list[Any]]:
    """An aiocoap ``Options``' option objects per option number: the dict itself, so that callers
    can copy or move options without aiocoap's per-option setters and deep copies (its
    option objects are immutable and may be shared). Upstream: ``Options.copy()`` shallow,
    and a public ``Options.items()`` / ``Options.replace(number, values)``."""
    return opt._options  # type: ignore[no-any-return]


def set_option_lists(opt: Any, options: dict[int, list[Any]]) -> None:
    """Replace all of an ``Options``' options by ``options`` (see :func:`option_lists`)."""
    opt._options = options


def release_request(request: Any) -> None:
    """Drop the reference cycle of an answered one-answer aiocoap ``Request`` (its
    ``_stop_interest`` partial holds its pipe and callback). Upstream: ``Request`` clearing
    it once the last answer arrived."""
    request._stop_interest = _nothing


def _nothing() -> None:
    pass


async def complete_block2(context: Any, request: Any, first: Any, log: Any) -> Any:
    """aiocoap's own completion of a Block2 answer whose first block is ``first``.
    Upstream: a public ``BlockwiseRequest.complete_block2``."""
    return await BlockwiseRequest._complete_by_requesting_block2(context, request, first, log)


def blockwise_request(context: Any, app_request: Any, name: str) -> Any:
    """aiocoap 0.4.17's ``BlockwiseRequest(context, app_request)`` with a constant task
    name: aiocoap names it after the request's repr, formatted for every request.
    Upstream: a ``name`` argument, or lazy task names."""
    request = BlockwiseRequest.__new__(BlockwiseRequest)
    request.protocol = context
    request.log = context.log.getChild("blockwise-requester")
    request.response = context.loop.create_future()
    request.observation = (
        ClientObservation() if app_request.opt.observe is not None else None)
    observation = request.observation
    request._runner = context.loop.create_task(
        BlockwiseRequest._run_outer(
            app_request, request.response,
            weakref.ref(observation) if observation is not None else lambda: None,
            context, request.log),
        name=name,
    )
    request.response.add_done_callback(request._response_cancellation_handler)
    return request


def request_block_key(request: Any) -> Any:
    """What aiocoap keys a block-wise transfer by (endpoint and the request's cache-key
    options). Upstream: a public ``blockwise.extract_block_key``."""
    return _extract_block_key(request)


# ------------------------------------------------------------------------ resources


def site_children(site: Any) -> list[Any]:
    """The resources added to an aiocoap ``resource.Site``. Upstream: a public iterator."""
    return list(site._resources.values())


def replace_block_state(resource: Any, block1: Any = None, block2: Any = None,
                        completes: Any = None) -> tuple[bool, bool]:
    """Give an aiocoap ``resource.Resource`` our Block1 spool and/or Block2 cache in place of
    its own unbounded ones (``completes``: the Block2 cache's response table); returns
    which of the two the resource has. Upstream: bounds in aiocoap's ``Block1Spool`` and
    ``Block2Cache``, or a constructor argument for them."""
    has1, has2 = hasattr(resource, "_block1"), hasattr(resource, "_block2")
    if has1 and block1 is not None:
        resource._block1 = block1
    if has2 and block2 is not None:
        if completes is not None:
            block2._completes = completes
        resource._block2 = block2
    return has1, has2


# ------------------------------------------------------------------- message manager


def message_manager_of(request_interface: Any) -> Any:
    """The aiocoap ``MessageManager`` below a request interface (None: not one of
    aiocoap's token-managed transports)."""
    mman = getattr(request_interface, "token_interface", None)
    return mman if mman is not None and hasattr(mman, "_recent_messages") else None


def replace_duplicate_table(mman: Any, deduplicate: Callable[..., Any],
                            store: Callable[..., Any]) -> None:
    """Have ``mman`` (before it has seen a message) detect duplicates and keep answers with
    ``deduplicate`` / ``store`` in place of its own dict. Upstream: a pluggable (or bounded,
    compact) duplicate table in ``MessageManager``."""
    mman._deduplicate_message = deduplicate
    mman._store_response_for_duplicates = store


REPEATED_RESPONSES = 1024
"""Separate CON responses remembered per message manager, so that a repetition is ACKed."""


def acknowledge_repeated_responses(mman: Any, remember: int = REPEATED_RESPONSES) -> None:
    """Have ``mman`` acknowledge a separate CON response again when it comes again (the
    upstream's copy after our ACK was lost), instead of resetting it.

    aiocoap does not deduplicate responses (its ``dispatch_message`` says why): once a
    separate response has been taken, the token's exchange is gone, and a repetition is
    "not recognized" and gets an RST, which tells the upstream that the answer it sent was
    rejected. RFC 7252 4.5 asks for the same ACK again. The last ``remember`` acknowledged
    (remote, message ID) pairs are kept (bounded; a repetition comes within
    MAX_TRANSMIT_SPAN, long before that many others). Upstream: response deduplication
    in ``MessageManager``, or a hook for unmatched responses.
    """
    process = mman._process_response
    if getattr(process, "_coaplayers", False):
        return
    acked: OrderedDict[tuple[Any, int], None] = OrderedDict()
    con = Type.CON

    def process_response(response: Any) -> bool:
        if process(response):
            if response.mtype is con:
                acked[(response.remote, response.mid)] = None
                if len(acked) > remember:
                    acked.popitem(last=False)
            return True
        # a repetition: "expected", so aiocoap ACKs it again (and delivers nothing)
        return response.mtype is con and (response.remote, response.mid) in acked

    process_response._coaplayers = True  # type: ignore[attr-defined]
    mman._process_response = process_response


def abandon_request(request_interface: Any, message: Any) -> bool:
    """Stop the message layer's work on ``message``, a CON request sent through
    ``request_interface`` whose answer nobody waits for any more (coap-proxy answered its
    client 5.04): no more retransmissions, and it no longer holds the peer's NSTART slot
    (RFC 7252 4.7 counts an interaction only while its answer "is still expected"); one
    still waiting in that backlog is not sent at all. True if there was such work.

    aiocoap 0.4.17 retransmits a CON until MAX_RETRANSMIT even when the request's interest
    ended (its ``send_message`` returns no canceller), holding every later CON to that peer
    behind it. Upstream: a canceller from ``MessageManager.send_message``, called when a
    request's interest ends."""
    mman = message_manager_of(request_interface)
    if mman is None or message.mtype is not Type.CON or message.mid is None:
        return False
    backlog = mman._backlogs.get(message.remote)
    if backlog:
        for i, (queued, _) in enumerate(backlog):
            if queued is message:
                del backlog[i]
                return True
    exchanges = mman._active_exchanges
    if exchanges is None or (message.remote, message.mid) not in exchanges:
        return False
    mman._remove_exchange(message)  # (its retransmission timer and the backlog's next go)
    return True


def send_datagram(mman: Any, message: Any) -> None:
    """Send ``message`` through ``mman``'s transport as is (no retransmission state)."""
    mman._send_via_transport(message)


def intercept_datagrams(interface: Any, hook: Callable[[bytes, Any, Any], bool], *,
                        batch: int = 32) -> None:
    """Offer every datagram that aiocoap's udp6 ``interface`` receives to ``hook(data,
    pktinfo, address)`` first; aiocoap decodes and handles it only when ``hook`` returns
    False. For coap-proxy's fast path (``proxy/fastpath.py``), which forwards plain requests
    below aiocoap's message layer.

    The socket is read here, up to ``batch`` datagrams per wakeup of the event loop (aiocoap
    reads one, after a read of the socket's error queue that is nearly always empty). An
    error on the socket (an ICMP error queued by ``IP_RECVERR``) is left to aiocoap's own
    reader, which reads the error queue. A socket bound to one address is read without
    ancillary data (``pktinfo`` is None; aiocoap gets that address as its pktinfo).
    Upstream: a receive hook on ``MessageInterfaceUDP6`` and batched reads in its transport.
    """
    transport = interface.transport
    sock = transport.get_extra_info("socket")
    fileno = sock.fileno()
    size = transport.max_size
    received = interface.datagram_msg_received
    ipv6 = socket.IPPROTO_IPV6
    pktinfo_type = socket.IPV6_PKTINFO
    aiocoap_reader = transport._read_ready
    bound = sock.getsockname()[0]
    if bound not in ("::", "::ffff:0.0.0.0"):
        # One local address: every answer leaves from it without ancillary data.
        recvfrom = sock.recvfrom
        local = [(ipv6, pktinfo_type, socket.inet_pton(socket.AF_INET6, bound.split("%")[0])
                  + b"\0\0\0\0")]

        def readable() -> None:
            for _ in range(batch):
                try:
                    data, address = recvfrom(size)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    aiocoap_reader()
                    return
                if not hook(data, None, address):
                    received(data, local, 0, address)
    else:
        recvmsg = sock.recvmsg

        def readable() -> None:
            for _ in range(batch):
                try:
                    data, ancdata, flags, address = recvmsg(size, 1024)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    aiocoap_reader()
                    return
                pktinfo = None
                for level, kind, value in ancdata:
                    if level == ipv6 and kind == pktinfo_type:
                        pktinfo = value
                if not hook(data, pktinfo, address):
                    received(data, ancdata, flags, address)

    loop = transport._loop
    loop.remove_reader(fileno)
    loop.add_reader(fileno, readable)


def reject_malformed_responses(interface: Any, malformed: Callable[[bytes], bool]) -> None:
    """Have aiocoap's udp6 ``interface`` (a client socket) end the exchange of an answer that
    ``malformed`` says has a message format error aiocoap's decoder lets pass (see
    :func:`end_malformed_response`). Upstream: a strict decoder in ``Message.decode``."""
    mman = interface._ctx
    send = datagram_sender(interface)
    from aiocoap.transports.udp6 import UDP6EndpointAddress

    def hook(data: bytes, pktinfo: Any, address: Any) -> bool:
        if not data or data[-1] != 0xFF or not malformed(data):
            return False
        return end_malformed_response(
            mman, data, UDP6EndpointAddress(address, interface, pktinfo=pktinfo),
            lambda rst: send(rst, pktinfo, address))

    intercept_datagrams(interface, hook)


def end_malformed_response(mman: Any, data: bytes, remote: Any,
                           reset: Callable[[bytes], None]) -> bool:
    """End the exchange that ``data``, an answer from ``remote`` with a message format error
    aiocoap's decoder lets pass (RFC 7252 3: a payload marker followed by no payload, which
    aiocoap reads as no payload), belongs to, in ``mman`` (an aiocoap ``MessageManager``):
    the request gets ``UnparsableMessage`` instead of the answer, a CON answer is reset
    through ``reset`` (RFC 7252 4.2), and a piggybacked one still acknowledges the request
    (its retransmission stops), as RFC 8974 3.3 has a client treat an ACK whose answer it
    discards. False if ``data`` is no answer aiocoap could decode (it ignores it anyway)."""
    if len(data) < 4 or data[1] < 0x40:
        return False
    try:
        message = Message.decode(data, remote)
    except (error.UnparsableMessage, UnicodeDecodeError):
        return False
    if message.mtype is Type.CON:
        reset(bytes((0x70, 0)) + data[2:4])
    elif message.mtype is Type.ACK:
        mman._remove_exchange(message)
    requests = mman.token_manager.outgoing_requests
    request = requests.pop((message.token, message.remote), None) if requests else None
    if request is not None:
        request.add_exception(error.UnparsableMessage(
            "answer with a payload marker and no payload"))
    return True


def datagram_sender(interface: Any) -> Callable[[bytes, Any, Any], None]:
    """``send(data, pktinfo, address)`` on aiocoap's udp6 ``interface``'s socket, answering
    from the address a request came to (``pktinfo`` as :func:`intercept_datagrams` gave it)."""
    sock = interface.transport.get_extra_info("socket")
    sendmsg, sendto = sock.sendmsg, sock.sendto
    ipv6 = socket.IPPROTO_IPV6
    pktinfo_type = socket.IPV6_PKTINFO

    def send(data: bytes, pktinfo: Any, address: Any) -> None:
        try:
            if pktinfo is None:
                sendto(data, address)
            else:
                sendmsg(data, [(ipv6, pktinfo_type, pktinfo)], 0, address)
        except (BlockingIOError, InterruptedError):
            pass  # the socket's buffer is full: lost, as on the wire
        except OSError as exc:  # (as aiocoap's transport does: the error is the peer's)
            logging.getLogger("coaplayers.proxy").debug("send to %s failed: %s", address, exc)

    return send


def udp6_message_manager(interface: Any) -> Any:
    """The aiocoap ``MessageManager`` that aiocoap's udp6 ``interface`` delivers to."""
    return interface._ctx


def next_message_id(mman: Any) -> int:
    """A message ID from ``mman``'s own sequence, so that messages sent past aiocoap on its
    socket never take an ID aiocoap uses for a message it is waiting on."""
    return int(mman._next_message_id())


def wrap_sending(mman: Any, wrap: Callable[[Callable[[Any], None]], Callable[[Any], None]]
                 ) -> bool:
    """Route every message ``mman`` sends through ``wrap(send)``; False if ``mman`` is not
    an aiocoap ``MessageManager``. Upstream: a send hook on ``MessageManager``."""
    send = getattr(mman, "_send_via_transport", None)
    if send is None:
        return False
    mman._send_via_transport = wrap(send)
    return True


# ------------------------------------------------------------------------------ OSCORE


def oscore_transport_tasks(transport: Any) -> set[Any]:
    """The task set aiocoap's ``TransportOSCORE`` keeps its request tasks in."""
    return transport._tasks  # type: ignore[no-any-return]


def oscore_transport_run(transport: Any, request: Any) -> Any:
    """The coroutine aiocoap's ``TransportOSCORE.request`` runs for ``request`` (protect,
    send through the wire, unprotect). Upstream: a public coroutine, or a hook for mapping
    its errors."""
    return transport._request(request)


def oscore_transport_wire(transport: Any) -> Any:
    """The forward context aiocoap's ``TransportOSCORE`` sends protected messages through."""
    return transport._wire


# ------------------------------------------------------------------------------- pipes


def add_event_after_end(pipe: Any, event: Any) -> bool:
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


def install_pipe_fix() -> None:
    """Install :func:`add_event_after_end` in aiocoap's ``Pipe`` (once)."""
    original = Pipe._add_event
    if getattr(original, "_coaplayers", False):
        return

    def _add_event(self: Any, event: Any) -> None:
        if not add_event_after_end(self, event):
            original(self, event)

    _add_event._coaplayers = True  # type: ignore[attr-defined]
    Pipe._add_event = _add_event  # type: ignore[method-assign]




def install_send_error_fix() -> None:
    """Keep one peer's ICMP error from failing a datagram to another (aiocoap's udp6, once).

    aiocoap sets ``IP(V6)_RECVERR`` and reads ICMP errors from the error queue, where each
    names its peer. Linux also keeps the latest one as the socket's pending error and fails
    the next ``sendmsg`` with it, whoever that datagram is for: the datagram is not sent,
    and aiocoap blames the peer it was being sent to (a forward proxy answered a live
    upstream "5.04 unreachable" because another one's port was closed). Such a send is
    tried once more; an error on that try is the peer's own. Retire once aiocoap's udp6
    retries it (or reads the error queue before blaming the current peer).
    """
    from aiocoap.transports.udp6 import MessageInterfaceUDP6

    send, error_received = MessageInterfaceUDP6.send, MessageInterfaceUDP6.error_received
    if getattr(send, "_coaplayers", False):
        return

    def patched_send(self: Any, message: Any) -> None:
        self._coaplayers_sending = message
        try:
            send(self, message)
        finally:
            self._coaplayers_sending = None

    def patched_error_received(self: Any, exc: Exception) -> None:
        message = getattr(self, "_coaplayers_sending", None)
        if message is None or getattr(exc, "errno", None) not in ICMP_ERRNOS:
            error_received(self, exc)
            return
        self._coaplayers_sending = None  # once: a second failure is this peer's
        being_sent_to = self._remote_being_sent_to
        remote = being_sent_to.get(None)
        being_sent_to.set(None)  # (aiocoap's send asserts it is not re-entered)
        try:
            send(self, message)
        finally:
            being_sent_to.set(remote)

    patched_send._coaplayers = True  # type: ignore[attr-defined]
    MessageInterfaceUDP6.send = patched_send  # type: ignore[method-assign]
    MessageInterfaceUDP6.error_received = patched_error_received  # type: ignore[method-assign]


# ---------------------------------------------------------- copies of aiocoap functions


def error_answer(exc: BaseException, log: logging.Logger) -> Any:
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


def error_to_message(old_pr: Any, log: logging.Logger) -> Any:
    """aiocoap's ``aiocoap.pipe.error_to_message`` (0.4.17; recheck on upgrades), unchanged
    in what it does: a new pipe for the responder whose answers go to ``old_pr``, whose
    exceptions become a terminal answer there (:func:`error_answer`), and whose loss of
    interest is forwarded.

    Copied because aiocoap's runs ``from .message import Message`` on every call: an import
    statement per rendered request, and a server renders through one or two of these per
    request (the cost: docs/BENCHMARKS.md, "Costs behind the code").
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


# ------------------------------------------------------------------------- credentials
#
# aiocoap's credentials map builds entries from JSON through a class map and a base class
# that are both private. Upstream: a public registry of entry kinds (and base class).


def credentials_entry_base() -> type:
    """The base class of aiocoap's credential entries (``credentials._Objectish``)."""
    from aiocoap import credentials

    return credentials._Objectish  # type: ignore[no-any-return]


def credentials_map_base(**extra: Callable[[], type]) -> type:
    """A base for a ``CredentialsMap`` whose JSON loader knows the entry kinds ``extra``
    (JSON key -> class factory) besides aiocoap's own."""
    from aiocoap import credentials

    kinds = {**credentials.CredentialsMap._class_map, **extra}
    return type("CredentialsMapWithKinds", (credentials.CredentialsMap,), {"_class_map": kinds})


# ------------------------------------------------------------------- process-wide patches
#
# remember_local_multicast: aiocoap decides for every response whether the request came to a
# multicast address of ours (UDP6EndpointAddress.as_response_address ->
# is_multicast_locally), parsing our own address from the packet info with ipaddress each
# time, three times per Layer 0 handshake and once per plain request. The answer depends only
# on those packet-info bytes, of which a server sees a handful (one per local address), so it
# is remembered per value. Upstream: a cached property on UDP6EndpointAddress.

_MULTICAST_MEMO_LIMIT = 256  # distinct local addresses remembered (then the memo starts over)


def remember_local_multicast() -> None:
    """Make ``UDP6EndpointAddress.is_multicast_locally`` remember its answer per packet info."""
    from aiocoap.transports.udp6 import UDP6EndpointAddress

    original = UDP6EndpointAddress.is_multicast_locally
    compute = original.fget
    if getattr(compute, "_coaplayers_memo", False):
        return
    memo: dict[bytes, bool] = {}

    def is_multicast_locally(self: Any) -> bool:
        pktinfo = self.pktinfo
        if pktinfo is None:
            return bool(compute(self))  # as aiocoap does (it fails without packet info)
        known = memo.get(pktinfo)
        if known is None:
            known = bool(compute(self))
            if len(memo) >= _MULTICAST_MEMO_LIMIT:
                memo.clear()
            memo[pktinfo] = known
        return known

    prop = property(is_multicast_locally, doc=original.__doc__)
    is_multicast_locally._coaplayers_memo = True  # type: ignore[attr-defined]
    UDP6EndpointAddress.is_multicast_locally = prop  # type: ignore[method-assign]
