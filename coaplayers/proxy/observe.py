"""Observe aggregation (RFC 7641 section 5, RFC 7252 5.7): one upstream observation per resource.

Many clients observing the same unprotected resource through the proxy cost the device one
observation: the first client's registration goes upstream, later ones with the same cache key
join it and get the latest notification at once (Max-Age lowered by its age), and every
notification is fanned out to each client in the order it arrived. The upstream observation
is cancelled when the last client leaves. End-to-end protected observations (OSCORE, Layer 0)
have no shared key and keep one upstream observation per client, through a :class:`Fanout`
of one.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Hashable
from typing import Any

from aiocoap import Message

from .cache import DEFAULT_MAX_AGE

QUEUE_BOUND = 8  # notifications waiting per client; Observe is lossy by design: oldest go

Event = tuple[Message | None, BaseException | None]


class Fanout:
    """An upstream observation and the clients it feeds (each through a bounded queue)."""

    def __init__(self, key: Hashable | None, clock: Callable[[], float]) -> None:
        self.key = key  # None: not shared (protected, or aggregation off)
        self.clock = clock
        self.ready: asyncio.Future[Message | None] = asyncio.get_running_loop().create_future()
        self.latest: Message | None = None
        self.latest_at = 0.0
        self.queues: set[asyncio.Queue[Event]] = set()
        self.obs: Any = None
        self.ended = False  # the upstream ended it: new clients start a fresh one

    def start(self, obs: Any, first: Message) -> None:
        """The upstream accepted the registration: fan its notifications out from now on."""
        self.obs = obs
        self.latest, self.latest_at = first, self.clock()
        obs.register_callback(self._notify, _suppress_deprecation=True)
        obs.register_errback(self._error, _suppress_deprecation=True)
        if not self.ready.done():
            self.ready.set_result(first)

    def abandon(self) -> None:
        """The registration did not become an observation: waiting clients go their own way."""
        self.ended = True
        if not self.ready.done():
            self.ready.set_result(None)

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self.queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> bool:
        """Remove a client; True if it was the last (the caller then cancels upstream)."""
        self.queues.discard(queue)
        return not self.queues

    def current(self) -> tuple[Message, int] | None:
        """The latest notification and its remaining freshness in whole seconds."""
        if self.latest is None:
            return None
        max_age = self.latest.opt.max_age
        max_age = DEFAULT_MAX_AGE if max_age is None else max_age
        return self.latest, max(0, math.floor(max_age - (self.clock() - self.latest_at)))

    def _notify(self, msg: Message) -> None:
        self.latest, self.latest_at = msg, self.clock()
        if msg.opt.observe is None or not msg.code.is_successful():
            self.ended = True
        for queue in self.queues:
            if queue.qsize() >= QUEUE_BOUND:
                queue.get_nowait()
            queue.put_nowait((msg, None))

    def _error(self, exc: BaseException) -> None:
        self.ended = True
        for queue in self.queues:
            queue.put_nowait((None, exc))
