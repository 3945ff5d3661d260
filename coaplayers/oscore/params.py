"""The OSCORE parameters the server sends to the client inside Layer 0.

After the Layer 0 DTLS handshake, the server tells the client which Sender/Recipient IDs,
algorithms and (optional) ID Context to use. Both ends then derive the same RFC 8613
security context from these parameters and the TLS exporter (see :mod:`.keying`). The
encoding is a small deterministic CBOR map, specified in docs/OSCORE-KEYING.md; this module is
its single implementation, and its parser is deliberately strict (every deviation raises
:class:`~coaplayers.oscore.errors.ParameterError`), because a lenient parser is how two
implementations come to disagree about keys.

Pure functions and a frozen dataclass: no I/O.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Protocol

import cbor2
from aiocoap import oscore as _aiooscore
from cryptography.hazmat.primitives import hashes

from .errors import ParameterError

# CBOR map labels. 3, 4 and 6 are the labels RFC 9203 (ACE OSCORE profile) gives the same
# fields in its OSCORE_Input_Material; 7 and 8 are this profile's own. Labels 0, 1, 2 and 5
# of RFC 9203 (id, version, ms, salt) are not allowed: the secret and salt come from the
# exporter and never travel.
KEY_HKDF = 3
KEY_ALG = 4
KEY_ID_CONTEXT = 6
KEY_CLIENT_ID = 7
KEY_SERVER_ID = 8
_KNOWN_KEYS = frozenset({KEY_HKDF, KEY_ALG, KEY_ID_CONTEXT, KEY_CLIENT_ID, KEY_SERVER_ID})

#: COSE AEAD algorithm 10, AES-CCM-16-64-128: RFC 8613's mandatory-to-implement default.
DEFAULT_AEAD = 10
#: COSE algorithm -10 ("direct+HKDF-SHA-256"), taken here to mean HKDF with SHA-256, RFC
#: 8613's default.
DEFAULT_HKDF = -10

class AeadAlgorithm(Protocol):
    """What this package uses of an aiocoap AEAD algorithm object (aiocoap has no types)."""

    @property
    def value(self) -> int: ...  # the COSE algorithm value
    @property
    def key_bytes(self) -> int: ...
    @property
    def iv_bytes(self) -> int: ...
    @property
    def tag_bytes(self) -> int: ...

    def encrypt(self, plaintext: bytes, aad: bytes, key: bytes, iv: bytes) -> bytes: ...
    def decrypt(self, ciphertext_and_tag: bytes, aad: bytes, key: bytes, iv: bytes) -> bytes: ...


#: COSE AEAD algorithm value -> aiocoap algorithm object. AES-CBC (not an AEAD) is excluded.
AEAD_ALGORITHMS: dict[int, AeadAlgorithm] = {
    alg.value: alg
    for alg in _aiooscore.algorithms.values()
    if isinstance(alg, _aiooscore.AeadAlgorithm)
}

#: Parameter value -> hash function for HKDF.
HKDF_ALGORITHMS: dict[int, hashes.HashAlgorithm] = {
    -10: hashes.SHA256(),
    -11: hashes.SHA512(),
}

#: Longest ID Context we accept: the OSCORE option's kid context length is one byte, but a
#: long ID Context in every request would defeat the point of OSCORE's small overhead.
MAX_ID_CONTEXT_LENGTH = 32


def aead_algorithm(value: int) -> AeadAlgorithm:
    """The aiocoap AEAD object for a COSE algorithm value (ParameterError if unsupported)."""
    try:
        return AEAD_ALGORITHMS[value]
    except KeyError:
        raise ParameterError(f"unsupported AEAD algorithm {value!r}") from None


def hkdf_hash(value: int) -> hashes.HashAlgorithm:
    """The hash function for an HKDF parameter value (ParameterError if unsupported)."""
    try:
        return HKDF_ALGORITHMS[value]
    except KeyError:
        raise ParameterError(f"unsupported HKDF algorithm {value!r}") from None


def max_id_length(aead: int) -> int:
    """Longest Sender/Recipient ID the AEAD's nonce can hold (RFC 8613 Section 3.3)."""
    return int(aead_algorithm(aead).iv_bytes) - 6


@dataclass(frozen=True)
class OscoreParameters:
    """What the server tells the client after the Layer 0 handshake.

    IDs are named by role, not by direction, so that one value means the same on both ends:
    ``client_id`` is the client's Sender ID (the ``kid`` in every request, the server's
    Recipient ID) and ``server_id`` is the server's Sender ID (the client's Recipient ID).
    The server chooses ``client_id`` so that it is unique among its live contexts, which is
    what lets it find the context for a request (see
    :meth:`coaplayers.oscore.server.ContextStore.allocate_client_id`).

    Constructing an instance validates it, so an instance is always sendable.
    """

    client_id: bytes
    server_id: bytes
    aead: int = DEFAULT_AEAD
    hkdf: int = DEFAULT_HKDF
    id_context: bytes | None = None

    def __post_init__(self) -> None:
        for name in ("client_id", "server_id"):
            value = getattr(self, name)
            if type(value) is not bytes:
                raise ParameterError(f"{name} must be bytes, not {type(value).__name__}")
        if type(self.aead) is not int or type(self.hkdf) is not int:
            raise ParameterError("aead and hkdf must be integers")
        aead_algorithm(self.aead)
        hkdf_hash(self.hkdf)
        limit = max_id_length(self.aead)
        for name in ("client_id", "server_id"):
            if len(getattr(self, name)) > limit:
                raise ParameterError(
                    f"{name} longer than {limit} bytes, the most AEAD {self.aead} allows"
                )
        if self.client_id == self.server_id:
            # Equal IDs would give both directions the same key and nonce space.
            raise ParameterError("client_id and server_id must differ")
        if self.id_context is not None:
            if type(self.id_context) is not bytes:
                raise ParameterError("id_context must be bytes")
            if len(self.id_context) > MAX_ID_CONTEXT_LENGTH:
                raise ParameterError(
                    f"id_context longer than {MAX_ID_CONTEXT_LENGTH} bytes"
                )

    def to_cbor(self) -> bytes:
        """Deterministically encoded CBOR map; fields at their default value are left out."""
        items: dict[int, int | bytes] = {}
        if self.hkdf != DEFAULT_HKDF:
            items[KEY_HKDF] = self.hkdf
        if self.aead != DEFAULT_AEAD:
            items[KEY_ALG] = self.aead
        if self.id_context is not None:
            items[KEY_ID_CONTEXT] = self.id_context
        items[KEY_CLIENT_ID] = self.client_id
        items[KEY_SERVER_ID] = self.server_id
        return _deterministic(items)

    @classmethod
    def from_cbor(cls, data: bytes) -> OscoreParameters:
        """Parse what :meth:`to_cbor` produces, rejecting everything else.

        Raises ParameterError for: anything that is not exactly one CBOR item, trailing
        bytes, a non-map, an encoding that is not deterministic (RFC 8949 Section 4.2.1:
        shortest forms, definite lengths, keys sorted; this also rules out duplicate keys),
        unknown keys, missing IDs, wrong types, and every check of the constructor.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ParameterError("parameters must be bytes")
        data = bytes(data)
        if not data:
            raise ParameterError("empty parameter message")
        stream = io.BytesIO(data)
        try:
            item = cbor2.CBORDecoder(stream).decode()
        except Exception as e:  # cbor2 raises several types for malformed input
            raise ParameterError(f"not well-formed CBOR: {e}") from None
        if stream.tell() != len(data):
            raise ParameterError(f"{len(data) - stream.tell()} trailing bytes after the map")
        if not isinstance(item, dict):
            raise ParameterError(f"expected a CBOR map, got {type(item).__name__}")
        for key in item:
            if type(key) is not int:
                raise ParameterError(f"map key {key!r} is not an integer")
        unknown = set(item) - _KNOWN_KEYS
        if unknown:
            raise ParameterError(f"unknown map keys {sorted(unknown)}")
        try:
            canonical = _deterministic(item)
        except Exception as e:
            raise ParameterError(f"unencodable value: {e}") from None
        if canonical != data:
            raise ParameterError("map is not deterministically encoded (RFC 8949 4.2.1)")
        for key in (KEY_CLIENT_ID, KEY_SERVER_ID):
            if key not in item:
                raise ParameterError(f"missing map key {key}")
        return cls(
            client_id=item[KEY_CLIENT_ID],
            server_id=item[KEY_SERVER_ID],
            aead=item.get(KEY_ALG, DEFAULT_AEAD),
            hkdf=item.get(KEY_HKDF, DEFAULT_HKDF),
            id_context=item.get(KEY_ID_CONTEXT),
        )


def _deterministic(items: dict[int, int | bytes]) -> bytes:
    """RFC 8949 core deterministic encoding of a map with integer keys and simple values.

    Keys are sorted by their encoded bytes (Section 4.2.1); cbor2 already emits shortest
    forms and definite lengths.
    """
    encoded = sorted((cbor2.dumps(k), cbor2.dumps(v)) for k, v in items.items())
    n = len(encoded)
    if n > 23:
        raise ValueError("map too large")
    return bytes([0xA0 | n]) + b"".join(k + v for k, v in encoded)
