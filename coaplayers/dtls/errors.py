"""Typed errors of the DTLS engine. Each says which side broke what, and the likely cause."""

from __future__ import annotations

from ..errors import CoaplayersError, LocalError, RemoteError
from .alerts import (
    CERTIFICATE_REJECTED,
    HANDSHAKE_REFUSED,
    VERIFY_FAILED,
    AlertDescription,
    alert_name,
)


class DtlsError(CoaplayersError):
    """Base class of every DTLS engine error."""


class ConfigurationError(DtlsError, LocalError):
    """Local credentials or settings are unusable (missing key, unreadable file, bad PEM)."""


class HandshakeTimeout(DtlsError, RemoteError):
    """The handshake did not finish in time.

    With PSK this is how a wrong key looks on the wire: the peer cannot decrypt our Finished
    message and drops it silently, so the message names that cause first.
    """


class AuthenticationFailed(DtlsError, RemoteError):
    """The peer was rejected, or rejected us (unknown identity, untrusted certificate, ...)."""


class PeerAlert(DtlsError, RemoteError):
    """The peer ended the session with a fatal alert."""

    def __init__(self, description: int, message: str | None = None) -> None:
        self.description = description
        super().__init__(message or f"peer sent fatal alert {alert_name(description)}")


class ProtocolViolation(DtlsError, RemoteError):
    """Received bytes are not valid DTLS (truncated record, bad length, ...)."""


class SessionClosed(DtlsError, LocalError):
    """The operation needs an open session, and this one is closed."""


class IdleTimeout(DtlsError, RemoteError):
    """The session was quiet for longer than the configured idle timeout."""


class NetworkUnreachable(DtlsError, RemoteError):
    """The local network stack refused to send to the peer (no route, host unreachable).

    ``refused`` tells a port where nothing listens (ICMP port unreachable) from a peer that
    cannot be reached at all: the first is a program not running, the second a network fault.
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


ALERT_NAMES = {int(a): a.name for a in AlertDescription}  # the enum's, by number


def alert_error(description: int, *, we_are_client: bool, raw_public_key: bool = False
                ) -> DtlsError:
    """Map a fatal alert from the peer to an error naming the likely cause (``raw_public_key``:
    we authenticate with a raw public key, RFC 7250, not a certificate)."""
    name = alert_name(description)
    if description in CERTIFICATE_REJECTED:
        side = "server" if we_are_client else "client"
        if raw_public_key:
            return AuthenticationFailed(
                f"the {side} rejected our raw public key ({name}): is it among the keys the"
                f" {side} trusts?"
            )
        return AuthenticationFailed(
            f"the {side} rejected our certificate ({name}): is it signed by a CA the peer trusts,"
            " still valid"
            + (", and issued for the name the client asked for?" if side == "client" else "?")
        )
    if description in HANDSHAKE_REFUSED:
        return AuthenticationFailed(
            f"the peer refused the handshake ({name}): likely an unknown PSK identity or no"
            " common cipher suite"
        )
    if description in VERIFY_FAILED:
        return AuthenticationFailed(
            f"the peer could not verify our handshake ({name}): likely a wrong PSK"
        )
    return PeerAlert(description)
