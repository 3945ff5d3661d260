"""A UDP fault relay for one hop: loss, duplication, reordering, delay with jitter, blackholes
and NAT rebinding, reproducible from a seed.

The project's fault tests put one relay on each hop (``tc netem`` is not available everywhere
the tests run, and a relay in user space also gives counters, a capture of what crossed the hop,
and NAT rebinding on demand). :class:`FaultModel` decides the fate of each datagram without
sockets or a clock of its own; :class:`FaultRelay` is the asyncio shell with real UDP sockets;
``coap-relay`` (:mod:`coaplayers.programs.relay`) is the command.
"""

from .capture import CapturedDatagram, read_capture
from .faults import (
    Delivery,
    Direction,
    DirectionStats,
    Fate,
    FaultModel,
    Faults,
    LinkFaults,
    Verdict,
)
from .relay import Address, FaultRelay, RelayStats

__all__ = [
    "Address",
    "CapturedDatagram",
    "Delivery",
    "Direction",
    "DirectionStats",
    "Fate",
    "FaultModel",
    "FaultRelay",
    "Faults",
    "LinkFaults",
    "RelayStats",
    "Verdict",
    "read_capture",
]
