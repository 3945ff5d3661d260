"""Build an aiocoap context that speaks plain ``coap://`` and Layer 1 ``coaps://``."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiocoap
from aiocoap.message import UndecidedRemote
from aiocoap.pipe import Pipe, run_driving_pipe
from aiocoap.tokenmanager import TokenManager
from aiocoap.transports.udp6 import UDP6EndpointAddress

from .. import _aiocoap, dedup, dtls
from ..message import error_to_message
from .credentials import ClientCredentials
from .transport import Layer1Limits, MessageInterfaceLayer1

DEFAULT_PORTS = {"coap": 5683, "coaps": 5684}


class ServerContext(aiocoap.Context):
    """aiocoap's context with a cheaper ``render_to_pipe`` and ``request``.

    aiocoap names each request's rendering task with ``"Rendering for %r" % request``, which
    formats the message and its remote (address parsing included) for every request, a good
    part of what a small request costs a server (docs/BENCHMARKS.md). The tasks get a
    constant name instead; everything else is aiocoap's (0.4.17; recheck on upgrades).
    Outgoing requests likewise: aiocoap's block-wise runner task is named after the request's
    repr (twice per request in the OSCORE mode, whose protected request is a second one).

    ``find_remote_and_interface`` keeps what aiocoap resolved for a ``coap://`` host for
    ``resolve_ttl`` seconds (0: resolve every time): aiocoap's udp6 transport otherwise runs
    ``getaddrinfo`` in a worker thread, plus a routability probe, for every request to an
    address given by name or as a URI (a large share of a plain client's CPU per request:
    docs/BENCHMARKS.md). For a ``coaps://`` host it keeps the Layer 1 transport's own remote
    for it, which stands for the host across DTLS sessions (the transport opens a new session
    on it when needed), instead of asking every request interface and the Layer 1 transport
    (name, socket and credential lookups) per request, at a client and at coap-proxy; the
    key says whether the request goes through a proxy, as that decides which credentials
    open a session. Only while every request interface is a
    plain aiocoap token manager (udp6, Layer 1) or says it declines the request
    (``declines(message)``, as the OSCORE client transport does for a message it has already
    protected): an interface such as OSCORE's claims requests by their URI, and a remembered
    address must never route a request past it. A request that fails on the network (no
    answer, ICMP error) makes the next one resolve afresh.
    """

    resolve_ttl: float = 30.0
    clock: Callable[[], float] = staticmethod(time.monotonic)
    _resolved: dict[tuple[UndecidedRemote, bool], tuple[Any, Any, float]] | None = None

    _interfaces_seen: tuple[list[Any], list[Callable[[aiocoap.Message], bool]] | None] | None = None

    def _cacheable(self, message: aiocoap.Message) -> bool:
        remote = message.remote
        if (
            type(remote) is not UndecidedRemote
            or remote.scheme not in DEFAULT_PORTS
            or self.resolve_ttl <= 0
        ):
            return False
        interfaces = self.request_interfaces
        seen = self._interfaces_seen
        if seen is None or seen[0] != interfaces:
            # Which interfaces must be asked, worked out again when the list changes.
            checks: list[Callable[[aiocoap.Message], bool]] | None = []
            for ri in interfaces:
                if type(ri) is not TokenManager:
                    declines = getattr(ri, "declines", None)
                    if declines is None:
                        checks = None
                        break
                    checks.append(declines)  # type: ignore[union-attr]
            seen = self._interfaces_seen = (list(interfaces), checks)
        checks = seen[1]
        if checks is None:
            return False
        for declines in checks:
            if not declines(message):
                return False
        return True

    async def find_remote_and_interface(self, message: aiocoap.Message) -> Any:
        if not self._cacheable(message):
            return await super().find_remote_and_interface(message)
        remote = message.remote
        opt = message.opt
        key = (remote, opt.proxy_scheme is not None or opt.proxy_uri is not None)
        if self._resolved is None:
            self._resolved = {}
        now = self.clock()
        hit = self._resolved.get(key)
        if hit is not None and hit[2] > now:
            message.remote = hit[1]
            return hit[0]
        interface = await super().find_remote_and_interface(message)
        resolved = message.remote
        if type(resolved) is UDP6EndpointAddress:
            resolved = ResolvedAddress(resolved)
        elif not getattr(resolved, "reusable", False):
            return interface  # e.g. a session another socket holds: look again next time
        if len(self._resolved) >= 1024:
            self._resolved.clear()
        self._resolved[key] = (interface, resolved, now + self.resolve_ttl)
        return interface

    def render_to_pipe(self, pipe: Pipe) -> None:
        run_driving_pipe(
            error_to_message(pipe, self.log), _aiocoap.render_site(self, pipe),
            name="coaplayers request",
        )

    def request(self, request_message: aiocoap.Message, handle_blockwise: bool = True) -> Any:
        remote = request_message.remote
        if handle_blockwise:
            request = _aiocoap.blockwise_request(
                self, request_message, "coaplayers blockwise request")
        else:
            request = super().request(request_message, handle_blockwise=False)
        if (type(remote) is UndecidedRemote and remote.scheme in DEFAULT_PORTS
                and self.resolve_ttl > 0):
            request.response.add_done_callback(
                lambda done, remote=remote: self._forget_after_failure(done, remote))
        return request

    def _forget_after_failure(self, done: Any, remote: UndecidedRemote) -> None:
        """A request that failed on the network resolves its address afresh next time (as
        coap-proxy does for its upstreams): the host may have moved."""
        if self._resolved and not done.cancelled() and isinstance(
                done.exception(), aiocoap.error.NetworkError):
            self.forget_resolution(remote)

    def forget_resolution(self, remote: UndecidedRemote) -> None:
        """Resolve ``remote`` afresh on the next request to it."""
        if self._resolved:
            self._resolved.pop((remote, False), None)
            self._resolved.pop((remote, True), None)


class ResolvedAddress(UDP6EndpointAddress):
    """A resolved address that is reused: what aiocoap derives from it per message
    (``is_multicast`` and ``hostinfo``, each parsing the address with ``ipaddress``) is
    computed once. Equal to (and hashed like) the plain address it copies, so answers from
    that address still match."""

    def __init__(self, remote: UDP6EndpointAddress) -> None:
        super().__init__(remote.sockaddr, remote.interface, pktinfo=remote.pktinfo)
        self.maximum_block_size_exp = remote.maximum_block_size_exp
        self._is_multicast = bool(remote.is_multicast)
        self._hostinfo = str(remote.hostinfo)

    @property
    def is_multicast(self) -> bool:
        return self._is_multicast

    @property
    def hostinfo(self) -> str:
        return self._hostinfo


def parse_listen_uri(uri: str) -> tuple[str, str, int]:
    """``coaps://[::]:5684`` -> ("coaps", "::", 5684); the port defaults per scheme."""
    parts = urlsplit(uri)
    if parts.scheme not in DEFAULT_PORTS:
        raise dtls.ConfigurationError(f"cannot listen on {uri!r}: scheme must be coap or coaps")
    if parts.path not in ("", "/") or parts.query:
        raise dtls.ConfigurationError(f"a listen URI has no path: {uri!r}")
    host = parts.hostname
    if host is None:
        raise dtls.ConfigurationError(f"listen URI {uri!r} names no address")
    try:
        port = parts.port
    except ValueError as exc:
        raise dtls.ConfigurationError(f"bad port in {uri!r}") from exc
    return parts.scheme, host, DEFAULT_PORTS[parts.scheme] if port is None else port


def _uri(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class LayeredContext:
    """An aiocoap context plus what was bound and the Layer 1 transport's handle."""

    def __init__(self, context: aiocoap.Context, layer1: MessageInterfaceLayer1,
                 bound: list[str]) -> None:
        self.context = context
        self.layer1 = layer1
        self.bound = bound
        #: The coap:// listeners' sockets, in the order of ``listen`` (coap-server steers
        #: its workers' SO_REUSEPORT groups through them: coaplayers.steering).
        self.plain_sockets: list[socket.socket] = []

    async def shutdown(self) -> None:
        await self.context.shutdown()


async def attach_layer1(
    ctx: aiocoap.Context,
    *,
    psk_store: dtls.PskStore | None = None,
    certificate: dtls.CertificateCredentials | None = None,
    client_credentials: ClientCredentials | None = None,
    limits: Layer1Limits | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    raw_public_key: dtls.RawPublicKeyCredentials | None = None,
) -> MessageInterfaceLayer1:
    """Add the Layer 1 transport to an existing aiocoap context (e.g. a proxy's).

    ``psk_store``, ``certificate`` and ``raw_public_key`` are the listeners' server
    credentials (any of them, served side by side); ``client_credentials`` open client hops.
    """
    holder: list[MessageInterfaceLayer1] = []

    async def make(mman: Any) -> MessageInterfaceLayer1:
        t = MessageInterfaceLayer1(
            mman,
            psk_store=psk_store,
            certificate=certificate,
            client_credentials=client_credentials,
            limits=limits or Layer1Limits(),
            on_event=on_event,
            raw_public_key=raw_public_key,
        )
        holder.append(t)
        return t

    await _aiocoap.append_transport(ctx, make)
    return holder[0]


async def create_context(
    site: Any = None,
    *,
    listen: Sequence[str] = (),
    psk_store: dtls.PskStore | None = None,
    certificate: dtls.CertificateCredentials | None = None,
    client_credentials: ClientCredentials | None = None,
    limits: Layer1Limits | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    loggername: str = "coaplayers",
    raw_public_key: dtls.RawPublicKeyCredentials | None = None,
) -> LayeredContext:
    """A context serving ``site`` on each listen URI and able to request coap and coaps URIs.

    Port 0 binds an ephemeral port; ``bound`` reports the real URIs in order.
    """
    ctx = ServerContext(serversite=site, loggername=loggername)
    bound: list[str] = []
    plain_sockets: list[socket.socket] = []
    listeners: list[Any] = []
    try:
        layer1 = await attach_layer1(
            ctx, psk_store=psk_store, certificate=certificate,
            client_credentials=client_credentials, limits=limits, on_event=on_event,
            raw_public_key=raw_public_key,
        )
        plain_bound = False
        for uri in listen:
            scheme, host, port = parse_listen_uri(uri)
            if scheme == "coaps":
                h, p = await layer1.listen(host, port)
                bound.append(_uri("coaps", h, p))
            else:
                udp = await _aiocoap.append_udp6(ctx, (host, port))
                sock = udp.transport.get_extra_info("socket")
                h, p = sock.getsockname()[:2]
                if sock.family == socket.AF_INET6 and h.startswith("::ffff:"):
                    h = h[7:]
                bound.append(_uri("coap", host if host not in ("::", "0.0.0.0") else h, p))
                plain_sockets.append(sock)
                listeners.append(udp)
                plain_bound = True
        if not plain_bound:
            await _aiocoap.append_udp6(ctx)
    except BaseException:
        await ctx.shutdown()
        raise
    dedup.install_all(ctx)
    for udp in listeners:
        # Every datagram queued is read in one wakeup of the event loop, without a read of
        # the error queue before each: aiocoap's reader takes one datagram per wakeup, so a
        # busy listener ran the loop (epoll_wait, its callbacks) once per datagram
        # (docs/BENCHMARKS.md, "2 workers against 1").
        _aiocoap.intercept_datagrams(udp, _to_aiocoap)
    layered = LayeredContext(ctx, layer1, bound)
    layered.plain_sockets = plain_sockets
    return layered


def _to_aiocoap(data: bytes, pktinfo: Any, address: Any) -> bool:
    """Every datagram goes on to aiocoap (the hook of :func:`_aiocoap.intercept_datagrams`)."""
    return False
