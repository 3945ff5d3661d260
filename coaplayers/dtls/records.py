"""DTLS 1.2 record framing (RFC 6347 section 4.1).

Hand-written because neither backend exposes record boundaries: OpenSSL's memory BIO joins the
datagrams it writes, and tinydtls writes one record per call. Only the 13-byte header is read;
nothing here looks inside a record.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .errors import ProtocolViolation

HEADER_LEN = 13
CONTENT_CHANGE_CIPHER_SPEC = 20
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23
_CONTENT_TYPES = frozenset(
    (CONTENT_CHANGE_CIPHER_SPEC, CONTENT_ALERT, CONTENT_HANDSHAKE, CONTENT_APPLICATION_DATA)
)
HANDSHAKE_CLIENT_HELLO = 1
HANDSHAKE_SERVER_HELLO = 2
HANDSHAKE_HELLO_VERIFY_REQUEST = 3
MAX_RECORD_PAYLOAD = 16384 + 2048  # RFC 6347: ciphertext fragment limit


def split_records(data: bytes) -> list[bytes]:
    """Split a buffer of concatenated DTLS records, raising :class:`ProtocolViolation`."""
    return list(iter_records(data))


def iter_records(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        if len(view) - pos < HEADER_LEN:
            raise ProtocolViolation(f"truncated DTLS record header ({len(view) - pos} bytes)")
        ctype = view[pos]
        if ctype not in _CONTENT_TYPES:
            raise ProtocolViolation(f"unknown DTLS content type {ctype}")
        if view[pos + 1] != 0xFE:
            raise ProtocolViolation("not a DTLS record (version major byte is not 0xfe)")
        length = int.from_bytes(view[pos + 11 : pos + 13], "big")
        if length > MAX_RECORD_PAYLOAD:
            raise ProtocolViolation(f"DTLS record length {length} exceeds the limit")
        end = pos + HEADER_LEN + length
        if end > len(view):
            raise ProtocolViolation("DTLS record runs past the end of the datagram")
        yield bytes(view[pos:end])
        pos = end


def content_type(record: bytes) -> int:
    return record[0]


def epoch(record: bytes) -> int:
    return int.from_bytes(record[3:5], "big")


def sequence_number(record: bytes) -> int:
    return int.from_bytes(record[5:11], "big")


def with_sequence_number(record: bytes, seq: int) -> bytes:
    """The record with another 48-bit sequence number (only sound for epoch 0: unprotected)."""
    return record[:5] + seq.to_bytes(6, "big") + record[11:]


def handshake_type(record: bytes) -> int | None:
    """The handshake message type of an unencrypted (epoch 0) handshake record."""
    if record[0] != CONTENT_HANDSHAKE or epoch(record) != 0 or len(record) <= HEADER_LEN:
        return None
    return record[HEADER_LEN]


def plausible(record: bytes) -> bool:
    """False for an epoch 0 record that cannot be what it claims to be.

    Application data (only ever sent under keys), a handshake record whose fragment header
    contradicts its length, or a ChangeCipherSpec whose body is not the single byte 1.

    Epoch 0 is unprotected, so nothing else stops such a record; tinydtls takes a malformed
    one in and can no longer finish the handshake. Other records pass (protected ones are
    checked by their MAC).
    """
    if epoch(record) != 0:
        return True
    if record[0] == CONTENT_APPLICATION_DATA:
        return False  # never legitimate before the keys exist
    if record[0] == CONTENT_CHANGE_CIPHER_SPEC:
        return record[HEADER_LEN:] == b"\x01"
    if record[0] != CONTENT_HANDSHAKE:
        return True
    body = record[HEADER_LEN:]
    if len(body) < 12:
        return False
    length = int.from_bytes(body[1:4], "big")
    offset = int.from_bytes(body[6:9], "big")
    frag = int.from_bytes(body[9:12], "big")
    return len(body) == 12 + frag and offset + frag <= length


def client_hello_random(datagram: bytes) -> bytes | None:
    """The 32-byte random of the ClientHello that starts ``datagram``, if it starts with one.

    RFC 6347 section 4.2.1 keeps the random unchanged when the client repeats its ClientHello
    with a cookie, so it names one handshake attempt across the cookie exchange.
    """
    # record header 13, handshake header 12, client_version 2, random 32
    if len(datagram) < HEADER_LEN + 12 + 2 + 32:
        return None
    if datagram[0] != CONTENT_HANDSHAKE or datagram[HEADER_LEN] != HANDSHAKE_CLIENT_HELLO:
        return None
    if epoch(datagram) != 0:
        return None
    # Only a whole, self-consistent ClientHello counts (they are small; nobody fragments
    # them): a listener must not answer, nor a session act on, one that cannot be genuine.
    try:
        first = split_records(datagram)[0]  # a datagram with broken framing is dropped whole
    except ProtocolViolation:
        return None
    body = first[HEADER_LEN:]
    if not plausible(first) or body[6:9] != b"\0\0\0" or body[1:4] != body[9:12]:
        return None
    start = HEADER_LEN + 12 + 2
    return bytes(datagram[start : start + 32])


def session_id_and_cookie(hello: bytes) -> tuple[bytes, int] | None:
    """The session ID a whole ClientHello (checked by :func:`client_hello_random`) offers,
    and the length of its cookie."""
    at = HEADER_LEN + 12 + 2 + 32  # record and handshake headers, version, random
    if len(hello) < at + 2:
        return None
    cookie_at = at + 1 + hello[at]
    if hello[at] > 32 or len(hello) <= cookie_at:
        return None
    return hello[at + 1 : cookie_at], hello[cookie_at]


def client_hello_cookie(datagram: bytes) -> bytes | None:
    """The cookie of the whole ClientHello that starts ``datagram`` (empty: none), or ``None``
    if it does not start with one."""
    if client_hello_random(datagram) is None:
        return None
    parsed = session_id_and_cookie(datagram)
    if parsed is None:
        return None
    session_id, length = parsed
    start = HEADER_LEN + 12 + 2 + 32 + 1 + len(session_id) + 1
    cookie = datagram[start : start + length]
    return cookie if len(cookie) == length else None


def has_cookie(hello: bytes) -> bool:
    parsed = session_id_and_cookie(hello)
    return parsed is not None and parsed[1] != 0


def server_hello_session_id(record: bytes) -> bytes | None:
    """The session ID of a ServerHello record (``None``: not a ServerHello)."""
    at = HEADER_LEN + 12 + 2 + 32  # record and handshake headers, version, random
    if handshake_type(record) != HANDSHAKE_SERVER_HELLO or len(record) <= at:
        return None
    return record[at + 1 : at + 1 + record[at]]


def session_id_without_cookie(hello: bytes) -> bytes | None:
    """The session ID a ClientHello without a cookie offers (None: none, or a cookie)."""
    parsed = session_id_and_cookie(hello)
    if parsed is None or not parsed[0] or parsed[1] != 0:
        return None
    return parsed[0]


def pack_datagrams(records: Iterable[bytes], mtu: int) -> list[bytes]:
    """Pack records into as few datagrams as fit ``mtu``; an oversized record goes alone."""
    out: list[bytes] = []
    current = bytearray()
    for record in records:
        if current and len(current) + len(record) > mtu:
            out.append(bytes(current))
            current = bytearray()
        current += record
    if current:
        out.append(bytes(current))
    return out


PSK_CIPHER_SUITES = frozenset({0xC0A8, 0xC0A4, 0xC0A5, 0x00A8, 0x00AE, 0x008C, 0xC0AA, 0xCCAB})
"""PSK suites (RFC 4279, RFC 5487, RFC 6655, RFC 7905) that select the PSK listener."""


def offered_suites(client_hello: bytes) -> frozenset[int]:
    """The cipher suites a ClientHello datagram offers (empty if it cannot be parsed)."""
    try:
        pos = HEADER_LEN + 12 + 2 + 32
        pos += 1 + client_hello[pos]  # session id
        pos += 1 + client_hello[pos]  # cookie
        n = int.from_bytes(client_hello[pos : pos + 2], "big")
        suites = client_hello[pos + 2 : pos + 2 + n]
    except IndexError:
        return frozenset()
    return frozenset(
        int.from_bytes(suites[i : i + 2], "big") for i in range(0, len(suites) - 1, 2)
    )


def offers_psk(client_hello: bytes) -> bool:
    """Whether a ClientHello datagram offers any PSK cipher suite."""
    return not offered_suites(client_hello).isdisjoint(PSK_CIPHER_SUITES)


SERVER_CERTIFICATE_TYPE = 20  # RFC 7250 section 3
RAW_PUBLIC_KEY = 2  # TLS Certificate Types registry


def offers_raw_public_key(client_hello: bytes) -> bool:
    """Whether a ClientHello datagram asks for the server's raw public key (RFC 7250)."""
    try:
        pos = HEADER_LEN + 12 + 2 + 32  # record header, handshake header, version, random
        pos += 1 + client_hello[pos]  # session id
        pos += 1 + client_hello[pos]  # cookie
        pos += 2 + int.from_bytes(client_hello[pos : pos + 2], "big")  # cipher suites
        pos += 1 + client_hello[pos]  # compression methods
        end = pos + 2 + int.from_bytes(client_hello[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= min(end, len(client_hello)):
            kind = int.from_bytes(client_hello[pos : pos + 2], "big")
            size = int.from_bytes(client_hello[pos + 2 : pos + 4], "big")
            body = client_hello[pos + 4 : pos + 4 + size]
            if kind == SERVER_CERTIFICATE_TYPE and body:
                return RAW_PUBLIC_KEY in body[1 : 1 + body[0]]
            pos += 4 + size
    except IndexError:
        return False
    return False
