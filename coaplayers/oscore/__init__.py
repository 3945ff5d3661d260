"""OSCORE mode: RFC 8613 end to end, keyed by the Layer 0 DTLS handshake.

The Layer 0 handshake runs once through Layer 0; after it, requests travel as plain RFC
8613 OSCORE messages to the real resource paths, through any proxy. The pieces:

* :mod:`.params` -- the CBOR parameters the server sends inside Layer 0
  (:class:`OscoreParameters`, strict :meth:`OscoreParameters.from_cbor`).
* :mod:`.keying` -- exporter label and length, and :func:`derive_context`, which turns the
  exporter output plus parameters into a :class:`SecurityContext` for either role.
* :mod:`.context` -- :class:`SecurityContext`: aiocoap's OSCORE with Class U outer options
  kept, sequence numbers that are never reused, a re-key threshold and a peer identity.
* :mod:`.persistence` -- :class:`ContextFile`: contexts across restarts (RFC 8613 B.1).
* :mod:`.kept` -- a client's contexts kept between runs, one locked file per server.
* :mod:`.server` -- :class:`ContextStore` (bounded, LRU) and :class:`OscoreSite`.
* :mod:`.client` -- :class:`OscoreClientTransport` / :func:`attach` for aiocoap clients.

Normative description of the keying: docs/OSCORE-KEYING.md. Everything but the client
transport, the site wrapper and the context file is sans-I/O.
"""

from .client import ClientContexts, OscoreClientTransport, attach, origin_of
from .context import MAX_SEQUENCE_NUMBER, SecurityContext
from .errors import (
    AlreadyProcessed,
    KeyingError,
    OscoreError,
    ParameterError,
    PersistenceError,
    RehandshakeReason,
    RehandshakeRequired,
    SequenceNumbersExhausted,
    UnprotectedErrorResponse,
    UnprotectedRequestRefused,
)
from .keying import (
    EXPORTER_LABEL,
    KeyMaterial,
    Role,
    derive_context,
    export_keying_material,
    exporter_length,
    split_exporter,
)
from .params import OscoreParameters
from .persistence import ContextFile
from .server import ContextStore, OscoreSite, oscore_context_of, peer_of

__all__ = [
    "EXPORTER_LABEL",
    "MAX_SEQUENCE_NUMBER",
    "AlreadyProcessed",
    "ClientContexts",
    "ContextFile",
    "ContextStore",
    "KeyMaterial",
    "KeyingError",
    "OscoreClientTransport",
    "OscoreError",
    "OscoreParameters",
    "OscoreSite",
    "ParameterError",
    "PersistenceError",
    "RehandshakeReason",
    "RehandshakeRequired",
    "Role",
    "SecurityContext",
    "SequenceNumbersExhausted",
    "UnprotectedErrorResponse",
    "UnprotectedRequestRefused",
    "attach",
    "derive_context",
    "export_keying_material",
    "exporter_length",
    "origin_of",
    "oscore_context_of",
    "peer_of",
    "split_exporter",
]
