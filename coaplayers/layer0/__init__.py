"""Layer 0: end-to-end DTLS inside CoAP payloads, through any CoAP proxy (docs/PROTOCOL.md).

Server: wrap an aiocoap Site in :class:`Layer0Site`. Client: :class:`Layer0Channel`.
"""

from .client import ChannelConfig, Layer0Channel, Layer0Observation, Layer0Request
from .core import Answer, Layer0Peer, ServerLimits, TunnelCore
from .errors import (
    ChannelClosed,
    HandshakeFailed,
    InnerMessageError,
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
    "ChannelClosed",
    "ChannelConfig",
    "HandshakeFailed",
    "InnerMessageError",
    "Layer0Channel",
    "Layer0Error",
    "Layer0Observation",
    "Layer0Peer",
    "Layer0Remote",
    "Layer0Request",
    "Layer0Site",
    "NoAnswer",
    "OuterError",
    "Policy",
    "RecordRejected",
    "ResponseRejected",
    "ServerBusy",
    "ServerLimits",
    "SessionLost",
    "TunnelCore",
    "layer0_peer",
]
