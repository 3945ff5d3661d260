"""RFC 8613 Appendix C, byte for byte, through coaplayers.oscore.SecurityContext.

The vectors (tests/oscore/vectors/rfc8613-appendix-c.json) were re-derived independently and
matched against the RFC text. Key derivation (C.1-C.3), protected requests (C.4-C.6) and
protected responses without and with an own Partial IV (C.7, C.8) all go through the same
code path the client transport and OscoreSite use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cbor2
import pytest
from aiocoap import Message
from aiocoap.message import Direction

from coaplayers.oscore import SecurityContext

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "rfc8613-appendix-c.json").read_text()
)
H = bytes.fromhex
SECRET = H(VECTORS["master_secret"])


def _context(section: str, role: str, **kw: Any) -> SecurityContext:
    vec = VECTORS[section]
    salt = b"" if vec["master_salt"] is None else H(vec["master_salt"])
    ids = vec[role]
    id_context = vec.get("id_context")
    return SecurityContext(
        master_secret=SECRET,
        master_salt=salt,
        sender_id=H(ids["sender_id"]),
        recipient_id=H(ids["recipient_id"]),
        id_context=None if id_context is None else H(id_context),
        aead=VECTORS["alg_aead"],
        **kw,
    )


def _outgoing(raw: str) -> Message:
    msg = Message.decode(H(raw))
    msg.direction = Direction.OUTGOING
    return msg


def _encode_like(protected: Message, original: Message) -> bytes:
    protected.mtype = original.mtype
    protected.mid = original.mid
    protected.token = original.token
    return protected.encode()


@pytest.mark.parametrize("section", ["C.1", "C.2", "C.3"])
def test_key_derivation(section: str) -> None:
    vec = VECTORS[section]["client"]
    ctx = _context(section, "client")
    assert ctx.sender_key.hex() == vec["sender_key"]
    assert ctx.recipient_key.hex() == vec["recipient_key"]
    assert ctx.common_iv.hex() == vec["common_iv"]
    # Nonces for Partial IV 0 of either sender.
    assert ctx._construct_nonce(b"\0", ctx.sender_id, ctx.alg_aead).hex() == (
        vec["sender_nonce_piv0"]
    )
    assert ctx._construct_nonce(b"\0", ctx.recipient_id, ctx.alg_aead).hex() == (
        vec["recipient_nonce_piv0"]
    )
    # The HKDF info structures the RFC prints, rebuilt the way aiocoap encodes them.
    id_ctx = ctx.id_context
    assert cbor2.dumps([ctx.sender_id, id_ctx, 10, "Key", 16]).hex() == vec["info_sender_key"]
    assert cbor2.dumps([ctx.recipient_id, id_ctx, 10, "Key", 16]).hex() == (
        vec["info_recipient_key"]
    )
    if "info_common_iv" in vec:
        assert cbor2.dumps([b"", id_ctx, 10, "IV", 13]).hex() == vec["info_common_iv"]


def test_server_side_of_c1_mirrors_client() -> None:
    vec = VECTORS["C.1"]["server"]
    ctx = _context("C.1", "server")
    assert ctx.sender_key.hex() == vec["sender_key"]
    assert ctx.recipient_key.hex() == vec["recipient_key"]
    assert ctx.common_iv.hex() == vec["common_iv"]


@pytest.mark.parametrize(("section", "base"), [("C.4", "C.1"), ("C.5", "C.2"), ("C.6", "C.3")])
def test_protected_request(section: str, base: str) -> None:
    vec = VECTORS[section]
    client = _context(base, "client", sender_sequence_number=vec["sender_sequence_number"])
    request = _outgoing(vec["unprotected_request"])
    protected, request_id = client.protect(request)
    assert protected.opt.oscore.hex() == vec["oscore_option"]
    assert protected.payload.hex() == vec["ciphertext"]
    assert _encode_like(protected, request).hex() == vec["protected_request"]
    assert request_id.partial_iv.hex() == vec["partial_iv"]
    assert client.sender_sequence_number == vec["sender_sequence_number"] + 1
    assert client._construct_nonce(H(vec["partial_iv"]), client.sender_id, client.alg_aead).hex() \
        == vec["nonce"]


def _server_for(base: str) -> SecurityContext:
    """C.2/C.3 list only the client; the server's context is its mirror image."""
    vec = VECTORS[base]
    client = vec["client"]
    salt = b"" if vec["master_salt"] is None else H(vec["master_salt"])
    id_context = vec.get("id_context")
    return SecurityContext(
        master_secret=SECRET,
        master_salt=salt,
        sender_id=H(client["recipient_id"]),
        recipient_id=H(client["sender_id"]),
        id_context=None if id_context is None else H(id_context),
    )


@pytest.mark.parametrize(("section", "base"), [("C.4", "C.1"), ("C.5", "C.2"), ("C.6", "C.3")])
def test_server_unprotects_request(section: str, base: str) -> None:
    vec = VECTORS[section]
    server = _server_for(base)
    inner, request_id = server.unprotect(Message.decode(H(vec["protected_request"])))
    original = Message.decode(H(vec["unprotected_request"]))
    assert inner.code == original.code
    assert inner.opt.uri_path == original.opt.uri_path == ("tv1",)
    assert request_id.partial_iv.hex() == vec["partial_iv"]


def _c7_request_id() -> Any:
    server = _context("C.1", "server")
    _, request_id = server.unprotect(Message.decode(H(VECTORS["C.4"]["protected_request"])))
    return server, request_id


def test_protected_response_without_partial_iv() -> None:
    vec = VECTORS["C.7"]
    server, request_id = _c7_request_id()
    response = _outgoing(vec["unprotected_response"])
    protected, _ = server.protect(response, request_id)
    assert protected.opt.oscore.hex() == vec["oscore_option"]
    assert protected.payload.hex() == vec["ciphertext"]
    assert _encode_like(protected, response).hex() == vec["protected_response"]
    # The response reused the request's nonce: no sequence number was consumed.
    assert server.sender_sequence_number == 0


def test_protected_response_with_own_partial_iv() -> None:
    vec = VECTORS["C.8"]
    server, request_id = _c7_request_id()
    request_id.can_reuse_nonce = False  # forces a fresh Partial IV, as in C.8
    response = _outgoing(VECTORS["C.7"]["unprotected_response"])
    protected, _ = server.protect(response, request_id)
    assert protected.opt.oscore.hex() == vec["oscore_option"]
    assert protected.payload.hex() == vec["ciphertext"]
    assert _encode_like(protected, response).hex() == vec["protected_response"]
    assert server.sender_sequence_number == 1


@pytest.mark.parametrize("section", ["C.7", "C.8"])
def test_client_unprotects_response(section: str) -> None:
    vec = VECTORS[section]
    client = _context("C.1", "client", sender_sequence_number=20)
    _, request_id = client.protect(_outgoing(VECTORS["C.4"]["unprotected_request"]))
    inner, _ = client.unprotect(Message.decode(H(vec["protected_response"])), request_id)
    assert str(inner.code) == "2.05 Content"
    assert inner.payload == b"Hello World!"
