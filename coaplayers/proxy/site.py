"""The forwarding site: aiocoap hands every incoming request here, and it relays it upstream.

Implements ``render_to_pipe`` directly (not ``resource.Resource``) so that aiocoap neither
reassembles block-wise transfers nor answers Observe itself: each Block1/Block2 message and each
notification is relayed as its own exchange, which keeps OSCORE and Layer 0 payloads
byte-identical end to end. Unprotected GET and FETCH answers are cached (:mod:`.cache`);
an unverified reader's small blocks (the 3x rule) are cut from a cached whole answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from aiocoap import Message, error
from aiocoap.message import UndecidedRemote
from aiocoap.numbers import OptionNumber, codes
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.numbers.types import Type
from aiocoap.optiontypes import UintOption
from aiocoap.pipe import Pipe
from aiocoap.transports.udp6 import UDP6EndpointAddress

from .. import dtls
from ..amplification import (
    AmplificationGuard,
    AmplificationLimits,
    guard_pipe,
    plain_address,
)
from ..errors import ICMP_ERRNOS
from ..layer1.transport import Layer1Error
from ..rules import NO_RESPONSE_ALL, suppressed
from .accesslog import AccessLog
from .cache import CacheLimits, ResponseCache, cached_answer, cut_block
from .config import ProxyConfig
from .http import HTTP_SCHEMES, HttpUpstream
from .http import forward as http_forward
from .limits import InFlight, RateLimiter
from .metrics import MetricsRegistry
from .observe import Event, Fanout
from .routing import ROUTING_OPTIONS, Decision, Refusal, Router, unknown_unsafe
from .transport import UpstreamNotAllowed, UpstreamPool, remote_ip

Opt = OptionNumber
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_508_TRACE = 256  # bytes of RFC 8768 proxy trace kept in relayed 5.08 payloads
_CODE_TEXT: dict[int, str] = {}  # code -> "2.05" (at most 256 entries)


def client_identity(request: Message) -> str | None:
    """The Layer 1 identity the request arrived with, if its transport authenticated one.

    The hook Layer 1 fills: its remotes expose ``authenticated_claims`` (objects with an
    ``identity``) and ``peer_identity``. Plain ``coap://`` remotes have neither.
    """
    remote = request.remote
    ident: Any = None
    try:
        claims = getattr(remote, "authenticated_claims", None) or []
        for claim in claims:
            ident = getattr(claim, "identity", None)
            if ident is not None:
                break
    except Exception:  # a transport's property must not break forwarding
        ident = None
    if ident is None:
        ident = getattr(remote, "peer_identity", None)
    return identity_text(ident)


def identity_text(ident: Any) -> str | None:
    """A Layer 1 identity as the exchange log and the rate limiter name it."""
    if ident is None:
        return None
    if isinstance(ident, bytes):
        return ident.decode("utf-8", "backslashreplace")
    return str(ident)


def routing_fields(request: Message) -> dict[str, Any]:
    """The outer options a proxy routes on, for the access log (never the payload)."""
    opt = request.opt
    out: dict[str, Any] = {}
    if opt.proxy_uri is not None:
        out["proxy_uri"] = opt.proxy_uri
    if opt.proxy_scheme is not None:
        out["proxy_scheme"] = opt.proxy_scheme
    if opt.uri_host is not None:
        out["uri_host"] = opt.uri_host
    if opt.uri_port is not None:
        out["uri_port"] = opt.uri_port
    if opt.uri_path:
        out["uri_path"] = "/" + "/".join(opt.uri_path)
    if opt.uri_query:
        out["uri_query"] = list(opt.uri_query)
    hop = opt.get_option(Opt.HOP_LIMIT)
    if hop:
        out["hop_limit"] = hop[0].value
    if opt.observe is not None:
        out["observe"] = opt.observe
    if opt.block1 is not None:
        out["block1"] = f"{opt.block1.block_number}/{int(opt.block1.more)}/{opt.block1.size}"
    if opt.block2 is not None:
        out["block2"] = f"{opt.block2.block_number}/{int(opt.block2.more)}/{opt.block2.size}"
    if opt.get_option(Opt.OSCORE):
        out["oscore"] = True
    return out


@dataclass
class ProxyMetrics:
    """The proxy's own counters, registered in the shared registry."""

    registry: MetricsRegistry
    requests: Any = field(init=False)
    errors: Any = field(init=False)
    responses: Any = field(init=False)
    latency: Any = field(init=False)
    bytes: Any = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = r.counter(
            "coap_proxy_requests_total", "Requests received, by routing kind", ["kind"]
        )
        self.errors = r.counter(
            "coap_proxy_errors_total", "Requests the proxy answered itself, by reason", ["kind"]
        )
        self.responses = r.counter(
            "coap_proxy_responses_total", "Responses sent to clients, by code", ["code"]
        )
        self.latency = r.histogram(
            "coap_proxy_upstream_latency_seconds", "Upstream round-trip time", LATENCY_BUCKETS
        )
        self.bytes = r.counter(
            "coap_proxy_payload_bytes_total", "Payload bytes relayed", ["direction"]
        )
        self.cache = r.counter(
            "coap_proxy_cache_total", "Cacheable requests by result (hit, miss, validated)",
            ["result"],
        )
        self.suppressed = r.counter(
            "coap_proxy_suppressed_total",
            "Answers not sent because the request's No-Response (RFC 7967) suppressed them",
        )


class ProxySite:
    """The serversite of the proxy's aiocoap context (see module docstring)."""

    def __init__(
        self,
        config: ProxyConfig,
        registry: MetricsRegistry,
        access_log: AccessLog,
        *,
        clock: Callable[[], float] = time.monotonic,
        identity: Callable[[Message], str | None] = client_identity,
    ) -> None:
        self.config = config
        self._tuning = _tuning(config.ack_timeout)
        self._downstream_tuning = _tuning(config.downstream_ack_timeout)
        self.router = Router(config)
        self.metrics = ProxyMetrics(registry)
        self.access_log = access_log
        self.log_exchanges = config.log_exchanges
        self.clock = clock
        self.identity = identity
        self.upstream: UpstreamPool | None = None  # set once the contexts exist
        self.upstream_schemes: frozenset[str] = frozenset({"coap"})
        self.http_upstream: HttpUpstream | None = None  # made on the first http:// request
        self.self_name = "coap-proxy"  # our hop id in relayed 5.08 payloads (RFC 8768)
        self.in_flight = InFlight(config.max_in_flight)
        self.limiter = (
            RateLimiter(config.rate_limit, config.rate_limit_clients)
            if config.rate_limit is not None else None
        )
        self.cache = ResponseCache(CacheLimits(config.cache_entries, config.cache_bytes))
        registry.gauge("coap_proxy_cache_entries", "Answers in the response cache",
                       func=lambda: len(self.cache))
        registry.gauge("coap_proxy_cache_bytes", "Bytes charged to the response cache",
                       func=lambda: self.cache.bytes_used)
        self.observations = 0  # upstream observations
        self.observers = 0  # client observations they feed
        self._shared: dict[Hashable, Fanout] = {}  # cache key -> the observation clients share
        # cache key -> done when the one upstream request for it is answered (or failed)
        self._misses: dict[Hashable, asyncio.Future[None]] = {}
        self.draining = False
        # Set while requests are served; ProxyNode clears it while it starts (hold_until_ready)
        self._ready = asyncio.Event()
        self._ready.set()
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        registry.gauge("coap_proxy_in_flight", "Exchanges waiting on an upstream",
                       func=lambda: self.in_flight.count)
        registry.gauge("coap_proxy_observations", "Upstream observations being relayed",
                       func=lambda: self.observations)
        registry.gauge("coap_proxy_observers", "Client observations being served",
                       func=lambda: self.observers)
        self.log = logging.getLogger("coaplayers.proxy")
        amplification = registry.counter(
            "coap_proxy_amplification_total", "Answers to unverified plain clients cut to a"
            " smaller block or replaced by 4.01 + Echo, and clients that echoed", ["action"])
        self.guard = AmplificationGuard(
            AmplificationLimits(factor=config.amplification_factor),
            on_action=lambda action: amplification.inc(action=action),
        ) if config.amplification_factor else None
        self._hostinfo: dict[Any, str] = {}  # sockaddr -> "host:port" of plain UDP clients

    def client_hostinfo(self, remote: Any) -> str:
        """``remote.hostinfo``, remembered per socket address for plain UDP remotes.

        aiocoap computes it anew on each access (parsing the address with ``ipaddress``).
        """
        if type(remote) is not UDP6EndpointAddress:
            return str(remote.hostinfo)
        return self.hostinfo_of(remote.sockaddr, lambda: str(remote.hostinfo))

    def hostinfo_of(self, sockaddr: Any, compute: Callable[[], str]) -> str:
        """The "host:port" of a plain UDP client at ``sockaddr`` (``compute`` on a miss)."""
        cache = self._hostinfo
        hostinfo = cache.get(sockaddr)
        if hostinfo is None:
            hostinfo = compute()
            if len(cache) >= 8192:
                cache.clear()
            cache[sockaddr] = hostinfo
        return hostinfo

    # -- lifecycle -------------------------------------------------------------------------

    def hold_until_ready(self) -> None:
        """Hold requests until :meth:`ready`. The listeners are bound (and answer pings) before
        the upstream contexts, the own addresses and the replica sets' first health round
        exist; a request arriving in between (a client retransmitting through a restart, or
        one that took the first answered ping for readiness) would otherwise be refused, 5.05
        for want of an upstream transport, for what is only a moment."""
        self._ready.clear()

    def ready(self) -> None:
        """Serve the held requests and every later one (the node has started)."""
        self._ready.set()

    async def _until_ready(self) -> bool:
        """Wait for :meth:`ready`, at most ``upstream_timeout`` (what a client waits for an
        upstream anyway); False if the node did not get there."""
        try:
            async with asyncio.timeout(self.config.upstream_timeout):
                await self._ready.wait()
        except TimeoutError:
            return False
        return True

    def begin_drain(self) -> None:
        """Refuse new requests with 5.03; end relayed observations with a final 5.03."""
        self.draining = True
        self._stopping.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until no exchange waits on an upstream; True if that happened."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- aiocoap serversite interface ------------------------------------------------------

    async def render_to_pipe(self, pipe: Pipe) -> None:
        request: Message = pipe.request
        started = self.clock()
        starting = not self._ready.is_set() and not await self._until_ready()
        entry: dict[str, Any] = {
            "event": "exchange",
            "client": self.client_hostinfo(request.remote),
            "identity": self.identity(request),
            "method": str(request.code),
            "type": "NON" if request.mtype == Type.NON else "CON",
            "routing": routing_fields(request) if self.log_exchanges else None,
            "request_bytes": len(request.payload),
        }
        if request.opt.no_response is not None:
            entry["no_response"] = request.opt.no_response
        slot = _Slot(self)
        unverified, held = self._unverified(request)
        if held is not None:
            # The repetition of a challenged request: the answer it got, not a second exchange
            # (a protected request would look like a replay upstream).
            entry["kind"] = "held"
            self.metrics.requests.inc(kind="held")
            self._done(entry, held, started, upstream=None)
            self._answer(pipe, held, is_last=True)
            return
        if unverified is not None:
            # Every answer to this request (relayed, refusal or notification) within 3x.
            pipe = guard_pipe(pipe, self.guard, unverified, self.log)  # type: ignore[arg-type]
        try:
            try:
                if starting:
                    raise Refusal(codes.SERVICE_UNAVAILABLE, "proxy starting", "starting",
                                  max_age=1)
                self._admit(request, entry, slot)
                decision = self.router.decide(request, entry["client"])
                if (decision.kind == "forward" and decision.route is None
                        and decision.upstream.scheme == "coaps" and entry["identity"] is None):
                    # The proxy's upstream credentials are not lent to whoever can send a
                    # datagram: a confused deputy would make every plain client the proxy.
                    raise Refusal(
                        codes.FORBIDDEN, "coaps:// upstreams are forwarded to for clients that"
                        " authenticated at Layer 1 only (or through a route)", "layer1_required")
            except Refusal as refusal:
                self._refuse(pipe, refusal, entry, started)
                return
            entry["kind"] = decision.kind
            entry["upstream"] = decision.uri
            if decision.route is not None:
                entry["route"] = decision.route
            self.metrics.requests.inc(kind=decision.kind)
            await self._forward(pipe, request, decision, entry, started, slot,
                                unverified is not None)
        finally:
            slot.release()

    # -- steps -----------------------------------------------------------------------------

    def _unverified(self, request: Message) -> tuple[Any, Message | None]:
        """The address of a plain client not yet verified (None if there is nothing to limit),
        and the answer held for this request if it repeats a challenged one.

        An Echo value of ours verifies the address, and is not forwarded (it means nothing
        upstream).
        """
        guard = self.guard
        if guard is None:
            return None, None
        address = plain_address(request.remote)
        if address is None:
            return None, None
        echo = request.opt.echo
        if echo is not None and guard.check_echo(address, echo):
            held = guard.take_held(address, request)
            request.opt.delete_option(Opt.ECHO)
            return None, held
        return (None if guard.is_verified(address) else address), None

    def _admit(self, request: Message, entry: dict[str, Any], slot: _Slot) -> None:
        if self.draining:
            raise Refusal(codes.SERVICE_UNAVAILABLE, "proxy shutting down", "draining")
        if self.limiter is not None:
            key = entry["identity"] or entry["client"]
            wait = self.limiter.admit(key, self.clock())
            if wait is not None:
                raise Refusal(codes.TOO_MANY_REQUESTS, "", "rate_limited", max_age=wait)
        if not self.in_flight.try_acquire():
            raise Refusal(codes.SERVICE_UNAVAILABLE, "proxy busy", "overloaded", max_age=1)
        slot.held = True
        self._idle.clear()

    def acquire_slot(self) -> bool:
        """Claim one exchange's place in the in-flight bound (the fast path's exchanges)."""
        if not self.in_flight.try_acquire():
            return False
        self._idle.clear()
        return True

    def release_slot(self) -> None:
        self.in_flight.release()
        if self.in_flight.count == 0:
            self._idle.set()

    def _refuse(self, pipe: Pipe, refusal: Refusal, entry: dict[str, Any], started: float) -> None:
        msg = refusal.to_message()
        if refusal.code == codes.HOP_LIMIT_REACHED:
            msg.payload = self.self_name.encode()
        self.metrics.requests.inc(kind="refused")
        self.metrics.errors.inc(kind=refusal.kind)
        entry["kind"] = "refused"
        entry["reason"] = refusal.kind
        self._done(entry, msg, started, None)
        self._answer(pipe, msg, is_last=True)

    def _upstream_request(self, request: Message, d: Decision, observe: bool) -> Message:
        out = Message(code=request.code, payload=request.payload)
        out.mtype = Type.NON if request.mtype == Type.NON else Type.CON
        for o in request.opt.option_list():
            if o.number in ROUTING_OPTIONS or (o.number == Opt.OBSERVE and not observe):
                continue
            out.opt.add_option(o)
        out.opt.uri_path = d.path
        out.opt.uri_query = d.query
        if d.uri_host is not None:
            out.opt.uri_host = d.uri_host
        out.opt.add_option(UintOption(Opt.HOP_LIMIT, d.hop_limit))
        out.remote = UndecidedRemote(d.upstream.scheme, d.upstream.hostinfo)
        if self._tuning is not None:
            out.transport_tuning = self._tuning
        return out

    def _answer(self, pipe: Pipe, message: Message, *, is_last: bool) -> None:
        """Hand an answer to aiocoap. A separate response (the client's request was acknowledged
        empty while the upstream took its time) or a notification sent as CON is retransmitted
        on ``downstream_ack_timeout`` when the operator set one."""
        if self._downstream_tuning is not None:
            message.transport_tuning = self._downstream_tuning
        no_response = pipe.request.opt.no_response
        if no_response and suppressed(no_response, message.code):
            # aiocoap's message layer then sends nothing (NON) or an empty ACK (CON).
            message.opt.no_response = no_response
            self.metrics.suppressed.inc()
        pipe.add_response(message, is_last=is_last)

    def relay(self, response: Message, d: Decision) -> Message:
        """A fresh downstream message carrying the upstream answer's code, options and payload
        (Location-Path mapped back through a mounted prefix route)."""
        out = Message(code=response.code, payload=response.payload)
        for o in response.opt.option_list():
            out.opt.add_option(o)
        if d.mount is not None and response.opt.location_path:
            location = d.location_down(tuple(response.opt.location_path))
            if location is not None:
                out.opt.location_path = location
        if response.code == codes.HOP_LIMIT_REACHED:
            trace = (self.self_name.encode() + b" " + response.payload).rstrip()
            out.payload = trace[:MAX_508_TRACE]
        return out

    async def _forward(
        self, pipe: Pipe, request: Message, d: Decision, entry: dict[str, Any], started: float,
        slot: _Slot, unverified: bool = False,
    ) -> None:
        if d.upstream.scheme in HTTP_SCHEMES:  # the CoAP-to-HTTP cross-proxy
            await http_forward(self, pipe, request, d, entry, started)
            return
        if d.upstream.scheme not in self.upstream_schemes or self.upstream is None:
            self._refuse(pipe, Refusal(
                codes.PROXYING_NOT_SUPPORTED,
                f"no {d.upstream.scheme} transport configured", "not_proxying"), entry, started)
            return
        wants_observe = request.opt.observe == 0
        cache = self.cache
        key = cache.key_for(request, d) if cache.enabled else None
        validating = None
        whole = False  # whether the whole representation is fetched, and blocks cut here
        if key is not None:
            now = self.clock()
            found = cache.lookup(key, now)
            block = request.opt.block2
            if found.fresh is None and block is not None and block.size_exponent <= 6:
                # A block of a whole representation held here is cut from it (RFC 7959 2.4).
                # An unverified reader's first block is fetched that way too: the 3x rule
                # serves it small blocks, which would otherwise each go upstream.
                whole_key = cache.key_for(request, d, whole=True)
                whole_found = cache.lookup(whole_key, now)
                if whole_found.fresh is not None or (unverified and block.block_number == 0):
                    key, found = whole_key, whole_found
            whole = unverified and (block is None or (
                block.block_number == 0 and block.size_exponent <= 6))
            # (An unverified client gets the answer within 3x through its guarded pipe: the
            # whole answer's first block, or a smaller one at the offset asked, cut there.)
            answer = cached_answer(found.fresh, request, now) if found.fresh else None
            if answer is not None:
                self.metrics.cache.inc(result="hit")
                entry["cache"] = "hit"
                self._done(entry, answer, started, None)
                self._answer(pipe, answer, is_last=True)
                return
            if key is not None and found.stale is not None and not request.opt.etags:
                validating = found.stale  # ask upstream whether our copy is still valid
            pending = self._misses.get(key)
            if pending is not None and not self._looped(request):
                # The same request of another client is upstream: its answer will do (RFC
                # 7252 5.6 lets a cache answer from it), so the device is asked once.
                try:
                    async with asyncio.timeout(self.config.upstream_timeout):
                        await asyncio.shield(pending)
                except TimeoutError:
                    pass
                now = self.clock()
                found = cache.lookup(key, now)
                if found.fresh is not None:
                    self.metrics.cache.inc(result="hit")
                    entry["cache"] = "hit"
                    entry["coalesced"] = True
                    answer = cached_answer(found.fresh, request, now)
                    self._done(entry, answer, started, None)
                    self._answer(pipe, answer, is_last=True)
                    return
        fanout: Fanout | None = None
        if wants_observe and self.observations < self.config.max_observations:
            okey = (cache.key_for(request, d, observing=True)
                    if self.config.aggregate_observations else None)
            shared = self._shared.get(okey) if okey is not None else None
            if shared is not None and self._looped(request):
                shared, okey = None, None  # it would wait for itself: its own, unshared
            if shared is not None and not shared.ended:
                if await self._join(pipe, shared, d, entry, started, slot):
                    return
                okey = None  # its registration failed: this client registers on its own
            fanout = Fanout(okey, self.clock)
            if okey is not None:
                self._shared[okey] = fanout
        miss: asyncio.Future[None] | None = None
        if key is not None and key not in self._misses:
            miss = self._misses[key] = asyncio.get_running_loop().create_future()
        try:
            await self._exchange(pipe, request, d, entry, started, slot, key, validating,
                                 fanout, unverified, whole)
        finally:
            if miss is not None:
                del self._misses[key]
                miss.set_result(None)
            if fanout is not None and fanout.obs is None:
                fanout.abandon()  # clients waiting to join go their own way
                if fanout.key is not None and self._shared.get(fanout.key) is fanout:
                    del self._shared[fanout.key]

    async def _exchange(
        self, pipe: Pipe, request: Message, d: Decision, entry: dict[str, Any], started: float,
        slot: _Slot, key: Hashable | None, validating: Any, fanout: Fanout | None,
        unverified: bool = False, whole: bool = False,
    ) -> None:
        """One upstream exchange (with its Observe registration when ``fanout`` is given).

        ``whole`` (an unverified reader's cacheable GET or FETCH, ``key`` the whole
        representation's): asked upstream without Block2, kept, and cut here, so that the
        small blocks of every such reader come from one upstream answer.
        """
        cache = self.cache
        wants_observe = request.opt.observe == 0
        observe = fanout is not None
        out = self._upstream_request(request, d, observe)
        if validating is not None:
            out.opt.etags = [validating.etag]
        if whole and key is not None:
            out.opt.block2 = None
        elif unverified and self.guard is not None:
            # Not cacheable, or a later block of an answer not held (the upstream cut it, or
            # it expired): the upstream cuts a GET's answer to the 3x rule itself.
            asked = out.opt.block2
            self.guard.ask_small_blocks(request, out)
            if out.opt.block2 != asked:
                key = None  # an answer to another request than the client's: not cached

        t0 = self.clock()
        client = entry["client"]  # per address: Block1 state is per address upstream
        target = f"{d.upstream.scheme}://{d.upstream.hostinfo}"
        pool = self.upstream
        assert pool is not None  # _route sent nothing here before the contexts existed
        # RFC 7967: when the client suppressed 2.xx, an upstream honouring that stays silent
        # on success, so silence is an answer: wait briefly, then end without a word. A NON
        # request suppressing every class cannot be answered at all: it is sent and left.
        no_response = request.opt.no_response or 0
        quiet = bool(no_response & 0x02) and not wants_observe
        forget = (quiet and request.mtype == Type.NON
                  and no_response & NO_RESPONSE_ALL == NO_RESPONSE_ALL)
        limit = self.config.upstream_timeout
        if quiet:
            limit = min(limit, self.config.no_response_wait)
        check = self._address_check(d) if d.check_address else None
        try:
            async with asyncio.timeout(limit):
                upstream = await pool.request(client, out, target, check)
                if forget:
                    # aiocoap keeps the request a little longer (a backlogged NON still goes
                    # out, a late answer is absorbed), without this exchange or its slot.
                    upstream.response.add_done_callback(_retrieve)
                    asyncio.get_running_loop().call_later(
                        self.config.no_response_wait, upstream.response.cancel)
                    self._silent(pipe, entry, started)
                    return
                response = await upstream.response
        except UpstreamNotAllowed:
            self._fail(pipe, codes.FORBIDDEN, f"upstream {d.upstream.hostinfo} resolved to an"
                       " address that is not allowed", "not_allowed", entry, started)
            return
        except (TimeoutError, error.TimeoutError):
            pool.forget(client, target)
            pool.abandon(client, out)  # (as the fast path ends its exchange at 5.04)
            if quiet:
                self._silent(pipe, entry, started)
                return
            self._fail(pipe, codes.GATEWAY_TIMEOUT, "upstream timeout", "timeout", entry, started)
            return
        except error.NoRequestInterface:
            self._fail(pipe, codes.PROXYING_NOT_SUPPORTED, "no transport for upstream",
                       "not_proxying", entry, started)
            return
        except dtls.ConfigurationError:
            # No Layer 1 credentials match this coaps:// upstream: the operator's to fix (the
            # exchange line and the metric say so; clients cannot flood the log with it).
            self._fail(pipe, codes.BAD_GATEWAY, "no credentials for this coaps upstream",
                       "no_credentials", entry, started)
            return
        except error.ResolutionError:
            self._fail(pipe, codes.BAD_GATEWAY, "cannot resolve upstream", "resolution",
                       entry, started)
            return
        except error.NetworkError as exc:
            pool.forget(client, target)
            if _unreachable(exc):
                # A replica set's member is down: once, to another (nothing ran at this one).
                again = None if "retried" in entry else self.router.upstream_unreachable(
                    d, request, client)
                if again is not None:
                    entry["retried"] = entry["upstream"]
                    entry["upstream"] = again.uri
                    await self._forward(pipe, request, again, entry, started, slot)
                    return
                # Host or port down: treated like silence, as a client cannot act differently.
                self._fail(pipe, codes.GATEWAY_TIMEOUT, "upstream unreachable", "unreachable",
                           entry, started)
            else:
                self._fail(pipe, codes.BAD_GATEWAY, "upstream failed", "bad_gateway",
                           entry, started)
            return
        except error.Error:
            pool.forget(client, target)
            self._fail(pipe, codes.BAD_GATEWAY, "upstream failed", "bad_gateway", entry, started)
            return
        self.metrics.latency.observe(self.clock() - t0)
        bad = unknown_unsafe(response.opt.option_list())
        if bad:
            if upstream.observation is not None:
                upstream.observation.cancel()
            self._fail(pipe, codes.BAD_GATEWAY, "upstream answer has unknown unsafe option "
                       + ",".join(map(str, bad)), "bad_gateway", entry, started)
            return
        if key is not None:
            now = self.clock()
            if (validating is not None and response.code == codes.VALID
                    and response.opt.etags[:1] == (validating.etag,)):
                cache.refresh(key, validating, response, now)
                self.metrics.cache.inc(result="validated")
                entry["cache"] = "validated"
                first = cached_answer(validating, request, now)
            else:
                if response.opt.block2 is None or out.opt.block2 is not None:
                    # (A block the request did not ask for is not stored: its next blocks
                    # come from the upstream that cut it, for the socket it cut it for.)
                    cache.store(key, response, d.uri, now)
                self.metrics.cache.inc(result="miss")
                entry["cache"] = "miss"
                first = self.relay(response, d)
                asked = request.opt.block2
                if (whole and asked is not None and first.opt.block2 is None
                        and first.code == codes.CONTENT):
                    # The block the client asked for, of the whole answer fetched for it.
                    first = cut_block(first.code, first.payload, first.opt.option_list(),
                                      asked, size2=request.opt.size2 is not None)
        else:
            if cache.enabled:
                cache.invalidate(request, response, d.uri)
            first = self.relay(response, d)
        relaying = (
            observe and upstream.observation is not None and response.opt.observe is not None
            and response.code.is_successful()
        )
        self._done(entry, first, started, upstream=True)
        self._answer(pipe, first, is_last=not relaying)
        if relaying:
            assert upstream.observation is not None and fanout is not None
            fanout.start(upstream.observation, response)
            self.observations += 1
            queue = fanout.subscribe()
            # The first answer is out: the slot for waiting exchanges is free again.
            slot.release()
            await self._relay_notifications(pipe, fanout, queue, d)

    def _address_check(self, d: Decision) -> Callable[[Any], bool]:
        """For a name only ``*`` or a prefix allowed: the address it resolved to must be."""
        allow = self.router.allow
        port = d.upstream.port

        def check(remote: Any) -> bool:
            ip = remote_ip(remote)
            return ip is not None and allow.address_allowed(ip, port)

        return check

    async def _join(self, pipe: Pipe, shared: Fanout, d: Decision, entry: dict[str, Any],
                    started: float, slot: _Slot) -> bool:
        """Serve an Observe registration from an upstream observation another client made;
        False if that registration did not become one (the caller then registers itself)."""
        try:
            async with asyncio.timeout(self.config.upstream_timeout):
                first = await asyncio.shield(shared.ready)
        except TimeoutError:
            self._fail(pipe, codes.GATEWAY_TIMEOUT, "upstream timeout", "timeout", entry, started)
            return True
        current = shared.current()
        if first is None or current is None or shared.ended:
            return False
        latest, max_age = current
        answer = self.relay(latest, d)
        answer.opt.max_age = max_age  # RFC 7252 5.6.1: what is left of its freshness
        queue = shared.subscribe()
        entry["observe"] = "shared"
        self._done(entry, answer, started, None)
        self._answer(pipe, answer, is_last=False)
        slot.release()
        await self._relay_notifications(pipe, shared, queue, d)
        return True

    def _looped(self, request: Message) -> bool:
        """A request from one of our own upstream sockets: it came round a routing loop, so
        waiting for a merged request or a shared observation would be waiting for itself
        (RFC 8768's Hop-Limit then ends the loop)."""
        sockaddr = getattr(request.remote, "sockaddr", None)
        return (self.upstream is not None and isinstance(sockaddr, tuple)
                and self.upstream.is_own_port(int(sockaddr[1])))

    def _leave(self, fanout: Fanout, queue: asyncio.Queue[Event]) -> None:
        """A client's observation ended; the upstream one ends with the last client."""
        last = fanout.unsubscribe(queue)
        if (last or fanout.ended) and fanout.key is not None \
                and self._shared.get(fanout.key) is fanout:
            del self._shared[fanout.key]
        if last and fanout.obs is not None:
            obs, fanout.obs = fanout.obs, None
            obs.cancel()
            self.observations -= 1

    async def _relay_notifications(self, pipe: Pipe, fanout: Fanout,
                                   queue: asyncio.Queue[Event], d: Decision) -> None:
        """Relay upstream notifications until either side ends the observation."""
        self.observers += 1
        stopping = asyncio.ensure_future(self._stopping.wait())
        getter: asyncio.Future[Event] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, stopping},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    self._answer(
                        pipe,
                        Message(code=codes.SERVICE_UNAVAILABLE, payload=b"proxy shutting down"),
                        is_last=True,
                    )
                    return
                msg, exc = getter.result()
                if msg is not None:
                    last = msg.opt.observe is None or not msg.code.is_successful()
                    self.metrics.bytes.inc(len(msg.payload), direction="downstream")
                    self._answer(pipe, self.relay(msg, d), is_last=last)
                    if last:
                        return
                    continue
                if isinstance(exc, (error.ObservationCancelled, error.NotObservable)):
                    # The terminal message (if any) was queued before this; nothing to add
                    # but an end for the client.
                    self._answer(pipe, Message(code=codes.BAD_GATEWAY,
                                               payload=b"upstream ended observation"),
                                 is_last=True)
                else:
                    self._answer(pipe, Message(code=codes.BAD_GATEWAY,
                                               payload=b"upstream observation failed"),
                                 is_last=True)
                return
        finally:
            # A client gone (its pipe lost interest) cancels this task: the queue's getter task
            # must end too, or it is destroyed pending once the queue is collected.
            stopping.cancel()
            if getter is not None:
                getter.cancel()
            self.observers -= 1
            self._leave(fanout, queue)

    def _silent(self, pipe: Pipe, entry: dict[str, Any], started: float) -> None:
        """End an exchange whose answer the client suppressed (RFC 7967) without sending one."""
        msg = Message(code=codes.CONTENT, no_response=NO_RESPONSE_ALL)
        entry["latency_ms"] = round((self.clock() - started) * 1000, 3)
        entry["code"] = None
        entry["suppressed"] = True
        self.metrics.suppressed.inc()
        self.metrics.bytes.inc(entry["request_bytes"], direction="upstream")
        if self.log_exchanges:
            self.access_log.exchange(entry)
        pipe.add_response(msg, is_last=True)

    def _fail(self, pipe: Pipe, code: Code, diagnostic: str, kind: str,
              entry: dict[str, Any], started: float) -> None:
        msg = Message(code=code, payload=diagnostic.encode())
        self.metrics.errors.inc(kind=kind)
        entry["reason"] = kind
        self._done(entry, msg, started, upstream=False)
        self._answer(pipe, msg, is_last=True)

    def _done(self, entry: dict[str, Any], response: Message, started: float,
              upstream: bool | None) -> None:
        code = response.code
        code_text = _CODE_TEXT.get(code)
        if code_text is None:
            code_text = _CODE_TEXT[code] = str(code).split(" ")[0]
        entry["code"] = code_text
        entry["response_bytes"] = len(response.payload)
        entry["latency_ms"] = round((self.clock() - started) * 1000, 3)
        if upstream and self.log_exchanges:
            resp_opts: dict[str, Any] = {}
            if response.opt.block1 is not None:
                b = response.opt.block1
                resp_opts["block1"] = f"{b.block_number}/{int(b.more)}/{b.size}"
            if response.opt.block2 is not None:
                b = response.opt.block2
                resp_opts["block2"] = f"{b.block_number}/{int(b.more)}/{b.size}"
            if response.opt.observe is not None:
                resp_opts["observe"] = response.opt.observe
            if resp_opts:
                entry["response_options"] = resp_opts
        if suppressed(entry.get("no_response"), code):
            entry["suppressed"] = True
        self.metrics.responses.inc(code=entry["code"])
        if upstream is not None:
            self.metrics.bytes.inc(entry["request_bytes"], direction="upstream")
        self.metrics.bytes.inc(entry["response_bytes"], direction="downstream")
        if self.log_exchanges:
            self.access_log.exchange(entry)


class _Slot:
    """One exchange's claim on the in-flight bound; released once, however the exchange ends."""

    def __init__(self, site: ProxySite) -> None:
        self.site = site
        self.held = False

    def release(self) -> None:
        if self.held:
            self.held = False
            self.site.release_slot()


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned upstream answer's exception as seen (no "never retrieved" noise)."""
    if not future.cancelled():
        future.exception()


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, Layer1Error):  # coaps://: the transport saw the ICMP error
        return isinstance(exc.cause, dtls.NetworkUnreachable)
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno in ICMP_ERRNOS


def _tuning(ack_timeout: float | None) -> TransportTuning | None:
    """aiocoap transmission parameters for what the proxy sends as CON (upstream requests, or
    downstream separate responses), when the operator set them."""
    if ack_timeout is None:
        return None

    class ProxyTuning(TransportTuning):
        ACK_TIMEOUT = ack_timeout

    return ProxyTuning()
