"""The 3x rule: an address that has not shown it receives gets at most three times what it sent.

UDP source addresses are not verified, so without a limit a 41-byte ``GET /firmware`` with a
forged source makes a server (or a proxy) send a block of about 1,040 bytes to a victim: 25x
reflection. Following RFC 9175 section 2.4 (and QUIC's rule for unvalidated addresses), a
response to an unverified address stays within ``factor`` times the request's size on the
wire. So

* a GET or FETCH asks, before it is answered, for Block2 blocks that fit (``ask_small_blocks``;
  the resource or upstream cuts its answer and serves the next blocks, RFC 7959 2.4), and a
  block that is still too large is cut to a smaller one at the same offset;
* an error keeps its code and loses diagnostic bytes;
* anything else is replaced by 4.01 Unauthorized with an Echo option (RFC 9175), and the
  answer is held: a client that repeats the request with that value has shown that it receives
  at its address, and gets the held answer without the request being processed again.

An address is verified by a Layer 1 session (its cookie exchange) or by an echoed Echo value;
the latter is remembered (``verified_addresses`` entries, LRU, each for ``verified_lifetime``
seconds from its last use). Echo values are stateless: four bytes of the time they were made and
eight bytes of HMAC-SHA256 over that time and the address, under a key each process draws at
start, so a value is good only for the address it was sent to and only for ``echo_lifetime``.

Sans-I/O: sizes, clock and addresses in, decisions out; ``guard_pipe`` is the thin aiocoap
adapter that coap-server and coap-proxy put in front of what they answer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from aiocoap.pipe import Pipe

ECHO_LENGTH = 12
_CUTTABLE = frozenset({Code.GET, Code.FETCH})
# What a block's answer carries besides its payload, at most, in the usual case: header, payload
# marker and options such as Content-Format, ETag, Block2, Size2 (the token is counted apart).
_ANSWER_OVERHEAD = 14


@dataclass(frozen=True, slots=True)
class AmplificationLimits:
    """How much an unverified address may get back, and how long verification lasts."""

    factor: float = 3.0
    #: seconds an Echo value is accepted after it was sent
    echo_lifetime: float = 300.0
    #: seconds an address that echoed stays verified after its last request
    verified_lifetime: float = 600.0
    #: addresses remembered as verified (least recently used forgotten first)
    verified_addresses: int = 4096
    #: answers held for a challenged request until it is repeated with the Echo value (so
    #: that it is neither processed nor forwarded twice; oldest dropped first)
    held_answers: int = 256

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError("amplification factor must be >= 1")
        if self.echo_lifetime <= 0 or self.verified_lifetime < 0:
            raise ValueError("echo_lifetime must be > 0 and verified_lifetime >= 0")
        if self.verified_addresses < 0 or self.held_answers < 0:
            raise ValueError("verified_addresses and held_answers must be >= 0")


def wire_size(message: Message, token_length: int) -> int:
    """The datagram size of ``message`` with a token of ``token_length`` bytes."""
    payload = len(message.payload)
    return 4 + token_length + options_size(message.opt) + (1 + payload if payload else 0)


def options_size(options: Any) -> int:
    """``len(options.encode())`` without building the bytes (RFC 7252 3.1): it is asked for
    every request from an address not yet verified."""
    size = 0
    last = 0
    for option in options.option_list():
        number = option.number
        length = len(option.encode())
        delta = number - last
        size += (1 + length + (0 if delta < 13 else 1 if delta < 269 else 2)
                 + (0 if length < 13 else 1 if length < 269 else 2))
        last = number
    return size


class AmplificationGuard:
    """Echo values, the verified addresses, and the fitting of responses (module docstring)."""

    def __init__(self, limits: AmplificationLimits | None = None, *,
                 clock: Callable[[], float] = time.time, key: bytes | None = None,
                 on_action: Callable[[str], None] | None = None) -> None:
        self.limits = limits or AmplificationLimits()
        self.clock = clock
        self._key = key or secrets.token_bytes(32)
        self._verified: OrderedDict[Hashable, float] = OrderedDict()
        #: what was done to unverified addresses' answers ("cut", "trimmed", "challenged") and
        #: how many addresses echoed ("verified"), for metrics and tests
        self.counts = {"cut": 0, "trimmed": 0, "challenged": 0, "verified": 0}
        self.on_action = on_action
        # (address, Echo value) -> (request digest, the answer, until when)
        self._held: OrderedDict[tuple[Hashable, bytes], tuple[bytes, Message, float]] = (
            OrderedDict())

    def _count(self, action: str) -> None:
        self.counts[action] += 1
        if self.on_action is not None:
            self.on_action(action)

    # -- Echo values ----------------------------------------------------------------------

    def _mac(self, address: Hashable, stamp: bytes) -> bytes:
        return hmac.new(self._key, stamp + repr(address).encode(), hashlib.sha256).digest()[:8]

    def echo_for(self, address: Hashable) -> bytes:
        stamp = struct.pack("!I", int(self.clock()) & 0xFFFFFFFF)
        return stamp + self._mac(address, stamp)

    def check_echo(self, address: Hashable, value: bytes) -> bool:
        """Whether ``value`` is a fresh Echo value made for ``address``; if so, it is verified."""
        if len(value) != ECHO_LENGTH:
            return False
        stamp, mac = value[:4], value[4:]
        if not hmac.compare_digest(mac, self._mac(address, stamp)):
            return False
        age = (int(self.clock()) - struct.unpack("!I", stamp)[0]) & 0xFFFFFFFF
        if age > self.limits.echo_lifetime:
            return False
        self.mark_verified(address)
        return True

    # -- verified addresses ---------------------------------------------------------------

    def mark_verified(self, address: Hashable) -> None:
        if self.limits.verified_addresses == 0:
            return
        verified = self._verified
        verified[address] = self.clock() + self.limits.verified_lifetime
        verified.move_to_end(address)
        while len(verified) > self.limits.verified_addresses:
            verified.popitem(last=False)
        self._count("verified")

    def is_verified(self, address: Hashable) -> bool:
        """Whether ``address`` echoed recently; using it keeps it verified longer."""
        until = self._verified.get(address)
        if until is None:
            return False
        now = self.clock()
        if until < now:
            del self._verified[address]
            return False
        self._verified[address] = now + self.limits.verified_lifetime
        self._verified.move_to_end(address)
        return True

    # -- responses ------------------------------------------------------------------------

    def budget(self, request: Message) -> int:
        return int(self.limits.factor * wire_size(request, len(request.token)))

    def fits(self, request: Message, response: Message) -> bool:
        """Whether ``response`` may go to ``request``'s unverified sender as it is."""
        return wire_size(response, len(request.token)) <= self.budget(request)

    def ask_small_blocks(self, request: Message, into: Message | None = None) -> None:
        """Ask for the answer of a GET or FETCH in blocks that fit the budget (Block2 set in
        ``into``, the request itself or the one forwarded for it).

        The server then cuts the answer itself and serves the following blocks as it does for
        any client that asks for small blocks (RFC 7959 2.4); an answer cut afterwards would
        leave the next blocks to a server that may keep no copy of an answer it sent whole.
        """
        if request.code not in _CUTTABLE or request.opt.oscore is not None:
            return
        room = self.budget(request) - len(request.token) - _ANSWER_OVERHEAD
        exponent = 0
        while exponent < 6 and 16 << (exponent + 1) <= room:
            exponent += 1
        target = into if into is not None else request
        asked = target.opt.block2
        if asked is None:
            target.opt.block2 = BlockOption.BlockwiseTuple(0, False, exponent)
        elif asked.size_exponent > exponent:
            target.opt.block2 = BlockOption.BlockwiseTuple(
                asked.block_number << (asked.size_exponent - exponent), False, exponent)

    def challenge(self, address: Hashable, request: Message | None = None,
                  answer: Message | None = None) -> Message:
        """4.01 with an Echo value: repeat the request with it to show you receive here.

        ``answer``, the answer the request got, is held for the repetition (``take_held``).
        """
        self._count("challenged")
        echo = self.echo_for(address)
        if request is not None and answer is not None and self.limits.held_answers:
            held = self._held
            held[(address, echo)] = (_digest(request), answer,
                                     self.clock() + self.limits.echo_lifetime)
            while len(held) > self.limits.held_answers:
                held.popitem(last=False)
        return Message(code=Code.UNAUTHORIZED, echo=echo)

    def take_held(self, address: Hashable, request: Message) -> Message | None:
        """The answer held for ``request``, repeated with the Echo value of its challenge."""
        echo = request.opt.echo
        if echo is None or not self._held:
            return None
        key = (address, echo)
        entry = self._held.get(key)
        if entry is None or entry[0] != _digest(request):
            return None
        del self._held[key]
        return entry[1] if entry[2] >= self.clock() else None

    def fit(self, address: Hashable, request: Message, response: Message, *,
            cut_unblocked: bool = True, budget: int | None = None) -> Message:
        """``response`` if it is within the budget, else a smaller block of it or a challenge.

        ``cut_unblocked``: whether a GET answer without Block2 may be cut too: the block the
        request asked for (or the first) is sliced out of the whole answer, which a server
        renders again for each block request, and which a proxy's upstream sends again.
        """
        if budget is None:
            budget = self.budget(request)
        token_length = len(request.token)
        if wire_size(response, token_length) <= budget:
            return response
        cut = self._cut(request, response, budget, token_length, cut_unblocked,
                        request.opt.block2)
        if cut is not None:
            self._count("cut")
            return cut
        if not response.code.is_successful() and response.opt.oscore is None:
            # An error's payload is a diagnostic (RFC 7252 5.5.2): shortened, not challenged,
            # so that the client still learns the code.
            bare = Message(code=response.code)
            for option in response.opt.option_list():
                bare.opt.add_option(option)
            room = budget - wire_size(bare, token_length) - 1
            bare.payload = response.payload[:room] if room > 0 else b""
            self._count("trimmed")
            return bare
        return self.challenge(address, request, response)

    @staticmethod
    def _cut(request: Message, response: Message, budget: int, token_length: int,
             cut_unblocked: bool, asked: Any) -> Message | None:
        if (not response.code.is_successful() or response.opt.observe is not None
                or response.opt.oscore is not None):
            return None
        block = response.opt.block2
        if block is not None:  # a block of the answer (any method): a smaller piece of it
            offset = block.block_number * block.size
            data, more_after, top = response.payload, block.more, block.size_exponent - 1
        elif cut_unblocked and request.code in _CUTTABLE:
            # The whole answer of a GET: the block asked for (or the first), the rest again.
            offset = asked.block_number * asked.size if asked is not None else 0
            top = asked.size_exponent if asked is not None else 6
            data, more_after = response.payload[offset:], False
        else:
            return None
        for exponent in range(min(top, 6), -1, -1):
            size = 16 << exponent
            piece = Message(code=response.code, payload=data[:size])
            for option in response.opt.option_list():
                piece.opt.add_option(option)
            piece.opt.block2 = BlockOption.BlockwiseTuple(
                offset // size, more_after or len(data) > size, exponent)
            if wire_size(piece, token_length) <= budget:
                return piece
        return None


def _digest(request: Message) -> bytes:
    """What identifies a request across its repetition with an Echo value (which it leaves out,
    with the message ID and the token)."""
    h = hashlib.sha256(bytes([int(request.code)]))
    for option in request.opt.option_list():
        if option.number != 252:  # Echo
            value = option.encode()
            h.update(struct.pack("!HH", int(option.number), len(value)) + value)
    h.update(b"\xff" + request.payload)
    return h.digest()


def plain_address(remote: Any) -> Hashable | None:
    """The address of a plain UDP remote (None for Layer 1, Layer 0 and OSCORE remotes,
    whose addresses a handshake or a key verified)."""
    # Not imported here: a process without aiocoap's UDP transport has no such remote (and
    # an import statement on every request costs more than the rest of this function).
    udp6 = sys.modules.get("aiocoap.transports.udp6")
    if udp6 is not None and isinstance(remote, udp6.UDP6EndpointAddress):
        return tuple(remote.sockaddr[:2])
    return None


def guard_pipe(pipe: Pipe, guard: AmplificationGuard, address: Hashable, log: Any, *,
               cut_unblocked: bool = True) -> Pipe:
    """A pipe for the responder whose answers reach ``pipe`` fitted to the 3x rule.

    For a request from an unverified plain address; exceptions and loss of interest pass
    through unchanged (aiocoap renders exceptions as small error answers).
    """
    request = pipe.request
    budget = guard.budget(request)  # of the request as it came, before any Block2 is added
    inner = Pipe(request, log)

    def on_event(event: Any) -> bool:
        if event.message is None:
            pipe.add_exception(event.exception)
            return False
        fitted = guard.fit(address, request, event.message, cut_unblocked=cut_unblocked,
                           budget=budget)
        last = event.is_last or fitted.code == Code.UNAUTHORIZED
        pipe.add_response(fitted, last)
        return not last

    remove = inner.on_event(on_event)
    pipe.on_interest_end(remove)
    return inner


def guarded(pipe: Pipe, guard: AmplificationGuard | None, log: Any, *,
            cut_unblocked: bool = True) -> Pipe | None:
    """``pipe`` itself for a verified or non-plain requester, else a 3x-fitted one; None when
    the request was answered here (the repetition of a challenged request: its held answer).

    An Echo value of ours in the request verifies its address first (the request then gets
    its full answer).
    """
    if guard is None:
        return pipe
    request = pipe.request
    address = plain_address(request.remote)
    if address is None:
        return pipe
    echo = request.opt.echo
    if echo is not None and guard.check_echo(address, echo):
        held = guard.take_held(address, request)
        if held is not None:
            pipe.add_response(held, is_last=True)
            return None
        return pipe
    if guard.is_verified(address):
        return pipe
    guarded_pipe = guard_pipe(pipe, guard, address, log, cut_unblocked=cut_unblocked)
    guard.ask_small_blocks(request)
    return guarded_pipe
