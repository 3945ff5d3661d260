"""Replica identity: which application server of a replica set holds a request's state.

Several coap-server processes can serve one logical origin (a replica set). A Layer 0 session
and an OSCORE context live in one of them, and a proxy in front must find that one from the
outer options alone, without a table of sessions (two proxies, or one after a restart, must
route alike). So each replica (``coap-server --replica N``) writes its number into the two
routing keys it hands out, the way Californium's cluster writes its node id into DTLS
connection ids:

- the Layer 0 session name ``~XYYYY``: the first character after the prefix is a base64url
  digit whose upper 4 bits are the replica number (its lower 2 bits and the rest stay random);
- the OSCORE Recipient IDs it assigns (the ``kid`` of every request): the upper 4 bits of the
  first byte are the replica number.

Neither costs a byte on the wire: the name keeps its length, and a kid keeps its length while
the replica holds fewer than 4 contexts (1-byte kids carry 4 random bits then; 2-byte kids
12, 3-byte kids 20). docs/PROTOCOL.md section 2 and docs/OSCORE-KEYING.md say the same.

Pure functions (no sockets, no clock): the proxy's router and the servers share them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

MAX_REPLICA: Final = 15
"""Replica numbers are 0..15 (4 bits in each routing key)."""

REPLICA_PATH: Final = (".well-known", "replica")
"""The resource a replica answers its number on (a proxy's health probe asks it)."""

_B64URL: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL_VALUE: Final = {c: i for i, c in enumerate(_B64URL)}

_OSCORE_OPTION: Final = 9
_URI_PATH: Final = 11


def check_replica(replica: int) -> int:
    """``replica`` if it is a valid replica number, else ValueError saying the range."""
    if isinstance(replica, bool) or not isinstance(replica, int) or not (
            0 <= replica <= MAX_REPLICA):
        raise ValueError(f"a replica number is 0 to {MAX_REPLICA}")
    return replica


def auto_replica() -> int:
    """A replica number from this host's address: its last byte modulo 16.

    For containers that run one command scaled to several copies (``compose --scale``): the
    copies get consecutive addresses on their network, so up to 16 of them get distinct
    numbers. Where addresses are not consecutive, give each replica its number instead.
    """
    import ipaddress
    import socket

    try:
        address = socket.gethostbyname(socket.gethostname())
        if address.startswith("127."):
            raise OSError("loopback")
    except OSError:
        # The address the host would send from (connect() on UDP sends nothing).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("10.255.255.255", 9))
                address = s.getsockname()[0]
            except OSError:
                address = "127.0.0.1"
    return int(ipaddress.ip_address(address).packed[-1]) % (MAX_REPLICA + 1)


def session_name(replica: int, name: str) -> str:
    """A random base64url session name (without the prefix) with ``replica`` in its first
    character; the other characters are left as they are."""
    first = _B64URL_VALUE[name[0]]
    return _B64URL[(replica << 2) | (first & 3)] + name[1:]


def replica_of_session(segment: str) -> int | None:
    """The replica number in a session's Uri-Path segment ``~X...``, None if it names none."""
    if len(segment) < 2 or segment[0] != "~":
        return None
    value = _B64URL_VALUE.get(segment[1])
    return None if value is None else value >> 2


def client_id(replica: int, random: bytes) -> bytes:
    """An OSCORE Recipient ID of ``len(random)`` bytes with ``replica`` in its upper 4 bits."""
    return bytes([(replica << 4) | (random[0] & 0x0F)]) + random[1:]


def replica_of_kid(kid: bytes) -> int | None:
    return kid[0] >> 4 if kid else None


def kid_of_option(value: bytes) -> bytes | None:
    """The kid in an OSCORE option value (RFC 8613 6.1), None if it has none or is malformed."""
    if not value:
        return None
    flags = value[0]
    if flags & 0xE0 or not flags & 0x08:  # reserved bits set, or no kid
        return None
    pos = 1 + (flags & 0x07)  # Partial IV
    if flags & 0x10:  # kid context: a length byte, then the context
        if pos >= len(value):
            return None
        pos += 1 + value[pos]
    if pos > len(value):
        return None
    return value[pos:]


_ENTRY_PATH: Final = (".well-known", "atls")


def client_hello_random(payload: bytes) -> bytes | None:
    """The 32-byte random of a DTLS 1.2 ClientHello starting ``payload`` (a Layer 0 first
    flight), None if it is not one. It is in clear, and a ClientHello repeated with a
    HelloVerifyRequest cookie carries the same random (RFC 6347 4.2.1), so hashing it keeps
    both on the replica whose cookie the second one returns."""
    # Record header (type 22, 13 bytes), handshake header (type 1, 12 bytes), version (2).
    if len(payload) < 59 or payload[0] != 22 or payload[13] != 1:
        return None
    return payload[27:59]


def balance_key(request: object, client: str) -> str:
    """What a request that names no replica is hashed on: a Layer 0 first flight's
    ClientHello random (clients behind one proxy or NAT share an address), else the
    client's address (a plain block-wise transfer stays on one replica)."""
    payload = request.payload  # type: ignore[attr-defined]
    if payload[:1] == b"\x16":
        return balance_key_of(bytes(payload), tuple(request.opt.uri_path), client)  # type: ignore[attr-defined]
    return client


def balance_key_of(payload: bytes, path: Sequence[str], client: str) -> str:
    """:func:`balance_key` from a request's payload and Uri-Path."""
    if payload[:1] == b"\x16" and tuple(path) == _ENTRY_PATH:
        random = client_hello_random(payload)
        if random is not None:
            return random.hex()
    return client


def replica_of(oscore: bytes | None, path: Sequence[str]) -> int | None:
    """:func:`replica_of_request` from a request's OSCORE option value (None: none) and its
    Uri-Path (or the path its Proxy-Uri named)."""
    if oscore is not None:
        kid = kid_of_option(oscore)
        return None if kid is None else replica_of_kid(kid)
    return replica_of_session(path[0]) if len(path) == 1 else None


def replica_of_request(options: object, path: Sequence[str] | None = None) -> int | None:
    """The replica that holds a request's state, from its outer options (an aiocoap
    ``Options``): the OSCORE kid, else a one-segment session path. None: any replica will do
    (a new handshake or a plain request)."""
    oscore = options.get_option(_OSCORE_OPTION)  # type: ignore[attr-defined]
    if oscore:
        return replica_of(bytes(oscore[0].value), ())
    if path is not None:  # the path a Proxy-Uri named
        return replica_of(None, path)
    segments = options.get_option(_URI_PATH)  # type: ignore[attr-defined]
    return replica_of(None, [s.value for s in segments])
