"""Building the proxy's aiocoap context from its configuration: THE place transports plug in.

``build_context`` is the single function that turns ``ProxyConfig.listen`` and
``ProxyConfig.layer1`` into sockets: ``coap://`` through aiocoap's udp6 transport, ``coaps://``
through the Layer 1 transport (listeners with their PSK store, certificate and raw public
key; upstream contexts with ``layer1.upstream_credentials``). Nothing else in the proxy knows
about transports (the site only asks ``ProxyContext.upstream_schemes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiocoap
from aiocoap import Message
from aiocoap.protocol import Request
from aiocoap.transports.udp6 import UDP6EndpointAddress

from .. import _aiocoap, dedup, dtls, layer1
from ..credentials import certificate_from, psk_store_from, raw_public_key_from
from ..errors import LocalError
from ..layer1.context import ResolvedAddress, ServerContext
from ..message import request_through
from .config import ConfigError, ProxyConfig
from .fastpath import is_multicast
from .metrics import MetricsRegistry
from .screen import malformed_answer, screen_request

log = logging.getLogger("coaplayers.proxy")


def parse_listen(uri: str) -> tuple[str, str, int]:
    """``coap://[::]:5683`` -> ("coap", "::", 5683); port 0 asks for an ephemeral port."""
    try:
        return layer1.parse_listen_uri(uri)
    except dtls.ConfigurationError as exc:
        raise ConfigError(str(exc)) from exc


def format_uri(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class UpstreamNotAllowed(LocalError):
    """The address an upstream name resolved to is not allowed (see ``allow.py``)."""


def remote_ip(remote: Any) -> str | None:
    """The IP address a resolved remote sends to (plain UDP or Layer 1), if it has one."""
    address = getattr(remote, "sockaddr", None) or getattr(remote, "address", None)
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        return address[0]
    return None


class UpstreamPool:
    """Client contexts for upstream requests; each downstream client sticks to one of them.

    One socket per (recent) client, as a NAT would do, because aiocoap keys state on the peer
    address: an upstream's Block1 reassembly would mix two clients' blocks arriving from one
    socket, and aiocoap's NSTART=1 would queue every client's request behind any other's
    unacknowledged one. New clients are spread round-robin; the client table is a bounded LRU.

    ``request`` also keeps what aiocoap resolved for each upstream (the address and the
    socket's interface for ``coap://``, the Layer 1 transport's remote for ``coaps://``) for
    ``resolve_ttl`` seconds, so that an exchange neither runs ``getaddrinfo`` in a thread
    (plus a routability probe socket) or the Layer 1 lookups nor spawns aiocoap's
    resolve-and-send task; ``forget`` drops an entry after an upstream failure.
    """

    def __init__(
        self, contexts: Sequence[aiocoap.Context], max_clients: int = 4096,
        resolve_ttl: float = 30.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not contexts:
            raise ValueError("an upstream pool needs at least one context")
        self.contexts = list(contexts)
        self.sockets: list[Any] = []  # the coap:// upstream sockets (build_context fills it)
        self._own_ports: set[int] = set()
        self.max_clients = max_clients
        self.resolve_ttl = resolve_ttl
        self.clock = clock
        self._assigned: OrderedDict[Hashable, int] = OrderedDict()
        self._next = itertools.cycle(range(len(self.contexts)))
        # (context index, "scheme://hostinfo") -> (request interface, remote, expiry)
        self._resolved: dict[tuple[int, str], tuple[Any, Any, float]] = {}

    def index_for(self, client: Hashable) -> int:
        assigned = self._assigned
        index = assigned.get(client)
        if index is None:
            index = next(self._next)
            assigned[client] = index
            if len(assigned) > self.max_clients:
                assigned.popitem(last=False)
        else:
            assigned.move_to_end(client)
        return index

    def context_for(self, client: Hashable) -> aiocoap.Context:
        return self.contexts[self.index_for(client)]

    async def request(self, client: Hashable, message: Message, target: str,
                      check: Callable[[Any], bool] | None = None) -> Request:
        """Send ``message`` (its remote an ``UndecidedRemote`` for ``target``) upstream.

        Like ``Context.request(message, handle_blockwise=False)``, except that resolution
        errors (``ResolutionError``, ``NoRequestInterface``) are raised here rather than from
        the response, and a cached resolution is reused. ``check`` sees the resolved remote
        before anything is sent; if it says no, ``UpstreamNotAllowed`` is raised.
        """
        index = self.index_for(client)
        ctx = self.contexts[index]
        key = (index, target)
        hit = self._resolved.get(key)
        if hit is not None and hit[2] > self.clock():
            interface = hit[0]
            message.remote = hit[1]
        else:
            if hit is not None:
                del self._resolved[key]
            interface = await ctx.find_remote_and_interface(message)
            remote = message.remote
            # Plain UDP addresses, and the Layer 1 transport's own remote for a coaps://
            # host (it stands for the host across DTLS sessions; the transport opens a new
            # session on it when needed), not a session a peer opened to us.
            if self.resolve_ttl > 0 and (type(remote) is UDP6EndpointAddress
                                         or getattr(remote, "reusable", False)):
                if len(self._resolved) >= 4096:
                    self._resolved.clear()
                if type(remote) is UDP6EndpointAddress:
                    remote = ResolvedAddress(remote)
                self._resolved[key] = (interface, remote, self.clock() + self.resolve_ttl)
        if check is not None and not check(message.remote):
            raise UpstreamNotAllowed(target)
        return request_through(ctx, interface, message)

    def is_own_port(self, port: int) -> bool:
        """Whether ``port`` is one of the upstream sockets' own: a request from there came back
        round a routing loop. (A socket gets its port at its first send, so the set is
        refreshed while some are still unbound.)"""
        if port in self._own_ports:
            return True
        if len(self._own_ports) < len(self.sockets):
            ports = set()
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    ports.add(int(sock.getsockname()[1]))
            ports.discard(0)
            self._own_ports = ports
        return port in self._own_ports

    def abandon(self, client: Hashable, message: Message) -> None:
        """Stop retransmitting ``message`` (sent by :meth:`request` for ``client``), whose
        answer the proxy no longer waits for: the client's next CON to that upstream then
        goes at once instead of waiting behind it (NSTART, RFC 7252 4.7)."""
        index = self._assigned.get(client)
        if index is None or message.remote is None:
            return
        for interface in self.contexts[index].request_interfaces:
            if _aiocoap.abandon_request(interface, message):
                return

    def forget(self, client: Hashable, target: str) -> None:
        """Resolve ``target`` afresh next time (after a failure towards it)."""
        index = self._assigned.get(client)
        if index is not None:
            self._resolved.pop((index, target), None)

    async def shutdown(self) -> None:
        for ctx in self.contexts:
            await ctx.shutdown()


@dataclass
class ProxyContext:
    """The listening context, what it is bound to, and the upstream side."""

    server: aiocoap.Context  # the listeners; its serversite is the proxy site
    bound: list[tuple[str, str, int]]  # (scheme, host, port) per listen URI, ports resolved
    upstream: UpstreamPool
    upstream_schemes: frozenset[str]
    extra: dict[str, Any] = field(default_factory=dict)  # handles Layer 1 may want to keep

    @property
    def bound_uris(self) -> list[str]:
        return [format_uri(*b) for b in self.bound]

    async def shutdown(self) -> None:
        await self.server.shutdown()
        await self.upstream.shutdown()


async def _udp_server(ctx: aiocoap.Context, host: str, port: int) -> tuple[str, int, Any]:
    udp = await _aiocoap.append_udp6(ctx, (host, port))
    sock: socket.socket = udp.transport.get_extra_info("socket")
    real_host, real_port = sock.getsockname()[:2]
    if real_host.startswith("::ffff:"):
        real_host = real_host[7:]
    # Report the configured address (e.g. "::" or a name) with the real port.
    return (host if host else real_host), int(real_port), udp


async def build_context(
    config: ProxyConfig, site: Any, metrics: MetricsRegistry
) -> ProxyContext:
    """The proxy's aiocoap context: listeners from ``config.listen``, upstream transports.

    ``metrics`` is the shared registry: Layer 1 registers its DTLS session and handshake
    counters there (for example from ``coaplayers.layer1.create_context``'s ``on_event``).
    """
    ctx = ServerContext(serversite=site, loggername="coaplayers.proxy.aiocoap")
    bound: list[tuple[str, str, int]] = []
    extra: dict[str, Any] = {}
    upstream = {"coap"}
    pool: list[aiocoap.Context] = []

    upstream_sockets: list[Any] = []

    async def upstream_context() -> aiocoap.Context:
        """One upstream client context (its own socket); the listeners only ever answer."""
        up = aiocoap.Context(loggername="coaplayers.proxy.upstream")
        interface = await _aiocoap.append_udp6(up)
        upstream_sockets.append(interface.transport.get_extra_info("socket"))
        # an answer with a format error aiocoap's decoder lets pass is 5.02, as on the
        # fast path (RFC 7252 3)
        _aiocoap.reject_malformed_responses(interface, malformed_answer)
        return up

    def acknowledge_repetitions(up: aiocoap.Context) -> None:
        """An upstream's separate CON answer sent again is ACKed again (RFC 7252 4.5)."""
        for interface in up.request_interfaces:
            mman = _aiocoap.message_manager_of(interface)
            if mman is not None:
                _aiocoap.acknowledge_repeated_responses(mman)

    make_upstream: Callable[[], Awaitable[aiocoap.Context]] = upstream_context
    try:
        listens = [parse_listen(u) for u in config.listen]
        for scheme, host, port in listens:
            if scheme == "coap":
                h, p, udp = await _udp_server(ctx, host, port)
                bound.append(("coap", h, p))
                extra.setdefault("udp", []).append(udp)

        # ---- Layer 1 (coaps://) ------------------------------------------------------------
        # Downstream (listener) and upstream credentials are separate policies: the PSK store,
        # certificate and raw public keys authenticate clients; upstream_credentials (whose
        # "dtls-rpk" entries pin upstream servers' keys) authenticate us upstream.
        l1 = config.layer1
        try:
            psk_store = psk_store_from(l1.psk, [l1.psk_file] if l1.psk_file else [])
            certificate = certificate_from(l1.cert, l1.key, l1.ca, require_peer=bool(l1.ca))
            raw_public_key = raw_public_key_from(l1.rpk_key, l1.rpk_trust, key_flag="--rpk-key",
                                                 trust_flag="--rpk-trust")
            dtls.check_identities(psk_store, raw_public_key)
            client_creds = (
                layer1.ClientCredentials.from_file(l1.upstream_credentials)
                if l1.upstream_credentials else layer1.ClientCredentials()
            )
        except dtls.ConfigurationError as exc:
            raise ConfigError(str(exc)) from exc
        on_event = _layer1_metrics(metrics)
        if any(s == "coaps" for s, _, _ in listens):
            if psk_store is None and certificate is None and raw_public_key is None:
                raise ConfigError(
                    "a coaps:// listener needs Layer 1 credentials: --psk, --psk-file,"
                    " --cert/--key or --rpk-key/--rpk-trust"
                )
            listener = await layer1.attach_layer1(
                ctx, psk_store=psk_store, certificate=certificate,
                raw_public_key=raw_public_key, on_event=on_event,
            )
            extra["layer1"] = listener
            metrics.gauge(
                "coap_proxy_dtls_sessions",
                "Layer 1 DTLS sessions of the listeners (downstream clients)",
                func=lambda: float(listener.session_count),
            )
        for scheme, host, port in listens:
            if scheme == "coaps":
                h, p = await listener.listen(host, port)
                bound.append(("coaps", host or h, p))
        upstream.add("coaps")

        async def upstream_context_l1() -> aiocoap.Context:
            up = await upstream_context()
            t = await layer1.attach_layer1(up, client_credentials=client_creds,
                                           on_event=on_event)
            t.plaintext_hook = functools.partial(_malformed_from_layer1, t)
            return up

        async def layer1_upstream() -> tuple[aiocoap.Context, Any]:
            """A client context of Layer 1 alone: the fast path's coaps:// sessions."""
            up = aiocoap.Context(loggername="coaplayers.proxy.upstream")
            t = await layer1.attach_layer1(up, client_credentials=client_creds,
                                           on_event=on_event)
            return up, t

        extra["layer1_upstream"] = layer1_upstream
        make_upstream = upstream_context_l1
        for _ in range(config.upstream_sockets):
            pool.append(await make_upstream())
            acknowledge_repetitions(pool[-1])
    except BaseException:
        for c in (ctx, *pool):
            if c.request_interfaces:  # aiocoap cannot shut down a context without transports
                await c.shutdown()
        raise
    dedup.install_all(ctx)  # the listeners' duplicate tables (upstream contexts get answers)
    upstream_pool = UpstreamPool(pool, resolve_ttl=config.resolve_ttl)
    upstream_pool.sockets = upstream_sockets
    return ProxyContext(
        ctx, bound, upstream_pool, frozenset(upstream),
        extra,
    )


def _malformed_from_layer1(transport: Any, data: bytes, remote: Any) -> bool:
    """An upstream's answer inside a Layer 1 session with a format error aiocoap's decoder
    lets pass: its exchange ends, 5.02, as for ``coap://`` upstreams (RFC 7252 3)."""
    if not data or data[-1] != 0xFF or not malformed_answer(data):
        return False
    mman = transport.message_manager
    return mman is not None and _aiocoap.end_malformed_response(
        mman, data, remote, lambda rst: transport.send_encoded(remote, rst))


def _layer1_metrics(metrics: MetricsRegistry) -> Callable[[str, dict[str, Any]], None]:
    """DTLS counters by peer identity, fed from the Layer 1 transport's events."""
    handshakes = metrics.counter(
        "coap_proxy_dtls_handshakes_total",
        "Layer 1 DTLS handshakes by peer identity, role (server: downstream, client: upstream)"
        " and result",
        ("identity", "role", "result"),
    )

    def on_event(kind: str, fields: dict[str, Any]) -> None:
        result = {"handshake": "ok", "handshake_failed": "failed"}.get(kind)
        if result is not None:
            handshakes.inc(
                identity=str(fields.get("identity") or "-"),
                role=str(fields.get("role")),
                result=result,
            )

    return on_event


# ---------------------------------------------------------------------------------- fast path


class FastPathShell:
    """The sockets, sessions and timers of one listener's :class:`~.fastpath.FastPath`.

    A ``coap://`` listener's core reads the listening socket (:meth:`on_udp`); a ``coaps://``
    listener's core gets the plaintext of the Layer 1 transport's sessions and answers
    through them (:meth:`on_layer1`).

    Upstream sockets are connected UDP sockets (an ICMP error then reaches the exchanges
    waiting there), one in use per upstream address: its answers come in together, read in
    one wakeup. A socket's message IDs may not repeat towards its upstream within
    EXCHANGE_LIFETIME (RFC 7252 4.4), so once it has sent 65,536 requests the next socket of
    that upstream takes over (up to ``upstream_sockets`` per upstream; the first to have
    rested a lifetime is reused). At most ``fast_path_sockets`` in all, an idle one closed for a
    new one. Upstream names are resolved off the path (``resolve_ttl``). Whatever finds no
    socket or no address yet goes through aiocoap.

    ``coaps://`` upstreams (a Layer 1 listener's core only: a plain client is not lent the
    hop's credentials) get Layer 1 client sessions of the fast path's own, one per upstream
    on each of up to ``upstream_sockets`` client contexts made for it, rotated like the
    sockets; a session is opened off the path, its first requests going through aiocoap.
    """

    def __init__(self, site: Any, *, send_down: Callable[[bytes, Any, Any], None],
                 duplicates: Any, next_mid: Callable[[], int], hostinfo: Callable[[Any], str],
                 identity: Callable[[Any], str | None] | None = None,
                 layer1_upstream: Callable[[], Awaitable[tuple[aiocoap.Context, Any]]] | None
                 = None) -> None:
        from .fastpath import FastPath

        self.loop = asyncio.get_running_loop()
        self.site = site
        self.config = site.config
        self.per_upstream = self.config.upstream_sockets
        self.max_sockets = self.config.fast_path_sockets
        self.max_lookups = self.config.fast_path_lookups
        self._active: dict[Any, Any] = {}  # upstream address -> the Upstream in use
        self._sockets: OrderedDict[tuple[Any, int], tuple[Any, socket.socket]] = OrderedDict()
        self._names: dict[tuple[str, int], tuple[tuple[Any, int] | None, float]] = {}
        self._lookups: set[asyncio.Task[None]] = set()
        # Layer 1 upstreams: the client contexts made so far (index -> context, transport),
        # (sockaddr, host, index) -> its Upstream (None: being opened, or cannot be)
        self._make_layer1 = layer1_upstream
        self._l1_contexts: list[tuple[aiocoap.Context, Any]] = []
        self._l1: dict[tuple[Any, str, int], Any] = {}
        self._l1_by_remote: dict[tuple[int, Any], Any] = {}
        self._l1_sessions: dict[tuple[Any, str, int], tuple[Any, Any]] = {}
        schemes = {"coap"} if layer1_upstream is None else {"coap", "coaps"}
        self.core = FastPath(
            site, send_down=send_down, duplicates=duplicates, next_mid=next_mid,
            upstream_for=self.upstream_for, resolve=self.resolve,
            call_later=self.loop.call_later, hostinfo=hostinfo, clock=self.loop.time,
            schemes=frozenset(schemes), identity=identity,
        )

    @classmethod
    def on_udp(cls, site: Any, interface: Any) -> FastPathShell:
        """The fast path of a ``coap://`` listener (aiocoap's udp6 ``interface``)."""
        mman = _aiocoap.udp6_message_manager(interface)

        def hostinfo(address: Any) -> str:
            return str(site.hostinfo_of(
                address, lambda: UDP6EndpointAddress(address, interface).hostinfo))

        send_down = _aiocoap.datagram_sender(interface)
        shell = cls(site, send_down=send_down, duplicates=mman.compact_duplicates,
                    next_mid=lambda: _aiocoap.next_message_id(mman), hostinfo=hostinfo)
        _aiocoap.intercept_datagrams(interface, screened(
            site, send_down, shell.core.next_mid, shell.core.from_client))
        return shell

    @classmethod
    def on_layer1(cls, site: Any, transport: Any,
                  layer1_upstream: Callable[[], Awaitable[tuple[aiocoap.Context, Any]]] | None
                  ) -> FastPathShell:
        """The fast path of the ``coaps://`` listeners (the Layer 1 ``transport``): the
        plaintext its sessions deliver, answered through them."""
        from .site import identity_text

        mman = transport.message_manager

        def identity(remote: Any) -> str | None:
            return identity_text(remote.peer_identity)

        def send_down(data: bytes, pktinfo: Any, remote: Any) -> None:
            transport.send_encoded(remote, data)

        shell = cls(site, send_down=send_down, duplicates=mman.compact_duplicates,
                    next_mid=lambda: _aiocoap.next_message_id(mman),
                    hostinfo=lambda remote: str(remote.hostinfo), identity=identity,
                    layer1_upstream=layer1_upstream)
        hook = screened(site, send_down, shell.core.next_mid, shell.core.from_client)
        transport.plaintext_hook = lambda data, remote: hook(data, None, remote)
        return shell

    def upstream_for(self, sockaddr: Any, version: int, decision: Any) -> Any:
        if decision.upstream.scheme == "coaps":
            return self._layer1_upstream(sockaddr, decision)
        up = self._active.get(sockaddr)
        if up is not None and up.sent < 0x10000:
            up.sent += 1
            return up
        return self._next_socket(sockaddr, socket.AF_INET if version == 4 else socket.AF_INET6)

    def _next_socket(self, sockaddr: Any, family: int) -> Any:
        from .fastpath import EXCHANGE_LIFETIME, Upstream

        now = self.loop.time()
        for index in range(self.per_upstream):
            key = (sockaddr, index)
            found = self._sockets.get(key)
            if found is None:
                break
            if found[0].since + EXCHANGE_LIFETIME <= now:  # its message IDs are free again
                up = found[0]
                up.sent, up.since = 1, now
                self._active[sockaddr] = up
                return up
        else:
            return None  # every socket of this upstream used its IDs within a lifetime
        if len(self._sockets) >= self.max_sockets:
            idle = next((k for k, (u, _) in self._sockets.items()
                         if not u.by_token and self._active.get(k[0]) is not u), None)
            if idle is None:
                return None
            self._close(idle)
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(sockaddr)
        except OSError:
            return None
        up = Upstream(key, sock.send)
        up.sent, up.since = 1, now
        self._sockets[key] = (up, sock)
        self._active[sockaddr] = up
        self.loop.add_reader(sock.fileno(), self._readable, up, sock)
        return up

    def _readable(self, up: Any, sock: socket.socket) -> None:
        core = self.core
        for _ in range(64):  # what is there, in one wakeup (bounded: others' turn)
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error (connection refused, unreachable)
                core.upstream_failed(up, exc)
                continue
            core.from_upstream(up, data)

    # -- Layer 1 upstreams -----------------------------------------------------------------

    def _layer1_upstream(self, sockaddr: Any, d: Any) -> Any:
        """The Upstream (a Layer 1 session) for ``d``'s coaps:// upstream, rotated as the
        sockets are; None while it is being opened (aiocoap's path meanwhile)."""
        from .fastpath import EXCHANGE_LIFETIME

        host = d.upstream.host
        active = (sockaddr, host)
        up = self._active.get(active)
        if up is not None and up.sent < 0x10000:
            if not self._established(up):
                return None
            up.sent += 1
            return up
        now = self.loop.time()
        for index in range(self.per_upstream):
            key = (sockaddr, host, index)
            if key not in self._l1:
                if len(self._l1) < self.max_sockets:
                    self._l1[key] = None  # (being opened)
                    self._spawn(self._open_layer1(key, d.uri), f"layer1 {d.uri} {index}")
                return None
            session = self._l1[key]
            if session is None:
                return None
            if session is up:
                continue  # (it sent its 65,536 message IDs)
            if session.sent == 0 or session.since + EXCHANGE_LIFETIME <= now:
                if not self._established(session):
                    return None
                session.sent, session.since = 1, now  # (new, or its IDs are free again)
                self._active[active] = session
                return session
        return None

    def _established(self, up: Any) -> bool:
        transport, remote = self._l1_sessions[up.key]
        return bool(transport.ready(remote))

    async def _open_layer1(self, key: tuple[Any, str, int], uri: str) -> None:
        from .fastpath import Upstream

        assert self._make_layer1 is not None
        index = key[2]
        try:
            while len(self._l1_contexts) <= index:
                context, transport = await self._make_layer1()
                transport.plaintext_hook = functools.partial(
                    self._from_layer1, len(self._l1_contexts))
                transport.error_hook = functools.partial(
                    self._layer1_failed, len(self._l1_contexts))
                self._l1_contexts.append((context, transport))
            transport = self._l1_contexts[index][1]
            remote = await transport.determine_remote(Message(code=aiocoap.POST, uri=uri))
        except Exception as exc:  # (no credentials, a name that does not resolve, ...)
            log.debug("fast path: no Layer 1 session to %s: %s", uri, exc)
            remote = None
        if remote is None or not getattr(remote, "reusable", False):
            # aiocoap's path takes these requests; tried again after resolve_ttl (the cause
            # may pass: a name not resolving yet, credentials fixed by a restart)
            self.loop.call_later(max(1.0, self.config.resolve_ttl), self._forget_layer1, key)
            return

        def send(data: bytes) -> None:
            transport.send_encoded(remote, data)

        up = Upstream(key, send)
        up.since = self.loop.time()
        self._l1_sessions[key] = (transport, remote)
        transport.ready(remote)  # (the handshake starts now)
        self._l1[key] = up
        self._l1_by_remote[(index, remote)] = up

    def _forget_layer1(self, key: tuple[Any, str, int]) -> None:
        if key in self._l1 and self._l1[key] is None:
            del self._l1[key]

    def _from_layer1(self, index: int, data: bytes, remote: Any) -> bool:
        up = self._l1_by_remote.get((index, remote))
        if up is None:
            return False
        self.core.from_upstream(up, data)
        return True

    def _layer1_failed(self, index: int, remote: Any, exc: dtls.DtlsError) -> None:
        up = self._l1_by_remote.get((index, remote))
        if up is not None:
            log.debug("fast path: Layer 1 upstream %s: %s", remote, exc)
            self.core.upstream_lost(up, isinstance(exc, dtls.NetworkUnreachable))

    # -- names -----------------------------------------------------------------------------

    def resolve(self, host: str, port: int) -> tuple[Any, int] | None:
        key = (host, port)
        now = self.loop.time()
        found = self._names.get(key)
        if found is not None and found[1] > now:
            return found[0]
        name = f"resolve {host}:{port}"
        if len(self._lookups) < self.max_lookups and not any(
                t.get_name() == name for t in self._lookups):
            self._spawn(self._lookup(host, port), name)
        return None

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = self.loop.create_task(work, name=name)
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)

    async def _lookup(self, host: str, port: int) -> None:
        try:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError:
            infos = []
        result = ((infos[0][4], 4 if infos[0][0] == socket.AF_INET else 6) if infos
                  else None)
        if len(self._names) >= 4096:
            self._names.clear()
        self._names[(host, port)] = (result, self.loop.time() + self.config.resolve_ttl)

    def _close(self, key: tuple[Any, int]) -> None:
        up, sock = self._sockets.pop(key)
        if self._active.get(key[0]) is up:
            del self._active[key[0]]
        self.loop.remove_reader(sock.fileno())
        sock.close()

    def close(self) -> None:
        self.core.close()
        for key in list(self._sockets):
            self._close(key)
        for task in self._lookups:
            task.cancel()

    async def shutdown(self) -> None:
        """:meth:`close`, and the Layer 1 client contexts ended (close_notify sent)."""
        self.close()
        for context, _ in self._l1_contexts:
            await context.shutdown()
        self._l1_contexts.clear()


def screened(site: Any, send_down: Callable[[bytes, Any, Any], None],
             next_mid: Callable[[], int],
             fast: Callable[[bytes, Any, Any], bool] | None = None
             ) -> Callable[[bytes, Any, Any], bool]:
    """A listener's hook below aiocoap: the fast path's (if any), then, for what it declines,
    the wire-format rules of ``screen.py`` (True: answered or dropped here)."""
    errors = site.metrics.errors

    def hook(data: bytes, pktinfo: Any, address: Any) -> bool:
        if fast is not None and fast(data, pktinfo, address):
            return True
        if pktinfo is not None and is_multicast(pktinfo):
            return False  # (no RST or error to a multicast request: aiocoap's path decides)
        verdict = screen_request(data, next_mid)
        if verdict is None:
            return False
        errors.inc(kind=verdict.kind)
        if verdict.answer:
            send_down(verdict.answer, pktinfo, address)
        return True

    return hook


def attach_screens(context: ProxyContext, site: Any) -> None:
    """The wire-format rules on every listener of ``context``, without a fast path."""
    for udp in context.extra.get("udp", []):
        mman = _aiocoap.udp6_message_manager(udp)
        _aiocoap.intercept_datagrams(udp, screened(
            site, _aiocoap.datagram_sender(udp),
            functools.partial(_aiocoap.next_message_id, mman)))
    listener = context.extra.get("layer1")
    if listener is not None:
        mman = listener.message_manager

        def send_down(data: bytes, pktinfo: Any, remote: Any) -> None:
            listener.send_encoded(remote, data)

        hook = screened(site, send_down, functools.partial(_aiocoap.next_message_id, mman))
        listener.plaintext_hook = lambda data, remote: hook(data, None, remote)


def attach_fast_path(context: ProxyContext, site: Any) -> list[FastPathShell]:
    """A fast path on every listener of ``context`` (``ProxyConfig.fast_path``)."""
    shells = [FastPathShell.on_udp(site, udp) for udp in context.extra.get("udp", [])]
    listener = context.extra.get("layer1")
    if listener is not None:
        shells.append(FastPathShell.on_layer1(site, listener,
                                              context.extra.get("layer1_upstream")))
    return shells
