"""Who may use which path (sans-I/O): the server's Layer 0 authorization, decided on paths only.

Two questions, kept apart because they are asked at different layers:

* :meth:`Policy.requires_layer0`: a plain (outer) request to this path gets 4.01, so a resource
  cannot be reached around Layer 0 by mistake;
* :meth:`Policy.allows`: an inner request from this Layer 0 identity to this path gets 4.03 when
  not granted. Identities are the Layer 0 ones only (PSK identity, certificate common name, or
  a raw public key's fingerprint); a Layer 1 identity never appears here, so the two
  authorization domains stay separate.

A raw-public-key peer (RFC 7250) has no name of its own: its identity is
:func:`~coaplayers.dtls.spki_fingerprint` of its key, the first 16 bytes of the SHA-256 of its
DER SubjectPublicKeyInfo as 32 lowercase hex digits (``coap-keys`` prints it, the server logs
it). Grants name it that way; :func:`rpk_identity` computes it from a public key, a private
key or a PEM public key file (``Policy.build(grants={rpk_identity("client.pub"): [...]})``). PSK
identities, certificate names and fingerprints share one namespace, so a PSK identity should
never be 32 hex digits.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path as _FilePath
from typing import overload

from .profile import is_layer0_path

Path = tuple[str, ...]


def _prefix(p: str | Sequence[str]) -> Path:
    if isinstance(p, str):
        return tuple(s for s in p.strip("/").split("/") if s)
    return tuple(p)


def _under(path: Sequence[str], prefix: Path) -> bool:
    return tuple(path[: len(prefix)]) == prefix


@dataclass(frozen=True)
class Policy:
    """``protected``: path prefixes that only Layer 0 may reach (``"/"`` = everything, the default).

    ``grants``: identity -> path prefixes it may use inside Layer 0; ``None`` lets every
    authenticated identity use every path (raw-public-key peers are named by fingerprint: see
    the module docstring). Prefixes are written ``"/a/b"`` or ``("a", "b")`` and match whole
    path segments (``/a`` covers ``/a/x`` but not ``/ab``).
    """

    protected: tuple[Path, ...] = ((),)
    grants: Mapping[str, tuple[Path, ...]] | None = None

    @classmethod
    def build(
        cls,
        protected: Iterable[str | Sequence[str]] = ("/",),
        grants: Mapping[str | bytes, Iterable[str | Sequence[str]]] | None = None,
    ) -> Policy:
        """``grants`` keys: PSK identities (bytes or text), certificate common names, raw
        public key fingerprints (:func:`rpk_identity`)."""
        g = None
        if grants is not None:
            g = {identity_text(k): tuple(_prefix(p) for p in v) for k, v in grants.items()}
        return cls(tuple(_prefix(p) for p in protected), g)

    def requires_layer0(self, path: Sequence[str]) -> bool:
        if is_layer0_path(path):
            return False
        return any(_under(path, p) for p in self.protected)

    def allows(self, identity: str | None, path: Sequence[str]) -> bool:
        if is_layer0_path(path):
            return False  # no Layer 0 inside Layer 0
        if self.grants is None:
            return True
        if identity is None:
            return False
        return any(_under(path, p) for p in self.grants.get(identity, ()))


@overload
def identity_text(identity: bytes | str) -> str: ...
@overload
def identity_text(identity: None) -> None: ...
def identity_text(identity: bytes | str | None) -> str | None:
    """The text form policies and resources use: PSK identities as UTF-8 (escaped if not)."""
    if identity is None or isinstance(identity, str):
        return identity
    return identity.decode("utf-8", "backslashreplace")


_FINGERPRINT = re.compile(r"[0-9a-f]{32}")


def rpk_identity(key: object) -> str:
    """The Layer 0 identity of a raw-public-key peer: its SPKI fingerprint (32 hex digits).

    ``key``: a ``cryptography`` public (or private) key, DER SubjectPublicKeyInfo bytes, a
    path to a PEM file holding exactly one ``PUBLIC KEY``, or a fingerprint already (checked
    and lowercased, so one copied from a log or from ``coap-keys`` in capitals works too).
    """
    from ..dtls.credentials import load_public_keys, spki_der, spki_fingerprint
    from ..dtls.errors import ConfigurationError

    if isinstance(key, str) and _FINGERPRINT.fullmatch(key.lower()):
        return key.lower()
    if isinstance(key, str | os.PathLike):
        keys = load_public_keys(_FilePath(key))
        if len(keys) != 1:
            raise ConfigurationError(f"{key} holds {len(keys)} public keys; name one")
        return spki_fingerprint(keys[0])
    public_key = getattr(key, "public_key", None)
    if hasattr(key, "private_bytes") and callable(public_key):
        key = public_key()  # a private key: its public half
    return spki_fingerprint(spki_der(key))
