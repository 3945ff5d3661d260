"""Bounded Block1 reassembly (RFC 7959) for the resources a server renders.

aiocoap's ``Block1Spool`` (0.4.17) keeps any number of assemblies of any size for its
lifetime, and appends each block by copying the whole body so far (quadratic in the number of
blocks); a block out of order raises a bare ``ValueError``, which becomes 5.00 and a traceback
in the log. :class:`Block1Assembler` replaces it for every resource of a :class:`BoundedSite`
(coap-server's resources, in plain CoAP, inside Layer 0 and under OSCORE alike, since all
three hand the inner request to the same resource):

* a body beyond the resource's limit gets 4.13 Request Entity Too Large with Size1 saying the
  limit (RFC 7959 section 2.9.3), at block 0 already when the client announced the size in
  Size1;
* a block that does not continue the body (a gap, or an overlap that differs) gets 4.08
  Request Entity Incomplete and ends the assembly (section 2.9.2); a repeated block that
  matches what was received gets 2.31 again;
* each peer has a bounded number of assemblies in progress, and all peers together too: a new
  one displaces the peer's own oldest, or at the overall limit the oldest of the host holding
  the most, so a host with many ports displaces its own assemblies first;
* blocks are appended to one buffer, copied once when the body is complete;
* the complete responses that later Block2 requests are cut from are kept for the whole site
  up to a bound, not one per block key without one.

Sans-I/O: time comes from ``clock``; an assembly not continued within ``lifetime`` is dropped
when the table is next used, so no timer runs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiocoap.resource as resource
from aiocoap import Message, error
from aiocoap.blockwise import Block2Cache, ContinueException, IncompleteException
from aiocoap.numbers.codes import Code

from . import _aiocoap
from .errors import RemoteError
from .message import copy_request


@dataclass(frozen=True, slots=True)
class BlockwiseLimits:
    """Bounds of Block1 reassembly.

    ``max_body`` applies to a resource that does not set its own ``max_body`` attribute.
    ``lifetime`` is RFC 7252's MAX_TRANSMIT_WAIT: a client that let that pass between two
    blocks has given up on the exchange.
    """

    max_body: int = 64 * 1024
    max_per_peer: int = 4
    max_assemblies: int = 64
    lifetime: float = 93.0
    max_responses: int = 256

    def __post_init__(self) -> None:
        if (self.max_body < 1 or self.max_per_peer < 1 or self.max_assemblies < 1
                or self.max_responses < 1):
            raise ValueError("block-wise limits must be at least 1")
        if self.lifetime <= 0:
            raise ValueError("the block-wise lifetime must be positive")


class RequestTooLarge(error.ConstructionRenderableError, RemoteError):  # type: ignore[misc]
    """4.13 with Size1: the body a client sends (or announced) exceeds the resource's limit."""

    code = Code.REQUEST_ENTITY_TOO_LARGE

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is limited to {limit} bytes")
        self.limit = limit

    def to_message(self) -> Message:
        message = super().to_message()
        message.opt.size1 = self.limit
        return message


class BlockOutOfOrder(IncompleteException, RemoteError):  # type: ignore[misc]
    """4.08: a block that does not continue the body received so far."""

    message = "block out of order: send the body again from block 0"


@dataclass(slots=True)
class _Assembly:
    peer: Hashable
    host: Hashable
    body: bytearray
    seen: float
    limit: int


class _Remote(Protocol):
    """What block-wise assembly needs of an aiocoap remote (aiocoap has no types)."""

    @property
    def blockwise_key(self) -> Hashable: ...


def _peer_and_host(remote: _Remote) -> tuple[Hashable, Hashable]:
    """The remote's block-wise key (aiocoap's), and its host without the port where known."""
    peer = remote.blockwise_key
    address = getattr(remote, "sockaddr", None) or getattr(remote, "address", None)
    host = address[0] if isinstance(address, tuple) and address else peer
    return peer, host


class Block1Assembler:
    """The Block1 assemblies of one site: a block in, the complete request or an answer out."""

    def __init__(self, limits: BlockwiseLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or BlockwiseLimits()
        self.clock = clock
        self._assemblies: OrderedDict[Hashable, _Assembly] = OrderedDict()
        self._per_peer: dict[Hashable, int] = {}
        self._per_host: dict[Hashable, int] = {}
        self.stats = {"too_large": 0, "out_of_order": 0, "displaced": 0, "expired": 0}

    def __len__(self) -> int:
        return len(self._assemblies)

    def feed(self, request: Message, limit: int | None = None) -> Message:
        """The complete request, or raises what answers this block: ContinueException (2.31),
        :class:`BlockOutOfOrder` (4.08), :class:`RequestTooLarge` (4.13) or
        ``error.BadRequest`` (a block whose size does not match its Block1 option)."""
        block1 = request.opt.block1
        limit = self.limits.max_body if limit is None else limit
        if block1 is None:
            if len(request.payload) > limit:
                self.stats["too_large"] += 1
                raise RequestTooLarge(limit)
            return request
        now = self.clock()
        self._expire(now)
        key = _aiocoap.request_block_key(request)
        payload = request.payload
        if block1.more and len(payload) != block1.size and not (
            block1.size_exponent == 7 and payload and len(payload) % block1.size == 0
        ):
            self._drop(key)
            raise error.BadRequest("payload size does not match Block1")
        if block1.block_number == 0:
            self._drop(key)  # a new body replaces an unfinished one
            size1 = request.opt.size1
            if len(payload) > limit or (size1 is not None and size1 > limit):
                self.stats["too_large"] += 1
                raise RequestTooLarge(limit)
            if not block1.more:
                return request
            peer, host = _peer_and_host(request.remote)
            self._make_room(peer, host)
            self._assemblies[key] = _Assembly(peer, host, bytearray(payload), now, limit)
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            self._per_host[host] = self._per_host.get(host, 0) + 1
            raise ContinueException(block1)
        assembly = self._assemblies.get(key)
        if assembly is None:
            self.stats["out_of_order"] += 1
            raise BlockOutOfOrder()
        start, body = block1.start, assembly.body
        if start != len(body):
            if start < len(body) and body[start:start + len(payload)] == payload and block1.more:
                assembly.seen = now  # a repeat of a block we hold: acknowledge it again
                self._assemblies.move_to_end(key)
                raise ContinueException(block1)
            self._drop(key)
            self.stats["out_of_order"] += 1
            raise BlockOutOfOrder()
        if len(body) + len(payload) > assembly.limit:
            self._drop(key)
            self.stats["too_large"] += 1
            raise RequestTooLarge(assembly.limit)
        body += payload
        assembly.seen = now
        self._assemblies.move_to_end(key)
        if block1.more:
            raise ContinueException(block1)
        self._drop(key)
        complete = copy_request(request)
        complete.payload = bytes(body)
        return complete

    def _drop(self, key: Hashable) -> None:
        assembly = self._assemblies.pop(key, None)
        if assembly is None:
            return
        for table, k in ((self._per_peer, assembly.peer), (self._per_host, assembly.host)):
            left = table[k] - 1
            if left:
                table[k] = left
            else:
                del table[k]

    def _expire(self, now: float) -> None:
        deadline = now - self.limits.lifetime
        while self._assemblies:
            key, oldest = next(iter(self._assemblies.items()))
            if oldest.seen > deadline:
                return
            self._drop(key)
            self.stats["expired"] += 1

    def _make_room(self, peer: Hashable, host: Hashable) -> None:
        limits = self.limits
        if self._per_peer.get(peer, 0) >= limits.max_per_peer:
            self._displace(lambda a: a.peer == peer)
        if len(self._assemblies) >= limits.max_assemblies:
            busiest = max(self._per_host, key=self._per_host.__getitem__)
            self._displace(lambda a: a.host == busiest)

    def _displace(self, which: Callable[[_Assembly], bool]) -> None:
        for key, assembly in self._assemblies.items():  # least recently continued first
            if which(assembly):
                self._drop(key)
                self.stats["displaced"] += 1
                return


class _Responses:
    """The complete responses that Block2 requests after the first are cut from (aiocoap's
    ``Block2Cache`` keeps one per block key, without a bound, for ``lifetime``): at most
    ``max_responses`` for a whole site, the least recently asked for giving way. A block
    asked for after its response gave way gets 4.08, and the client starts again."""

    def __init__(self, limits: BlockwiseLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self._items: OrderedDict[Hashable, tuple[Message, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, key: Hashable) -> Message:
        message, stored = self._items[key]
        if self.clock() - stored > self.limits.lifetime:
            del self._items[key]
            raise KeyError(key)
        return message

    def __setitem__(self, key: Hashable, message: Message) -> None:
        self._items.pop(key, None)
        self._items[key] = (message, self.clock())
        while len(self._items) > self.limits.max_responses:
            self._items.popitem(last=False)


class _ResourceSpool:
    """What aiocoap's ``Resource`` calls as its ``_block1``: the site's assembler with the
    resource's own body limit."""

    __slots__ = ("assembler", "limit")

    def __init__(self, assembler: Block1Assembler, limit: int) -> None:
        self.assembler = assembler
        self.limit = limit

    def feed_and_take(self, request: Message) -> Message:
        return self.assembler.feed(request, self.limit)


class BoundedSite(resource.Site):  # type: ignore[misc]
    """aiocoap's ``Site`` whose resources reassemble Block1 through one
    :class:`Block1Assembler` and keep Block2 responses in one bounded store; a resource's
    ``max_body`` attribute (bytes) overrides the default body limit. Nested sites are
    covered as they are added."""

    def __init__(self, limits: BlockwiseLimits | None = None) -> None:
        super().__init__()
        self.block1 = Block1Assembler(limits)
        self.responses = _Responses(self.block1.limits, self.block1.clock)

    def add_resource(self, path: Sequence[str], resource_: object) -> None:
        self._bound(resource_)
        super().add_resource(path, resource_)

    def _bound(self, resource_: object) -> None:
        limit = getattr(resource_, "max_body", None)
        _aiocoap.replace_block_state(
            resource_,
            block1=_ResourceSpool(
                self.block1, limit if isinstance(limit, int) else self.block1.limits.max_body),
            block2=Block2Cache(), completes=self.responses)
        if isinstance(resource_, resource.Site) and not isinstance(resource_, BoundedSite):
            for child in _aiocoap.site_children(resource_):
                self._bound(child)


__all__ = ["Block1Assembler", "BlockOutOfOrder", "BlockwiseLimits", "BoundedSite",
           "RequestTooLarge"]
