"""A CoAP site served over HTTP: ATLS's HTTP binding for Layer 0 and the OSCORE mode.

:class:`CoapAsgiApp` is an ASGI application. Each HTTP request is mapped to the CoAP request it
stands for (RFC 8075; :mod:`coaplayers.httpmap`) and rendered by the same site a CoAP listener
serves, so Layer 0 (``POST /.well-known/atls``, then ``POST /~name``) runs on the
same :class:`~coaplayers.layer0.core.Layer0ServerCore`, its inner requests reach the same resources,
and an OSCORE request (the ``OSCORE`` header field, an ``application/oscore`` body, RFC 8613
section 11) is unprotected by the same context store. The CoAP answer goes back as the HTTP
response (RFC 8075 section 7).

Any ASGI server can mount the app (uvicorn, hypercorn, a larger web application's router);
:class:`HttpListener` is the small uvicorn shell coap-server uses for ``--listen http://``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiocoap import Message, interfaces
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from aiocoap.pipe import Pipe, run_driving_pipe

from .httpmap import MappingError, coap_to_http_response, http_to_coap_request
from .message import error_to_message

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HttpBindingLimits:
    """Bounds of the HTTP binding."""

    max_body: int = 64 * 1024
    """Largest request body read; a larger one gets 413 before the site sees anything."""
    timeout: float = 30.0
    """How long a request may wait for its CoAP answer (then 504)."""
    max_connections: int = 1024
    """Connections and requests served at once by :class:`HttpListener` (503 beyond)."""

    def __post_init__(self) -> None:
        if self.max_body < 1 or self.timeout <= 0 or self.max_connections < 1:
            raise ValueError("the HTTP binding's limits must be positive")


class HttpRemote(interfaces.EndpointAddress):
    """The ``remote`` of a request that came over HTTP: the TCP peer, scheme ``http``.

    Bodies arrive whole, so answers are never cut into Block2 slices for it."""

    def __init__(self, host: str, port: int, scheme: str = "http") -> None:
        self._host = host
        self._port = port
        self._scheme = scheme

    @property
    def scheme(self) -> str:
        return self._scheme

    def __hash__(self) -> int:
        return hash((self.scheme, self._host, self._port))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HttpRemote) and (
            (other.scheme, other._host, other._port) == (self.scheme, self._host, self._port))

    def __repr__(self) -> str:
        return f"<HttpRemote {self.hostinfo}:{self._port}>"

    @property
    def hostinfo(self) -> str:
        """The client's host without the port: an HTTP client (a cross-proxy's pool above
        all) sends one exchange over any of its connections, so the port does not name it,
        and a Layer 0 cookie exchange must not depend on which connection the next flight
        takes."""
        return f"[{self._host}]" if ":" in self._host else self._host

    hostinfo_local = property(lambda self: "http.invalid")
    uri_base = property(lambda self: f"{self.scheme}://{self.hostinfo}")
    uri_base_local = property(lambda self: f"{self.scheme}://http.invalid")
    is_multicast = False
    is_multicast_locally = False
    maximum_block_size_exp = 6
    maximum_payload_size = 1 << 30
    authenticated_claims = ()

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self._host, self._port)

    @property
    def blockwise_key(self) -> tuple[str, str, int]:
        return (self.scheme, self._host, self._port)


class CoapAsgiApp:
    """ASGI application serving ``site`` (an aiocoap resource, e.g. a Layer0Site) over HTTP."""

    def __init__(self, site: interfaces.Resource,
                 limits: HttpBindingLimits | None = None) -> None:
        self.site = site
        self.limits = limits or HttpBindingLimits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: nothing to serve
        try:
            body = await self._body(receive)
        except _Disconnected:
            return  # the client went away before its body was complete: nothing to serve
        if body is None:
            await _respond(send, 413, [(b"content-type", b"text/plain; charset=utf-8")],
                           f"request body is limited to {self.limits.max_body} bytes".encode())
            return
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1"))
                   for k, v in scope.get("headers", ())]
        try:
            request = http_to_coap_request(
                scope["method"], scope.get("path", "/"),
                scope.get("query_string", b"").decode("latin-1"), headers, body)
        except MappingError as exc:
            await _respond(send, exc.status, [(b"content-type", b"text/plain; charset=utf-8")],
                           exc.text.encode())
            return
        client = scope.get("client") or ("0.0.0.0", 0)
        request.remote = HttpRemote(str(client[0]), int(client[1]), scope.get("scheme", "http"))
        request.direction = Direction.INCOMING
        request.mtype = Type.CON
        request.token = b""
        response = await self.render(request)
        status, out, payload = coap_to_http_response(response)
        await _respond(send, status, out, payload)

    async def render(self, request: Message) -> Message:
        """The site's first answer to ``request`` (an observation is not kept over HTTP)."""
        pipe = Pipe(request, log)
        first: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

        def on_event(event: Pipe.Event) -> bool:
            if not first.done():
                first.set_result(event.message or Message(code=Code.INTERNAL_SERVER_ERROR))
            return False  # one answer per HTTP request: no notifications follow

        stop = pipe.on_event(on_event)
        inline = getattr(self.site, "render_inline", None)
        if inline is None or not inline(pipe):
            run_driving_pipe(error_to_message(pipe, log), self.site.render_to_pipe(pipe),
                             name="HTTP request")
        try:
            return await asyncio.wait_for(asyncio.shield(first), self.limits.timeout)
        except TimeoutError:
            stop()
            return Message(code=Code.GATEWAY_TIMEOUT)

    async def _body(self, receive: Receive) -> bytes | None:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected()
            body += message.get("body", b"")
            if len(body) > self.limits.max_body:
                return None
            if not message.get("more_body"):
                return bytes(body)


class _Disconnected(Exception):
    """The HTTP client disconnected while its request body was being read."""


async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> None:
    if not any(k == b"content-length" for k, _ in headers):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _uvicorn_server(config: Any, started: asyncio.Event) -> Any:
    """uvicorn's server, leaving signals to the program that runs it and saying when it
    accepts connections."""
    import uvicorn

    class Server(uvicorn.Server):  # type: ignore[misc]
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            started.set()

    return Server(config)


class HttpListener:
    """``--listen http://HOST:PORT``: serve an ASGI app with uvicorn in the running loop."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        """``app``: a :class:`CoapAsgiApp` (its limits apply) or any other ASGI app."""
        self.app = app
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, so that asyncio sets TCP_NODELAY on accepted connections (it
        # checks sock.proto): otherwise a response's head and body, two writes, wait for the
        # client's delayed ACK on every keep-alive request after the first.
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self._task: asyncio.Task[None] | None = None
        self._server: Any = None

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        import uvicorn

        config = uvicorn.Config(self.app, lifespan="off", log_level="warning",
                                access_log=False, proxy_headers=False, server_header=False,
                                date_header=False,
                                limit_concurrency=getattr(self.app, "limits",
                                                          HttpBindingLimits()).max_connections)
        started = asyncio.Event()
        self._server = _uvicorn_server(config, started)
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]))
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not started.is_set():  # startup ended the task instead
            waiter.cancel()
            self._task.result()
            raise OSError(f"cannot serve {self.uri}")

    async def close(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)
        self.sock.close()


__all__ = ["CoapAsgiApp", "HttpBindingLimits", "HttpListener", "HttpRemote"]
