"""Layer 0 handshake sizes in memory (coaplayers_tools.bench.inmem): guards against regressions.

The bounds are the sizes measured when they were set, with a little room: the certificate
handshake was 1,906 bytes with OpenSSL's default hello lists and coap-keys' earlier
certificates, and a resumption took the cookie exchange (684 bytes, three round trips).
"""

from __future__ import annotations

import pytest

from coaplayers_tools.bench.handshake import profiles


@pytest.fixture(scope="module")
def sizes() -> dict:
    return profiles()


def test_certificate_handshake_size(sizes: dict) -> None:
    cert = sizes["certificate"]
    assert cert["total_bytes"] <= 1700, cert["bytes_per_message"]
    msgs = cert["bytes_per_message"]
    assert msgs["ClientHello"] <= 240  # both, trimmed groups and signature algorithms
    assert msgs["CertificateRequest"] <= 40  # one signature scheme, no CA names
    assert msgs["Certificate"] <= 800  # both minimal coap-keys certificates


def test_resumption_skips_the_cookie_exchange(sizes: dict) -> None:
    resumed = sizes["resumed"]
    assert resumed["resumed"] and not resumed["cookie_exchange"]
    assert resumed["round_trips"] == 2
    assert resumed["total_bytes"] <= 400, resumed["bytes_per_message"]
    first_up, first_down = resumed["exchanges"][0]["up"], resumed["exchanges"][0]["down"]
    assert first_down < 1.5 * first_up  # the cookie-less answer is no amplifier


def test_psk_handshake_size_is_unchanged(sizes: dict) -> None:
    assert sizes["psk"]["total_bytes"] <= 500
