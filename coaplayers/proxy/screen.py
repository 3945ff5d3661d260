"""What a listener answers before a request is decoded: the wire-format rules aiocoap's
decoder does not apply.

aiocoap reads a payload marker without a payload as no payload, takes any token length up to
15 from the header's 4 bits, and keeps an option's value but not its length (a Hop-Limit of
``00 05`` is 5 to it). RFC 7252 3 and 5.3.1, RFC 8768 3 and RFC 8974 2 say otherwise, so the
datagram is looked at here first, on both ways of forwarding (the fast path forwards none of
these; what it declines is screened before aiocoap gets it).

Pure function of the datagram (no state, no clock): the same datagram always gets the same
answer, so a duplicate needs no table.
"""

from __future__ import annotations

from collections.abc import Callable

from .fastpath import Malformed, parse_options

CON, NON = 0, 1
BAD_REQUEST = 0x80  # 4.00
OPT_HOP_LIMIT = 16
MAX_TOKEN = 12
"""The longest token the proxy takes (TKL 0-12): longer RFC 8974 tokens get 4.00."""

DROP = b""
"""The verdict for a datagram that is ignored (a NON with a format error)."""


class Verdict:
    """Why a request was answered here: ``kind`` for the metric, ``answer`` the datagram."""

    __slots__ = ("answer", "kind")

    def __init__(self, answer: bytes, kind: str) -> None:
        self.answer = answer
        self.kind = kind


def screen_request(data: bytes, next_mid: Callable[[], int],
                   factor: float = 3.0) -> Verdict | None:
    """The answer to a request datagram that must not be routed, or None (it goes on).

    - A message format error (RFC 7252 3: a payload marker followed by no payload, an option
      delta or length nibble of 15, an option running past the end; RFC 8974 2.1: TKL 15):
      a CON is rejected with an RST of its message ID (RFC 7252 4.2), a NON ignored (4.3).
    - A token longer than :data:`MAX_TOKEN` (RFC 8974 TKL 13 or 14): 4.00 with the token
      echoed. The proxy takes tokens of 9 to 12 bytes, so to a client discovering support
      (RFC 8974 2.2.2) it is a server that supports extended tokens, which "MUST NOT
      reject the message" for a length it cannot handle and "SHOULD return a 4.00 (Bad
      Request)" when it never will.
    - A Hop-Limit whose value is not one byte (RFC 8768 3: length 1, values 1 to 255): 4.00,
      as for the values 0 and above 255 (a longer encoding would otherwise pass as its
      number, or be forwarded unchanged as an unrecognised option, RFC 7252 5.4.3, and loops
      would go undetected).

    Other datagrams (responses, empty messages, versions other than 1, fewer than 4 bytes)
    go on to aiocoap's message layer, which answers or ignores them. An answer's diagnostic
    payload is left out where it would take the answer beyond ``factor`` times the request.
    """
    if len(data) < 4 or data[0] >> 6 != 1:
        return None
    mtype = (data[0] >> 4) & 3
    code = data[1]
    if mtype > NON or not 1 <= code < 32:
        return None
    tkl = data[0] & 0x0F
    token_at = 4
    if tkl == 13 and len(data) > 4:
        tkl, token_at = data[4] + 13, 5
    elif tkl == 14 and len(data) > 5:
        tkl, token_at = (data[4] << 8 | data[5]) + 269, 6
    elif tkl >= 13:
        return _reject(data, mtype)
    if token_at + tkl > len(data):
        return _reject(data, mtype)
    try:
        options, _ = parse_options(data, token_at + tkl)
    except (Malformed, IndexError):
        return _reject(data, mtype)
    if tkl > MAX_TOKEN:
        return _bad_request(data, mtype, data[4:token_at + tkl], b"token too long",
                            next_mid, factor, "bad_request")
    for number, value in options:
        if number == OPT_HOP_LIMIT and len(value) > 1:
            return _bad_request(data, mtype, data[4:token_at + tkl],
                                b"Hop-Limit must be 1..255", next_mid, factor, "bad_request")
        if number > OPT_HOP_LIMIT:
            break
    return None


def malformed_answer(data: bytes) -> bool:
    """Whether an upstream's datagram has a message format error in its options or payload
    marker (RFC 7252 3), for aiocoap's path (``_aiocoap.reject_malformed_responses``); the
    fast path finds the same with its own parse and answers 5.02."""
    tkl = data[0] & 0x0F
    if tkl > 8:
        return False  # (not an answer to any token of ours)
    try:
        parse_options(data, 4 + tkl)
    except (Malformed, IndexError):
        return True
    return False


def _reject(data: bytes, mtype: int) -> Verdict:
    if mtype == CON:
        return Verdict(bytes((0x70, 0)) + data[2:4], "malformed")  # RST, its message ID
    return Verdict(DROP, "malformed")


def _bad_request(data: bytes, mtype: int, token_field: bytes, diagnostic: bytes,
                 next_mid: Callable[[], int], factor: float, kind: str) -> Verdict:
    """4.00 piggybacked on the ACK of a CON, or as a NON; ``token_field`` is the token as it
    came, with its RFC 8974 length bytes."""
    mid = data[2:4] if mtype == CON else next_mid().to_bytes(2, "big")
    head = bytes((0x40 | (2 if mtype == CON else NON) << 4 | (data[0] & 0x0F), BAD_REQUEST))
    answer = head + mid + token_field
    if len(answer) + 1 + len(diagnostic) <= factor * len(data):
        answer += b"\xff" + diagnostic
    return Verdict(answer, kind)


__all__ = ["DROP", "MAX_TOKEN", "Verdict", "malformed_answer", "screen_request"]
