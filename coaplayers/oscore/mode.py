"""The OSCORE mode end to end: one Layer 0 handshake keys RFC 8613 for the requests after it.

How the parameters travel (docs/PROTOCOL.md, "OSCORE mode"): once the Layer 0 session is
established, the client sends an inner ``POST /.well-known/atls-oscore`` through Layer 0.
The server picks the parameters, derives its context from the session's exporter and answers
2.04 with the parameters' CBOR (docs/OSCORE-KEYING.md). The client derives the same context,
closes the Layer 0 session (it is no longer needed) and sends plain OSCORE requests to the real
resource paths from then on. Being an inner request, the keying exchange is encrypted and
authenticated by the Layer 0 session, and it reuses Layer 0's retransmission and
block-wise machinery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiocoap
import aiocoap.resource as resource
from aiocoap.message import UndecidedRemote
from aiocoap.numbers import OptionNumber
from aiocoap.numbers.codes import Code
from aiocoap.proxy.client import ProxyForwarder
from aiocoap.transports.oscore import OSCOREAddress

from .. import _aiocoap
from ..dtls.errors import DtlsError
from ..layer0.client import Layer0Client
from ..layer0.server import layer0_peer
from ..message import copy_request, split_hostinfo
from .client import ClientContexts, Routing, apply_routing, attach, origin_of
from .errors import AlreadyProcessed, ParameterError, RehandshakeRequired
from .kept import KeptSlot
from .keying import EXPORTER_LABEL, Role, derive_context, exporter_length
from .params import OscoreParameters
from .server import ContextStore

log = logging.getLogger("coaplayers.oscore.mode")

KEYING_PATH = (".well-known", "atls-oscore")
"""Inner path of the keying exchange; only reachable inside a Layer 0 session."""
KEYING_ALPN = b"atls-oscore"
"""ALPN protocol (RFC 7301) of a Layer 0 handshake made only to key OSCORE: agreeing on it
stands for the keying request (``POST`` :data:`KEYING_PATH`, empty token) sent with the client's
last flight; the server answers it with its own and ends the session (docs/OSCORE-KEYING.md
9.1). It is in the handshake's transcript, which both Finished messages authenticate."""
PARAMETERS_CONTENT_FORMAT = 65001
"""``application/vnd.coaplayers.oscore-params+cbor`` (experimental range)."""
ALREADY_PROCESSED = b"request already processed"
"""Diagnostic payload of the 4.09 to a keying request whose ``prior=`` request was processed."""
ALREADY_KEYED = b"this Layer 0 session has keyed OSCORE already"
"""Diagnostic payload of the 4.09 to a second keying request on one Layer 0 session."""
NEEDS_FULL_HANDSHAKE = b"OSCORE keying needs a full handshake (this session was resumed)"
"""Diagnostic payload of the 4.03 to a keying request on a resumed Layer 0 session."""


class KeyingResource(resource.Resource):
    """Server side: turns the Layer 0 session a request arrived on into an OSCORE context."""

    def __init__(self, store: ContextStore, *, id_length: int | None = None) -> None:
        super().__init__()
        self.store = store
        self.id_length = id_length

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        peer = layer0_peer(request)
        if peer is None:
            return aiocoap.Message(
                code=Code.UNAUTHORIZED, payload=b"OSCORE keying needs a Layer 0 session"
            )
        try:  # every Layer 0 server backend has one (PSK too: OpenSSL); checked anyway
            peer.export_keying_material(EXPORTER_LABEL, 1, None)
        except DtlsError:
            return aiocoap.Message(
                code=Code.NOT_IMPLEMENTED,
                payload=b"OSCORE keying needs a session with a TLS exporter",
            )
        if peer.resumed:
            # docs/OSCORE-KEYING.md section 1: keys come from a full handshake only.
            return aiocoap.Message(code=Code.FORBIDDEN, payload=NEEDS_FULL_HANDSHAKE)
        if not peer.claim("oscore-keying"):
            # A second context from the same exporter output would have the first one's
            # keys and Common IV and start at sequence number 0 again: nonces would repeat.
            return aiocoap.Message(code=Code.CONFLICT, payload=ALREADY_KEYED)
        prior = _prior_of(request)
        if prior is not None:
            old = self.store.get(prior[0])
            if old is not None and old.peer == peer.identity:
                if _seen(old, prior[1]):
                    # The client's old context is alive and took this request: whatever
                    # refusal the client got was forged in transit. It keeps that context.
                    return aiocoap.Message(code=Code.CONFLICT, payload=ALREADY_PROCESSED)
                # Not processed: end the old context, so that a copy of the request held
                # back in transit can never be processed after the client sent it again.
                self.store.remove(old)
        params = OscoreParameters(
            client_id=self.store.allocate_client_id(self.id_length),
            server_id=self.store.server_id,
        )
        secret = peer.export_keying_material(EXPORTER_LABEL, exporter_length(params), None)
        context = derive_context(secret, params, Role.SERVER, peer=peer.identity)
        self.store.add(context)
        log.info("OSCORE context for %s (kid %s)", peer.identity, params.client_id.hex())
        return aiocoap.Message(
            code=Code.CHANGED, payload=params.to_cbor(),
            content_format=PARAMETERS_CONTENT_FORMAT,
        )


PRIOR_QUERY = "prior="
"""Inner Uri-Query of a keying request sent because a request was refused with an
unprotected "context not found" / "decryption failed": ``prior=<kid hex>.<Partial IV hex>``
of that request. If the server's context for that kid (of the same Layer 0 peer) is alive
and has seen that Partial IV, it answers 4.09 and keys nothing (the refusal was forged);
otherwise it removes that context and keys a new one, and the request may be sent again."""


def _prior_of(request: aiocoap.Message) -> tuple[bytes, int] | None:
    for query in request.opt.uri_query:
        if query.startswith(PRIOR_QUERY):
            kid, _, piv = query.removeprefix(PRIOR_QUERY).partition(".")
            try:
                return bytes.fromhex(kid), int.from_bytes(bytes.fromhex(piv), "big")
            except ValueError:
                return None
    return None


def _seen(context: Any, number: int) -> bool:
    """Whether the context's replay window took (or can no longer tell about) ``number``."""
    window = context.recipient_replay_window
    return not window.is_initialized() or not window.is_valid(number)


class OscoreRequester:
    """Client side: key once through Layer 0, then send OSCORE requests (via a proxy if given).

    A "Security context not found" (server restarted or evicted us) or an exhausted sequence
    number space leads to one new handshake and one retry of the request, by itself. With
    ``rekey_threshold``, a context whose sender sequence number has reached it is replaced by
    a new handshake before the next request (docs/OSCORE-KEYING.md, section 7).
    """

    def __init__(self, context: aiocoap.Context, origin: str,
                 new_channel: Callable[[], Layer0Client], *, proxy: str | None = None,
                 rekey_threshold: int | None = None, kept: KeptSlot | None = None) -> None:
        self.rekey_threshold = rekey_threshold
        self._context = context
        self.origin = origin_of(origin)
        self._new_channel = new_channel  # a new Layer 0 client (full handshake) per keying
        self._contexts = ClientContexts()
        self._transport = attach(context, self._contexts)
        self._proxy = proxy
        # One forwarder for all requests (aiocoap parses the proxy URI when making one).
        self._via: Any = ProxyForwarder(proxy, context) if proxy else context
        self._lock = asyncio.Lock()
        self._routes: dict[tuple[str, str], Routing] = {}
        self.keyings = 0
        self.parameters: OscoreParameters | None = None
        self.last_handshake: Any = None
        # A context kept from an earlier run (coaplayers.oscore.kept): the first request goes
        # out protected at once; every keying replaces it.
        self.kept = kept
        self.restored = False
        self._closings: set[asyncio.Future[None]] = set()  # keying sessions being closed
        if kept is not None:
            sc = kept.load(rekey_threshold=rekey_threshold)
            if sc is not None:
                self._contexts.set(self.origin, sc)
                self.restored = True

    async def key(self) -> None:
        """Run a Layer 0 handshake now and install a fresh OSCORE context."""
        async with self._lock:
            await self._key_locked()

    async def _rekey(self, stale: Any, prior: tuple[bytes, bytes] | None = None) -> bool:
        """Key unless the context ``stale`` (None: no context yet) was replaced meanwhile;
        True if this call keyed. With ``prior`` (kid, Partial IV of a refused request) the
        server first checks that request (``PRIOR_QUERY``); :class:`AlreadyProcessed` if it
        had processed it.

        Requests that fail together on one dead context (or start together without one)
        wait for a single handshake instead of running one each.
        """
        async with self._lock:
            if self.security_context is stale:
                await self._key_locked(prior)
                return True
            return False

    async def _key_locked(self, prior: tuple[bytes, bytes] | None = None) -> None:
        channel = self._new_channel()
        # The keying request is folded into the handshake (KEYING_ALPN), unless it must carry
        # prior=, which only an explicit request can.
        if prior is None:
            channel.alpn = KEYING_ALPN
        ended = False  # the server ended the session after its folded answer
        try:
            response = None
            if prior is None:
                await channel.connect()
                response = channel.folded
                ended = channel.agreed_alpn == KEYING_ALPN
                if ended and response is None:
                    raise ParameterError(
                        "the server keyed with its last handshake flight, but its answer was"
                        " not in it (removed in transit); nothing was keyed here"
                    )
            if response is None:  # a server (or backend) that does not fold: ask
                msg = aiocoap.Message(code=Code.POST, uri_path=KEYING_PATH)
                if prior is not None:
                    msg.opt.uri_query = [f"{PRIOR_QUERY}{prior[0].hex()}.{prior[1].hex()}"]
                response = await channel.request(msg).response
            if (response.code == Code.CONFLICT and prior is not None
                    and response.payload == ALREADY_PROCESSED):
                raise AlreadyProcessed(
                    "the server's refusal was forged in transit: its context is alive and"
                    " has processed the request, which is not sent again"
                )
            if response.code != Code.CHANGED:
                raise ParameterError(
                    f"the server refused OSCORE keying: {response.code}"
                    f" {response.payload.decode(errors='replace')}"
                )
            if response.opt.content_format != PARAMETERS_CONTENT_FORMAT:
                raise ParameterError(
                    f"keying answer has Content-Format {response.opt.content_format},"
                    f" not {PARAMETERS_CONTENT_FORMAT}"
                )
            params = OscoreParameters.from_cbor(response.payload)
            secret = channel.export_keying_material(
                EXPORTER_LABEL, exporter_length(params), None
            )
            self.last_handshake = channel.last_handshake
        finally:
            if ended:  # nothing to close: the server has ended it
                channel.forget_session()
            # The session is no longer needed: close it (close_notify) right away, beside the
            # first request rather than before it (a round trip saved; docs/OSCORE-KEYING.md 2).
            self._closing_channel(channel)
        peer = self.last_handshake.peer_identity if self.last_handshake else None
        sc = derive_context(secret, params, Role.CLIENT, peer=peer,
                            rekey_threshold=self.rekey_threshold)
        if self.kept is not None:
            try:
                self.kept.save(sc)  # attaches the file: numbers are reserved before use
            except OSError as e:
                log.warning("OSCORE context not kept: %s", e)
        self._contexts.set(self.origin, sc)
        self.restored = False
        self.parameters = params
        self.keyings += 1

    def _closing_channel(self, channel: Layer0Client) -> None:
        task = asyncio.ensure_future(channel.close())
        self._closings.add(task)
        task.add_done_callback(self._closings.discard)

    def request(self, message: aiocoap.Message) -> _Pending:
        return _Pending(self, message)

    def _send(self, message: aiocoap.Message) -> Any:
        # A copy, as sending fills in the remote and routing options and the request may go
        # out again after a re-keying. Shallow (see copy_request): aiocoap's Message.copy
        # deep-copies the options (its cost: docs/BENCHMARKS.md).
        return self._via.request(copy_request(message))

    async def _exchange(self, message: aiocoap.Message) -> tuple[aiocoap.Message, Any]:
        """Send ``message`` once, protected; (response, observation or None)."""
        if (
            message.opt.observe is None
            and message.opt.block1 is None
            and message.opt.block2 is None
            and len(message.payload) <= OSCOREAddress.maximum_payload_size
            and isinstance(message.remote, UndecidedRemote)
        ):
            # The request's remote is its origin, which picks the context; the proxy's
            # routing options go on the protected message (they are outer options).
            sc = self._contexts.for_request(message)
            if sc is not None:
                return await self._exchange_direct(message, sc), None
        pr = self._send(message)
        return await pr.response, pr.observation

    def _routing(self, remote: UndecidedRemote) -> Routing:
        """What ProxyForwarder.request sets for a request to ``remote``: Uri-Host, Uri-Port
        and Proxy-Scheme (None: the option is removed), as the options' setters would set
        them, kept per scheme and host (computed once, not per request)."""
        key = (remote.scheme, remote.hostinfo)
        routing = self._routes.get(key)
        if routing is None:
            template = aiocoap.Message()
            host, port = split_hostinfo(key[1])
            template.opt.uri_port = port
            template.opt.uri_host = host
            template.opt.proxy_scheme = key[0]
            routing = [(n, _aiocoap.option_lists(template.opt).get(n)) for n in _ROUTING]
            if len(self._routes) >= 64:
                self._routes.clear()
            self._routes[key] = routing
        return routing

    def _route_through_proxy(self, message: aiocoap.Message) -> None:
        """Address ``message`` to the proxy, as ProxyForwarder.request does."""
        apply_routing(message, self._routing(message.remote))
        message.remote = self._via.proxy_address

    async def _exchange_direct(self, message: aiocoap.Message, sc: Any) -> aiocoap.Message:
        """A one-block request without Observe, handed straight to the OSCORE transport.

        What aiocoap's ``Context.request`` would do for it, without its machinery: its
        block-wise runner task, the task that looks for a request interface (asking each
        transport), the OSCORE transport's own task and the send task of the protected
        request (:meth:`OscoreClientTransport.exchange_one`); together a large share of the
        client's CPU per request (docs/BENCHMARKS.md). ``message`` itself is protected (it is not
        changed) and the proxy's routing options go on the protected message, so no copy
        of it is made. The protected request still goes through the context
        (retransmission, Layer 1), and a block-wise answer is completed by aiocoap's own
        code, as its block-wise runner would.
        """
        origin = message.remote
        if self._proxy:
            hop, routing = self._via.proxy_address, self._routing(origin)
        else:
            hop, routing = origin, None
        response = await self._transport.exchange_one(message, sc, hop, routing)
        response.opt.block1 = None
        block2 = response.opt.block2
        if block2 is None or not block2.more:
            response.opt.block2 = None
            return response
        # An inner Block2 answer: aiocoap asks for the rest through the OSCORE transport.
        follow = copy_request(message)
        if self._proxy:
            self._route_through_proxy(follow)
        follow.remote = OSCOREAddress(sc, follow.remote)
        return await _aiocoap.complete_block2(  # type: ignore[no-any-return]
            self._context, follow, response, log)

    @property
    def security_context(self) -> Any:
        return self._contexts.get_origin(self.origin)

    async def close(self) -> None:
        self._contexts.remove(self.origin)
        if self._closings:  # let the keying sessions' close_notify go out (bounded by theirs)
            await asyncio.gather(*self._closings, return_exceptions=True)
        if self.kept is not None:
            self.kept.release()


#: The options a request through a forward proxy gets from its remote (aiocoap's
#: ProxyForwarder sets these three).
_ROUTING = (OptionNumber.URI_HOST, OptionNumber.URI_PORT, OptionNumber.PROXY_SCHEME)


class _Pending:
    """``.response`` and ``.observation`` like aiocoap's request, with one re-keying retry."""

    def __init__(self, requester: OscoreRequester, message: aiocoap.Message) -> None:
        self._requester = requester
        self._message = message
        self.observation: Any = None
        self.response = asyncio.ensure_future(self._run())

    async def _run(self) -> aiocoap.Message:
        r = self._requester
        current = r.security_context
        if current is None or current.needs_rekey:
            await r._rekey(current)
        for attempt in (1, 2):
            used = r.security_context
            try:
                response, observation = await r._exchange(self._message)
            except RehandshakeRequired as exc:
                if attempt == 2:
                    raise
                log.info("OSCORE context rejected (%s); new Layer 0 handshake", exc.reason)
                stale = exc.security_context or used
                if exc.request_piv is None or stale is None:
                    # Nothing was sent (sequence numbers): sending it now is safe.
                    await r._rekey(stale)
                    continue
                # The refusal is unauthenticated: the request may have been processed and
                # the answer replaced. Send it again only if the server confirms, inside
                # the new Layer 0 session, that it was not (AlreadyProcessed otherwise).
                prior = (stale.sender_id, exc.request_piv)
                if not await r._rekey(stale, prior) and not _idempotent(self._message):
                    raise  # keyed by another request meanwhile: this one was not checked
                continue
            self.observation = observation
            return response
        raise AssertionError("unreachable")


def _idempotent(message: aiocoap.Message) -> bool:
    return message.code in (Code.GET, Code.FETCH, Code.PUT, Code.DELETE, Code.iPATCH)
