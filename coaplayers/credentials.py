"""Credentials from what people write: ``ID:KEY`` pairs, JSON PSK files and PEM files.

The programs build their credentials here from flags and configuration files, and so does the
proxy's Layer 1 transport from its configuration. Messages name the flags (``--psk``,
``--e2e-cert``), since that is where the mistake is made. cryptography loads only when
certificate credentials are built: reading a PSK pair never pays for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import dtls
from .dtls import ConfigurationError

if TYPE_CHECKING:
    from .dtls.credentials import raw_public_key_from as raw_public_key_from


def __getattr__(name: str) -> Any:
    if name == "raw_public_key_from":
        from .dtls.credentials import raw_public_key_from

        return raw_public_key_from
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_psk_pair(text: str) -> tuple[bytes, bytes]:
    """``IDENTITY:KEY`` (KEY as text, or hex after ``0x``), as libcoap's users write it."""
    identity, sep, key = text.partition(":")
    if not sep or not identity or not key:
        raise ConfigurationError(f"PSK {identity or '?'}:... must be given as IDENTITY:KEY")
    return identity.encode(), dtls.parse_key_text(key)


def psk_store_from(pairs: Iterable[str] = (), files: Iterable[str] = ()) -> dtls.PskStore | None:
    """A PSK store from ``ID:KEY`` pairs and JSON files (object identity -> key)."""
    store = dtls.PskStore()
    for pair in pairs:
        store.add(*parse_psk_pair(pair))
    for file in files:
        try:
            data = json.loads(Path(file).read_text())
            dtls.check_key_file_permissions(file)
        except OSError as exc:
            raise ConfigurationError(f"cannot read PSK file {file}: {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"PSK file {file} is not JSON: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigurationError(f"PSK file {file} is not UTF-8 text: {exc}") from exc
        except RecursionError as exc:
            raise ConfigurationError(f"PSK file {file} is nested too deeply") from exc
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise ConfigurationError(
                f"PSK file {file} must be a JSON object of identity -> key strings"
            )
        for identity, key in data.items():
            store.add(identity.encode(), dtls.parse_key_text(key))
    return store if len(store) else None


def certificate_from(
    cert: str | None, key: str | None, ca: str | None, *, require_peer: bool = True,
    server_name: str | None = None, what: str = "",
) -> dtls.CertificateCredentials | None:
    """Certificate credentials from PEM files, or None when none are given.

    ``what`` prefixes the flag names in messages (``"e2e-"`` names ``--e2e-cert``).
    """
    if not cert and not key:
        if ca:
            raise ConfigurationError(f"--{what}ca needs --{what}cert and --{what}key too")
        return None
    if not (cert and key):
        raise ConfigurationError(f"--{what}cert and --{what}key must be given together")
    creds = dtls.CertificateCredentials.from_files(
        cert, key, ca, require_peer=require_peer, server_name=server_name
    )
    # A key that does not belong to the certificate would only show up as a handshake failure
    # on the peer's side, far from the mistake; refuse it at start.
    from cryptography.hazmat.primitives import serialization

    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    leaf_key = creds.certificate_chain[0].public_key().public_bytes(*spki)
    assert creds.private_key is not None
    if creds.private_key.public_key().public_bytes(*spki) != leaf_key:
        raise ConfigurationError(
            f"--{what}key {key} is not the private key of the certificate in --{what}cert {cert}"
        )
    return creds




def check_layers_apart(
    hop: dtls.RawPublicKeyCredentials | None, e2e: dtls.RawPublicKeyCredentials | None,
    *, hop_flags: tuple[str, str] = ("--rpk-key", "--rpk-trust"),
    e2e_flags: tuple[str, str] = ("--e2e-rpk-key", "--e2e-rpk-trust"),
) -> None:
    """Each layer is its own authorization domain: a key that opens a hop must open nothing
    end to end, and the reverse. One private key for both layers, or a peer key trusted at
    both, would join them, so either is refused."""
    if hop is None or e2e is None:
        return
    if hop.public_key_der == e2e.public_key_der:
        raise ConfigurationError(
            f"{hop_flags[0]} and {e2e_flags[0]} are the same key: give each layer its own"
            " (coap-keys makes separate hop and end-to-end key pairs)"
        )
    both = hop.trusted_keys & e2e.trusted_keys
    if both:
        fp = dtls.spki_fingerprint(min(both))
        raise ConfigurationError(
            f"{hop_flags[1]} and {e2e_flags[1]} both list the key {fp}: a hop key must not"
            " open end-to-end sessions (nor the reverse); give each layer its own keys"
        )
