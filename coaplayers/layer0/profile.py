"""The numbers of the Layer 0 (ATLS) profile, in one place; docs/PROTOCOL.md explains each.

Kept apart from the code that uses them so that a peer implementer (and the tests) can read the
whole wire contract from one short module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

from aiocoap.numbers.codes import Code

from ..dtls import records
from ..dtls.errors import ProtocolViolation
from ..dtls.session import DtlsConfig

WELL_KNOWN_PATH: Final = (".well-known", "atls")
"""The Layer 0 entry resource: a client POSTs its first ClientHello here."""

CONTENT_FORMAT: Final = 65000
"""``application/vnd.coaplayers.atls-records`` (experimental range): DTLS 1.2 records."""

MAX_DATAGRAM: Final = 1024
"""Largest outer payload either side sends: one RFC 7959 block, so that no proxy (libcoap's
splits anything larger into blocks) ever needs outer block-wise transfer. It is also the MTU
given to the DTLS engine, which fragments handshake messages to fit it."""

DTLS_CIPHERS: Final = "ECDHE-ECDSA-AES128-CCM8:@SECLEVEL=0"
"""The one cipher suite a certificate-mode Layer 0 handshake offers and accepts: RFC 7925's
(and RFC 7252's) mandatory TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8, which the PSK mode's CCM_8 mirrors.
Both ends of a Layer 0 session run coaplayers, so a list would only cost 2 bytes per suite in
each ClientHello. (``@SECLEVEL=0``: OpenSSL rates a 64-bit tag below its default level.)"""

INNER_BLOCK_SZX: Final = 5
"""Inner block-wise size exponent (512-byte blocks): an inner message plus the record overhead
(at most 45 bytes with AES-GCM) stays below :data:`MAX_DATAGRAM`."""

INNER_BLOCK_SIZE: Final = 1 << (INNER_BLOCK_SZX + 4)

SESSION_PREFIX: Final = "~"
"""First character of every session resource's name: ``/~<id>``, one Uri-Path option. One-segment
paths starting with it belong to Layer 0 (an unknown one gets 4.04 "unknown session", never
the wrapped site); one segment keeps the session's name at 7 bytes on every request."""

SESSION_ID_CHARS: Final = 5
"""Random base64url characters after the prefix: 30 bits. The name is a routing key, not a
credential: nothing that does not authenticate changes a session, and an unauthenticated request
gets the same answer on a live name as on a dead one (docs/PROTOCOL.md 2, 3.3, 3.4)."""

HANDSHAKE_TAG_LEN: Final = 8
PADDING_OPTION: Final = 65052
"""Outer Padding option (experimental range; elective, safe to forward, not a cache key):
its value is ignored. A certificate client pads its cookie-bearing ClientHello with it so
that the server's first flight fits three times the request (the 3x rule of proxies and
servers that have not verified its address): docs/PROTOCOL.md 3.1."""
"""Bytes of the handshake tag that starts every request payload to a half-open session."""

UNKNOWN_SESSION: Final = b"unknown session"
"""The diagnostic of the one answer (4.04) to every session request that does not authenticate,
whether or not the name is live."""

PULL_CODE: Final = 0
"""Inner code of a pull: an Empty (0.00) inner message whose token is the acknowledgement."""

MAX_LOCATION_SEGMENTS: Final = 4
"""Longest Location-Path a client accepts for a session (this server sends one segment)."""

MAX_TOKEN_LENGTH: Final = 8

# Outer response codes of the Layer 0 resources (docs/PROTOCOL.md, "Outer codes").
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


def is_layer0_path(path: Sequence[str]) -> bool:
    """Whether an outer Uri-Path belongs to Layer 0: the entry resource (and anything below
    it) or a one-segment session name. Such paths never reach the wrapped site, carry no OSCORE
    and are refused inside Layer 0."""
    return tuple(path[:2]) == WELL_KNOWN_PATH or (
        len(path) == 1 and path[0].startswith(SESSION_PREFIX)
    )


def handshake_tag(datagram: bytes) -> bytes | None:
    """The tag that proves a request to a half-open session comes from whoever received the
    server's first datagram: SHA-256 over the ServerHello's random, first 8 bytes.

    The random is chosen afresh by the server and travels only in that datagram's payload, so a
    party that merely knows (or guesses) the session name cannot produce it; a repeated 2.01
    carries the same ServerHello, hence the same tag. ``None`` if ``datagram`` does not start
    with a ServerHello.
    """
    try:
        first = records.split_records(datagram)[0]
    except (ProtocolViolation, IndexError):
        return None
    body = first[records.HEADER_LEN:]
    # handshake header 12 (type, length 3, message_seq 2, fragment offset 3, fragment length 3),
    # server_version 2, random 32
    if (records.handshake_type(first) != records.HANDSHAKE_SERVER_HELLO
            or body[6:9] != b"\0\0\0" or len(body) < 12 + 2 + 32):
        return None
    return hashlib.sha256(body[14:46]).digest()[:HANDSHAKE_TAG_LEN]


def pull_message(acknowledged: int) -> bytes:
    """The inner message of a pull: acknowledges every queued record up to sequence number
    ``acknowledged`` (-1: none yet) that earlier pull answers delivered."""
    if acknowledged < 0:
        return bytes([0, PULL_CODE])
    ack = acknowledged.to_bytes(max(1, (acknowledged.bit_length() + 7) // 8), "big")
    return bytes([len(ack)]) + ack + bytes([PULL_CODE])


def parse_pull(plaintext: bytes) -> int | None:
    """The acknowledgement of a pull's inner message (-1: nothing acknowledged), or ``None``
    if ``plaintext`` is not a pull."""
    if not plaintext or plaintext[0] > MAX_TOKEN_LENGTH or len(plaintext) != plaintext[0] + 2:
        return None
    if plaintext[-1] != PULL_CODE:
        return None
    return int.from_bytes(plaintext[1:-1], "big") if plaintext[0] else -1


MAX_INNER: Final = MAX_DATAGRAM - 64
"""Largest inner message a record may carry: MAX_DATAGRAM minus the worst record overhead
(13 header + 8 explicit nonce + 16 GCM tag) with margin."""


def layer0_config(handshake_timeout: float = 30.0, *, client: bool = False) -> DtlsConfig:
    """The engine settings of a Layer 0 session: datagrams fit one outer payload (a client's
    leave room for the handshake tag, docs/PROTOCOL.md 3.3)."""
    mtu = MAX_DATAGRAM - HANDSHAKE_TAG_LEN if client else MAX_DATAGRAM
    # A client may send its first request with its last flight (False Start, 3.3).
    return DtlsConfig(mtu=mtu, handshake_timeout=handshake_timeout, false_start=client)
