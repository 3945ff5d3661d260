"""Credentials of one DTLS endpoint: PSK (tinydtls backend) or X.509 (OpenSSL backend).

Each layer builds its own credential objects; nothing here is shared between layers, so a key
that opens a hop cannot open an end-to-end session by accident.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

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


def certificate_matches(cert: x509.Certificate, host: str) -> bool:
    """Whether ``cert`` is for ``host`` as RFC 6125 reads it: an address against the iPAddress
    names, a name against the dNSName ones (a left-most ``*`` stands for one label), and the
    common name only when the certificate has no dNSName (what OpenSSL's own check does)."""
    import ipaddress

    host = host.strip("[]").rstrip(".").lower()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        return san is not None and address in san.get_values_for_type(x509.IPAddress)
    dns = san.get_values_for_type(x509.DNSName) if san is not None else []
    if not dns:
        dns = [str(a.value) for a in cert.subject.get_attributes_for_oid(
            x509.oid.NameOID.COMMON_NAME)]
    for name in dns:
        name = name.rstrip(".").lower()
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


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


def spki_der(key: object) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key, given as DER bytes or a cryptography key."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        der = bytes(key)
        try:
            serialization.load_der_public_key(der)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError("not a DER SubjectPublicKeyInfo") from exc
        return der
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        raise ConfigurationError(f"not a public key: {type(key).__name__}")
    return bytes(
        public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def spki_fingerprint(spki: bytes) -> str:
    """How a raw public key is named in logs and on :class:`HandshakeComplete`.

    The first 16 bytes of the SHA-256 of its DER SubjectPublicKeyInfo, as 32 lowercase hex
    digits (the ``coap-keys`` style of naming a key by its hash; 128 bits, so a second key
    with the same name cannot be searched for). Pinning itself compares whole SPKIs.
    """
    import hashlib

    return hashlib.sha256(spki).digest()[:16].hex()


@dataclass(slots=True)
class RawPublicKeyCredentials:
    """Raw public keys (RFC 7250, RFC 7925's certificate profile) for the GnuTLS backend.

    Each side presents its own ECDSA P-256 key as a bare SubjectPublicKeyInfo (91 bytes in
    place of a ~350-byte certificate) and authenticates the peer by pinning: the peer's SPKI
    must be one of ``trusted``, checked during the handshake, so an untrusted peer gets a fatal
    alert rather than a session. ``trusted`` takes DER SPKIs or cryptography public keys; it
    is stored as DER. With ``require_peer`` (the default) a peer must present a trusted key; a
    server without it does not ask clients for a key when ``trusted`` is empty (and checks
    one that is presented otherwise). A client always pins the server unless ``require_peer``
    is off and ``trusted`` is empty. The peer identity a session reports is
    :func:`spki_fingerprint` of the peer's key.
    """

    private_key: PrivateKeyTypes
    trusted: Collection[bytes | PublicKeyTypes] = field(default_factory=frozenset)
    require_peer: bool = True

    def __post_init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        if not isinstance(self.private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            self.private_key.curve, ec.SECP256R1
        ):
            raise ConfigurationError(
                "raw public key mode needs an ECDSA P-256 private key (RFC 7925's profile)"
            )
        self.trusted = frozenset(spki_der(k) for k in self.trusted)

    @property
    def trusted_keys(self) -> frozenset[bytes]:
        """The pinned peer keys, as DER SubjectPublicKeyInfo."""
        return frozenset(self.trusted)  # type: ignore[arg-type]  # normalized to DER

    @property
    def public_key_der(self) -> bytes:
        """Our own SubjectPublicKeyInfo (what the peer pins)."""
        return spki_der(self.private_key.public_key())

    @property
    def fingerprint(self) -> str:
        return spki_fingerprint(self.public_key_der)

    def trusts(self, spki: bytes) -> bool:
        return spki in self.trusted  # a frozenset of DER bytes (__post_init__)

    def __repr__(self) -> str:  # never show the key
        return (
            f"RawPublicKeyCredentials(key={self.fingerprint}, trusted={len(self.trusted)},"
            f" require_peer={self.require_peer})"
        )

    @classmethod
    def from_files(
        cls,
        key: str | os.PathLike[str],
        trusted: str | os.PathLike[str] | list[str | os.PathLike[str]] | None = None,
        *,
        require_peer: bool = True,
    ) -> RawPublicKeyCredentials:
        """Our PEM private key, and PEM files of trusted public keys (``-----BEGIN PUBLIC
        KEY-----`` blocks, any number per file)."""
        private_key = load_private_key(key)
        paths = [] if trusted is None else trusted if isinstance(trusted, list) else [trusted]
        keys: list[bytes] = []
        for path in paths:
            keys += load_public_keys(path)
        return cls(private_key, frozenset(keys), require_peer)


def load_public_keys(path: str | os.PathLike[str]) -> list[bytes]:
    """The DER SPKIs of the PEM ``PUBLIC KEY`` blocks in a file."""
    import re

    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read public key file {path}: {exc.strerror}") from exc
    blocks = re.findall(
        rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", text, flags=re.DOTALL
    )
    if not blocks:
        raise ConfigurationError(f"{path} holds no PEM public key (BEGIN PUBLIC KEY)")
    out = []
    for block in blocks:
        try:
            out.append(spki_der(serialization.load_pem_public_key(block)))
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"{path} holds a PEM public key that cannot be read") from exc
    return out


def check_identities(
    psk_store: PskStore | None, raw_public_key: RawPublicKeyCredentials | None,
    *, psk_flag: str = "--psk", trust_flag: str = "--rpk-trust",
) -> None:
    """Refuse a PSK identity spelled like the fingerprint of a trusted raw public key.

    An endpoint names its peers in one namespace (resources and policies see PSK identities
    and key fingerprints alike as the peer's identity), so such a PSK would pass for that
    key's holder. Both layers check their own credentials with it; the flags name them in
    the error.
    """
    if psk_store is None or raw_public_key is None:
        return
    names = {spki_fingerprint(k) for k in raw_public_key.trusted_keys}
    for identity in psk_store.identities():
        text = identity.decode(errors="replace")
        if text in names:
            raise ConfigurationError(
                f"{psk_flag} identity {text} is the fingerprint of a key in {trust_flag}:"
                " choose another PSK identity"
            )


def raw_public_key_from(
    key: str | None, trusted: Iterable[str] = (), *, key_flag: str = "--e2e-rpk-key",
    trust_flag: str = "--e2e-rpk-trust", peer: str = "client",
) -> RawPublicKeyCredentials | None:
    """Raw-public-key credentials (RFC 7250) from PEM files, or None when none are given.

    ``key`` is our ECDSA P-256 private key; ``trusted`` are files of PEM ``PUBLIC KEY`` blocks,
    the keys the ``peer`` may present (pinning: at least one, every one P-256). The flag names
    make the messages point at what to change.
    """
    trusted = list(trusted)
    if not key:
        if trusted:
            raise ConfigurationError(f"{trust_flag} needs {key_flag} (our own private key) too")
        return None
    if not trusted:
        raise ConfigurationError(
            f"{key_flag} needs {trust_flag}: the {peer}'s public key(s) to accept (PEM files);"
            f" raw public keys authenticate by pinning, so the trust list cannot be empty"
        )
    try:
        private_key = load_private_key(key)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{key_flag}: {exc}") from exc
    if not _is_p256(private_key):
        raise ConfigurationError(
            f"{key_flag} {key} is not an ECDSA P-256 private key (RFC 7925's raw-public-key"
            " profile; make one with: openssl genpkey -algorithm EC -pkeyopt"
            " ec_paramgen_curve:P-256)"
        )
    keys: list[bytes] = []
    for path in trusted:
        try:
            found = load_public_keys(path)
        except ConfigurationError as exc:
            hint = ""
            if Path(path).is_file() and b"BEGIN CERTIFICATE" in Path(path).read_bytes()[:4096]:
                hint = (f" (it is a certificate: take its key with openssl x509 -pubkey -noout"
                        f" -in {path})")
            elif Path(path).is_file() and b"PRIVATE KEY" in Path(path).read_bytes()[:4096]:
                hint = " (it is a private key: give the public key file, never the private one)"
            raise ConfigurationError(f"{trust_flag}: {exc}{hint}") from exc
        for der in found:
            if not _is_p256(serialization.load_der_public_key(der)):
                raise ConfigurationError(
                    f"{trust_flag} {path} holds a public key that is not ECDSA P-256"
                )
        keys += found
    creds = RawPublicKeyCredentials(private_key, frozenset(keys))
    if creds.public_key_der in creds.trusted_keys:
        raise ConfigurationError(
            f"{trust_flag} lists our own public key ({key_flag} {key}): give the {peer}'s"
        )
    return creds


def _is_p256(key: object) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec

    return isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
        key.curve, ec.SECP256R1
    )
