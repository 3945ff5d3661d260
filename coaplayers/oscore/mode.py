"""The OSCORE mode end to end: one Layer 0 handshake keys RFC 8613 for the requests after it.

How the parameters travel (docs/PROTOCOL.md, "OSCORE mode"): once the Layer 0 session is
established, the client sends an inner ``POST /.well-known/atls-oscore`` through the tunnel.
The server picks the parameters, derives its context from the session's exporter and answers
2.04 with the parameters' CBOR (docs/OSCORE-KEYING.md). The client derives the same context,
closes the Layer 0 session (it is no longer needed) and sends plain OSCORE requests to the real
resource paths from then on. Being an inner request, the keying exchange is encrypted and
authenticated by the Layer 0 session, and it reuses the tunnel's retransmission and
block-wise machinery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiocoap
import aiocoap.resource as resource
from aiocoap.numbers.codes import Code

from ..layer0.client import Layer0Channel
from ..layer0.server import layer0_peer
from .client import ClientContexts, attach, origin_of
from .errors import ParameterError, RehandshakeRequired
from .keying import EXPORTER_LABEL, Role, derive_context, exporter_length
from .params import OscoreParameters
from .server import ContextStore

log = logging.getLogger("coaplayers.oscore.mode")

KEYING_PATH = (".well-known", "atls-oscore")
"""Inner path of the keying exchange; only reachable inside a Layer 0 session."""
PARAMETERS_CONTENT_FORMAT = 65001
"""``application/vnd.coaplayers.oscore-params+cbor`` (experimental range)."""


class KeyingResource(resource.Resource):
    """Server side: turns the Layer 0 session a request arrived on into an OSCORE context."""

    def __init__(self, store: ContextStore, *, id_length: int = 2) -> None:
        super().__init__()
        self.store = store
        self.id_length = id_length

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        peer = layer0_peer(request)
        if peer is None:
            return aiocoap.Message(
                code=Code.UNAUTHORIZED, payload=b"OSCORE keying needs a Layer 0 session"
            )
        if peer.mode == "psk":
            return aiocoap.Message(
                code=Code.NOT_IMPLEMENTED,
                payload=b"OSCORE keying needs a certificate-mode session (TLS exporter)",
            )
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


class OscoreRequester:
    """Client side: key once through Layer 0, then send OSCORE requests (via a proxy if given).

    A "Security context not found" (server restarted or evicted us) or an exhausted sequence
    number space leads to one new handshake and one retry of the request, by itself. With
    ``rekey_threshold``, a context whose sender sequence number has reached it is replaced by
    a new handshake before the next request (docs/OSCORE-KEYING.md, section 7).
    """

    def __init__(self, context: aiocoap.Context, origin: str,
                 new_channel: Callable[[], Layer0Channel], *, proxy: str | None = None,
                 rekey_threshold: int | None = None) -> None:
        self.rekey_threshold = rekey_threshold
        self._context = context
        self.origin = origin_of(origin)
        self._new_channel = new_channel  # a new channel (full handshake) per keying
        self._contexts = ClientContexts()
        self._transport = attach(context, self._contexts)
        self._proxy = proxy
        self._lock = asyncio.Lock()
        self.keyings = 0
        self.parameters: OscoreParameters | None = None
        self.last_handshake: Any = None

    async def key(self) -> None:
        """Run a Layer 0 handshake now and install a fresh OSCORE context."""
        async with self._lock:
            await self._key_locked()

    async def _rekey(self, stale: Any) -> None:
        """Key unless the context ``stale`` (None: no context yet) was replaced meanwhile.

        Requests that fail together on one dead context (or start together without one)
        wait for a single handshake instead of running one each.
        """
        async with self._lock:
            if self.security_context is stale:
                await self._key_locked()

    async def _key_locked(self) -> None:
        channel = self._new_channel()
        try:
            msg = aiocoap.Message(code=Code.POST, uri_path=KEYING_PATH)
            response = await channel.request(msg).response
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
            # The session is no longer needed: close it (close_notify) right away.
            await channel.close()
        peer = self.last_handshake.peer_identity if self.last_handshake else None
        sc = derive_context(secret, params, Role.CLIENT, peer=peer,
                            rekey_threshold=self.rekey_threshold)
        self._contexts.set(self.origin, sc)
        self.parameters = params
        self.keyings += 1

    def request(self, message: aiocoap.Message) -> _Pending:
        return _Pending(self, message)

    def _send(self, message: aiocoap.Message) -> Any:
        if self._proxy:
            from aiocoap.proxy.client import ProxyForwarder

            return ProxyForwarder(self._proxy, self._context).request(message.copy())
        return self._context.request(message.copy())

    @property
    def security_context(self) -> Any:
        return self._contexts.get(self.origin)

    async def close(self) -> None:
        self._contexts.remove(self.origin)


class _Pending:
    """``.response`` and ``.observation`` like aiocoap's request, with one re-keying retry."""

    def __init__(self, requester: OscoreRequester, message: aiocoap.Message) -> None:
        self._requester = requester
        self._message = message
        self.observation: Any = None
        self._observe_ready = asyncio.get_running_loop().create_future()
        self.response = asyncio.ensure_future(self._run())

    async def _run(self) -> aiocoap.Message:
        r = self._requester
        current = r.security_context
        if current is None or current.needs_rekey:
            await r._rekey(current)
        for attempt in (1, 2):
            used = r.security_context
            pr = r._send(self._message)
            try:
                response = await pr.response
            except RehandshakeRequired as exc:
                if attempt == 2:
                    raise
                log.info("OSCORE context rejected (%s); new Layer 0 handshake", exc.reason)
                await r._rekey(exc.security_context or used)
                continue
            self.observation = pr.observation
            return response
        raise AssertionError("unreachable")
