"""One Layer 0 endpoint for every end-to-end credential kind a server holds.

A server may accept PSK (tinydtls), X.509 certificates (OpenSSL) and raw public keys (GnuTLS)
side by side. The backends cannot share a handshake, so each ClientHello is handed to the
listener of the kind it asks for, decided from the ClientHello alone (each listener then runs
its own stateless cookie exchange, and the second ClientHello asks for the same kind again):

1. it offers ``RawPublicKey`` (2) in a ``server_certificate_type`` extension (RFC 7250, type
   20): the raw-public-key listener;
2. it offers a PSK cipher suite: the PSK listener;
3. anything else: the certificate listener.

A ClientHello for a kind the server does not hold goes to a listener it does hold, whose
handshake then fails with an alert: the client learns at once that the server does not speak
its kind (rather than timing out).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from ..dtls import records

SERVER_CERTIFICATE_TYPE = 20  # RFC 7250 section 3
RAW_PUBLIC_KEY = 2  # TLS Certificate Types registry


def offers_raw_public_key(client_hello: bytes) -> bool:
    """Whether a ClientHello datagram asks for the server's raw public key (RFC 7250)."""
    try:
        pos = records.HEADER_LEN + 12 + 2 + 32  # record header, handshake header, version, random
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


class KindListener:
    """PSK, certificate and raw-public-key listeners behind one ``accept`` (any of them may
    be ``None``, not all); see the module docstring for the dispatch."""

    def __init__(self, *, psk: Any = None, certificate: Any = None, rpk: Any = None) -> None:
        if psk is None and certificate is None and rpk is None:
            raise ValueError("KindListener needs at least one listener")
        self.psk = psk
        self.certificate = certificate
        self.rpk = rpk

    def _for(self, datagram: bytes) -> Any:
        if self.rpk is not None and offers_raw_public_key(datagram):
            return self.rpk
        if self.psk is not None and records.offers_psk(datagram):
            return self.psk
        return self.certificate or self.rpk or self.psk

    def accept(self, peer_key: Hashable, datagram: bytes, now: float) -> tuple[list[bytes], Any]:
        return self._for(datagram).accept(peer_key, datagram, now)
