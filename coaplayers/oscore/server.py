"""Server side: a bounded store of security contexts and a Site wrapper that uses it.

Layer 0 adds a context after every handshake (:meth:`ContextStore.add`) and may remove it
when the session ends; the store is bounded and evicts the least recently used context, so
a flood of handshakes cannot grow it without limit. An evicted client gets 4.01 "Security
context not found" on its next request and runs a new handshake.

:class:`OscoreSite` wraps an ordinary aiocoap resource tree. It is adapted from aiocoap's
``OscoreSiteWrapper`` (without its EDHOC part) with two changes: error answers carry no
Max-Age unless asked to (aiocoap-proxy turns a relayed Max-Age into 4.02), and contexts are
found through the :class:`ContextStore`. Resources see the context the request came through
as ``request.remote.security_context`` and the Layer 0 peer as
``request.remote.authenticated_claims`` (see :func:`oscore_context_of` / :func:`peer_of`).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.pipe
from aiocoap import interfaces
from aiocoap import oscore as _aiooscore
from aiocoap.numbers.codes import FETCH, POST
from aiocoap.transports.oscore import OSCOREAddress

from .. import replica as replica_ids
from .. import steering
from ..layer0.eager import run_driving_pipe_eagerly
from ..message import error_answer, error_to_message
from .context import SecurityContext
from .errors import PersistenceError
from .persistence import DEFAULT_AHEAD, ContextFile

log = logging.getLogger("coaplayers.oscore.server")

#: Diagnostic payload of the 4.01 sent when no context matches; clients key on it.
CONTEXT_NOT_FOUND = "Security context not found"
#: Diagnostic payload of the 4.01 sent for a replayed request.
REPLAY_DETECTED = "Replay detected"
#: Diagnostic payload of the 4.00 sent when the AEAD check fails.
DECRYPTION_FAILED = "Decryption failed"

DEFAULT_MAX_CONTEXTS = 1024


class ContextStore:
    """Server-side security contexts by (Recipient ID, ID Context), bounded, LRU-evicted.

    Implements the part of aiocoap's credentials interface that OSCORE servers use
    (``find_oscore``), so it can also stand where aiocoap expects server credentials.

    :param max_contexts: upper bound; adding beyond it evicts the least recently used.
    :param server_id: the Sender ID this server uses in every context it creates; client
        IDs are allocated so that they never equal it.
    """

    def __init__(
        self,
        max_contexts: int = DEFAULT_MAX_CONTEXTS,
        server_id: bytes = b"",
        *,
        state_dir: str | os.PathLike[str] | None = None,
        ahead: int = DEFAULT_AHEAD,
        replica: int | None = None,
        worker: tuple[int, int] | None = None,
    ) -> None:
        if max_contexts < 1:
            raise ValueError("max_contexts must be at least 1")
        self.max_contexts = max_contexts
        self.server_id = server_id
        #: coap-server --replica: its number goes into every client ID (coaplayers.replica).
        self.replica = replica
        #: coap-server --workers: (index, count); client IDs steer to this worker.
        self.worker = worker
        self._contexts: OrderedDict[tuple[bytes, bytes | None], SecurityContext] = OrderedDict()
        #: Number of contexts evicted for room so far (for monitoring).
        self.evictions = 0
        #: With a directory, every context is kept in a file of its own there
        #: (:class:`~coaplayers.oscore.persistence.ContextFile`), so that a restarted server
        #: still knows its clients: they go on without a new handshake (the restored window
        #: is unknown, so their first request is answered 4.01 + Echo, RFC 8613 B.1.2, which
        #: the clients answer by themselves).
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.ahead = ahead
        #: Contexts read back from ``state_dir`` at start.
        self.restored = 0
        if self.state_dir is not None:
            self._restore()

    def __len__(self) -> int:
        return len(self._contexts)

    def __iter__(self) -> Iterator[SecurityContext]:
        return iter(list(self._contexts.values()))

    def __contains__(self, context: object) -> bool:
        return (
            isinstance(context, SecurityContext)
            and self._contexts.get(context.lookup_key) is context
        )

    def add(self, context: SecurityContext) -> list[SecurityContext]:
        """Add (or replace) a context; returns the contexts evicted to make room.

        A context with the same (Recipient ID, ID Context) is replaced: a client that runs
        a new handshake and gets the same ID again must not be answered with the old keys.
        """
        key = context.lookup_key
        replaced = self._contexts.pop(key, None)
        if replaced is not None and replaced is not context:
            self._forget(replaced, delete=False)  # the same file is written for the new one
        if self.state_dir is not None:
            # On disk before it is used: a failed write (PersistenceError) keeps it out, and
            # the file of the context it replaces must not outlive it.
            path = self._file_of(context)
            try:
                ContextFile.save(path, context, self.ahead)
            except PersistenceError:
                path.unlink(missing_ok=True)
                raise
        self._contexts[key] = context
        evicted = []
        while len(self._contexts) > self.max_contexts:
            _, old = self._contexts.popitem(last=False)
            evicted.append(old)
            self.evictions += 1
        for old in evicted:
            log.info("evicted OSCORE context %r (store full)", old)
            self._forget(old)
        return evicted

    def remove(self, context: SecurityContext) -> bool:
        """Remove a context (Layer 0 session ended); False if it was not (or no longer) here."""
        key = context.lookup_key
        if self._contexts.get(key) is context:
            del self._contexts[key]
            self._forget(context)
            return True
        return False

    # -- persistence -------------------------------------------------------------------

    def _file_of(self, context: SecurityContext) -> Path:
        assert self.state_dir is not None
        ctx = "none" if context.id_context is None else context.id_context.hex()
        return self.state_dir / f"{context.recipient_id.hex() or 'empty'}.{ctx}.json"

    def _forget(self, context: SecurityContext, *, delete: bool = True) -> None:
        """A context leaves the store: detach its file (so that a late use of the context
        cannot write its mark over a newer context's file) and delete the file."""
        store = context.store
        if store is None or self.state_dir is None:
            return
        context.store = None
        if delete:
            try:
                store.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("could not delete OSCORE context file %s: %s", store.path, e)

    def _restore(self) -> None:
        assert self.state_dir is not None
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            paths = sorted(self.state_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        except OSError as e:
            raise PersistenceError(f"cannot use {self.state_dir}: {e.strerror or e}") from e
        for path in paths:  # oldest first: the least recently written is evicted first
            try:
                context = ContextFile(path, self.ahead).load()
            except PersistenceError as e:
                log.warning("OSCORE context file not restored: %s", e)
                continue
            if self.replica is not None and (
                    replica_ids.replica_of_kid(context.recipient_id) != self.replica):
                continue  # another replica's, in a folder the set shares: one writer per kid
            if self.worker is not None and not steering.client_id_for(
                    context.recipient_id, *self.worker):
                continue  # another worker's (coap-server --workers): never two copies in use
            if context.sender_id != self.server_id or path != self._file_of(context):
                log.warning("OSCORE context file %s is not one of this server's; ignored", path)
                continue
            self._contexts[context.lookup_key] = context
            self.restored += 1
        while len(self._contexts) > self.max_contexts:
            _, old = self._contexts.popitem(last=False)
            self._forget(old)
            self.restored -= 1
        if self.restored:
            log.info("restored %d OSCORE context(s) from %s", self.restored, self.state_dir)

    def get(self, recipient_id: bytes, id_context: bytes | None = None) -> SecurityContext | None:
        """Look a context up without touching its LRU position."""
        return self._contexts.get((recipient_id, id_context))

    def find_oscore(self, unprotected: dict[int, Any]) -> SecurityContext:
        """The context for a request's unprotected COSE header (KeyError if none).

        Used for every incoming request, so it also marks the context as recently used.
        """
        kid = unprotected.get(_aiooscore.COSE_KID)
        if kid is None:
            raise KeyError("request carries no kid")
        key = (kid, unprotected.get(_aiooscore.COSE_KID_CONTEXT))
        context = self._contexts[key]
        self._contexts.move_to_end(key)
        return context

    def allocate_client_id(
        self, length: int | None = None, id_context: bytes | None = None
    ) -> bytes:
        """A Recipient ID for a new client: random, unused here, never the server's own ID.

        ``length=None`` picks the shortest length whose ID space is at most a quarter full, so
        every request carries a 1-byte ``kid`` while the server holds fewer than 64 contexts
        (4 with a replica number, which fixes 4 bits of every ID: coaplayers.replica)
        (RFC 8613 leaves the length to the server; the kid is on every request's wire).
        Random rather than counted so that after a server restart an old client's stale ID
        is unlikely to name someone else's context: it will then get "Security context not
        found" (clean re-handshake) rather than "Decryption failed".
        """
        # With a replica number, 4 bits of the first byte are fixed: fewer IDs per length.
        fixed = 16 if self.replica is not None else 1
        if self.worker is not None:
            fixed *= self.worker[1]  # and the last byte's value modulo the worker count
        if length is None:
            length = 1
            while len(self._contexts) >= 256**length // fixed // 4 and length < 7:
                length += 1
        if not 1 <= length <= 7:
            raise ValueError("client IDs are 1 to 7 bytes (AES-CCM-16-64-128 nonce)")
        space = 256**length // fixed
        if len(self._contexts) >= space // 2:
            raise RuntimeError("client ID space too crowded; use longer IDs")
        while True:
            candidate = secrets.token_bytes(length)
            if self.replica is not None:
                candidate = replica_ids.client_id(self.replica, candidate)
            if self.worker is not None and not steering.client_id_for(candidate, *self.worker):
                continue
            if candidate != self.server_id and (candidate, id_context) not in self._contexts:
                return candidate


def oscore_context_of(request: aiocoap.Message) -> SecurityContext | None:
    """The security context an (unprotected) request arrived through, or None if plain."""
    remote = request.remote
    if isinstance(remote, OSCOREAddress) and isinstance(remote.security_context, SecurityContext):
        return remote.security_context
    return None


def peer_of(request: aiocoap.Message) -> str | None:
    """The authenticated Layer 0 peer of an OSCORE request, or None (plain or anonymous)."""
    context = oscore_context_of(request)
    return None if context is None else context.peer


class OscoreSite(interfaces.Resource):
    """Serve an aiocoap resource tree to OSCORE clients whose contexts are in a store.

    Unprotected requests go to the inner site unchanged (so ``/.well-known/atls`` and
    Layer 0 keep working next to OSCORE); protected ones are unprotected with the context
    their kid names, rendered by the inner site, and the responses (including every Observe
    notification) protected again.

    :param inner_site: the resource tree (``aiocoap.resource.Site`` or any Resource).
    :param contexts: where to look contexts up.
    :param error_max_age: Max-Age to put on unprotected OSCORE error answers. RFC 8613
        suggests 0; the default None leaves it out, because aiocoap-proxy rejects relayed
        responses that carry Max-Age with 4.02.
    :param require_oscore: answer unprotected requests with 4.01 instead of passing them on
        (except for paths in ``plain_paths``).
    """

    def __init__(
        self,
        inner_site: interfaces.Resource,
        contexts: ContextStore,
        *,
        error_max_age: int | None = None,
        require_oscore: bool = False,
        plain_paths: tuple[tuple[str, ...], ...] = ((".well-known", "atls"),),
    ) -> None:
        self._inner_site = inner_site
        self.contexts = contexts
        self.error_max_age = error_max_age
        self.require_oscore = require_oscore
        self.plain_paths = plain_paths

    def get_resources_as_linkheader(self) -> Any:
        return self._inner_site.get_resources_as_linkheader()  # type: ignore[attr-defined]

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        raise RuntimeError("OscoreSite is only used through render_to_pipe")

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        raise RuntimeError("OscoreSite is only used through render_to_pipe")

    def _error(self, code: aiocoap.numbers.Code, text: str) -> aiocoap.Message:
        return aiocoap.Message(code=code, payload=text.encode("ascii"), max_age=self.error_max_age)

    def render_inline(self, pipe: aiocoap.pipe.Pipe) -> bool:
        """Answer a protected request before returning, when its resource does not wait;
        ``False`` for an unprotected one (render it as usual).

        What aiocoap's ``Context.render_to_pipe`` does, minus its task: the rendering starts
        at once and gets a task only if it waits (:mod:`coaplayers.layer0.eager`). Layer 0's
        inner requests are answered so with ``Layer0Site(eager=True)``, which hands protected
        requests here (coap-server does); the same caveat holds: a resource that needs
        ``asyncio.current_task()`` before its first ``await`` cannot be served this way.
        """
        if pipe.request.opt.oscore is None:
            return False
        run_driving_pipe_eagerly(error_to_message(pipe, log),
                                 self.render_to_pipe(pipe), name="OSCORE request")
        return True

    async def render_to_pipe(self, pipe: aiocoap.pipe.Pipe) -> None:
        request = pipe.request
        try:
            unprotected = _aiooscore.verify_start(request)
        except _aiooscore.NotAProtectedMessage:
            if self.require_oscore and request.opt.uri_path[:2] not in self.plain_paths:
                pipe.add_response(self._error(aiocoap.UNAUTHORIZED, "OSCORE required"),
                                  is_last=True)
                return
            await self._inner_site.render_to_pipe(pipe)
            return
        except _aiooscore.DecodeError:
            if request.mtype == aiocoap.CON:
                pipe.add_response(self._error(aiocoap.BAD_OPTION, "Failed to decode COSE"),
                                  is_last=True)
            return

        is_con = request.mtype == aiocoap.CON
        if request.code not in (FETCH, POST):
            pipe.add_response(self._error(aiocoap.METHOD_NOT_ALLOWED, ""), is_last=True)
            return

        try:
            sc = self.contexts.find_oscore(unprotected)
        except KeyError:
            if is_con:
                pipe.add_response(self._error(aiocoap.UNAUTHORIZED, CONTEXT_NOT_FOUND),
                                  is_last=True)
            return

        try:
            inner_request, request_id = sc.unprotect(request)
        except _aiooscore.ReplayErrorWithEcho as e:
            # Restored context, window unknown: the Echo answer is itself protected.
            pipe.add_response(e.to_message(), is_last=True)
            return
        except _aiooscore.ReplayError:
            if is_con:
                pipe.add_response(self._error(aiocoap.UNAUTHORIZED, REPLAY_DETECTED),
                                  is_last=True)
            return
        except _aiooscore.DecodeError:
            if is_con:
                pipe.add_response(self._error(aiocoap.BAD_OPTION, "Failed to decode COSE"),
                                  is_last=True)
            return
        except _aiooscore.ProtectionInvalid:
            if is_con:
                pipe.add_response(self._error(aiocoap.BAD_REQUEST, DECRYPTION_FAILED),
                                  is_last=True)
            return
        except (UnicodeDecodeError, ValueError, IndexError, TypeError):
            # Authentic, but the plaintext's options do not parse (aiocoap decodes them after
            # the AEAD check and raises assorted types, e.g. for a non-UTF-8 Uri-Path): the
            # peer holds the keys, so this is a broken peer, not an attack; treat it like a
            # malformed COSE object.
            if is_con:
                pipe.add_response(self._error(aiocoap.BAD_OPTION, "Failed to decode COSE"),
                                  is_last=True)
            return

        inner_request.remote = OSCOREAddress(sc, request.remote)
        log.debug("request unprotected with %r", sc)
        sc = sc.context_for_response()

        # The inner site renders in this task, and its answers are protected as it adds them
        # (a callback on a plain Pipe). aiocoap's wrapper runs it in a task of its own and
        # queues the answers through an IterablePipe; doing without that task, queue and the
        # task name (which formatted the context's repr) saves CPU on every request
        # (docs/BENCHMARKS.md). Loss of interest still stops the rendering: it cancels this task.
        inner_pipe = aiocoap.pipe.Pipe(inner_request, log)
        outer_pipe = pipe

        def on_event(event: aiocoap.pipe.Pipe.Event) -> bool:
            if event.exception is not None:
                # What error_to_message would add: a renderable error's own answer (4.04
                # and the like), else 5.00; protected like any other answer.
                message = error_answer(event.exception, log)
                is_last = True
            elif event.message is None:
                return False  # the end of interest, nothing to send
            else:
                message = event.message
                is_last = event.is_last
            if not is_last:
                message.opt.observe = 0
            try:
                protected, _ = sc.protect(message, request_id)
            except Exception as exc:  # e.g. sequence numbers exhausted on a notification
                outer_pipe.add_exception(exc)
                return False
            if message.opt.observe is not None:
                # The outer Observe only has to increase; the sender sequence number does.
                protected.opt.observe = sc.sender_sequence_number & 0xFFFFFF
            outer_pipe.add_response(protected, is_last=is_last)
            return not is_last

        inner_pipe.on_event(on_event)
        try:
            await self._inner_site.render_to_pipe(inner_pipe)
        except Exception as exc:  # as aiocoap's run_driving_pipe: the error becomes an answer
            inner_pipe.add_exception(exc)
