"""Where a request goes: the proxy's routing decision, computed from outer options only.

Pure functions of the request's options and the configuration (no sockets, no clock), so every
RFC 7252 section 5.7 / RFC 8768 rule can be tested without a network. The forwarding site
(``site.py``) turns a :class:`Decision` into an upstream request and a :class:`Refusal` into an
error response.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from aiocoap import Message
from aiocoap.numbers import OptionNumber, codes
from aiocoap.numbers.codes import Code

from ..errors import RemoteError
from ..replica import balance_key, replica_of_request
from .allow import AllowList, IPAddress, Verdict, bind_probe
from .config import DEFAULT_PORTS, ProxyConfig, Route, Upstream

Opt = OptionNumber

# Options the proxy consumes and regenerates: everything else is copied through unchanged.
ROUTING_OPTIONS = frozenset(
    {
        Opt.PROXY_URI, Opt.PROXY_SCHEME, Opt.URI_HOST, Opt.URI_PORT, Opt.URI_PATH,
        Opt.URI_QUERY, Opt.HOP_LIMIT,
    }
)

# Proxy-unsafe options this proxy understands (RFC 7252 5.7.1): block-wise and Observe pass
# through hop by hop, Max-Age and No-Response are carried end to end with known meaning.
KNOWN_UNSAFE = frozenset(
    {
        Opt.URI_HOST, Opt.URI_PORT, Opt.URI_PATH, Opt.URI_QUERY, Opt.PROXY_URI, Opt.PROXY_SCHEME,
        Opt.OBSERVE, Opt.BLOCK1, Opt.BLOCK2, Opt.MAX_AGE, Opt.NO_RESPONSE,
    }
)


class Refusal(RemoteError):
    """The proxy answers this request itself; ``kind`` labels the metric and the log line."""

    def __init__(self, code: Code, diagnostic: str, kind: str, max_age: int | None = None) -> None:
        super().__init__(diagnostic)
        self.code = code
        self.diagnostic = diagnostic
        self.kind = kind
        self.max_age = max_age  # when to retry (4.29 per RFC 8516, 5.03)

    def to_message(self) -> Message:
        msg = Message(code=self.code, payload=self.diagnostic.encode())
        if self.max_age is not None:
            msg.opt.max_age = self.max_age
        return msg


@dataclass(frozen=True, slots=True)
class Decision:
    """An upstream target for one request, and what to put in its routing options."""

    kind: str  # "forward" or "reverse"
    upstream: Upstream  # scheme, host, port; its path is already folded into ``path``
    path: tuple[str, ...]
    query: tuple[str, ...]
    uri_host: str | None  # sent as Uri-Host; None for IP literals (RFC 7252 6.4)
    hop_limit: int  # the Hop-Limit value to send
    route: str | None = None
    # A mounted prefix route: (upstream base path, prefix) for Location-Path in answers.
    mount: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    # A name only "*" or a prefix allowed: the address it resolves to is checked before sending.
    check_address: bool = False

    def location_down(self, location: tuple[str, ...]) -> tuple[str, ...] | None:
        """An answer's Location-Path as the client must see it (None: unchanged)."""
        if self.mount is None:
            return None
        base, prefix = self.mount
        if location[: len(base)] != base:
            return None
        return prefix + location[len(base):]

    @property
    def uri(self) -> str:
        return str(self.upstream) + "".join("/" + s for s in self.path) + (
            "?" + "&".join(self.query) if self.query else ""
        )


_UNKNOWN_UNSAFE: dict[int, bool] = {}  # option number -> answered with 4.02 (memo)


def _is_unknown_unsafe(number: int) -> bool:
    n = OptionNumber(number)
    verdict = n.is_unsafe() and n not in KNOWN_UNSAFE
    if len(_UNKNOWN_UNSAFE) < 4096:  # option numbers come from the network: bounded
        _UNKNOWN_UNSAFE[number] = verdict
    return verdict


def is_unknown_unsafe(number: int) -> bool:
    """Whether an option number is proxy-unsafe and not understood here (answered 4.02)."""
    verdict = _UNKNOWN_UNSAFE.get(number)
    return _is_unknown_unsafe(number) if verdict is None else verdict


def unknown_unsafe(options: Iterable[object]) -> list[int]:
    """Numbers of proxy-unsafe options this proxy does not understand (answered with 4.02)."""
    bad: set[int] = set()
    for o in options:
        number = int(o.number)  # type: ignore[attr-defined]
        verdict = _UNKNOWN_UNSAFE.get(number)
        if verdict is None:
            verdict = _is_unknown_unsafe(number)
        if verdict:
            bad.add(number)
    return sorted(bad) if bad else []


@functools.lru_cache(maxsize=1024)
def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


_DOTS = {".": ".", "%2e": ".", "..": "..", ".%2e": "..", "%2e.": "..", "%2e%2e": ".."}


def remove_dot_segments(path: str) -> list[str]:
    """A URI's path as its segments (still percent-encoded) after RFC 3986 5.2.4, which
    RFC 7252 6.4 applies to a Proxy-Uri (step 2, reference resolution): "." goes, ".."
    takes its parent with it, and either one last leaves an empty last segment (a trailing
    slash); other empty segments stay. A percent-encoded dot counts as a dot (RFC 3986
    6.2.2.2: it is unreserved). The path "" or "/" has no segments (no Uri-Path)."""
    if not path.startswith("/"):
        return []  # (an absolute URI's path is empty or begins with "/")
    out: list[str] = []
    segments = path.split("/")[1:]
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        dots = _DOTS.get(seg.lower()) if len(seg) <= 6 else None
        if dots is None:
            out.append(seg)
            continue
        if dots == ".." and out:
            out.pop()
        if i == last:
            out.append("")
    return [] if out == [""] else out


_WILDCARDS = frozenset({"::", "0.0.0.0", ""})
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "::ffff:127.0.0.1"})


class Router:
    """Decides forward / reverse / refuse for each request; knows the proxy's own names."""

    def __init__(self, config: ProxyConfig,
                 local_address: Callable[[IPAddress], bool] = bind_probe) -> None:
        self.config = config
        self.allow = AllowList(config.allow, local_address)
        self.names = {n.lower() for n in config.names}
        self.addresses: set[tuple[str, str, int]] = set()  # (scheme, host, port) we listen on
        self.host_routes = {r.match: r for r in config.routes if not r.is_prefix}
        # Longest prefix first, so "/a/b" wins over "/a" and "/" is the catch-all.
        self.prefix_routes = sorted(
            (r for r in config.routes if r.is_prefix), key=lambda r: -len(r.prefix)
        )
        from .replicas import ReplicaSet  # (it imports is_ip_literal from here)

        # Replica sets by route: members, their health, the choice per request (replicas.py).
        self.sets = {
            r.match: ReplicaSet(r, config.health_timeout) for r in config.routes if r.is_set
        }

    def add_own_address(self, scheme: str, host: str, port: int) -> None:
        self.addresses.add((scheme, host.strip("[]").lower(), port))

    def is_self(self, scheme: str, host: str, port: int) -> bool:
        """Whether scheme://host:port names this proxy (so forwarding there would loop)."""
        host = host.strip("[]").lower()
        for s, h, p in self.addresses:
            if s != scheme or p != port:
                continue
            if host == h or host in self.names:
                return True
            if h in _WILDCARDS and host in _LOOPBACK_NAMES:
                return True
        return False

    def decide(self, request: Message, client: str = "") -> Decision:
        """The routing decision for ``request``, or raise :class:`Refusal`. ``client`` (the
        downstream address) picks the replica of a set for requests that name none."""
        opt = request.opt
        bad = unknown_unsafe(opt.option_list())
        if bad:
            raise Refusal(
                codes.BAD_OPTION, "unknown proxy-unsafe option " + ",".join(map(str, bad)),
                "bad_option",
            )
        decision = self._route(request, client)
        return decision

    def upstream_unreachable(
        self, d: Decision, request: Message, client: str
    ) -> Decision | None:
        """A replica set member refused ``d``'s datagram (ICMP: no process took it, so
        nothing ran): mark it down and decide again. None: not a set, or no other member."""
        s = self.sets.get(d.route) if d.route is not None else None
        if s is None:
            return None
        s.fail(f"{d.upstream.scheme}://{d.upstream.hostinfo}", "unreachable")
        try:
            again = self.decide(request, client)
        except Refusal:
            return None
        return again if again.upstream != d.upstream else None

    # -- routing -------------------------------------------------------------------------------

    def _route(self, request: Message, client: str = "") -> Decision:
        opt = request.opt
        if opt.proxy_uri is not None:
            scheme, host, port, path, query = self._split_proxy_uri(opt.proxy_uri)
            return self._forward(request, scheme, host, port, path, query, client)
        if opt.proxy_scheme is not None:
            if opt.uri_host is None:
                raise Refusal(codes.BAD_REQUEST, "Proxy-Scheme needs Uri-Host", "bad_request")
            scheme = opt.proxy_scheme.lower()
            port = opt.uri_port if opt.uri_port is not None else DEFAULT_PORTS.get(scheme, 0)
            return self._forward(
                request, scheme, opt.uri_host, port, tuple(opt.uri_path), tuple(opt.uri_query),
                client,
            )
        return self._reverse(request, opt.uri_host, tuple(opt.uri_path), tuple(opt.uri_query),
                             client)

    @staticmethod
    def _split_proxy_uri(uri: str) -> tuple[str, str, int, tuple[str, ...], tuple[str, ...]]:
        try:
            parts = urlsplit(uri)
            port = parts.port
        except ValueError as exc:
            raise Refusal(codes.BAD_REQUEST, "malformed Proxy-Uri", "bad_request") from exc
        scheme = parts.scheme.lower()
        if not parts.hostname or parts.fragment or parts.username is not None:
            raise Refusal(codes.BAD_REQUEST, "malformed Proxy-Uri", "bad_request")
        path = tuple(unquote(s) for s in remove_dot_segments(parts.path))
        query = tuple(unquote(q) for q in parts.query.split("&")) if parts.query else ()
        if port is None:
            port = DEFAULT_PORTS.get(scheme, 0)
        return scheme, parts.hostname, port, path, query

    def _forward(
        self, request: Message, scheme: str, host: str, port: int,
        path: tuple[str, ...], query: tuple[str, ...], client: str = "",
    ) -> Decision:
        host = host.strip("[]")
        if scheme in DEFAULT_PORTS and self.is_self(scheme, host, port):
            # Addressed to us by name or address: not a proxy request (RFC 7252 5.7.2), so
            # route it as if it had come without proxy options instead of forwarding to
            # ourselves.
            return self._reverse(request, None, path, query)
        named = self.host_routes.get(host.lower())
        if named is not None and named.is_set and not named.upstream.mount:
            # A forward request for a name that a replica set serves: one of its replicas,
            # chosen as for a reverse request (the set's scheme and port).
            return self._replica(request, named, path, query, client, "forward", host)
        if not self.config.forward:
            raise Refusal(
                codes.PROXYING_NOT_SUPPORTED, "forward proxying is disabled", "not_proxying"
            )
        if scheme not in self.config.allowed_schemes:
            raise Refusal(
                codes.PROXYING_NOT_SUPPORTED, f"will not proxy to {scheme!r}", "not_proxying"
            )
        verdict = self.allow.check_target(host, port)
        if verdict is Verdict.REFUSED:
            raise Refusal(codes.FORBIDDEN, self.allow.describe_refusal(host, port), "not_allowed")
        upstream = Upstream(scheme, host, port)
        return Decision(
            "forward", upstream, path, query,
            None if is_ip_literal(host) else host.lower(),
            self._next_hop_limit(request),
            check_address=verdict is Verdict.CHECK_ADDRESS,
        )

    def _reverse(
        self, request: Message, uri_host: str | None, path: tuple[str, ...],
        query: tuple[str, ...], client: str = "",
    ) -> Decision:
        route: Route | None = None
        rest = path
        if uri_host is not None and uri_host.lower() not in self.names:
            route = self.host_routes.get(uri_host.lower())
        if route is None:
            for r in self.prefix_routes:
                if path[: len(r.prefix)] == r.prefix:
                    route = r
                    rest = path[len(r.prefix):] if r.upstream.mount else path
                    break
        if route is None:
            raise Refusal(codes.PROXYING_NOT_SUPPORTED, "no route for this request", "no_route")
        up = route.upstream
        uri_host = None if is_ip_literal(up.host) else up.host.lower()
        if route.is_set:
            member = self.sets[route.match].pick(
                replica_of_request(request.opt), balance_key(request, client))
            if member is None:
                raise Refusal(codes.SERVICE_UNAVAILABLE, "no replica answers", "no_replica",
                              max_age=1)
            up = member.upstream
            name = member.name or up.host
            uri_host = None if is_ip_literal(name) else name.lower()
        return Decision(
            "reverse",
            Upstream(up.scheme, up.host, up.port),
            up.path + rest,
            query,
            uri_host,
            self._next_hop_limit(request),
            route=route.match,
            mount=(up.path, route.prefix if route.is_prefix else ()) if up.mount else None,
        )

    def _replica(
        self, request: Message, route: Route, path: tuple[str, ...], query: tuple[str, ...],
        client: str, kind: str, origin: str | None = None,
    ) -> Decision:
        member = self.sets[route.match].pick(
            replica_of_request(request.opt, path), balance_key(request, client))
        if member is None:
            raise Refusal(codes.SERVICE_UNAVAILABLE, "no replica answers", "no_replica",
                          max_age=1)
        up = member.upstream
        # Uri-Host: the name the client asked for, else the one the set was given by.
        name = origin or member.name or up.host
        return Decision(
            kind, Upstream(up.scheme, up.host, up.port), up.path + path, query,
            None if is_ip_literal(name) else name.lower(), self._next_hop_limit(request),
            route=route.match,
        )

    def _next_hop_limit(self, request: Message) -> int:
        """RFC 8768: insert the initial value if absent, else decrement; 5.08 at zero; 4.00
        for 0 and above 255 (a value longer than one byte is refused before decoding,
        ``screen.py``)."""
        raw = request.opt.get_option(Opt.HOP_LIMIT)
        if not raw:
            return self.config.hop_limit
        value = raw[0].value
        if not isinstance(value, int) or not 1 <= value <= 255:
            raise Refusal(codes.BAD_REQUEST, "Hop-Limit must be 1..255", "bad_request")
        if value - 1 < 1:
            raise Refusal(codes.HOP_LIMIT_REACHED, "", "hop_limit")
        return value - 1
