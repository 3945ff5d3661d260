"""Admission control: a per-client token bucket (RFC 8516 4.29) and the in-flight bound (5.03).

Time is passed in, so the arithmetic is testable without waiting; the client table is an LRU of
bounded size so that a flood of spoofed source addresses costs bounded memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable

from .config import RateLimit


class RateLimiter:
    """Token buckets keyed by client (address or Layer 1 identity)."""

    def __init__(self, limit: RateLimit, max_clients: int = 10000) -> None:
        self.limit = limit
        self.max_clients = max_clients
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, client: Hashable, now: float) -> int | None:
        """None if admitted; otherwise whole seconds until a token is back (the Max-Age)."""
        rate, burst = self.limit.rate, self.limit.burst
        tokens, last = self._buckets.pop(client, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = None
        else:
            wait = max(1, math.ceil((1.0 - tokens) / rate))
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            # A forgotten client restarts with a full bucket: acceptable, and it keeps memory
            # bounded however many source addresses appear.
            self._buckets.popitem(last=False)
        return wait


class InFlight:
    """Counts exchanges waiting on an upstream; refuses beyond a bound instead of queueing."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def try_acquire(self) -> bool:
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def release(self) -> None:
        self.count -= 1
