"""Per-request work coap-server saves inside aiocoap (0.4.17; recheck on upgrades).

:func:`remember_local_multicast`: aiocoap decides for every response whether the request came to
a multicast address of ours (``UDP6EndpointAddress.as_response_address`` ->
``is_multicast_locally``), parsing our own address from the packet info with ``ipaddress``
each time: about 12 us, three times per Layer 0 handshake and once per plain request. The
answer depends only on those packet-info bytes, of which a server sees a handful (one per local
address), so it is remembered per value.
"""

from __future__ import annotations

from aiocoap.transports.udp6 import UDP6EndpointAddress

_LIMIT = 256  # distinct local addresses remembered (then the memo starts over)


def remember_local_multicast() -> None:
    """Make ``UDP6EndpointAddress.is_multicast_locally`` remember its answer per packet info."""
    original = UDP6EndpointAddress.is_multicast_locally
    compute = original.fget
    if getattr(compute, "_coaplayers_memo", False):
        return
    memo: dict[bytes, bool] = {}

    def is_multicast_locally(self: UDP6EndpointAddress) -> bool:
        pktinfo = self.pktinfo
        if pktinfo is None:
            return bool(compute(self))  # as aiocoap does (it fails without packet info)
        known = memo.get(pktinfo)
        if known is None:
            known = bool(compute(self))
            if len(memo) >= _LIMIT:
                memo.clear()
            memo[pktinfo] = known
        return known

    prop = property(is_multicast_locally, doc=original.__doc__)
    prop.fget._coaplayers_memo = True  # type: ignore[attr-defined]
    UDP6EndpointAddress.is_multicast_locally = prop  # type: ignore[method-assign]
