"""One endpoint serving both PSK and certificate handshakes."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from .openssl import OpenSslListener
from .records import offers_psk
from .tinydtls import TinyDtlsListener


class DualListener:
    """PSK and certificates on one endpoint: each ClientHello goes to the listener whose
    kind of cipher suite it offers (a PSK suite selects tinydtls)."""

    def __init__(self, psk: TinyDtlsListener, certificate: OpenSslListener) -> None:
        self.psk = psk
        self.certificate = certificate

    def accept(self, peer_key: Hashable, datagram: bytes, now: float) -> tuple[list[bytes], Any]:
        listener = self.psk if offers_psk(datagram) else self.certificate
        return listener.accept(peer_key, datagram, now)
