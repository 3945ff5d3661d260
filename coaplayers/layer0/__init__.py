"""Layer 0: end-to-end DTLS inside CoAP payloads, through any CoAP proxy (docs/PROTOCOL.md).

Server: wrap an aiocoap Site in :class:`Layer0Site`. Client: :class:`Layer0Client`. Both are
asyncio shells around a sans-I/O core: :class:`Layer0ServerCore` (core.py) and
:class:`Layer0ClientCore` (clientcore.py), each testable without a network or a clock.
"""

from .client import Layer0Client, Layer0Config, Layer0Observation, Layer0Request
from .clientcore import Layer0ClientCore
from .core import Answer, Layer0Peer, Layer0ServerCore, ServerLimits
from .errors import (
    HandshakeFailed,
    InnerMessageError,
    Layer0Closed,
    Layer0Error,
    NoAnswer,
    OuterError,
    RecordRejected,
    ResponseRejected,
    ServerBusy,
    SessionLost,
)
from .policy import Policy
from .profile import CONTENT_FORMAT, MAX_DATAGRAM, WELL_KNOWN_PATH
from .server import Layer0Remote, Layer0Site, layer0_peer

__all__ = [
    "CONTENT_FORMAT",
    "MAX_DATAGRAM",
    "WELL_KNOWN_PATH",
    "Answer",
    "HandshakeFailed",
    "InnerMessageError",
    "Layer0Client",
    "Layer0ClientCore",
    "Layer0Closed",
    "Layer0Config",
    "Layer0Error",
    "Layer0Observation",
    "Layer0Peer",
    "Layer0Remote",
    "Layer0Request",
    "Layer0ServerCore",
    "Layer0Site",
    "NoAnswer",
    "OuterError",
    "Policy",
    "RecordRejected",
    "ResponseRejected",
    "ServerBusy",
    "ServerLimits",
    "SessionLost",
    "layer0_peer",
]
