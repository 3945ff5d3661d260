"""The numbers of the Layer 0 (ATLS) profile, in one place; docs/PROTOCOL.md explains each.

Kept apart from the code that uses them so that a peer implementer (and the tests) can read the
whole wire contract from one short module.
"""

from __future__ import annotations

from typing import Final

from aiocoap.numbers.codes import Code

WELL_KNOWN_PATH: Final = (".well-known", "atls")
"""The tunnel entry resource: a client POSTs its first ClientHello here."""

CONTENT_FORMAT: Final = 65000
"""``application/vnd.coaplayers.atls-records`` (experimental range): DTLS 1.2 records."""

MAX_DATAGRAM: Final = 1024
"""Largest outer payload either side sends: one RFC 7959 block, so that no proxy (libcoap's
splits anything larger into blocks) ever needs outer block-wise transfer. It is also the MTU
given to the DTLS engine, which fragments handshake messages to fit it."""

INNER_BLOCK_SZX: Final = 5
"""Inner block-wise size exponent (512-byte blocks): an inner message plus the record overhead
(at most 45 bytes with AES-GCM) stays below :data:`MAX_DATAGRAM`."""

INNER_BLOCK_SIZE: Final = 1 << (INNER_BLOCK_SZX + 4)

SESSION_ID_BYTES: Final = 6
"""Random bytes in a session name (48 bits, 8 base64url characters in the Location-Path)."""

MAX_TOKEN_LENGTH: Final = 8

# Outer response codes of the tunnel resources (docs/PROTOCOL.md, "Outer codes").
CREATED: Final = Code.CREATED  # session created (entry resource)
CHANGED: Final = Code.CHANGED  # datagram processed; payload: answering records (maybe none)
DELETED: Final = Code.DELETED  # session ended in an orderly way (close_notify)
BAD_REQUEST: Final = Code.BAD_REQUEST  # payload is not DTLS records / not a ClientHello
UNAUTHORIZED: Final = Code.UNAUTHORIZED  # record not accepted (forged, altered or replayed)
FORBIDDEN: Final = Code.FORBIDDEN  # handshake failed or fatal alert; session removed
NOT_FOUND: Final = Code.NOT_FOUND  # unknown session: handshake again
METHOD_NOT_ALLOWED: Final = Code.METHOD_NOT_ALLOWED
REQUEST_ENTITY_TOO_LARGE: Final = Code.REQUEST_ENTITY_TOO_LARGE
UNSUPPORTED_CONTENT_FORMAT: Final = Code.UNSUPPORTED_CONTENT_FORMAT
SERVICE_UNAVAILABLE: Final = Code.SERVICE_UNAVAILABLE  # half-open limit reached

OUTER_ONLY_OPTIONS: Final = frozenset({3, 7, 35, 39})
"""Uri-Host, Uri-Port, Proxy-Uri, Proxy-Scheme: they route the outer message and never appear
inside (RFC 8613 treats them as class U for the same reason)."""

IDEMPOTENT_METHODS: Final = frozenset({Code.GET, Code.FETCH, Code.PUT, Code.DELETE, Code.iPATCH})
