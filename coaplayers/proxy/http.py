"""http:// and https:// upstreams: coap-proxy as a CoAP-to-HTTP cross-proxy (RFC 7252 10.1).

The forwarding site hands a routed request here when its upstream is an HTTP origin. A CoAP
exchange becomes one HTTP exchange over a pooled keep-alive connection (httpx): Block1 blocks
are reassembled into one bounded body first (2.31 for each block until the last), and an
answer larger than the client's block size is served in Block2 slices. The mapping itself
lives in :mod:`coaplayers.httpmap`, shared with coap-server's HTTP listener, so that the Layer 0
outer exchanges and OSCORE messages cross unread and unchanged.

What HTTP cannot carry is refused, never dropped: a method without counterpart (4.05), a
Content-Format without a media type (4.15, or 4.06 for Accept), an unknown critical option
(4.02). Observe has no HTTP form: the request is answered once, without Observe, which tells
the client that the resource is not being observed (RFC 7641 section 3.1).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from aiocoap import Message, error
from aiocoap.blockwise import ContinueException
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from ..blockwise import Block1Assembler, BlockOutOfOrder, BlockwiseLimits, RequestTooLarge
from ..errors import RemoteError
from ..httpmap import (
    EtagMap,
    HttpRequest,
    MappingError,
    coap_to_http_request,
    http_to_coap_response,
    target_url,
)
from .config import HttpSettings

if TYPE_CHECKING:
    from aiocoap.pipe import Pipe

    from .routing import Decision
    from .site import ProxySite

HTTP_SCHEMES = frozenset({"http", "https"})
DEFAULT_BLOCK_SZX = 6  # 1024-byte Block2 slices unless the client asks for smaller
HELD_LIFETIME = 93.0  # RFC 7252 MAX_TRANSMIT_WAIT: a client that waited longer has given up


class BodyTooLarge(RemoteError):
    """An HTTP answer larger than ``HttpSettings.max_body``."""


class HttpUpstream:
    """The proxy's HTTP client: one pool of keep-alive connections for all origins."""

    def __init__(self, settings: HttpSettings, timeout: float) -> None:
        import httpx  # on the first http:// request: coap-proxy starts without it

        self.settings = settings
        # https:// is checked against the system's CAs, or the operator's bundle; never off.
        context = ssl.create_default_context(cafile=settings.ca)
        limits = httpx.Limits(max_connections=settings.connections,
                              max_keepalive_connections=settings.connections)
        # TCP_NODELAY: a request's head and body are two writes; without it the body waits
        # for the origin's delayed ACK of the head.
        transport = httpx.AsyncHTTPTransport(
            verify=context, limits=limits,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.client = httpx.AsyncClient(
            transport=transport, timeout=timeout, follow_redirects=False, trust_env=False)
        # Only what the CoAP request says goes up (Accept only from an Accept option): no
        # default Accept, Accept-Encoding, User-Agent or Connection (keep-alive is HTTP/1.1's).
        for name in ("accept", "accept-encoding", "user-agent", "connection"):
            del self.client.headers[name]
        self.etags = EtagMap()
        self.block1 = Block1Assembler(BlockwiseLimits(max_body=settings.max_body))
        # (client, method, url) -> (expiry, answer): Block2 continuations.
        self.held: OrderedDict[Hashable, tuple[float, Message]] = OrderedDict()
        self.clock = time.monotonic

    async def close(self) -> None:
        await self.client.aclose()

    async def fetch(
        self, request: HttpRequest, *, connect_to: str | None = None,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """One HTTP exchange; the body is read up to ``max_body`` (:class:`BodyTooLarge`).

        ``connect_to``: an address already checked against the allow-list; the connection goes
        there while Host and the TLS server name stay the URL's host.
        """
        import httpx

        url = httpx.URL(request.url)
        headers = list(request.headers)
        extensions: dict[str, Any] = {}
        if connect_to is not None:
            headers.append(("host", url.netloc.decode("ascii")))
            extensions["sni_hostname"] = url.host
            url = url.copy_with(host=connect_to)
        limit = self.settings.max_body
        async with self.client.stream(request.method, url, headers=headers,
                                      content=request.body or None,
                                      extensions=extensions) as response:
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge()
            # Header names come lower case from httpx; Content-Encoding is already undone.
            return response.status_code, list(response.headers.multi_items()), bytes(body)

    def hold(self, key: Hashable, answer: Message) -> None:
        now = self.clock()
        self.held[key] = (now + HELD_LIFETIME, answer)
        self.held.move_to_end(key)
        while self.held and (len(self.held) > self.settings.held_bodies
                             or next(iter(self.held.values()))[0] < now):
            self.held.popitem(last=False)

    def take_held(self, key: Hashable) -> Message | None:
        entry = self.held.get(key)
        if entry is None or entry[0] < self.clock():
            return None
        return entry[1]


def upstream_for(site: ProxySite) -> HttpUpstream:
    http: HttpUpstream | None = getattr(site, "http_upstream", None)
    if http is None:
        http = HttpUpstream(site.config.http, site.config.upstream_timeout)
        site.http_upstream = http
    return http


def _slice(answer: Message, block2: BlockOption.BlockwiseTuple | None) -> Message | None:
    """The Block2 slice of ``answer`` a request asks for (None: past the end)."""
    szx = DEFAULT_BLOCK_SZX if block2 is None else min(block2.size_exponent, DEFAULT_BLOCK_SZX)
    number = 0 if block2 is None else block2.block_number
    if block2 is not None and block2.size_exponent > szx:  # the client asked for larger
        number = number * (1 << (block2.size_exponent - szx))
    size = 1 << (szx + 4)
    payload = answer.payload
    if number == 0 and len(payload) <= size:
        return answer
    start = number * size
    if start >= len(payload) and start > 0:
        return None
    out = Message(code=answer.code, payload=payload[start:start + size])
    for option in answer.opt.option_list():
        out.opt.add_option(option)
    more = start + size < len(payload)
    out.opt.block2 = (number, more, szx)
    if number == 0:
        out.opt.size2 = len(payload)
    return out


async def forward(
    site: ProxySite, pipe: Pipe, request: Message, d: Decision, entry: dict[str, Any],
    started: float,
) -> None:
    """Relay one CoAP request to the HTTP origin of ``d`` and answer it (see module doc)."""
    import httpx

    http = upstream_for(site)
    if not _usable_host(d.upstream.host):
        # Uri-Host is any string: "a.example/x?" or "user@b" would put another authority into
        # the URL than the one routed and allowed.
        site._fail(pipe, Code.BAD_REQUEST, "Uri-Host is not a host name or address",
                   "bad_request", entry, started)
        return
    url = target_url(d.upstream.scheme, d.upstream.hostinfo, d.path, d.query)
    block2 = request.opt.block2
    # A Block2 continuation repeats method and URI, not the body (RFC 7959 section 2.4).
    held_key = (entry["client"], int(request.code), url)
    if block2 is not None and block2.block_number > 0 and request.opt.block1 is None:
        held = http.take_held(held_key)
        if held is not None:
            part = _slice(held, block2)
            if part is None:
                site._fail(pipe, Code.BAD_REQUEST, "Block2 past the end", "bad_request",
                           entry, started)
            else:
                site._done(entry, part, started, upstream=None)
                site._answer(pipe, part, is_last=True)
            return
        if request.code not in (Code.GET, Code.FETCH):
            site._fail(pipe, Code.REQUEST_ENTITY_INCOMPLETE, "answer no longer held: send the"
                       " request again from block 0", "incomplete", entry, started)
            return
    try:
        whole = http.block1.feed(request)
    except (ContinueException, BlockOutOfOrder, RequestTooLarge, error.BadRequest) as exc:
        answer = exc.to_message()
        site._done(entry, answer, started, upstream=None)
        site._answer(pipe, answer, is_last=True)
        return
    try:
        outgoing = coap_to_http_request(whole, url, http.etags)
    except MappingError as exc:
        site._fail(pipe, exc.code, exc.text, "not_mappable", entry, started)
        return
    connect_to = None
    if getattr(d, "check_address", False):
        # A name the allow-list admits only by address: resolve once, check, and connect to
        # that very address (no second resolution for a rebinding DNS to answer differently).
        connect_to = await _checked_address(site, d)
        if connect_to is None:
            site._fail(pipe, Code.FORBIDDEN, f"upstream {d.upstream.hostinfo} resolved to an"
                       " address that is not allowed", "not_allowed", entry, started)
            return
    t0 = site.clock()
    try:
        async with asyncio.timeout(site.config.upstream_timeout):
            status, headers, body = await http.fetch(outgoing, connect_to=connect_to)
    except (TimeoutError, httpx.TimeoutException):
        site._fail(pipe, Code.GATEWAY_TIMEOUT, "upstream timeout", "timeout", entry, started)
        return
    except BodyTooLarge:
        site._fail(pipe, Code.BAD_GATEWAY, f"upstream answer larger than"
                   f" {http.settings.max_body} bytes", "too_large", entry, started)
        return
    except httpx.ConnectError as exc:
        if _cause(exc, socket.gaierror):
            site._fail(pipe, Code.BAD_GATEWAY, "cannot resolve upstream", "resolution",
                       entry, started)
        elif _cause(exc, ssl.SSLError):
            site._fail(pipe, Code.BAD_GATEWAY, "upstream certificate not trusted",
                       "tls", entry, started)
        else:
            site._fail(pipe, Code.GATEWAY_TIMEOUT, "upstream unreachable", "unreachable",
                       entry, started)
        return
    except (httpx.HTTPError, OSError, ValueError):
        site._fail(pipe, Code.BAD_GATEWAY, "upstream failed", "bad_gateway", entry, started)
        return
    site.metrics.latency.observe(site.clock() - t0)
    host = f"[{d.upstream.host}]" if ":" in d.upstream.host else d.upstream.host
    origin = f"{d.upstream.scheme}://{host}" + (
        "" if d.upstream.port == (80 if d.upstream.scheme == "http" else 443)
        else f":{d.upstream.port}")
    answer = http_to_coap_response(whole.code, status, headers, body, etags=http.etags,
                                   upstream=origin)
    if d.mount is not None and answer.opt.location_path:
        location = d.location_down(tuple(answer.opt.location_path))
        if location is not None:
            answer.opt.location_path = location
    part = _slice(answer, block2)
    if part is None:
        part = Message(code=Code.BAD_REQUEST, payload=b"Block2 past the end")
    elif part is not answer:
        http.hold(held_key, answer)
    if request.opt.block1 is not None:  # the answer to the last block says which it was
        part.opt.block1 = request.opt.block1
    site._done(entry, part, started, upstream=True)
    site._answer(pipe, part, is_last=True)


async def _checked_address(site: ProxySite, d: Decision) -> str | None:
    allow = site.router.allow  # type: ignore[attr-defined]
    port = d.upstream.port
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            d.upstream.host, port, type=socket.SOCK_STREAM)
    except OSError:
        return None
    for info in infos:
        ip = str(info[4][0])
        if allow.address_allowed(ip, port):
            return ip
    return None


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})"
                        r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


def _usable_host(host: str) -> bool:
    """A DNS name or an IP address literal, nothing that could change the URL's authority."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return bool(_HOST_NAME.match(host))
    return True


def _cause(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is among the exceptions that led to ``exc`` (httpx wraps them)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
