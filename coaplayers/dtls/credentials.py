"""Credentials of one DTLS endpoint: PSK (tinydtls backend) or X.509 (OpenSSL backend).

Each layer builds its own credential objects; nothing here is shared between layers, so a key
that opens a hop cannot open an end-to-end session by accident.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .errors import ConfigurationError

MAX_PSK_IDENTITY = 32
MAX_PSK_KEY = 16


def parse_key_text(text: str) -> bytes:
    """A PSK as users type it: ``0x`` followed by hex, or plain text (libcoap's convention)."""
    if text.startswith(("0x", "0X")):
        try:
            return bytes.fromhex(text[2:])
        except ValueError as exc:
            raise ConfigurationError(f"PSK {text[:4]}... is not valid hex after 0x") from exc
    return text.encode()


@dataclass(frozen=True, slots=True)
class PskClientCredentials:
    """What a PSK client presents: its identity and the key bound to it."""

    identity: bytes
    key: bytes

    def __post_init__(self) -> None:
        if not self.identity or b"\0" in self.identity:
            raise ConfigurationError("PSK identity must be non-empty and contain no NUL byte")
        if not self.key:
            raise ConfigurationError("PSK key must not be empty")
        # tinydtls' compiled-in limits (DTLS_PSK_MAX_CLIENT_IDENTITY_LEN, DTLS_PSK_MAX_KEY_LEN):
        # a longer key or identity makes every handshake fail, so refuse it here, clearly.
        if len(self.identity) > MAX_PSK_IDENTITY:
            raise ConfigurationError(
                f"PSK identity is {len(self.identity)} bytes; at most {MAX_PSK_IDENTITY} are"
                " supported"
            )
        if len(self.key) > MAX_PSK_KEY:
            raise ConfigurationError(
                f"PSK is {len(self.key)} bytes; at most {MAX_PSK_KEY} are supported (16 random"
                " bytes, e.g. 0x followed by 32 hex digits, are the RFC 7925 profile's key size)"
            )

    def __repr__(self) -> str:  # never show the key
        return f"PskClientCredentials(identity={self.identity!r}, key=<{len(self.key)} bytes>)"


class PskStore:
    """Server side identity -> key table; mutable at runtime (keys can be added or revoked)."""

    def __init__(self, keys: Mapping[bytes, bytes] | None = None) -> None:
        self._keys: dict[bytes, bytes] = {}
        for identity, key in (keys or {}).items():
            self.add(identity, key)

    def add(self, identity: bytes, key: bytes) -> None:
        PskClientCredentials(identity, key)  # same validation
        self._keys[bytes(identity)] = bytes(key)

    def remove(self, identity: bytes) -> None:
        self._keys.pop(identity, None)

    def get(self, identity: bytes) -> bytes | None:
        return self._keys.get(identity)

    def __contains__(self, identity: object) -> bool:
        return identity in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def identities(self) -> list[bytes]:
        return list(self._keys)

    def __repr__(self) -> str:
        return f"PskStore({len(self._keys)} identities)"


@dataclass(slots=True)
class CertificateCredentials:
    """X.509 credentials for the OpenSSL backend (ECDSA P-256 is what the profiles expect).

    ``trusted`` are the CA certificates that authenticate the peer; with ``require_peer`` the
    handshake fails unless the peer presents a certificate chaining to one of them. A client
    checks the server's name against ``server_name`` when it is set. A client that only
    authenticates the server has an empty ``certificate_chain`` and ``private_key=None``.
    """

    certificate_chain: list[x509.Certificate]
    private_key: PrivateKeyTypes | None
    trusted: list[x509.Certificate] = field(default_factory=list)
    require_peer: bool = True
    server_name: str | None = None
    verify_peer: Callable[[x509.Certificate], bool] | None = None

    def __repr__(self) -> str:
        subj = self.certificate_chain[0].subject.rfc4514_string() if self.certificate_chain else "-"
        return f"CertificateCredentials(subject={subj!r}, trusted={len(self.trusted)})"

    @classmethod
    def trust_only(
        cls, ca: str | os.PathLike[str], *, server_name: str | None = None
    ) -> CertificateCredentials:
        """A client that authenticates the server but presents no certificate itself."""
        return cls([], None, load_certificates(ca), True, server_name)

    @classmethod
    def from_files(
        cls,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca: str | os.PathLike[str] | None = None,
        *,
        require_peer: bool = True,
        server_name: str | None = None,
    ) -> CertificateCredentials:
        chain = load_certificates(cert)
        private_key = load_private_key(key)
        trusted = load_certificates(ca) if ca else []
        return cls(chain, private_key, trusted, require_peer, server_name)


def check_key_file_permissions(path: str | os.PathLike[str], *, strict: bool = False) -> None:
    """Warn (or refuse with ``strict``) when a key file is readable by group or others."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        msg = (
            f"key file {path} is accessible by other users (mode {stat.S_IMODE(mode):o});"
            f" run: chmod 600 {path}"
        )
        if strict:
            raise ConfigurationError(msg)
        warnings.warn(msg, KeyFilePermissionWarning, stacklevel=2)


class KeyFilePermissionWarning(UserWarning):
    """A key file can be read by users other than its owner."""


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read certificate file {path}: {exc.strerror}") from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigurationError(f"{path} holds no PEM certificate") from exc
    return certs


def load_private_key(path: str | os.PathLike[str]) -> PrivateKeyTypes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read key file {path}: {exc.strerror}") from exc
    check_key_file_permissions(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"{path} holds no unencrypted PEM private key"
        ) from exc
