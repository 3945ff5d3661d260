"""Small X.509 toolkit: a CA and ECDSA P-256 leaf certificates for demos and tests.

Production deployments bring their own PKI; this exists so that a credential set can be made
with one command (``coaplayers.programs.keys``) and so that tests need no files checked in.

Leaf certificates are kept small, since each handshake carries them (a Layer 0 certificate
handshake sends two): a 9-byte serial, only the subject alternative names a server is checked
against (none for a client-only certificate, whose identity is its common name) and the
extended key usages it is for; no basicConstraints (a v3 certificate without it is not a CA,
RFC 5280 section 4.2.1.9) and no key identifiers (OpenSSL's chain building and verification
do not need them in a one-level chain).
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _serial() -> int:
    """70 random bits in a 9-byte positive DER integer (x509.random_serial_number takes 20)."""
    return secrets.randbits(70) | (1 << 70)


def make_ca(common_name: str = "coaplayers demo CA", days: int = 3650) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    common_name: str,
    *,
    names: list[str] | None = None,
    days: int = 825,
    client: bool = True,
    server: bool = True,
) -> Issued:
    """A leaf certificate; ``names`` become DNS or IP subject alternative names.

    Without ``names``, a certificate for a server (``server=True``) names its common name; a
    client-only one names nothing (its identity is the common name).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    if names is None:
        names = [common_name] if server else []
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    usages = []
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return Issued(builder.sign(ca.private_key, hashes.SHA256()), key)
