"""coap-proxy's fast path: plain requests forwarded as datagrams, below aiocoap.

aiocoap's machinery for one request (a message decoded and encoded twice, a pipe, a task, a
request object and its timers, on both sides) is most of what a proxied request costs. A
request that needs none of what that machinery adds (block-wise transfer, Observe, Echo,
No-Response, the response cache, Layer 1) is forwarded here as bytes: header and
token swapped, the routing options regenerated from the same :class:`Router` decision, every
other option and the payload copied as they came. The answer comes back the same way.

The choice is made per datagram before any state changes, and from what the datagram and the
configuration say (not from load), so that all of an exchange, its duplicates included, stays
on one path: what this module does not take, aiocoap's path (``site.py``) gets unchanged. Both
share the duplicate table (``dedup.py``), the message IDs of the listening socket, the in-flight
bound, the rate limiter, the 3x rule, metrics and the exchange log.

Written here because no CoAP library forwards encoded messages; the option codec is RFC 7252
section 3.1. ``tests/proxy/test_fastpath.py`` runs this core without sockets.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiocoap import Message
from aiocoap.numbers import codes
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.numbers.optionnumbers import OptionNumber

from ..dedup import CompactDuplicates
from ..errors import ICMP_ERRNOS, RemoteError
from ..replica import balance_key_of, replica_of
from .routing import Decision, is_unknown_unsafe

if TYPE_CHECKING:
    from .site import ProxySite

CON, NON, ACK, RST = 0, 1, 2, 3
GET, FETCH = 1, 5
OPT_LOCATION_PATH, OPT_URI_HOST, OPT_URI_PATH, OPT_URI_QUERY, OPT_HOP_LIMIT = 8, 3, 11, 15, 16
OPT_OSCORE, OPT_PROXY_URI = 9, 35
HOP_LIMIT_REACHED = 0xA8  # 5.08

# Request options this path forwards (RFC 7252, 8613, 8768): If-Match, Uri-Host, ETag,
# If-None-Match, Uri-Port, OSCORE, Uri-Path, Content-Format, Uri-Query, Hop-Limit, Accept,
# Proxy-Uri, Proxy-Scheme, Size1; and every safe-to-forward option aiocoap does not know (as
# aiocoap's path does, RFC 7252 5.7.1: Layer 0's Padding, for one). A request with any other
# goes through aiocoap.
REQUEST_OPTIONS = frozenset({1, 3, 4, 5, 7, 9, 11, 12, 15, 16, 17, 35, 39, 60})
_KNOWN = frozenset(int(v) for v in vars(OptionNumber).values() if isinstance(v, OptionNumber))
ROUTING = frozenset({3, 7, 11, 15, 16, 35, 39})  # consumed, and regenerated from the decision

EXCHANGE_LIFETIME = 247.0  # RFC 7252 4.8.2 with the default parameters
TICK = 0.05  # seconds between looks at exchanges older than EMPTY_ACK_DELAY
TOKEN = 4  # upstream token bytes, random: RFC 7252 5.3.1's 32 bits for Internet clients
RECENTLY_DONE = 1024  # upstream tokens of finished exchanges whose CON answers are ACKed again

log = logging.getLogger("coaplayers.proxy")

_UNKNOWN, _SET = object(), object()  # a decision not made yet; one made for every request


@dataclass(slots=True)
class _SetRoute:
    """A replica set's route: decisions remembered per member (health picks the member)."""

    match: str
    # (routing options, member) -> the decision: a session's requests reuse theirs
    members: dict[Any, _Route] = field(default_factory=dict)

    def remember(self, key: Any, member: str, route: _Route, bound: int) -> None:
        if len(self.members) >= bound:
            self.members.clear()
        self.members[(key, member)] = route



class Malformed(RemoteError, ValueError):
    """The datagram is not a well-formed CoAP message (aiocoap's path then decides)."""


def parse_options(data: bytes, offset: int) -> tuple[list[tuple[int, bytes]], int]:
    """The options from ``offset`` on as (number, value) pairs, and where the payload marker
    (or the end) is; :class:`Malformed` for what RFC 7252 3.1 does not allow."""
    options: list[tuple[int, bytes]] = []
    number = 0
    end = len(data)
    while offset < end:
        byte = data[offset]
        if byte == 0xFF:
            if offset + 1 == end:
                raise Malformed("payload marker without payload")
            return options, offset
        offset += 1
        delta, length = byte >> 4, byte & 0x0F
        if delta >= 13:
            delta, offset = _extended_nibble(delta, data, offset, "delta")
        if length >= 13:
            length, offset = _extended_nibble(length, data, offset, "length")
        number += delta
        value = data[offset:offset + length]
        offset += length
        if offset > end:
            raise Malformed("option runs past the end")
        options.append((number, value))
    return options, end


def _extended_nibble(nibble: int, data: bytes, offset: int, what: str) -> tuple[int, int]:
    """An option delta or length of 13 or 14 and its extension bytes: (value, next offset)."""
    if nibble == 13:
        return data[offset] + 13, offset + 1
    if nibble == 14:
        return ((data[offset] << 8) | data[offset + 1]) + 269, offset + 2
    raise Malformed(f"option {what} 15")


def _extended(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    return 14, struct.pack("!H", value - 269)


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    """RFC 7252 3.1 encoding of (number, value) pairs sorted by number."""
    out = bytearray()
    last = 0
    for number, value in options:
        delta, length = number - last, len(value)
        if delta < 13 and length < 13:
            out.append(delta << 4 | length)
        else:
            d, dx = _extended(delta)
            n, nx = _extended(length)
            out.append(d << 4 | n)
            out += dx
            out += nx
        out += value
        last = number
    return bytes(out)


def _uint(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


_CODE_TEXT = [f"{c >> 5}.{c & 0x1F:02d}" for c in range(256)]
_METHOD_TEXT = {c: str(Code(c)) for c in range(GET, 8)}  # GET..iPATCH, as aiocoap names them


def _code_text(code: int) -> str:
    return _CODE_TEXT[code]


def is_multicast(pktinfo: bytes) -> bool:
    """Whether a datagram came to a multicast address (its answer may not come from there)."""
    return pktinfo[0] == 0xFF or (pktinfo[:12] == b"\0" * 10 + b"\xff\xff"
                                  and 224 <= pktinfo[12] < 240)


@dataclass(slots=True)
class _Route:
    """A routing decision and what it puts in the upstream request's routing options."""

    decision: Decision
    options: list[tuple[int, bytes]]
    encoded: bytes  # ``options`` encoded: the upstream request's when it has no others
    # The exchange log's fields that follow from the decision and the routing options alone,
    # made for the first request (aiocoap's decoder and the URI text are most of a line)
    log: dict[str, Any] | None = None


class _Exchange:
    """One forwarded request, from its arrival to the answer's departure."""

    __slots__ = (
        "address", "code", "con", "empty_acked", "entry", "mid", "nstart", "peer", "pktinfo",
        "request", "request_payload", "retried", "retries", "route", "rto", "sent", "sent_at",
        "started", "timer", "token", "up", "up_acked", "up_datagram", "up_mid", "up_token",
        "verified", "young",
    )
    peer: Hashable  # the client's address (the duplicate table's key, dedup.peer_key)
    pktinfo: Any  # where the request came to (the answer leaves from there)
    address: Any
    mid: int
    token: bytes
    con: bool
    code: int
    request: bytes  # the datagram as it came
    request_payload: int
    route: _Route
    started: float
    up: Upstream
    up_token: bytes
    up_mid: int
    up_datagram: bytes
    verified: bool  # the client's address is verified (no 3x rule)

    def __init__(self) -> None:
        self.timer: Any = None
        self.up_acked = False
        self.empty_acked = False
        self.retries = 0
        self.retried = False
        self.young = True
        self.sent = False  # (a CON waits while its client has another outstanding upstream)
        self.sent_at = 0.0
        self.rto = 0.0  # the first retransmission timeout, once chosen
        self.nstart: tuple[Any, Any] | None = None
        self.entry: dict[str, Any] | None = None


class Upstream:
    """One upstream socket (connected to one upstream address): its exchanges by token and
    message ID, and its message ID sequence (RFC 7252 4.4: per endpoint pair)."""

    __slots__ = ("by_mid", "by_token", "done", "key", "next_mid", "send", "sent", "since")

    def __init__(self, key: Hashable, send: Callable[[bytes], object]) -> None:
        self.key = key
        self.send = send
        self.by_token: dict[bytes, _Exchange] = {}
        self.by_mid: dict[int, _Exchange] = {}
        self.next_mid = random.getrandbits(16)
        self.sent = 0  # requests sent in this message ID window (the shell's count)
        self.since = 0.0  # when the window began
        # tokens of finished exchanges -> their message ID: a CON answer repeated (our ACK
        # lost) is ACKed again, not reset
        self.done: OrderedDict[bytes, int] = OrderedDict()

    def mid(self) -> int:
        mid = self.next_mid
        self.next_mid = (mid + 1) & 0xFFFF
        return mid


class FastPath:
    """The forwarding core: datagrams in, datagrams out; sockets and timers are the shell's.

    ``send_down(data, pktinfo, address)`` answers a client on the listening socket (or
    over its Layer 1 session); ``upstream_for(sockaddr, version, decision)`` (IP version 4 or
    6) gives the :class:`Upstream` that requests to ``sockaddr`` use (``None``: none free; the
    request then goes through aiocoap); ``resolve(host, port)`` gives an upstream name's
    (sockaddr, version) if it is known (and looks it up for next time if not);
    ``call_later(delay, fn)`` returns a handle with ``cancel()``; ``clock`` is the loop's.

    ``schemes`` are the upstream schemes the shell has sockets or sessions for. A Layer 1
    listener's core (``identity`` given) serves clients that the DTLS handshake verified
    and authenticated: no 3x rule, and the rate limit and the exchange log by identity.
    """

    def __init__(
        self, site: ProxySite, *, send_down: Callable[[bytes, Any, Any], None],
        duplicates: CompactDuplicates, next_mid: Callable[[], int],
        upstream_for: Callable[[Any, int, Decision], Upstream | None],
        resolve: Callable[[str, int], tuple[Any, int] | None],
        call_later: Callable[[float, Callable[[], None]], Any],
        hostinfo: Callable[[Any], str],
        clock: Callable[[], float],
        schemes: frozenset[str] = frozenset({"coap"}),
        identity: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.site = site
        self.config = site.config
        self.send_down = send_down
        self.duplicates = duplicates
        self.next_mid = next_mid
        self.upstream_for = upstream_for
        self.resolve = resolve
        self.call_later = call_later
        self.hostinfo = hostinfo
        self.clock = clock
        self.schemes = schemes & site.upstream_schemes
        self.identity = identity
        # RFC 7252 4.8's parameters as aiocoap's path uses them: its defaults (which a program
        # may set), the ACK_TIMEOUTs of the configuration
        tuning = TransportTuning()
        self.empty_ack_delay = float(tuning.EMPTY_ACK_DELAY)
        self.random_factor = float(tuning.ACK_RANDOM_FACTOR)
        self.max_retransmit = int(tuning.MAX_RETRANSMIT)
        self.exchange_lifetime = float(tuning.EXCHANGE_LIFETIME)
        self.ack_timeout = self.config.ack_timeout or float(tuning.ACK_TIMEOUT)
        self.down_ack_timeout = self.config.downstream_ack_timeout or float(tuning.ACK_TIMEOUT)
        # Routing decisions remembered (by the routing options' bytes; per set member too),
        # and upstream addresses: each table at most this many entries
        self.decisions = self.config.fast_path_decisions
        self._routes: dict[tuple[tuple[int, bytes], ...], object] = {}
        self._sets: dict[str, _SetRoute] = {}  # route -> its remembered member decisions
        self._addresses: dict[tuple[str, int], tuple[Any, int] | None] = {}
        self._pending: dict[tuple[Hashable, int], _Exchange] = {}  # (peer, MID) in progress
        self._young: OrderedDict[int, _Exchange] = OrderedDict()  # by arrival, < 0.1 s old
        self._awaiting: dict[tuple[Hashable, int], list[Any]] = {}  # separate CON answers
        # (client, upstream) -> CON requests waiting behind the outstanding one (NSTART)
        self._outstanding: dict[tuple[Any, Any], list[_Exchange]] = {}
        self._tick: Any = None
        self._forwarded = site.metrics.registry.counter(
            "coap_proxy_fast_path_total",
            "Requests forwarded as datagrams, below aiocoap (the fast path)")
        # Counted here in plain numbers, added to the metrics on every tick and scrape
        # (:meth:`flush_metrics`): a metric's increment costs more than the rest of a step.
        self.forwarded = 0
        self._random, self._random_at = b"", 0
        self._kinds: dict[str, int] = {}
        self._codes: dict[int, int] = {}
        self._bytes_up = self._bytes_down = 0
        self._observe = site.metrics.latency.observe
        site.metrics.registry.flushes.append(self.flush_metrics)

    # -- from clients ----------------------------------------------------------------------

    def from_client(self, data: bytes, pktinfo: Any, address: Any) -> bool:
        """Take a datagram from the listening socket; False: aiocoap's path handles it."""
        try:
            return self._from_client(data, pktinfo, address)
        except Exception:  # a fault here must not stop the listener: the datagram is dropped
            log.exception("fast path: datagram from %s dropped", address)
            return True

    def from_upstream(self, up: Upstream, data: bytes) -> None:
        """A datagram from an upstream's socket."""
        try:
            self._from_upstream(up, data)
        except Exception:
            log.exception("fast path: datagram from upstream %s dropped", up.key)

    def _from_client(self, data: bytes, pktinfo: Any, address: Any) -> bool:
        if len(data) < 4:
            return False
        b0 = data[0]
        if b0 >> 6 != 1:
            return False
        mtype = (b0 >> 4) & 3
        code = data[1]
        mid = data[2] << 8 | data[3]
        peer = address
        if mtype >= ACK:
            if code != 0:
                return False
            waiting = self._awaiting.pop((peer, mid), None)
            if waiting is None:
                return False
            if waiting[0] is not None:
                waiting[0].cancel()
            return True
        tkl = b0 & 0x0F
        if not 1 <= code <= 7 or tkl > 8:
            return False
        seen = self.duplicates.seen(peer, mid)
        if seen is not None:
            if seen[1] is not None:
                if mtype == CON:
                    self.send_down(seen[1], pktinfo, address)
                return True
            return (peer, mid) in self._pending
        return self._forward(data, pktinfo, address, peer, mtype, code, mid, tkl)

    def _forward(self, data: bytes, pktinfo: Any, address: Any, peer: Hashable, mtype: int,
                 code: int, mid: int, tkl: int) -> bool:
        site = self.site
        if site.draining or (pktinfo is not None and is_multicast(pktinfo)):
            return False
        try:
            options, payload_at = parse_options(data, 4 + tkl)
        except (Malformed, IndexError):
            return False
        routing: list[tuple[int, bytes]] = []
        others: list[tuple[int, bytes]] = []
        for option in options:
            number = option[0]
            if number not in REQUEST_OPTIONS and (number & 2 or number in _KNOWN):
                return False
            (routing if number in ROUTING else others).append(option)
        cuttable = code == GET or code == FETCH
        if cuttable and site.cache.enabled:
            return False
        verified = True
        guard = site.guard
        identity = None
        if self.identity is not None:
            identity = self.identity(address)
            if identity is None:
                return False  # (a session not yet complete: aiocoap's path decides)
        elif guard is not None and not guard.is_verified((address[0], address[1])):
            if cuttable:
                return False  # its answer may need small blocks: aiocoap's path asks for them
            verified = False
        route = self._route(tuple(routing), data, address)
        if route is None:
            return False
        d = route.decision
        if d.upstream.scheme == "coaps" and identity is None and d.route is None:
            return False  # aiocoap's path refuses it: the hop's credentials are not lent
        target = self._address(d.upstream.host, d.upstream.port, d.check_address)
        if target is None:
            return False
        client = self.hostinfo(address) if site.limiter is not None or site.log_exchanges \
            else None
        up = self.upstream_for(target[0], target[1], d)
        if up is None or not site.acquire_slot():
            return False  # (aiocoap's path answers 5.03 and takes the rate limit's token)
        if site.limiter is not None and site.limiter.admit(
                identity or client, self.clock()) is not None:
            site.release_slot()
            return False  # refused: aiocoap's path answers 4.29 (and counts it)

        ex = _Exchange()
        ex.peer, ex.pktinfo, ex.address, ex.mid = peer, pktinfo, address, mid
        ex.token = data[4:4 + tkl]
        ex.con = mtype == CON
        ex.code = code
        ex.request = data
        ex.route = route
        ex.verified = verified
        ex.started = self.clock()
        ex.request_payload = len(data) - payload_at - 1 if payload_at < len(data) else 0
        ex.up = up
        token = self._token()
        while token in up.by_token:
            token = self._token()
        ex.up_token = token
        ex.up_mid = up_mid = up.mid()
        if others:
            opts = others + route.options
            opts.sort(key=_number)
            encoded = encode_options(opts)
        else:
            encoded = route.encoded
        ex.up_datagram = (
            bytes((0x40 | mtype << 4 | TOKEN, code)) + up_mid.to_bytes(2, "big") + token + encoded
            + data[payload_at:]
        )
        up.by_token[token] = ex
        if ex.con:
            up.by_mid[up_mid] = ex
        self._pending[(peer, mid)] = ex
        self._young[id(ex)] = ex
        self.duplicates.remember(peer, mid, self.exchange_lifetime)
        kinds = self._kinds
        kinds[d.kind] = kinds.get(d.kind, 0) + 1
        if site.log_exchanges:
            ex.entry = self._entry(ex, client, identity, data,
                                   any(n == OPT_OSCORE for n, _ in others))
        if self._tick is None:
            self._tick = self.call_later(TICK, self._on_tick)
        self.forwarded += 1
        if ex.con:
            # RFC 7252 4.7 (NSTART 1): one outstanding CON request of a client to an
            # upstream at a time; a second waits until the first is acknowledged or ends.
            ex.nstart = nkey = (address, target[0])
            waiting = self._outstanding.get(nkey)
            if waiting is not None:
                waiting.append(ex)
                return True
            self._outstanding[nkey] = []
        ex.sent, ex.sent_at = True, ex.started
        self._send_up(ex)
        return True

    def _next_of(self, ex: _Exchange) -> None:
        """``ex`` is no longer outstanding upstream: its client's next CON to there goes."""
        nkey = ex.nstart
        if nkey is None:
            return
        ex.nstart = None
        waiting = self._outstanding.get(nkey)
        if waiting is None:
            return
        if ex in waiting:  # it ended before it was sent
            waiting.remove(ex)
            return
        while waiting:
            following = waiting.pop(0)
            following.sent, following.sent_at = True, self.clock()
            if self._send_up(following):
                self._reschedule(following)
                return
        del self._outstanding[nkey]

    def _send_up(self, ex: _Exchange) -> bool:
        try:
            ex.up.send(ex.up_datagram)
        except BlockingIOError:
            pass  # the socket's buffer is full: lost, as on the wire (a CON is sent again)
        except OSError as exc:
            if exc.errno in ICMP_ERRNOS:
                self._icmp_on_send(ex.up, exc)
                return True  # (still waiting: the error's handling moves or ends it)
            log.debug("upstream send failed: %s", exc)
            self._fail(ex, codes.GATEWAY_TIMEOUT, "upstream unreachable", "unreachable")
            return False
        return True

    def _reply_up(self, up: Upstream, data: bytes) -> None:
        """An ACK or RST to an upstream's message."""
        try:
            up.send(data)
        except OSError as exc:
            if exc.errno in ICMP_ERRNOS:
                self._icmp_on_send(up, exc)
            # (else: lost, as on the wire; the upstream sends its message again)

    def _icmp_on_send(self, up: Upstream, exc: OSError) -> None:
        """A connected socket reports an ICMP error for an earlier datagram at the next send
        (and no longer to its reader): handled as the reader would, on the next turn of the
        loop (not inside the step that was sending: it may be ending an exchange)."""
        self.call_later(0, lambda: self.upstream_failed(up, exc))

    def _token(self) -> bytes:
        """A random upstream token (read from the OS 4 KiB at a time: a system call per
        request is a noticeable share of one)."""
        at = self._random_at
        if at >= len(self._random):
            self._random, at = os.urandom(4096), 0
        self._random_at = at + TOKEN
        return self._random[at:at + TOKEN]

    def _route(self, key: tuple[tuple[int, bytes], ...], data: bytes,
               address: Any) -> _Route | None:
        """The decision for a request with these routing options: remembered, as it depends
        on them and the configuration only, except for a replica set's route, whose member
        depends on the request's OSCORE kid or session name, the client and the members'
        health: decided again for every request, as aiocoap's path does."""
        known = self._routes.get(key, _UNKNOWN)
        if type(known) is _SetRoute:
            return self._member_route(known, key, data, address)
        if known is _SET:
            return self._decide(data, self.hostinfo(address))
        if known is not _UNKNOWN:
            return known  # type: ignore[return-value]
        if any(n == OPT_HOP_LIMIT and len(v) > 1 for n, v in key):
            return None  # (not one byte: refused before aiocoap decodes it, screen.py)
        route = self._decide(data, self.hostinfo(address))
        remembered: object = route
        match = route.decision.route if route is not None else None
        if match is not None and match in self.site.router.sets:
            if any(n == OPT_PROXY_URI for n, _ in key):
                remembered = _SET  # (its path comes from the URI: decided every time)
            else:
                remembered = self._sets.get(match)
                if remembered is None:
                    remembered = self._sets[match] = _SetRoute(match)
                assert route is not None
                d = route.decision
                remembered.remember(key, f"{d.upstream.scheme}://{d.upstream.hostinfo}", route,
                                    self.decisions)
        if len(self._routes) >= self.decisions:
            self._routes.clear()
        self._routes[key] = remembered
        return route

    def _member_route(self, known: _SetRoute, key: tuple[tuple[int, bytes], ...],
                      data: bytes, address: Any) -> _Route | None:
        """A replica set's route: the member from the request's raw OSCORE option or session
        path and the client (``replica.replica_of``, ``balance_key_of``, the set's ``pick``,
        as ``Router.decide`` does), and the decision for that member remembered."""
        try:
            tkl = data[0] & 0x0F
            options, payload_at = parse_options(data, 4 + tkl)
            path = tuple(v.decode() for n, v in options if n == OPT_URI_PATH)
        except (Malformed, IndexError, UnicodeDecodeError):
            return None
        oscore = next((v for n, v in options if n == OPT_OSCORE), None)
        client = self.hostinfo(address)
        member = self.site.router.sets[known.match].pick(
            replica_of(oscore, path), balance_key_of(data[payload_at + 1:], path, client))
        if member is None:
            return None  # no member up: aiocoap's path answers 5.03
        cached = known.members.get((key, member.key))
        if cached is not None:
            return cached
        route = self._decide(data, client)
        if route is None:
            return None
        d = route.decision
        if f"{d.upstream.scheme}://{d.upstream.hostinfo}" == member.key:
            known.remember(key, member.key, route, self.decisions)
        return route

    def _decide(self, data: bytes, client: str) -> _Route | None:
        site = self.site
        try:
            d = site.router.decide(Message.decode(data), client)
        except Exception:  # (Refusal, or what aiocoap's decoder rejects)
            return None  # aiocoap's path answers it, and counts it
        if (d.upstream.scheme not in self.schemes or site.upstream is None
                or "%" in d.upstream.host):
            return None
        return _route_of(d)

    def _address(self, host: str, port: int, check: bool) -> tuple[Any, int] | None:
        """(sockaddr, IP version) of an upstream, or None (not known yet, or not allowed: aiocoap's
        path resolves it, or refuses it)."""
        key = (host, port)
        try:
            return self._addresses[key]
        except KeyError:
            pass
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            found = self.resolve(host, port)  # a name: known only for a while
            if found is None:
                return None
            if check and not self.site.router.allow.address_allowed(
                    _ip_of(found[0]), port):
                return None
            return found
        if ip.version == 4:
            result: tuple[Any, int] | None = ((str(ip), port), 4)
        else:
            result = ((str(ip), port, 0, 0), 6)
        if check and not self.site.router.allow.address_allowed(str(ip), port):
            result = None
        if len(self._addresses) >= self.decisions:
            self._addresses.clear()
        self._addresses[key] = result
        return result

    # -- from upstreams --------------------------------------------------------------------

    def _from_upstream(self, up: Upstream, data: bytes) -> None:
        if len(data) < 4:
            return
        b0 = data[0]
        if b0 >> 6 != 1:
            return
        mtype = (b0 >> 4) & 3
        tkl = b0 & 0x0F
        code = data[1]
        mid = data[2] << 8 | data[3]
        if code == 0:
            if mtype == ACK:
                ex = up.by_mid.pop(mid, None)
                if ex is not None:
                    ex.up_acked = True  # the answer follows separately
                    self._next_of(ex)
            elif mtype == RST:
                ex = up.by_mid.get(mid)
                if ex is not None:
                    self._fail(ex, codes.BAD_GATEWAY, "upstream failed", "bad_gateway")
            elif mtype == CON:
                self._reply_up(up, bytes((0x70, 0)) + data[2:4])  # a ping: RST (RFC 7252 4.3)
            return
        if code < 0x40 or tkl > 8:
            return
        token = data[4:4 + tkl]
        ex = up.by_token.get(token)
        if code >= 0xC0:  # 6.xx and 7.xx: no response codes over UDP (RFC 8323's signals)
            if mtype == CON:
                self._reply_up(up, bytes((0x70, 0)) + data[2:4])
            if ex is not None and (mtype != ACK or ex.up_mid == mid):
                self._fail(ex, codes.BAD_GATEWAY, "upstream failed", "bad_gateway")
            return
        if mtype == CON:
            if ex is None and token not in up.done:
                self._reply_up(up, bytes((0x70, 0)) + data[2:4])
                return
            self._reply_up(up, bytes((0x60, 0)) + data[2:4])
        if ex is None or (mtype == ACK and ex.up_mid != mid):
            return
        self._answer(ex, data, tkl, code)

    def upstream_failed(self, up: Upstream, exc: OSError) -> None:
        """The socket to an upstream reported an error (see :meth:`upstream_lost`)."""
        log.debug("upstream %s: %s", up.key, exc)
        self.upstream_lost(up, exc.errno in ICMP_ERRNOS)

    def upstream_lost(self, up: Upstream, unreachable: bool) -> None:
        """Every exchange waiting on ``up`` ends as aiocoap's path ends it. Nothing listens
        there (ICMP): 5.04 "upstream unreachable", except that a replica set's member is
        marked down and the request goes once to another member (nothing ran at this one);
        any other error (a Layer 1 handshake that failed, ...): 5.02."""
        sets = self.site.router.sets
        for ex in list(up.by_token.values()):
            if not unreachable:
                self._fail(ex, codes.BAD_GATEWAY, "upstream failed", "bad_gateway")
                continue
            d = ex.route.decision
            if d.route is not None and d.route in sets and not ex.retried:
                ex.retried = True
                again = self.site.router.upstream_unreachable(
                    d, Message.decode(ex.request), self.hostinfo(ex.address))
                if again is not None and self._move(ex, again):
                    continue
            self._fail(ex, codes.GATEWAY_TIMEOUT, "upstream unreachable", "unreachable")

    def _move(self, ex: _Exchange, d: Decision) -> bool:
        """Send ``ex`` to another upstream (``d``, a set's other member) instead."""
        if d.upstream.scheme not in self.schemes:
            return False
        target = self._address(d.upstream.host, d.upstream.port, d.check_address)
        up = self.upstream_for(target[0], target[1], d) if target else None
        if up is None:
            return False
        old = ex.up
        old.by_token.pop(ex.up_token, None)
        old.by_mid.pop(ex.up_mid, None)
        self._next_of(ex)  # (the client's next request to the old member goes on its way)
        ex.sent, ex.sent_at = True, self.clock()
        ex.route = _route_of(d)
        tkl = ex.request[0] & 0x0F
        request_options, payload_at = parse_options(ex.request, 4 + tkl)
        opts = [o for o in request_options if o[0] not in ROUTING] + ex.route.options
        opts.sort(key=_number)
        token = self._token()
        while token in up.by_token:
            token = self._token()
        ex.up, ex.up_token, ex.up_mid = up, token, up.mid()
        ex.up_acked, ex.retries = False, 0
        ex.up_datagram = (bytes((0x40 | (CON if ex.con else NON) << 4 | TOKEN, ex.code))
                          + ex.up_mid.to_bytes(2, "big") + token + encode_options(opts)
                          + ex.request[payload_at:])
        up.by_token[token] = ex
        if ex.con:
            up.by_mid[ex.up_mid] = ex
        if ex.entry is not None:
            ex.entry["retried"] = ex.entry["upstream"]
            ex.entry["upstream"] = d.uri
        if not self._send_up(ex):
            return False
        self._reschedule(ex)
        return True

    def _reschedule(self, ex: _Exchange) -> None:
        """Timers for an exchange sent now (the tick sets them for one still young)."""
        if ex.young:
            return
        if ex.timer is not None:
            ex.timer.cancel()
        self._schedule(ex, self.clock())

    def _answer(self, ex: _Exchange, data: bytes, tkl: int, code: int) -> None:
        try:
            options, payload_at = parse_options(data, 4 + tkl)
        except (Malformed, IndexError):
            self._fail(ex, codes.BAD_GATEWAY, "upstream failed", "bad_gateway")
            return
        d = ex.route.decision
        bad = sorted({n for n, _ in options if is_unknown_unsafe(n)})
        if bad:
            self._fail(ex, codes.BAD_GATEWAY, "upstream answer has unknown unsafe option "
                       + ",".join(map(str, bad)), "bad_gateway")
            return
        site = self.site
        self._observe(self.clock() - ex.started)
        if site.cache.enabled:
            site.cache.invalidate_codes(ex.code, code, d.uri)
        body = data[4 + tkl:]
        payload = len(data) - payload_at - 1 if payload_at < len(data) else 0
        if code == HOP_LIMIT_REACHED or (
                d.mount is not None and any(n == OPT_LOCATION_PATH for n, _ in options)):
            # What aiocoap's path adds to such an answer (the 5.08 trace, the Location-Path
            # mapped through a mount), from its own code.
            relayed = self.site.relay(Message.decode(data), d)
            code, body, payload = _encoded(relayed)
        self._send_answer(ex, code, body, payload)

    # -- answers ---------------------------------------------------------------------------

    def _fail(self, ex: _Exchange, code: Code, diagnostic: str, kind: str) -> None:
        self.site.metrics.errors.inc(kind=kind)
        if ex.entry is not None:
            ex.entry["reason"] = kind
        text = diagnostic.encode()
        self._send_answer(ex, int(code), b"\xff" + text, len(text))

    def _send_answer(self, ex: _Exchange, code: int, body: bytes, payload: int) -> None:
        if not self._end(ex):
            return
        token = ex.token
        if not ex.verified:
            guard = self.site.guard
            assert guard is not None
            budget = int(guard.limits.factor * len(ex.request))
            if 4 + len(token) + len(body) > budget:
                # Beyond 3x for an address not yet verified: a piece of it, or 4.01 + Echo
                # with the answer held for the repetition, as aiocoap's path does.
                request = Message.decode(ex.request)
                answer = Message.decode(bytes((0x40, code, 0, 0)) + body)
                fresh = Message(code=answer.code, payload=answer.payload)
                for option in answer.opt.option_list():
                    fresh.opt.add_option(option)
                fitted = guard.fit((ex.address[0], ex.address[1]), request, fresh,
                                   budget=budget)
                code, body, payload = _encoded(fitted)
        if ex.con and not ex.empty_acked:
            mtype, mid = ACK, ex.mid
        else:
            mtype, mid = (CON if ex.con else NON), self.next_mid()
        datagram = bytes((0x40 | mtype << 4 | len(token), code)) + mid.to_bytes(2, "big") \
            + token + body
        codes_ = self._codes
        codes_[code] = codes_.get(code, 0) + 1
        self._bytes_up += ex.request_payload
        self._bytes_down += payload
        entry = ex.entry
        if entry is not None:  # (written before the answer leaves, as on aiocoap's path)
            entry["code"] = _code_text(code)
            entry["response_bytes"] = payload
            entry["latency_ms"] = round((self.clock() - ex.started) * 1000, 3)
            self.site.access_log.exchange(entry)
        self.send_down(datagram, ex.pktinfo, ex.address)
        if mtype != CON:
            self.duplicates.answered(ex.peer, ex.mid, datagram)
        else:
            self._await_ack(ex, datagram, mid)

    def _end(self, ex: _Exchange) -> bool:
        """Forget ``ex`` everywhere (once; False if it had ended already)."""
        if self._pending.pop((ex.peer, ex.mid), None) is None:
            return False
        up = ex.up
        up.by_token.pop(ex.up_token, None)
        if up.by_mid.get(ex.up_mid) is ex:
            del up.by_mid[ex.up_mid]
        if ex.con:
            up.done[ex.up_token] = ex.up_mid
            if len(up.done) > RECENTLY_DONE:
                up.done.popitem(last=False)
        self._young.pop(id(ex), None)
        if ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None
        self._next_of(ex)
        self.site.release_slot()
        return True

    def _await_ack(self, ex: _Exchange, datagram: bytes, mid: int) -> None:
        """A separate answer sent as CON: retransmitted until the client ACKs or resets it
        (RFC 7252 4.2); its request's duplicates get the empty ACK again."""
        key = (ex.peer, mid)
        state: list[Any] = [None, 0,
                            self.down_ack_timeout * random.uniform(1.0, self.random_factor)]
        if len(self._awaiting) >= self.config.max_in_flight:
            self._awaiting.pop(next(iter(self._awaiting)))  # bounded: the oldest gives up

        def again() -> None:
            if self._awaiting.get(key) is not state:
                return
            if state[1] >= self.max_retransmit:
                del self._awaiting[key]
                return
            state[1] += 1
            state[2] *= 2
            self.send_down(datagram, ex.pktinfo, ex.address)
            state[0] = self.call_later(state[2], again)

        self._awaiting[key] = state
        state[0] = self.call_later(state[2], again)

    # -- time ------------------------------------------------------------------------------

    def flush_metrics(self) -> None:
        """Add what was counted since the last time to the metrics."""
        m = self.site.metrics
        if self.forwarded:
            self._forwarded.inc(self.forwarded)
            self.forwarded = 0
        for kind, n in self._kinds.items():
            m.requests.inc(n, kind=kind)
        self._kinds.clear()
        for code, n in self._codes.items():
            m.responses.inc(n, code=_code_text(code))
        self._codes.clear()
        if self._bytes_up:
            m.bytes.inc(self._bytes_up, direction="upstream")
        if self._bytes_down:
            m.bytes.inc(self._bytes_down, direction="downstream")
        self._bytes_up = self._bytes_down = 0

    def _on_tick(self) -> None:
        self._tick = None
        self.flush_metrics()
        now = self.clock()
        young = self._young
        while young:
            ex = next(iter(young.values()))
            if now - ex.started < self.empty_ack_delay:
                break
            del young[id(ex)]
            ex.young = False
            if ex.con:
                # RFC 7252 5.2.2: acknowledge now, answer separately when the upstream does.
                ack = bytes((0x60, 0)) + ex.mid.to_bytes(2, "big")
                ex.empty_acked = True
                self.send_down(ack, ex.pktinfo, ex.address)
                self.duplicates.answered(ex.peer, ex.mid, ack)
            self._schedule(ex, now)
        if young:
            self._tick = self.call_later(TICK, self._on_tick)

    def _schedule(self, ex: _Exchange, now: float) -> None:
        deadline = ex.started + self.config.upstream_timeout
        when = deadline
        if ex.con and ex.sent and not ex.up_acked and ex.retries < self.max_retransmit:
            if ex.rto == 0.0:
                ex.rto = self.ack_timeout * random.uniform(1.0, self.random_factor)
            # RFC 7252 4.2: the timeout doubles with each retransmission
            when = min(when, ex.sent_at + ex.rto * ((2 ** (ex.retries + 1)) - 1))
        ex.timer = self.call_later(max(0.0, when - now), lambda: self._on_timer(ex))

    def _on_timer(self, ex: _Exchange) -> None:
        ex.timer = None
        if (ex.peer, ex.mid) not in self._pending:
            return
        now = self.clock()
        if now >= ex.started + self.config.upstream_timeout:
            self._fail(ex, codes.GATEWAY_TIMEOUT, "upstream timeout", "timeout")
            return
        if (ex.con and ex.sent and not ex.up_acked and ex.retries < self.max_retransmit
                and now >= ex.sent_at + ex.rto * ((2 ** (ex.retries + 1)) - 1)):
            ex.retries += 1
            if not self._send_up(ex):
                return
        self._schedule(ex, now)

    # -- the exchange log ------------------------------------------------------------------

    def _entry(self, ex: _Exchange, client: str | None, identity: str | None, data: bytes,
               oscore: bool) -> dict[str, Any]:
        fixed = ex.route.log
        if fixed is None:
            from .site import routing_fields  # (site imports this module)

            d = ex.route.decision
            routing = routing_fields(Message.decode(data))
            routing.pop("oscore", None)  # (not a routing option: added per request)
            fixed = ex.route.log = {"routing": routing, "kind": d.kind, "upstream": d.uri}
            if d.route is not None:
                fixed["route"] = d.route
        entry: dict[str, Any] = {
            "event": "exchange", "client": client, "identity": identity,
            "method": _METHOD_TEXT[ex.code], "type": "CON" if ex.con else "NON",
            "routing": {**fixed["routing"], "oscore": True} if oscore else fixed["routing"],
            "request_bytes": ex.request_payload,
            "kind": fixed["kind"], "upstream": fixed["upstream"],
        }
        if "route" in fixed:
            entry["route"] = fixed["route"]
        return entry

    def close(self) -> None:
        """End what is waiting (the listening socket is closing)."""
        self.flush_metrics()
        flushes = self.site.metrics.registry.flushes
        if self.flush_metrics in flushes:
            flushes.remove(self.flush_metrics)
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for ex in list(self._pending.values()):
            self._end(ex)
        for state in self._awaiting.values():
            if state[0] is not None:
                state[0].cancel()
        self._awaiting.clear()


def _route_of(d: Decision) -> _Route:
    """A decision and the routing options it puts in the upstream request."""
    options: list[tuple[int, bytes]] = []
    if d.uri_host is not None:
        options.append((OPT_URI_HOST, d.uri_host.encode()))
    options += [(OPT_URI_PATH, s.encode()) for s in d.path]
    options += [(OPT_URI_QUERY, q.encode()) for q in d.query]
    options.append((OPT_HOP_LIMIT, _uint(d.hop_limit)))
    return _Route(d, options, encode_options(options))


def _number(option: tuple[int, bytes]) -> int:
    return option[0]


def _encoded(message: Message) -> tuple[int, bytes, int]:
    """An aiocoap answer as (code, options and payload encoded, payload length)."""
    body = encode_options([(int(o.number), o.encode()) for o in message.opt.option_list()])
    if message.payload:
        body += b"\xff" + message.payload
    return int(message.code), body, len(message.payload)


def _ip_of(sockaddr: Any) -> str:
    return str(sockaddr[0])
