"""The proxy's response cache (RFC 7252 sections 5.6 and 5.7): fewer requests reach devices.

Sans-I/O: the forwarding site asks :meth:`ResponseCache.lookup` with a request's cache key and
the time, and offers upstream answers with :meth:`ResponseCache.store`; no clock or socket here.

What is cached: 2.05 Content answers to GET and FETCH, fresh for their Max-Age (60 s when
absent, RFC 7252 5.10.5; Max-Age 0 is never stored). Never cached: requests or answers with
the OSCORE option (end-to-end protected, and one-time by design), anything but GET/FETCH (so
Layer 0's POSTs), and Observe registrations (relayed or aggregated instead). A stale entry
with an ETag is validated upstream (the proxy adds its ETag; a 2.03 refreshes it). A client's
own ETag matching a fresh entry is answered 2.03 by the proxy.

Cache key (RFC 7252 5.6 and 5.4.6): method, the upstream target (scheme, host, port, path,
query, as routing decided) and every other request option except NoCacheKey ones, the ones
the proxy implements itself (ETag, Observe, No-Response, Hop-Limit, the routing options), and
the payload and Content-Format for FETCH. Block2 is part of the key: each block an upstream
cut is an entry. A whole representation (an answer without Block2) is also found under the key
without Block2, and any block a request asks for is cut from it here (RFC 7959 2.4: same
ETag, More set while bytes follow, Size2 when asked), so that the small blocks the 3x rule
serves unverified readers come from one upstream answer.

Memory is bounded by entries and by bytes (payload plus options), least recently used first.
A successful POST, PUT, DELETE or iPATCH/PATCH answer drops the entries of that target.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from aiocoap import Message
from aiocoap.numbers import OptionNumber, codes
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from .routing import ROUTING_OPTIONS, Decision

Opt = OptionNumber

DEFAULT_MAX_AGE = 60
ENTRY_OVERHEAD = 200  # bytes charged per entry besides payload and options (key, bookkeeping)

# Request options the proxy implements itself: not part of the key.
_NOT_IN_KEY = frozenset(ROUTING_OPTIONS | {Opt.ETAG, Opt.OBSERVE, Opt.NO_RESPONSE})
# Answer options recomputed when serving (Max-Age) or tied to the exchange.
_NOT_STORED = frozenset({Opt.MAX_AGE, Opt.OBSERVE})
_CACHEABLE_METHODS = frozenset({codes.GET, codes.FETCH})
_INVALIDATING_METHODS = frozenset({codes.POST, codes.PUT, codes.DELETE, codes.PATCH, codes.iPATCH})


def _no_cache_key(number: int) -> bool:
    return number & 0x1E == 0x1C  # RFC 7252 5.4.6


@dataclass(slots=True)
class Entry:
    """One cached answer: what to send again, and until when it is fresh (clock seconds)."""

    code: Code
    payload: bytes
    options: list[object]  # aiocoap option objects (never changed in place by aiocoap)
    etag: bytes | None
    fresh_until: float
    size: int
    target: str
    #: a block an upstream cut (its Block2 kept), rather than a whole representation
    block: bool = False

    def max_age(self, now: float) -> int:
        return max(0, math.floor(self.fresh_until - now))


@dataclass(frozen=True, slots=True)
class CacheLimits:
    """Bounds of the cache; ``entries = 0`` turns it off."""

    entries: int = 1024
    bytes: int = 1 << 20
    max_entry_bytes: int = 16384  # a larger answer is relayed, not stored


@dataclass(slots=True)
class Lookup:
    """What the cache has for a request: ``fresh`` to serve, else ``stale`` to validate."""

    key: Hashable
    fresh: Entry | None = None
    stale: Entry | None = None


@dataclass
class ResponseCache:
    """An LRU of :class:`Entry` objects bounded by :class:`CacheLimits`."""

    limits: CacheLimits = field(default_factory=CacheLimits)
    _entries: OrderedDict[Hashable, Entry] = field(default_factory=OrderedDict)
    _by_target: dict[str, set[Hashable]] = field(default_factory=dict)
    bytes_used: int = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.limits.entries > 0

    @staticmethod
    def key_for(request: Message, d: Decision, *, observing: bool = False,
                whole: bool = False) -> Hashable | None:
        """The cache key of ``request`` going to ``d``; None if it must not be cached.

        ``observing``: the key of an Observe registration, under which clients share one
        upstream observation (:mod:`coaplayers.proxy.observe`). ``whole``: the key of the
        whole representation the blocks ``request`` asks for are cut from (Block2 left out).
        """
        if request.code not in _CACHEABLE_METHODS or (
                request.opt.observe is not None and not observing):
            return None
        parts: list[object] = [int(request.code), d.upstream.scheme, d.upstream.host,
                               d.upstream.port, d.path, d.query]
        for o in request.opt.option_list():
            n = int(o.number)
            if n == Opt.OSCORE:
                return None
            if n in _NOT_IN_KEY or _no_cache_key(n) or (whole and n == Opt.BLOCK2):
                continue
            parts.append((n, o.encode()))
        if request.code == codes.FETCH:
            parts.append(request.payload)
        return tuple(parts)

    def lookup(self, key: Hashable, now: float) -> Lookup:
        found = Lookup(key)
        entry = self._entries.get(key)
        if entry is None:
            return found
        self._entries.move_to_end(key)
        if entry.fresh_until > now:
            found.fresh = entry
        elif entry.etag is not None:
            found.stale = entry
        else:
            self._drop(key)
        return found

    def store(self, key: Hashable, response: Message, target: str, now: float) -> Entry | None:
        """Keep a 2.05 answer (if it may be kept); returns the entry."""
        if not self.enabled or response.code != codes.CONTENT:
            return None
        max_age = response.opt.max_age
        max_age = DEFAULT_MAX_AGE if max_age is None else max_age
        if max_age <= 0 or response.opt.observe is not None:
            self._drop(key)
            return None
        options = []
        size = ENTRY_OVERHEAD + len(response.payload)
        for o in response.opt.option_list():
            n = int(o.number)
            if n == Opt.OSCORE:
                self._drop(key)
                return None
            if n in _NOT_STORED:
                continue
            options.append(o)
            size += 4 + len(o.encode())
        if size > self.limits.max_entry_bytes or size > self.limits.bytes:
            self._drop(key)
            return None
        etags = response.opt.etags
        entry = Entry(response.code, response.payload, options, etags[0] if etags else None,
                      now + max_age, size, target, response.opt.block2 is not None)
        self._drop(key)
        self._entries[key] = entry
        self._by_target.setdefault(target, set()).add(key)
        self.bytes_used += size
        while len(self._entries) > self.limits.entries or self.bytes_used > self.limits.bytes:
            self._drop(next(iter(self._entries)))
        return entry

    def refresh(self, key: Hashable, entry: Entry, valid: Message, now: float) -> None:
        """A 2.03 Valid for ``entry``'s ETag: fresh again for the answer's Max-Age."""
        max_age = valid.opt.max_age
        max_age = DEFAULT_MAX_AGE if max_age is None else max_age
        if max_age <= 0:
            self._drop(key)
            return
        entry.fresh_until = now + max_age
        if key in self._entries:
            self._entries.move_to_end(key)

    def invalidate(self, request: Message, response: Message, target: str) -> int:
        """After a successful unsafe request to ``target``: drop what is cached for it."""
        return self.invalidate_codes(int(request.code), int(response.code), target)

    def invalidate_codes(self, method: int, code: int, target: str) -> int:
        """:meth:`invalidate` from the method's and the answer's code numbers."""
        if method not in _INVALIDATING_METHODS or code >> 5 != 2 or not self._by_target:
            return 0
        keys = self._by_target.pop(target, set())
        for key in keys:
            self._drop(key)
        return len(keys)

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.bytes_used -= entry.size
        keys = self._by_target.get(entry.target)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_target[entry.target]


def cached_answer(entry: Entry, request: Message, now: float) -> Message:
    """The answer to send from a fresh ``entry``: 2.03 if the client holds its ETag, else the
    entry, or the block of it the request asks for when the entry is a whole representation."""
    if entry.etag is not None and entry.etag in request.opt.etags:
        msg = Message(code=codes.VALID)
        msg.opt.etag = entry.etag
    else:
        block = request.opt.block2
        if block is not None and not entry.block and block.size_exponent <= 6:
            msg = cut_block(entry.code, entry.payload, entry.options, block,
                            size2=request.opt.size2 is not None)
        else:
            msg = Message(code=entry.code, payload=entry.payload)
            for o in entry.options:
                msg.opt.add_option(o)
    msg.opt.max_age = entry.max_age(now)
    return msg


def cut_block(code: Code, payload: bytes, options: list[object], block: BlockOption.BlockwiseTuple,
              *, size2: bool = False) -> Message:
    """Block ``block`` of a whole representation (RFC 7959 2.2-2.4): its options (so its ETag)
    with Block2 saying whether more follows, and Size2 if ``size2`` (the request had one, 4).

    A block past the end is 4.00, as RFC 7959 2.2 leaves it to the server (block 0 of an empty
    representation is that empty block).
    """
    start = block.block_number * block.size
    if start >= len(payload) and start:
        return Message(code=codes.BAD_REQUEST, payload=b"block out of range")
    msg = Message(code=code, payload=payload[start:start + block.size])
    for o in options:
        msg.opt.add_option(o)
    msg.opt.block2 = BlockOption.BlockwiseTuple(
        block.block_number, start + block.size < len(payload), block.size_exponent)
    if size2:
        msg.opt.size2 = len(payload)
    return msg
