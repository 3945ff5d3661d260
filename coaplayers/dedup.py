"""Duplicate detection (RFC 7252 section 4.5) for aiocoap's message manager, kept compact.

aiocoap remembers every received request for EXCHANGE_LIFETIME (247 s by default) with the
response it got, as a ``Message`` (its options, option objects and transport tuning), and one
timer per entry: about 25 objects per request that the garbage collector walks. A proxy or
server answering a few hundred requests per second holds millions of them, and Python's full
collections then stop the process for long pauses that grow with the load (coap-bench's
figures: docs/BENCHMARKS.md, "Costs behind the code"). Written here because
aiocoap has no setting for it: the same checks, with the response kept as its encoded bytes
and the entries keyed by a number per peer (tuples of numbers and bytes, which the collector
stops walking), expiring in order from one timer.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from aiocoap import CON, Message
from aiocoap.message import Direction
from aiocoap.transports.udp6 import UDP6EndpointAddress

from . import _aiocoap

SWEEP_INTERVAL = 1.0
"""Seconds between expiry passes (an entry lives up to this much longer than its lifetime)."""


class CompactDuplicates:
    """The duplicate table of one aiocoap ``MessageManager``; :func:`install` puts it in."""

    def __init__(self, mman: Any) -> None:
        self._mman = mman
        self._log: logging.Logger = mman.log
        self._loop = mman.loop
        # (peer number, message ID) -> (expiry time, encoded response or None), oldest
        # first; all numbers and bytes, so the collector stops looking at them
        self._entries: OrderedDict[tuple[int, int], tuple[float, bytes | None]] = OrderedDict()
        self._peers: dict[Hashable, list[int]] = {}  # peer_key -> [peer number, entries]
        self._remotes: dict[int, Hashable] = {}  # peer number -> peer_key
        self._next_peer = 0
        self._sweep: Any = None

    def __len__(self) -> int:
        return len(self._entries)

    def deduplicate(self, message: Message) -> bool:
        """aiocoap's duplicate check: True (and the stored answer sent again) for a
        request seen within its exchange lifetime."""
        remote = message.remote
        peer = self._peers.get(peer_key(remote))
        entry = self._entries.get((peer[0], message.mid)) if peer is not None else None
        if entry is not None:
            if message.mtype is CON:
                if entry[1] is not None:
                    self._log.info("Duplicate CON received, sending old response again")
                    again = Message.decode(entry[1], message.remote)
                    again.direction = Direction.OUTGOING
                    _aiocoap.send_datagram(self._mman, again)
                else:
                    self._log.info("Duplicate CON received, no response to send yet")
            else:
                self._log.info("Duplicate NON, ACK or RST received")
            return True
        self.remember(peer_key(remote), message.mid,
                      message.transport_tuning.EXCHANGE_LIFETIME)
        return False

    # -- the same table for datagrams answered below aiocoap (coap-proxy's fast path) -----

    def seen(self, key: Hashable, mid: int) -> tuple[float, bytes | None] | None:
        """The entry of a request from ``key`` (see :func:`peer_key`) with message ID ``mid``
        if it is remembered: (expiry, the encoded answer or None while there is none)."""
        peer = self._peers.get(key)
        return self._entries.get((peer[0], mid)) if peer is not None else None

    def remember(self, key: Hashable, mid: int, lifetime: float) -> None:
        """Remember a request (not yet answered) for ``lifetime`` seconds."""
        peer = self._peers.get(key)
        if peer is None:
            peer = self._peers[key] = [self._next_peer, 0]
            self._remotes[self._next_peer] = key
            self._next_peer += 1
        peer[1] += 1
        self._entries[(peer[0], mid)] = (self._loop.time() + lifetime, None)
        if self._sweep is None:
            self._sweep = self._loop.call_later(SWEEP_INTERVAL, self._expire)

    def answered(self, key: Hashable, mid: int, datagram: bytes) -> None:
        """Keep ``datagram`` (its answer, encoded) for a remembered request's duplicates."""
        peer = self._peers.get(key)
        if peer is None:
            return
        entry = self._entries.get((peer[0], mid))
        if entry is not None:
            self._entries[(peer[0], mid)] = (entry[0], datagram)

    def store(self, message: Message) -> None:
        """aiocoap's response store for duplicates: keep the answer to a remembered
        request (a piggybacked response, an empty ACK or a RST: same message ID).

        The transport encodes the same message right after this; encoding it here too
        (a small cost) is what keeps the table out of the collector's walk, and aiocoap's
        message interface hands back no encoded bytes to keep instead."""
        peer = self._peers.get(peer_key(message.remote))
        if peer is None:
            return
        key = (peer[0], message.mid)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], message.encode())

    def _expire(self) -> None:
        self._sweep = None
        now = self._loop.time()
        entries = self._entries
        while entries:
            key = next(iter(entries))
            if entries[key][0] > now:
                break
            del entries[key]
            remote = self._remotes[key[0]]
            peer = self._peers[remote]
            peer[1] -= 1
            if peer[1] == 0:
                del self._peers[remote], self._remotes[key[0]]
        if entries:
            self._sweep = self._loop.call_later(SWEEP_INTERVAL, self._expire)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._entries.clear()
        self._peers.clear()
        self._remotes.clear()


def peer_key(remote: Any) -> Hashable:
    """What the table keys a peer on: a plain UDP remote by its address tuple as received, so
    that datagrams answered below aiocoap (keyed by the same tuple) and through it share
    entries; any other remote by itself."""
    if type(remote) is UDP6EndpointAddress:
        return remote.sockaddr  # type: ignore[no-any-return]
    return remote  # type: ignore[no-any-return]


def install(mman: Any) -> CompactDuplicates:
    """Replace ``mman``'s duplicate table (an aiocoap ``MessageManager``, before it has seen
    a message) with a :class:`CompactDuplicates`."""
    table = CompactDuplicates(mman)
    _aiocoap.replace_duplicate_table(mman, table.deduplicate, table.store)
    mman.compact_duplicates = table
    shutdown = mman.shutdown

    async def shutdown_and_forget() -> None:
        table.close()
        await shutdown()

    mman.shutdown = shutdown_and_forget
    return table


def install_all(context: Any) -> None:
    """:func:`install` on every message manager of an aiocoap context."""
    for interface in context.request_interfaces:
        mman = _aiocoap.message_manager_of(interface)
        if mman is not None and not hasattr(mman, "compact_duplicates"):
            install(mman)


__all__ = ["SWEEP_INTERVAL", "CompactDuplicates", "install", "install_all", "peer_key"]
