"""Layer 1 client credentials in aiocoap's credentials JSON format, plus certificates and
raw public keys.

aiocoap's format already has ``dtls`` entries (PSK and client identity). This module adds a
``dtls-cert`` entry type for the certificate mode and a ``dtls-rpk`` one for raw public keys
(RFC 7250: our ECDSA P-256 private key, and the server keys we accept, pinned), so one file
can hold all three; file names are relative to the credentials file::

    {
      "coaps://gateway.example*": {"dtls": {"psk": {"ascii": "secret"},
                                            "client-identity": {"ascii": "dev-1"}}},
      "coaps://[2001:db8::1]*": {"dtls-cert": {"cert": "client.pem", "key": "client.key",
                                               "ca": "ca.pem"}},
      "coaps://sensor-hub.example*": {"dtls-rpk": {"key": "client-hop-rpk.key",
                                                   "peer-keys": ["server-hop-rpk.pub"]}}
    }

Matching is aiocoap's: the most specific wildcard pattern over the whole request URI, port
included (so ``coaps://127.0.0.1*`` rather than ``coaps://127.0.0.1/*``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiocoap.credentials as aiocoap_credentials
from aiocoap import Message

from .. import _aiocoap
from ..dtls import (
    CertificateCredentials,
    ConfigurationError,
    PskClientCredentials,
    RawPublicKeyCredentials,
)
from ..dtls.credentials import raw_public_key_from

Loaded = PskClientCredentials | CertificateCredentials | RawPublicKeyCredentials


def _entry_fields(
    kind: str, data: Any, required: tuple[str, ...], optional: tuple[str, ...] = (),
    lists: tuple[str, ...] = (),
) -> dict[str, Any]:
    """An entry's members as keyword arguments, checked: aiocoap's generic loader compares
    annotations as text and so rejects every optional member (``str | None``)."""
    if not isinstance(data, dict):
        raise aiocoap_credentials.CredentialsLoadError(f"{kind} goes with an object")
    out: dict[str, Any] = {}
    for name, value in data.items():
        field = name.replace("-", "_")
        if field in lists:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not items or not all(
                isinstance(v, str) for v in items
            ):
                raise aiocoap_credentials.CredentialsLoadError(
                    f"{kind} {name!r} must be a file name or a non-empty list of file names"
                )
            out[field] = list(items)
        elif field in required or field in optional:
            if not isinstance(value, str):
                raise aiocoap_credentials.CredentialsLoadError(
                    f"{kind} {name!r} must be a string"
                )
            out[field] = value
        else:
            raise aiocoap_credentials.CredentialsLoadError(f"{kind} has no member {name!r}")
    missing = [n.replace("_", "-") for n in required if n not in out]
    if missing:
        raise aiocoap_credentials.CredentialsLoadError(
            f"{kind} needs {', '.join(repr(m) for m in missing)}"
        )
    return out


class DtlsCert(_aiocoap.credentials_entry_base()):  # type: ignore[misc]
    """A ``dtls-cert`` entry: PEM file names, relative to the credentials file."""

    @classmethod
    def from_item(cls, init_data: Any) -> DtlsCert:
        return cls(**_entry_fields("dtls-cert", init_data, ("cert", "key"), ("ca", "server_name")))

    def __init__(
        self, cert: str, key: str, ca: str | None = None, server_name: str | None = None
    ) -> None:
        self.cert = cert
        self.key = key
        self.ca = ca
        self.server_name = server_name
        self._loaded: CertificateCredentials | None = None
        self.base: Path = Path(".")

    def load(self) -> CertificateCredentials:
        if self._loaded is None:
            ca = self.base / self.ca if self.ca else None
            self._loaded = CertificateCredentials.from_files(
                self.base / self.cert, self.base / self.key, ca, server_name=self.server_name
            )
        return self._loaded


class DtlsRpk(_aiocoap.credentials_entry_base()):  # type: ignore[misc]
    """A ``dtls-rpk`` entry (RFC 7250 raw public keys): our PEM private key and the PEM
    public keys the server may present, file names relative to the credentials file.

    The server is authenticated by pinning, so ``peer-keys`` cannot be empty; a server
    presenting any other key fails the handshake with
    :class:`~coaplayers.dtls.AuthenticationFailed`.
    """

    def __init__(self, key: str, peer_keys: list[str]) -> None:
        self.key = key
        self.peer_keys = peer_keys
        self._loaded: RawPublicKeyCredentials | None = None
        self.base: Path = Path(".")

    @classmethod
    def from_item(cls, init_data: Any) -> DtlsRpk:
        return cls(**_entry_fields("dtls-rpk", init_data, ("key", "peer_keys"),
                                   lists=("peer_keys",)))

    def load(self) -> RawPublicKeyCredentials:
        if self._loaded is None:
            loaded = raw_public_key_from(
                str(self.base / self.key), [str(self.base / k) for k in self.peer_keys],
                key_flag='dtls-rpk "key"', trust_flag='dtls-rpk "peer-keys"', peer="server",
            )
            assert loaded is not None  # a key is always given
            self._loaded = loaded
        return self._loaded


class ClientCredentials(_aiocoap.credentials_map_base(  # type: ignore[misc]
        **{"dtls-cert": lambda: DtlsCert, "dtls-rpk": lambda: DtlsRpk})):
    """aiocoap's credentials map that also understands ``dtls-cert`` and ``dtls-rpk`` entries."""

    def __init__(self, base: str | os.PathLike[str] = ".") -> None:
        super().__init__()
        self._base = Path(base)
        # uri -> what for_uri returned. The transport asks for every request (a proxied
        # request names the same hop every time); matching means building a Message from
        # the URI and testing every pattern (its cost: docs/BENCHMARKS.md).
        # Any change to the map empties it (see _changed).
        self._for_uri: dict[str, Loaded] = {}

    # Every dict mutator empties the for_uri memo.
    def _changed(self) -> None:
        self._for_uri.clear()

    def __setitem__(self, key: Any, value: Any) -> None:
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._changed()
        super().__delitem__(key)

    def clear(self) -> None:
        self._changed()
        super().clear()

    def pop(self, *args: Any) -> Any:
        self._changed()
        return super().pop(*args)

    def popitem(self) -> Any:
        self._changed()
        return super().popitem()

    def setdefault(self, *args: Any) -> Any:
        self._changed()
        return super().setdefault(*args)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._changed()
        super().update(*args, **kwargs)

    def __ior__(self, other: Any) -> ClientCredentials:
        self._changed()
        return super().__ior__(other)  # type: ignore[no-any-return]

    def load_from_dict(self, d: dict[str, Any]) -> None:
        try:
            super().load_from_dict(d)
        except (aiocoap_credentials.CredentialsLoadError, TypeError, ValueError, KeyError,
                AttributeError) as exc:  # KeyError: a ":name" reference to a missing entry
            raise ConfigurationError(f"invalid credentials: {exc}") from exc
        for item in self.values():
            if isinstance(item, DtlsCert | DtlsRpk):
                item.base = self._base

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ClientCredentials:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read credentials file {path}: {exc.strerror}"
            ) from exc
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"credentials file {path} is not JSON: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigurationError(f"credentials file {path} is not UTF-8 text: {exc}") from exc
        except RecursionError as exc:
            raise ConfigurationError(f"credentials file {path} is nested too deeply") from exc
        if not isinstance(data, dict):
            raise ConfigurationError(f"credentials file {path} must hold a JSON object")
        self = cls(Path(path).parent)
        self.load_from_dict(data)
        return self

    def for_request(self, message: Message) -> Loaded:
        """The DTLS credentials for this request's first hop, or a clear error."""
        return self.for_uri(message.get_request_uri())

    def for_uri(self, uri: str) -> Loaded:
        """The DTLS credentials for the ``coaps://`` hop named by ``uri``."""
        found = self._for_uri.get(uri)
        if found is None:
            found = self._match(uri)
            if len(self._for_uri) >= 1024:
                self._for_uri.clear()
            self._for_uri[uri] = found
        return found

    def _match(self, uri: str) -> Loaded:
        try:
            item = self.credentials_from_request(Message(code=1, uri=uri))
        except aiocoap_credentials.CredentialsMissingError as exc:
            raise ConfigurationError(
                f"no coaps credentials match {uri}: add an entry such as"
                ' "coaps://HOST*" to the credentials (patterns match the whole URI, port'
                " included)"
            ) from exc
        if isinstance(item, DtlsCert | DtlsRpk):
            return item.load()
        if hasattr(item, "as_dtls_psk"):
            try:
                identity, key = item.as_dtls_psk()
            except (KeyError, RecursionError) as exc:  # a ":name" reference that goes nowhere
                raise ConfigurationError(
                    f"the credentials for {uri} refer to an entry that does not exist"
                ) from exc
            except (
                aiocoap_credentials.CredentialsMissingError, TypeError, ValueError, AttributeError
            ) as exc:
                raise ConfigurationError(f"the credentials for {uri} are unusable: {exc}") from exc
            return PskClientCredentials(bytes(identity), bytes(key))
        raise ConfigurationError(f"the credentials for {uri} are not DTLS credentials")

    def add_psk(self, pattern: str, identity: bytes, key: bytes) -> None:
        entry = {"psk": {"hex": key.hex()}, "client-identity": {"hex": identity.hex()}}
        self.load_from_dict({pattern: {"dtls": entry}})

    def add_certificate(self, pattern: str, credentials: CertificateCredentials) -> None:
        item = DtlsCert("-", "-")
        item._loaded = credentials
        self[pattern] = item

    def raw_public_keys(self) -> list[RawPublicKeyCredentials]:
        """Every ``dtls-rpk`` entry, loaded (so that a program can keep its layers' keys
        apart before the first request)."""
        return [item.load() for item in self.values() if isinstance(item, DtlsRpk)]

    def add_raw_public_key(self, pattern: str, credentials: RawPublicKeyCredentials) -> None:
        item = DtlsRpk("-", ["-"])
        item._loaded = credentials
        self[pattern] = item
