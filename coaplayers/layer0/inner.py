"""The inner message carried in one DTLS application-data record (sans-I/O).

Layout (docs/PROTOCOL.md, "Inner message")::

    Token Length (1 byte, 0..8) | Token | Code (1 byte) | Options | [0xFF | Payload]

Everything after the token is exactly RFC 8613 section 5.3's plaintext, so aiocoap's own option
encoder does the work. The token is inside, not outer, because proxies replace outer tokens: the
client matches every answer to its request by this token, never by the outer exchange that
happened to carry it, so a proxy that swaps two answers cannot make one request see the other's
response.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiocoap import Message
from aiocoap.numbers.codes import Code

from .errors import InnerMessageError
from .profile import MAX_TOKEN_LENGTH, OUTER_ONLY_OPTIONS


@dataclass(frozen=True, slots=True)
class InnerMessage:
    token: bytes
    message: Message


def encode(token: bytes, message: Message) -> bytes:
    """Serialise ``message`` (code, options, payload) with ``token``; outer-only options refused."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise InnerMessageError(f"token of {len(token)} bytes (max {MAX_TOKEN_LENGTH})")
    if message.code is None:
        raise InnerMessageError("inner message has no code")
    bad = [o.number for o in message.opt.option_list() if int(o.number) in OUTER_ONLY_OPTIONS]
    if bad:
        raise InnerMessageError(f"outer-only options inside: {sorted(int(b) for b in bad)}")
    out: bytes = bytes([len(token)]) + token + bytes([int(message.code)]) + message.opt.encode()
    if message.payload:
        out += b"\xff" + bytes(message.payload)
    return out


def decode(data: bytes) -> InnerMessage:
    """Parse an inner message; every failure is an :class:`InnerMessageError`."""
    if len(data) < 2:
        raise InnerMessageError("inner message shorter than 2 bytes")
    tkl = data[0]
    if tkl > MAX_TOKEN_LENGTH:
        raise InnerMessageError(f"token length {tkl} > {MAX_TOKEN_LENGTH}")
    if len(data) < 2 + tkl:
        raise InnerMessageError("inner message truncated in the token")
    token = bytes(data[1 : 1 + tkl])
    code = data[1 + tkl]
    try:
        message = Message(code=Code(code))
        payload = message.opt.decode(bytes(data[2 + tkl :]))
    except Exception as exc:  # aiocoap raises assorted types for malformed options
        raise InnerMessageError(f"malformed inner options: {type(exc).__name__}") from exc
    if data[2 + tkl :].endswith(b"\xff") and not payload:
        raise InnerMessageError("payload marker followed by an empty payload")
    message.payload = bytes(payload)
    bad = [o.number for o in message.opt.option_list() if int(o.number) in OUTER_ONLY_OPTIONS]
    if bad:
        raise InnerMessageError(f"outer-only options inside: {sorted(int(b) for b in bad)}")
    return InnerMessage(token, message)


def peek_token(data: bytes) -> bytes | None:
    """The token of a possibly malformed inner message, to address an error answer to it."""
    if len(data) >= 1 and data[0] <= MAX_TOKEN_LENGTH and len(data) >= 1 + data[0]:
        return bytes(data[1 : 1 + data[0]])
    return None
