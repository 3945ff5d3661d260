"""One endpoint serving several kinds of credentials: each ClientHello picks its backend.

Used by both layers (Layer 0's tunnel endpoint, Layer 1's ``coaps://`` sockets); the dispatch
is written down in :mod:`coaplayers.layer0.listeners`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from .records import client_hello_random, offers_psk, offers_raw_public_key

# Fatal handshake_failure alert in epoch 0 (RFC 6347 record, RFC 5246 alert): 15 bytes.
HANDSHAKE_FAILURE_ALERT = bytes.fromhex("15fefd" "0000" "000000000000" "0002" "0228")


class KindListener:
    """PSK, certificate and raw-public-key listeners behind one ``accept`` (any of them may
    be ``None``, not all).

    A ClientHello offering ``RawPublicKey`` as server certificate type goes to ``rpk``, one
    offering a PSK suite to ``psk``, anything else to ``certificate``; a kind the endpoint
    does not hold goes to one it does, whose handshake then fails with an alert (the client
    learns at once, rather than by timeout). Only tinydtls ignores a ClientHello without a
    PSK suite: an endpoint holding nothing else answers it with a handshake_failure alert
    itself (smaller than the ClientHello, so no amplification).
    """

    def __init__(self, *, psk: Any = None, certificate: Any = None, rpk: Any = None) -> None:
        if psk is None and certificate is None and rpk is None:
            raise ValueError("KindListener needs at least one listener")
        self.psk = psk
        self.certificate = certificate
        self.rpk = rpk

    @property
    def listeners(self) -> list[Any]:
        return [x for x in (self.psk, self.certificate, self.rpk) if x is not None]

    def _for(self, datagram: bytes) -> Any:
        if self.rpk is not None and offers_raw_public_key(datagram):
            return self.rpk
        if self.psk is not None and offers_psk(datagram):
            return self.psk
        return self.certificate or self.rpk  # None: PSK alone, and no PSK suite offered

    def accept(self, peer_key: Hashable, datagram: bytes, now: float) -> tuple[list[bytes], Any]:
        listener = self._for(datagram)
        if listener is None:
            if client_hello_random(datagram) is None:
                return [], None
            return [HANDSHAKE_FAILURE_ALERT], None
        return listener.accept(peer_key, datagram, now)
