"""Alerts are named by an IntEnum (RFC 5246 7.2 numbers), and the error a fatal alert maps to
names its likely cause."""

from __future__ import annotations

import pytest

from coaplayers.dtls import AlertDescription, AlertLevel, AuthenticationFailed, PeerAlert
from coaplayers.dtls.alerts import alert_name
from coaplayers.dtls.errors import alert_error


def test_members_are_the_wire_numbers() -> None:
    assert AlertDescription.close_notify == 0
    assert AlertDescription.handshake_failure == 40
    assert AlertDescription.bad_certificate == 42
    assert AlertDescription.unknown_psk_identity == 115
    assert AlertLevel.fatal == 2
    assert AlertDescription(48) is AlertDescription.unknown_ca
    assert alert_name(42) == "bad_certificate"
    assert alert_name(200) == "alert 200"  # not in the registry: still printable


@pytest.mark.parametrize(("description", "kind", "words"), [
    (AlertDescription.bad_certificate, AuthenticationFailed, "rejected our certificate"),
    (AlertDescription.unknown_ca, AuthenticationFailed, "rejected our certificate"),
    (AlertDescription.unknown_psk_identity, AuthenticationFailed, "unknown PSK identity"),
    (AlertDescription.decrypt_error, AuthenticationFailed, "wrong PSK"),
    (AlertDescription.internal_error, PeerAlert, "internal_error"),
    (201, PeerAlert, "alert 201"),
])
def test_fatal_alerts_map_to_their_cause(description: int, kind: type, words: str) -> None:
    error = alert_error(int(description), we_are_client=True)
    assert type(error) is kind
    assert words in str(error)
