"""Events a :class:`~coaplayers.dtls.DtlsSession` reports, as small immutable records."""

from __future__ import annotations

from dataclasses import dataclass

from .alerts import AlertLevel
from .errors import DtlsError


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every engine event."""


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """The handshake finished; ``peer_identity`` is what authenticated the peer.

    For PSK that is the PSK identity (bytes), for certificates the subject common name of the
    verified peer certificate (or ``None`` when the peer did not present one, which only a
    server that does not require client certificates allows).
    """

    peer_identity: bytes | str | None
    cipher_suite: str
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class ApplicationData(Event):
    """One decrypted application-data record."""

    data: bytes


@dataclass(frozen=True, slots=True)
class AlertReceived(Event):
    """The peer sent an alert (RFC 5246 section 7.2 numbering: :mod:`.alerts` names them)."""

    level: int
    description: int

    @property
    def fatal(self) -> bool:
        return self.level == AlertLevel.fatal


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The session is over. ``error`` is ``None`` for an orderly close_notify."""

    error: DtlsError | None = None
