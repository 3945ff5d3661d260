"""The engine's own record layer for epoch 1 of an established DTLS 1.2 session, and the TLS
1.2 PRF it derives keys with.

Both certificate backends hand an established session's records to it (OpenSSL for X.509 and
the PSK server side, GnuTLS for raw public keys) and free their own session object: what
remains is the keys, the two random values (for the exporter), the next sequence number and
the replay window. What it guarantees and how it is tested: docs/SECURITY.md, "The own record
layer".
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM

from . import records
from .errors import DtlsError


class RecordLayer:
    """Epoch 1 of an established DTLS 1.2 session with an AEAD suite (RFC 6347, RFC 5288,
    RFC 6655), once a backend has handed it over.

    A backend's session object holds far more than an established session needs (OpenSSL's
    DTLS objects never free their handshake buffers, and pyOpenSSL offers no call to free
    any of it). This keeps only what record protection needs: the keys (from the session's
    master secret, RFC 5246 section 6.3), the two random values (for the exporter), the next
    sequence number and the anti-replay window (RFC 6347 4.1.2.6).

    Its explicit nonce is the record's epoch and sequence number (RFC 6655 for CCM, and what
    RFC 5288 section 3 suggests for GCM). A backend may have written epoch 1 records under the
    same keys with another scheme before the hand-over (OpenSSL's GCM nonces count up from a
    random value): ``spent`` lists their explicit nonces, and a sequence number whose nonce
    is among them is skipped, so that no nonce is used twice by construction rather than
    with high probability (RFC 5288 section 3 requires distinct nonces).
    """

    __slots__ = ("_hash", "_mask", "_master", "_open", "_randoms", "_read_iv", "_seal", "_seq",
                 "_skip", "_tag", "_top", "_write_iv")

    def __init__(self, suite: str, master: bytes, client_random: bytes, server_random: bytes,
                 *, is_client: bool, next_seq: int, spent: Iterable[bytes] = ()) -> None:
        key_len, self._tag, self._hash, aead = SUITES[suite]
        block = prf(self._hash, master, b"key expansion", server_random + client_random,
                    2 * key_len + 8)
        ckey, skey = block[:key_len], block[key_len:2 * key_len]
        civ, siv = block[2 * key_len:2 * key_len + 4], block[2 * key_len + 4:]
        wkey, rkey = (ckey, skey) if is_client else (skey, ckey)
        self._write_iv, self._read_iv = (civ, siv) if is_client else (siv, civ)
        self._seal, self._open = aead(wkey, self._tag), aead(rkey, self._tag)
        self._seq = next_seq
        # Sequence numbers ahead whose explicit nonce the backend has used (usually none).
        ahead = (int.from_bytes(n, "big") for n in spent if len(n) == 8)
        self._skip = frozenset(n & _SEQ_MASK for n in ahead if n >> 48 == 1
                               and n & _SEQ_MASK >= next_seq)
        self._top = -1  # highest sequence number accepted, and the window below it
        self._mask = 0
        self._master = master
        self._randoms = client_random + server_random

    def protect(self, ctype: int, data: bytes) -> bytes:
        if self._skip:
            while self._seq in self._skip:
                self._seq += 1
        if self._seq > _SEQ_MASK:
            raise DtlsError("sequence numbers of epoch 1 exhausted")
        explicit = (1 << 48 | self._seq).to_bytes(8, "big")  # epoch 1 and the sequence number
        self._seq += 1
        header = bytes((ctype, 0xFE, 0xFD)) + explicit
        aad = explicit + header[:3] + len(data).to_bytes(2, "big")  # RFC 6347 4.1.2.1
        sealed = self._seal.encrypt(self._write_iv + explicit, data, aad)
        return header + (8 + len(sealed)).to_bytes(2, "big") + explicit + sealed

    def unprotect(self, record: bytes) -> bytes | None:
        """The plaintext of an authentic epoch 1 record not seen before, else ``None``."""
        seq = records.sequence_number(record)
        if seq > self._top:
            pass
        elif self._top - seq >= 64 or self._mask >> (self._top - seq) & 1:
            return None  # too old for the window, or a replay
        body = record[records.HEADER_LEN:]
        if len(body) < 8 + self._tag:
            return None
        plain_len = len(body) - 8 - self._tag
        aad = record[3:11] + record[:3] + plain_len.to_bytes(2, "big")
        try:
            plain = self._open.decrypt(self._read_iv + body[:8], body[8:], aad)
        except InvalidTag:
            return None
        if len(plain) > 16384:
            return None
        if seq > self._top:
            shift = seq - self._top
            self._mask = (self._mask << shift | 1) & _WINDOW if shift < 64 else 1
            self._top = seq
        else:
            self._mask |= 1 << (self._top - seq)
        return plain

    def max_plaintext(self, mtu: int) -> int:
        return min(mtu - records.HEADER_LEN - 8 - self._tag, 16384)

    def export(self, label: bytes, length: int, context: bytes | None) -> bytes:
        seed = self._randoms
        if context is not None:
            seed += len(context).to_bytes(2, "big") + context
        return prf(self._hash, self._master, label, seed, length)


_WINDOW = (1 << 64) - 1
_SEQ_MASK = (1 << 48) - 1


def _ccm8(key: bytes, tag: int) -> AESCCM:
    return AESCCM(key, tag_length=tag)


def _gcm(key: bytes, _tag: int) -> AESGCM:
    return AESGCM(key)


_Aead = Callable[[bytes, int], AESCCM | AESGCM]

# OpenSSL's name -> key length, tag length, PRF hash, AEAD (the suites build_context allows)
SUITES: dict[str, tuple[int, int, str, _Aead]] = {
    "ECDHE-ECDSA-AES128-CCM8": (16, 8, "sha256", _ccm8),
    "ECDHE-ECDSA-AES128-GCM-SHA256": (16, 16, "sha256", _gcm),
    "ECDHE-ECDSA-AES256-GCM-SHA384": (32, 16, "sha384", _gcm),
    "PSK-AES128-CCM8": (16, 8, "sha256", _ccm8),
}


def prf(hash_name: str, secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """The TLS 1.2 PRF (RFC 5246 section 5): P_hash(secret, label + seed)."""
    seed = label + seed
    out = b""
    a = seed
    while len(out) < length:
        a = hmac.digest(secret, a, hash_name)
        out += hmac.digest(secret, a + seed, hash_name)
    return out[:length]
