"""The 3x rule's core without sockets: Echo values, verified addresses, cut blocks, trimmed
errors, challenges and held answers (coaplayers.amplification)."""

from __future__ import annotations

import pytest
from aiocoap import CHANGED, CONTENT, GET, NOT_FOUND, POST, UNAUTHORIZED, Message
from aiocoap.optiontypes import BlockOption, OpaqueOption

from coaplayers.amplification import (
    ECHO_LENGTH,
    AmplificationGuard,
    AmplificationLimits,
    options_size,
    wire_size,
)

A = ("192.0.2.1", 40000)
B = ("192.0.2.1", 40001)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def request(code: object = GET, payload: bytes = b"", **options: object) -> Message:
    m = Message(code=code, payload=payload, uri_path=("firmware",), **options)
    m.token = b"12345678"
    return m


def test_echo_values_are_per_address_and_expire() -> None:
    clock = Clock()
    guard = AmplificationGuard(AmplificationLimits(echo_lifetime=60), clock=clock)
    value = guard.echo_for(A)
    assert len(value) == ECHO_LENGTH
    assert not guard.check_echo(B, value)  # made for another address
    assert not guard.check_echo(A, value[:-1] + bytes([value[-1] ^ 1]))
    assert not guard.is_verified(A)
    clock.now += 61
    assert not guard.check_echo(A, value)  # too old
    fresh = guard.echo_for(A)
    assert guard.check_echo(A, fresh) and guard.is_verified(A) and not guard.is_verified(B)
    # Another process (another key) does not take it.
    assert not AmplificationGuard(clock=clock).check_echo(A, fresh)


def test_verified_addresses_are_bounded_and_lapse_unused() -> None:
    clock = Clock()
    guard = AmplificationGuard(
        AmplificationLimits(verified_lifetime=100, verified_addresses=2), clock=clock)
    for address in (A, B, ("192.0.2.9", 1)):
        assert guard.check_echo(address, guard.echo_for(address))
    assert not guard.is_verified(A)  # the oldest one was forgotten
    assert guard.is_verified(B)
    clock.now += 90
    assert guard.is_verified(B)  # used: good for another 100 s
    clock.now += 90
    assert guard.is_verified(B) and not guard.is_verified(("192.0.2.9", 1))


def firmware_block(number: int = 0, more: bool = True) -> Message:
    answer = Message(code=CONTENT, payload=bytes(range(256)) * 4)
    answer.opt.block2 = BlockOption.BlockwiseTuple(number, more, 6)
    answer.opt.size2 = 65536
    return answer


def test_a_large_block_is_cut_to_fit_three_times_the_request() -> None:
    guard = AmplificationGuard()
    req = request()
    budget = 3 * wire_size(req, 8)
    assert guard.budget(req) == budget
    cut = guard.fit(A, req, firmware_block(3))
    assert wire_size(cut, 8) <= budget and cut.code == CONTENT
    b = cut.opt.block2
    assert b is not None and b.more and b.size < 1024
    assert b.block_number * b.size == 3 * 1024  # the same offset, in smaller blocks
    assert cut.payload == bytes(range(256))[: b.size] and cut.opt.size2 == 65536
    assert guard.counts["cut"] == 1
    # A small answer, or any answer once the address is verified upstream of fit(), passes.
    small = Message(code=CONTENT, payload=b"21.5 C")
    assert guard.fit(A, req, small) is small


def test_a_whole_get_answer_is_sliced_at_the_block_asked_for() -> None:
    guard = AmplificationGuard()
    whole = Message(code=CONTENT, payload=bytes(range(256)) * 4)
    req = request(block2=BlockOption.BlockwiseTuple(5, False, 2))  # bytes 320..383
    cut = guard.fit(A, req, whole)
    b = cut.opt.block2
    assert b is not None and b.block_number * b.size == 320 and b.more
    assert cut.payload == whole.payload[320:320 + b.size]
    # Not for a proxy's relayed answer (it does not cut what its upstream sent whole).
    assert guard.fit(A, request(), whole, cut_unblocked=False).code == UNAUTHORIZED


def test_errors_lose_diagnostic_bytes_not_their_code() -> None:
    guard = AmplificationGuard()
    req = request()
    answer = guard.fit(A, req, Message(code=NOT_FOUND, payload=b"x" * 500))
    assert answer.code == NOT_FOUND and 0 < len(answer.payload) < 500
    assert wire_size(answer, 8) <= guard.budget(req)


def test_other_large_answers_are_challenged_and_held_for_the_repetition() -> None:
    guard = AmplificationGuard()
    req = request(POST, b"hi")
    big = Message(code=CHANGED, payload=b"y" * 900)
    challenge = guard.fit(A, req, big)
    assert challenge.code == UNAUTHORIZED and challenge.opt.echo is not None
    assert wire_size(challenge, 8) <= guard.budget(req)
    assert guard.counts["challenged"] == 1
    again = request(POST, b"hi", echo=challenge.opt.echo)
    again.token = b"other"
    different = request(POST, b"ho", echo=challenge.opt.echo)
    assert guard.take_held(A, different) is None  # another request gets nothing held ...
    assert guard.check_echo(A, challenge.opt.echo)
    assert guard.take_held(B, again) is None  # ... nor does another address
    assert guard.take_held(A, again) is big
    assert guard.take_held(A, again) is None  # once


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        AmplificationLimits(factor=0.5)
    with pytest.raises(ValueError):
        AmplificationLimits(held_answers=-1)


def test_a_get_asks_for_blocks_that_fit_before_it_is_answered() -> None:
    guard = AmplificationGuard()
    req = request()  # 21 bytes: 63 to spend, 8 on the token, some on the options
    guard.ask_small_blocks(req)
    b = req.opt.block2
    assert b is not None and (b.block_number, b.size) == (0, 32)
    # A client's own larger block at the same offset, in the smaller size; a smaller one kept.
    big = request(block2=BlockOption.BlockwiseTuple(3, False, 6))
    guard.ask_small_blocks(big)
    assert big.opt.block2.block_number * big.opt.block2.size == 3 * 1024
    small = request(block2=BlockOption.BlockwiseTuple(3, False, 0))
    guard.ask_small_blocks(small)
    assert small.opt.block2 == BlockOption.BlockwiseTuple(3, False, 0)
    # Into the forwarded copy, never for a POST.
    out = request()
    guard.ask_small_blocks(request(), out)
    assert out.opt.block2 is not None
    post = request(POST, b"x")
    guard.ask_small_blocks(post)
    assert post.opt.block2 is None


def test_options_size_is_the_encoded_length() -> None:
    """The size is computed without encoding; it must match the encoding byte for byte
    (option deltas and lengths at the 13 and 269 boundaries, repeated and empty options)."""
    for length in (0, 1, 12, 13, 14, 268, 269, 270, 600):
        for number in (1, 12, 13, 14, 268, 269, 270, 2049, 65000):
            m = request(GET, b"x", uri_port=5683, observe=0)
            m.opt.add_option(OpaqueOption(number, b"v" * length))
            m.opt.add_option(OpaqueOption(number, b""))
            assert options_size(m.opt) == len(m.opt.encode()), (number, length)
    m = request(POST, b"p" * 40, proxy_scheme="coap", uri_host="127.0.0.1", uri_port=40000)
    m.mtype, m.mid = 0, 1
    assert wire_size(m, len(m.token)) == len(m.encode())
