"""One endpoint serving several kinds of credentials: each ClientHello picks its backend.

Used by both layers (Layer 0's endpoint, Layer 1's ``coaps://`` sockets); the dispatch
is written down in :mod:`coaplayers.layer0.listeners`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

from .records import client_hello_random, offered_suites, offers_psk, offers_raw_public_key
from .session import DtlsSession

# Fatal handshake_failure alert in epoch 0 (RFC 6347 record, RFC 5246 alert): 15 bytes.
HANDSHAKE_FAILURE_ALERT = bytes.fromhex("15fefd" "0000" "000000000000" "0002" "0228")


class SessionListener(Protocol):
    """What every backend's listener offers: sessions from ClientHellos, cookie first."""

    def accept(
        self, peer_key: Hashable, datagram: bytes, now: float
    ) -> tuple[list[bytes], DtlsSession | None]: ...


class KindListener:
    """PSK, certificate and raw-public-key listeners behind one ``accept`` (any of them may
    be ``None``, not all).

    A ClientHello offering ``RawPublicKey`` as server certificate type goes to ``rpk``, one
    offering a PSK suite to ``psk``, anything else to ``certificate``; a kind the endpoint
    does not hold goes to one it does, whose handshake then fails with an alert (the client
    learns at once, rather than by timeout). Only tinydtls ignores a ClientHello without a
    suite it has (it has one, TLS_PSK_WITH_AES_128_CCM_8): such a hello goes to another kind,
    and an endpoint holding nothing else answers it with a handshake_failure alert itself
    (smaller than the ClientHello, so no amplification).
    """

    def __init__(self, *, psk: SessionListener | None = None,
                 certificate: SessionListener | None = None,
                 rpk: SessionListener | None = None) -> None:
        if psk is None and certificate is None and rpk is None:
            raise ValueError("KindListener needs at least one listener")
        self.psk = psk
        self.certificate = certificate
        self.rpk = rpk

    @property
    def listeners(self) -> list[SessionListener]:
        return [x for x in (self.psk, self.certificate, self.rpk) if x is not None]

    def _for(self, datagram: bytes) -> SessionListener | None:
        if self.rpk is not None and offers_raw_public_key(datagram):
            return self.rpk
        if self.psk is not None and offers_psk(datagram):
            # A backend that names its suites (tinydtls: CCM_8 only) gets only hellos it can
            # serve; tinydtls drops the others without a word, so the client would time out.
            served = getattr(self.psk, "cipher_suites", None)
            if served is None or not offered_suites(datagram).isdisjoint(served):
                return self.psk
        # None: nothing here serves that hello (PSK alone, and no PSK suite it has offered)
        return self.certificate or self.rpk

    def accept(
        self, peer_key: Hashable, datagram: bytes, now: float
    ) -> tuple[list[bytes], DtlsSession | None]:
        listener = self._for(datagram)
        if listener is None:
            if client_hello_random(datagram) is None:
                return [], None
            return [HANDSHAKE_FAILURE_ALERT], None
        return listener.accept(peer_key, datagram, now)
