"""Layer 1: hop-by-hop DTLS for aiocoap (``coaps://``), client and server in one context."""

from .context import LayeredContext, attach_layer1, create_context, parse_listen_uri
from .credentials import ClientCredentials, DtlsCert, DtlsRpk
from .transport import (
    Layer1Claim,
    Layer1Error,
    Layer1Limits,
    Layer1Remote,
    layer1_identity,
)

__all__ = [
    "ClientCredentials",
    "DtlsCert",
    "DtlsRpk",
    "Layer1Claim",
    "Layer1Error",
    "Layer1Limits",
    "Layer1Remote",
    "LayeredContext",
    "attach_layer1",
    "create_context",
    "layer1_identity",
    "parse_listen_uri",
]
