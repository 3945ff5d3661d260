"""The server side of Layer 0: an aiocoap resource wrapping an existing aiocoap ``Site``.

:class:`Layer0Site` is the thin asyncio shell around
:class:`~coaplayers.layer0.core.Layer0ServerCore`.
Give it as the ``serversite`` of any aiocoap server context (plain UDP, or the Layer 1 coaps
transport); it serves Layer 0 under ``/.well-known/atls``, hands every decrypted inner request
to the wrapped site exactly as aiocoap's own server would (so block-wise and Observe of the
existing resources work unchanged), and answers plain requests to protected paths with 4.01.

Resources learn who is calling with :func:`layer0_peer` (or from
``request.remote.authenticated_claims``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any

from aiocoap import Message, error, interfaces
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe, run_driving_pipe
from aiocoap.transports.udp6 import UDP6EndpointAddress

from ..dtls import (
    CertificateCredentials,
    DtlsConfig,
    GnuTlsListener,
    OpenSslListener,
    OpenSslPskListener,
    PskStore,
    RawPublicKeyCredentials,
    records,
)
from ..dtls.cookieless import CookieBudget, budget
from ..message import error_to_message
from . import inner, profile
from .core import Answer, Layer0Peer, Layer0ServerCore, Layer0ServerSession, ServerLimits
from .eager import run_driving_pipe_eagerly
from .errors import InnerMessageError
from .policy import Policy
from .profile import (
    CONTENT_FORMAT,
    INNER_BLOCK_SIZE,
    INNER_BLOCK_SZX,
    MAX_DATAGRAM,
    MAX_INNER,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    OUTER_ONLY_OPTIONS,
    UNSUPPORTED_CONTENT_FORMAT,
    WELL_KNOWN_PATH,
    is_layer0_path,
    layer0_config,
)

if TYPE_CHECKING:
    from ..dtls.dual import SessionListener

__all__ = ["Layer0Remote", "Layer0Site", "answer_inline", "layer0_peer"]

log = logging.getLogger(__name__)

_OneKind = PskStore | CertificateCredentials | RawPublicKeyCredentials
# One kind, or several kinds side by side (make_listener).
ServerCredentials = _OneKind | tuple[_OneKind, ...] | list[_OneKind]


def make_listener(credentials: ServerCredentials, config: DtlsConfig | None = None, *,
                  without_cookie: int | CookieBudget = 8) -> SessionListener:
    """A PSK store selects OpenSSL's PSK listener, certificate credentials OpenSSL, raw public
    keys GnuTLS. ClientHellos of every kind are answered without a cookie exchange while
    fewer than ``without_cookie`` such handshakes are in progress, one budget for all kinds
    (:mod:`coaplayers.dtls.cookieless`; docs/PROTOCOL.md 3.1).

    A tuple or list of credentials of different kinds serves them side by side (each
    ClientHello goes to the backend of the kind it asks for: :mod:`.listeners`).
    """
    config = config or layer0_config()
    shared = budget(without_cookie)
    if isinstance(credentials, tuple | list):  # several kinds side by side
        from .listeners import KindListener

        kinds = [type(c) for c in credentials]
        if len(set(kinds)) != len(kinds) or not kinds:
            raise TypeError("Layer 0 server credentials: at most one of each kind, at least one")
        listeners = {type(c): make_listener(c, config, without_cookie=shared)
                     for c in credentials}
        return KindListener(psk=listeners.get(PskStore),
                            certificate=listeners.get(CertificateCredentials),
                            rpk=listeners.get(RawPublicKeyCredentials))
    if isinstance(credentials, PskStore):
        return OpenSslPskListener(credentials, config, without_cookie=shared)
    if isinstance(credentials, CertificateCredentials):
        return OpenSslListener(credentials, config, ciphers=profile.DTLS_CIPHERS,
                               without_cookie=shared)
    if isinstance(credentials, RawPublicKeyCredentials):  # raw public keys select GnuTLS
        return GnuTlsListener(credentials, config, without_cookie=shared)
    raise TypeError(
        f"Layer 0 server credentials must be PskStore, CertificateCredentials or "
        f"RawPublicKeyCredentials, not {type(credentials).__name__}"
    )


class Layer0Remote(interfaces.EndpointAddress):
    """The ``remote`` of an inner request: one Layer 0 session, whatever path it took.

    Its block-wise key is the session, so inner block-wise transfers continue across proxy
    restarts and address changes, and inner blocks are 512 bytes so each fits one record.
    """

    def __init__(self, peer: Layer0Peer, outer_identity: bytes | str | None = None) -> None:
        self.peer = peer
        #: Who delivered the record at Layer 1: the last hop (a proxy, or the client when it
        #: came direct); None over plain CoAP. Per request, as the path may change.
        self.outer_identity = outer_identity

    def __hash__(self) -> int:
        return hash(("layer0", self.peer.session_id))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layer0Remote) and other.peer.session_id == self.peer.session_id

    def __repr__(self) -> str:
        return f"<Layer0Remote session={self.peer.session_id} identity={self.peer.identity!r}>"

    hostinfo = property(lambda self: "layer0.invalid")
    hostinfo_local = property(lambda self: "layer0.invalid")
    uri_base = property(lambda self: "coap://layer0.invalid")
    uri_base_local = property(lambda self: "coap://layer0.invalid")
    is_multicast = False
    is_multicast_locally = False
    scheme = "coap"

    @property
    def maximum_block_size_exp(self) -> int:
        return INNER_BLOCK_SZX

    @property
    def maximum_payload_size(self) -> int:
        return INNER_BLOCK_SIZE

    @property
    def authenticated_claims(self) -> tuple[Layer0Peer, ...]:
        return (self.peer,)

    @property
    def blockwise_key(self) -> Hashable:
        return ("layer0", self.peer.session_id)


def layer0_peer(request: Message) -> Layer0Peer | None:
    """The Layer 0 peer of a request rendered through Layer 0, ``None`` for plain requests."""
    remote = getattr(request, "remote", None)
    for claim in getattr(remote, "authenticated_claims", ()) or ():
        if isinstance(claim, Layer0Peer):
            return claim
    return None


def _outer(answer: Answer, *, entry: bool = False) -> Message:
    msg = Message(code=answer.code, payload=answer.payload)
    if entry and answer.carries_records:
        # Only the entry resource's answers say what they carry: a session resource's
        # success payloads are records by definition (3 bytes saved per answer).
        msg.opt.content_format = CONTENT_FORMAT
    if answer.location is not None:
        msg.opt.location_path = answer.location
    return msg


class Layer0Site(interfaces.Resource):
    """Serve ``site`` through Layer 0 (see the module docstring).

    ``credentials`` are Layer 0's own (a :class:`PskStore`, :class:`CertificateCredentials` or
    :class:`RawPublicKeyCredentials`, or a list of several kinds);
    ``policy`` decides which paths need Layer 0 and which identity may use which path;
    ``on_established`` is called with each new :class:`Layer0Peer` (the OSCORE mode's hook).
    ``eager`` renders inner requests at once rather than in a task each (see
    :mod:`.eager`): a Layer 0 request that its resource answers without waiting is then
    answered with no task at all. It is off by default because the rendering then starts
    outside any task: a site that uses ``asyncio.timeout()`` (or anything else that needs
    ``asyncio.current_task()``) before its first ``await`` must leave it off.
    """

    def __init__(
        self,
        site: interfaces.Resource,
        credentials: ServerCredentials,
        *,
        policy: Policy | None = None,
        limits: ServerLimits | None = None,
        on_established: Callable[[Layer0Peer], None] | None = None,
        eager: bool = False,
        replica: int | None = None,
        worker: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.site = site
        self.eager = eager
        self._run_driving_pipe = run_driving_pipe_eagerly if eager else run_driving_pipe
        self.policy = policy or Policy()
        self.limits = limits or ServerLimits()
        listener = make_listener(credentials, layer0_config(self.limits.handshake_timeout),
                                 without_cookie=self.limits.without_cookie)
        self.core = Layer0ServerCore(listener, self.limits)
        self.core.on_close = self._session_closed
        self.core.on_established = on_established
        self.core.replica = replica
        self.core.worker = worker
        self._wakeups: dict[str, asyncio.Event] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._hostinfos: dict[tuple[object, ...], str] = {}

    # aiocoap's abstract Resource interface; render_to_pipe below replaces both.
    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return False

    async def render(self, request: Message) -> Message:
        raise error.NotFound()

    def fold(self, alpn: bytes, request: Message) -> None:
        """Answer ``request`` (an inner request; its token is replaced by the empty one) with
        the server's last handshake flight whenever a full or resumed handshake agrees on the
        ALPN protocol ``alpn``, and end the session then (:attr:`Layer0ServerCore.folded`). The
        OSCORE mode folds its keying request this way (docs/OSCORE-KEYING.md 9.1). Certificates,
        PSK on OpenSSL and raw public keys (GnuTLS) agree on it; tinydtls has no ALPN, and its
        client asks explicitly."""
        self.core.folded[alpn] = inner.encode(b"", request)
        protocols = frozenset(self.core.folded)
        for listener in getattr(self.core.listener, "listeners", [self.core.listener]):
            if isinstance(listener, OpenSslListener | GnuTlsListener):
                listener.alpn = protocols

    def close(self) -> None:
        """Drop every session (ending their observations) and stop the idle sweeper."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.core.close_all()

    async def render_to_pipe(self, pipe: Pipe) -> None:
        request = pipe.request
        path = tuple(request.opt.uri_path)
        if is_layer0_path(path):
            answer = self._tunnel_now(request, path)
            if not isinstance(answer, Message):
                answer = await answer
            pipe.add_response(answer, is_last=True)
            return
        if self.policy.requires_layer0(path):
            pipe.add_response(
                Message(code=Code.UNAUTHORIZED, payload=b"this resource needs Layer 0"),
                is_last=True,
            )
            return
        await self.site.render_to_pipe(pipe)

    def render_inline(self, pipe: Pipe) -> bool:
        """Answer a Layer 0 request before returning, when it needs no waiting; ``False`` for
        any other request (render it through :meth:`render_to_pipe` as usual).

        Handshake flights, entry requests, DELETEs, refusals and pulls with something queued are
        answered
        here synchronously; inner requests and pulls that wait get a task as usual. With
        ``eager``, requests for the wrapped site go to its own ``render_inline`` when it has
        one (:meth:`coaplayers.oscore.OscoreSite.render_inline`: OSCORE requests). What this
        saves is aiocoap's per-request rendering task and its error-mapping pipe: see
        :func:`answer_inline`, which puts it in front of a context's rendering.
        """
        request = pipe.request
        path = tuple(request.opt.uri_path)
        if not is_layer0_path(path):
            # With ``eager``, an inner site that can answer inline (OscoreSite: protected
            # requests) is asked to, as Layer 0 answers its own inner requests.
            inline = getattr(self.site, "render_inline", None)
            if self.eager and inline is not None and not self.policy.requires_layer0(path):
                return bool(inline(pipe))
            return False
        try:
            answer = self._tunnel_now(request, path)
        except Exception:  # what error_to_message would do on the usual path
            log.exception("Layer 0 request failed")
            answer = Message(code=Code.INTERNAL_SERVER_ERROR)
        if isinstance(answer, Message):
            pipe.add_response(answer, is_last=True)
        else:
            # With ``eager``, inner requests are answered here too when the resource does not
            # wait (the usual case): see run_driving_pipe_eagerly.
            self._run_driving_pipe(
                error_to_message(pipe, log), self._answer_later(pipe, answer),
                name="Layer 0 request",
            )
        return True

    async def _answer_later(self, pipe: Pipe, answer: Awaitable[Message]) -> None:
        pipe.add_response(await answer, is_last=True)

    # ------------------------------------------------------------------- outer side

    def _tunnel_now(self, request: Message, path: tuple[str, ...]) -> Message | Awaitable[Message]:
        """The answer to a request on a Layer 0 path, or an awaitable of it when it must wait
        (inner requests, pulls that wait for a notification)."""
        self._arm_sweeper()
        if path == WELL_KNOWN_PATH:
            sid = None
        elif len(path) == 1:
            sid = path[0]
        else:
            return Message(code=NOT_FOUND)
        now = asyncio.get_running_loop().time()
        payload = bytes(request.payload)
        cf = request.opt.content_format
        if payload and cf is not None and int(cf) != CONTENT_FORMAT:
            return Message(code=UNSUPPORTED_CONTENT_FORMAT)
        if sid is None:
            if request.code != Code.POST:
                return Message(code=METHOD_NOT_ALLOWED)
            peer_key = (request.remote.scheme, self._hostinfo(request.remote))
            return _outer(self.core.entry(peer_key, payload, now), entry=True)
        if request.code == Code.DELETE:
            answer, _ = self.core.datagram(sid, payload, now, delete=True)
            return _outer(answer)
        if request.code != Code.POST:
            return Message(code=METHOD_NOT_ALLOWED)
        answer, plaintexts = self.core.datagram(sid, payload, now)
        if answer.pull:  # an authenticated pull that found nothing queued: maybe held
            at_once = self._pull_now(sid)
            return _outer(at_once) if at_once is not None else self._pull(sid)
        if not plaintexts:
            return _outer(answer)
        return self._inner(sid, answer, plaintexts, getattr(request.remote, "peer_identity", None))

    def _hostinfo(self, remote: interfaces.EndpointAddress) -> str:
        """``remote.hostinfo``, remembered per socket address for plain UDP remotes (aiocoap
        parses the address with ``ipaddress`` on every access; entry requests come from few
        addresses, a proxy's or a client's)."""
        if type(remote) is not UDP6EndpointAddress:
            return str(remote.hostinfo)
        key = remote.sockaddr
        hostinfo = self._hostinfos.get(key)
        if hostinfo is None:
            hostinfo = str(remote.hostinfo)
            if len(self._hostinfos) >= 4096:
                self._hostinfos.clear()
            self._hostinfos[key] = hostinfo
        return hostinfo

    async def _inner(
        self, sid: str, answer: Answer, plaintexts: list[bytes], hop: bytes | str | None
    ) -> Message:
        """The answer to records that carried inner requests: their sealed responses."""
        if len(plaintexts) == 1:  # the usual case: no task of its own for one request
            sealed = [await self._dispatch(sid, plaintexts[0], hop)]
        else:
            sealed = await asyncio.gather(*(self._dispatch(sid, p, hop) for p in plaintexts))
        recs = [answer.payload] if answer.payload else []
        recs += [r for r in sealed if r]
        packed = records.pack_datagrams(recs, MAX_DATAGRAM)
        for extra in packed[1:]:
            self.core.enqueue(sid, extra)
        self.core.answered(sid)
        return _outer(Answer(answer.code, packed[0] if packed else b""))

    def _pull_now(self, sid: str) -> Answer | None:
        """A pull's answer if it need not wait: queued datagrams, or an empty 2.04 when no
        notification can come (no such session, not established, nothing observed)."""
        answer = self.core.queued(sid)
        if answer is not None:
            return answer
        s = self.core.sessions.get(sid)
        if s is None or not s.established or not s.observations:
            return Answer(Code.CHANGED)
        return None

    async def _pull(self, sid: str) -> Message:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.poll_hold
        while True:
            answer = self._pull_now(sid)
            remaining = deadline - loop.time()
            if answer is not None:
                return _outer(answer)
            if remaining <= 0:
                return _outer(Answer(Code.CHANGED))
            event = self._wakeups.setdefault(sid, asyncio.Event())
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                pass

    # ------------------------------------------------------------------- inner side

    async def _dispatch(
        self, sid: str, plaintext: bytes, hop: bytes | str | None = None
    ) -> bytes | None:
        """Render one inner message through the wrapped site; returns its sealed response."""
        s = self.core.sessions.get(sid)
        if s is None or s.peer is None:
            return None
        try:
            msg = inner.decode(plaintext)
        except InnerMessageError as exc:
            token = inner.peek_token(plaintext)
            log.info("session %s: bad inner message (%s)", sid, exc)
            if token is None:
                return None
            return self._seal(sid, token, Message(code=Code.BAD_REQUEST))
        token, request = msg.token, msg.message
        if request.code == Code.PING:  # the client asks whether its session is alive
            return self._seal(sid, token, Message(code=Code.PONG))
        if not request.code.is_request():
            return None
        old = s.observations.pop(token, None)
        if old is not None:  # same token again (e.g. Observe: 1): the old observation ends
            old()
        if not self.policy.allows(s.peer.identity, request.opt.uri_path):
            return self._seal(sid, token, Message(code=Code.FORBIDDEN))
        request.remote = Layer0Remote(s.peer, hop)
        request.direction = Direction.INCOMING
        request.token = token
        pipe = Pipe(request, log)
        first: asyncio.Future[Pipe.Event] = asyncio.get_running_loop().create_future()

        def on_event(event: Pipe.Event) -> bool:
            if not first.done():
                first.set_result(event)
                return not event.is_last
            if event.message is not None:
                self._notify(sid, token, event.message)
            if event.is_last:
                live = self.core.sessions.get(sid)
                if live is not None:
                    live.observations.pop(token, None)
            return not event.is_last

        stop = pipe.on_event(on_event)
        self._run_driving_pipe(
            error_to_message(pipe, log),
            self.site.render_to_pipe(pipe),
            name=f"Layer 0 inner request on {sid}",
        )
        if first.done():  # the resource answered without waiting
            event = first.result()
        else:
            try:
                event = await asyncio.wait_for(asyncio.shield(first), self.limits.inner_timeout)
            except TimeoutError:
                stop()
                return self._seal(sid, token, Message(code=Code.SERVICE_UNAVAILABLE))
        response = event.message or Message(code=Code.INTERNAL_SERVER_ERROR)
        if not event.is_last:
            live = self.core.sessions.get(sid)
            observing = response.opt.observe is not None
            if live is None or not observing:
                stop()
            elif len(live.observations) >= self.limits.max_observations:
                stop()
                response.opt.observe = None
            else:
                live.observations[token] = stop
        return self._seal(sid, token, response)

    def _seal(self, sid: str, token: bytes, response: Message) -> bytes | None:
        # Outer-only options are never echoed inside. The response may be the resource's own
        # object, so it is copied before they are removed; only then (Message.copy is a deep
        # copy, and almost no response carries one of them).
        outer_only = [o for o in response.opt.option_list() if int(o.number) in OUTER_ONLY_OPTIONS]
        if outer_only:
            response = response.copy()
            for option in outer_only:
                response.opt.delete_option(option.number)
        try:
            plaintext = inner.encode(token, response)
        except InnerMessageError:
            plaintext = inner.encode(token, Message(code=Code.INTERNAL_SERVER_ERROR))
        if len(plaintext) > MAX_INNER:
            log.warning(
                "session %s: inner response of %d bytes does not fit a record", sid, len(plaintext)
            )
            plaintext = inner.encode(token, Message(code=Code.INTERNAL_SERVER_ERROR))
        try:
            return self.core.seal(sid, plaintext)
        except Exception:  # session ended meanwhile
            return None

    def _notify(self, sid: str, token: bytes, message: Message) -> None:
        sealed = self._seal(sid, token, message)
        if sealed is None:
            return
        self.core.enqueue(sid, sealed)
        event = self._wakeups.get(sid)
        if event is not None:
            event.set()

    def _session_closed(self, s: Layer0ServerSession) -> None:
        for stop in list(s.observations.values()):
            stop()
        s.observations.clear()
        event = self._wakeups.pop(s.sid, None)
        if event is not None:
            event.set()

    def _arm_sweeper(self) -> None:
        if self._sweeper is not None:
            return
        loop = asyncio.get_running_loop()
        period = max(
            0.5, min(10.0, self.limits.handshake_timeout / 2, self.limits.idle_timeout / 2)
        )

        def sweep() -> None:
            self.core.expire(loop.time())
            self._sweeper = loop.call_later(period, sweep)

        self._sweeper = loop.call_later(period, sweep)


def answer_inline(context: Any, site: Layer0Site) -> None:
    """Let ``site`` answer Layer 0 requests as the ``context`` dispatches them.

    aiocoap renders every request in a task of its own, behind a second pipe that turns
    exceptions into 5.00. The outer exchanges of a handshake need neither, since Layer 0
    answers them synchronously: with this, :meth:`Layer0Site.render_inline` answers them at
    once (the response still piggybacks on the ACK, and duplicates are still answered from
    aiocoap's cache), and everything else (inner requests, waiting pulls, other resources) is
    rendered exactly as before. ``context`` is the aiocoap context whose ``serversite`` is
    ``site``; coap-server does this.
    """
    render = context.render_to_pipe

    def render_to_pipe(pipe: Pipe) -> None:
        if not site.render_inline(pipe):
            render(pipe)

    context.render_to_pipe = render_to_pipe
