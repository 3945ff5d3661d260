"""Typed errors of the DTLS engine. Each says which side broke what, and the likely cause."""

from __future__ import annotations

from ..errors import CoaplayersError, LocalError, RemoteError


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
    """The local network stack refused to send to the peer (no route, host unreachable)."""


ALERT_NAMES = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    22: "record_overflow",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    90: "user_canceled",
    100: "no_renegotiation",
    110: "unsupported_extension",
    115: "unknown_psk_identity",
}


def alert_name(description: int) -> str:
    return ALERT_NAMES.get(description, f"alert {description}")


def alert_error(description: int, *, we_are_client: bool, raw_public_key: bool = False
                ) -> DtlsError:
    """Map a fatal alert from the peer to an error naming the likely cause (``raw_public_key``:
    we authenticate with a raw public key, RFC 7250, not a certificate)."""
    name = alert_name(description)
    if description in (42, 43, 44, 45, 46, 48):
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
    if description in (40, 115, 49):
        return AuthenticationFailed(
            f"the peer refused the handshake ({name}): likely an unknown PSK identity or no"
            " common cipher suite"
        )
    if description in (20, 51):
        return AuthenticationFailed(
            f"the peer could not verify our handshake ({name}): likely a wrong PSK"
        )
    return PeerAlert(description)
