"""The wire-format rules a listener applies before aiocoap decodes a request (screen.py)."""

from __future__ import annotations

import itertools

import pytest

from coaplayers.proxy.screen import DROP, malformed_answer, screen_request

MIDS = itertools.count(0x500)


def screen(data: bytes) -> bytes | None:
    verdict = screen_request(data, lambda: next(MIDS))
    return None if verdict is None else verdict.answer


@pytest.mark.parametrize("data", [
    bytes([0x41, 0x01, 0x12, 0x34, 0xAA]),  # a plain GET
    bytes([0x41, 0x02, 0x12, 0x34, 0xAA, 0xFF, 0x00]),  # a payload of one zero byte
    bytes([0x4C, 0x01, 0x12, 0x34]) + b"t" * 12,  # a 12-byte token
    bytes([0x40, 0x01, 0x12, 0x34, 0xD1, 0x03, 0x05]),  # Hop-Limit 5
    bytes([0x60, 0x00, 0x12, 0x34, 0xFF]),  # an ACK: not a request, aiocoap's
    bytes([0x40, 0x45, 0x12, 0x34, 0xFF]),  # a response: aiocoap's
    bytes([0x80, 0x01, 0x12, 0x34, 0xFF]),  # version 2: aiocoap ignores it
    bytes([0x40, 0x01, 0x12]),  # no message ID
])
def test_what_goes_on_to_aiocoap(data: bytes) -> None:
    assert screen(data) is None


@pytest.mark.parametrize("body", [b"\xff", b"\xf0", b"\xd5\x02a", b"\x0f"])
def test_format_errors_are_reset_in_a_con_and_dropped_in_a_non(body: bytes) -> None:
    assert screen(bytes([0x40, 0x01, 0x12, 0x34]) + body) == b"\x70\x00\x12\x34"
    assert screen(bytes([0x50, 0x01, 0x12, 0x34]) + body) == DROP


def test_tkl_15_and_a_token_past_the_end_are_format_errors() -> None:
    assert screen(bytes([0x4F, 0x01, 0x12, 0x34]) + b"x" * 20) == b"\x70\x00\x12\x34"
    assert screen(bytes([0x4D, 0x01, 0x12, 0x34, 0x05]) + b"x" * 10) == b"\x70\x00\x12\x34"
    assert screen(bytes([0x4E, 0x01, 0x12, 0x34])) == b"\x70\x00\x12\x34"


def test_an_extended_token_gets_400_with_the_token_as_it_came() -> None:
    token = bytes([0x4D, 0x01, 0x12, 0x34, 0x02]) + b"x" * 15
    assert screen(token + b"\xb1a") == b"\x6d\x80\x12\x34\x02" + b"x" * 15 + b"\xfftoken too long"
    long = bytes([0x5E, 0x01, 0x12, 0x34, 0x00, 0x01]) + b"y" * 270
    answer = screen(long)
    assert answer is not None and answer[:2] == b"\x5e\x80" and answer[2:4] != b"\x12\x34"
    assert answer[4:6 + 270] == long[4:]


@pytest.mark.parametrize("value", [b"\x00\x05", b"\x01\x00", b"\x00\x00\x10"])
def test_a_hop_limit_longer_than_a_byte_gets_400(value: bytes) -> None:
    data = bytes([0x41, 0x01, 0x12, 0x34, 0xAA, 0xD0 | len(value), 0x03]) + value
    answer = screen(data)
    assert answer is not None and answer[:5] == b"\x61\x80\x12\x34\xaa", answer
    # the diagnostic only where it keeps the answer within 3x of the request
    assert len(answer) <= 3 * len(data)


def test_an_answer_whose_payload_marker_has_no_payload_is_malformed() -> None:
    assert malformed_answer(bytes([0x50, 0x45, 0x00, 0x01, 0xFF]))
    assert malformed_answer(bytes([0x61, 0x45, 0x00, 0x01, 0xAA, 0xC1, 0x00, 0xFF]))
    assert not malformed_answer(bytes([0x50, 0x45, 0x00, 0x01, 0xFF, 0x01]))
    assert not malformed_answer(bytes([0x51, 0x45, 0x00, 0x01, 0xFF]))  # the token is 0xFF
    assert not malformed_answer(bytes([0x50, 0x45, 0x00, 0x01, 0xC1, 0xFF]))  # a value 0xFF
