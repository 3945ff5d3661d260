"""TLS alert levels and descriptions (RFC 5246 section 7.2, RFC 4279, RFC 7250's registry), as
named constants: code compares against ``AlertDescription.bad_certificate``, not ``42``, and
an alert prints as its name. Members are ``int`` (IntEnum), so a number from the wire compares
equal to its member; the names are the RFC's, as aioquic names its own."""

from __future__ import annotations

from enum import IntEnum


class AlertLevel(IntEnum):
    warning = 1
    fatal = 2


class AlertDescription(IntEnum):
    close_notify = 0
    unexpected_message = 10
    bad_record_mac = 20
    record_overflow = 22
    handshake_failure = 40
    bad_certificate = 42
    unsupported_certificate = 43
    certificate_revoked = 44
    certificate_expired = 45
    certificate_unknown = 46
    illegal_parameter = 47
    unknown_ca = 48
    access_denied = 49
    decode_error = 50
    decrypt_error = 51
    protocol_version = 70
    insufficient_security = 71
    internal_error = 80
    user_canceled = 90
    no_renegotiation = 100
    unsupported_extension = 110
    unknown_psk_identity = 115


CERTIFICATE_REJECTED = frozenset({
    AlertDescription.bad_certificate, AlertDescription.unsupported_certificate,
    AlertDescription.certificate_revoked, AlertDescription.certificate_expired,
    AlertDescription.certificate_unknown, AlertDescription.unknown_ca,
})
"""The peer refused our certificate or raw public key."""

HANDSHAKE_REFUSED = frozenset({
    AlertDescription.handshake_failure, AlertDescription.unknown_psk_identity,
    AlertDescription.access_denied,
})
"""The peer refused the handshake itself: no identity or suite in common."""

VERIFY_FAILED = frozenset({AlertDescription.bad_record_mac, AlertDescription.decrypt_error})
"""The peer could not check our Finished (in PSK mode: a different key)."""


def alert_name(description: int) -> str:
    """The RFC's name of an alert description, or ``alert N`` for one not listed."""
    try:
        return AlertDescription(description).name
    except ValueError:
        return f"alert {description}"


__all__ = ["CERTIFICATE_REJECTED", "HANDSHAKE_REFUSED", "VERIFY_FAILED", "AlertDescription",
           "AlertLevel", "alert_name"]
