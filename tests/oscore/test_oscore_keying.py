"""Keying from the Layer 0 handshake: the parameter CBOR, the exporter split, and a real
(in-memory) OpenSSL DTLS 1.2 handshake whose exporter keys both ends. No sockets."""

from __future__ import annotations

import datetime

import aiocoap
import cbor2
import pytest
from aiocoap import Message
from aiocoap.message import Direction
from aiocoap.numbers.codes import GET
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from coaplayers.oscore import (
    EXPORTER_LABEL,
    KeyingError,
    OscoreParameters,
    ParameterError,
    Role,
    derive_context,
    export_keying_material,
    exporter_length,
    split_exporter,
)

# -- parameters ----------------------------------------------------------------------


def test_minimal_parameters_are_six_bytes() -> None:
    params = OscoreParameters(client_id=b"\x01", server_id=b"")
    # {7: h'01', 8: h''}
    assert params.to_cbor() == bytes.fromhex("a2074101" "0840")
    assert OscoreParameters.from_cbor(params.to_cbor()) == params


def test_all_fields_round_trip_in_key_order() -> None:
    params = OscoreParameters(
        client_id=b"\xaa\xbb", server_id=b"\x01", aead=1, hkdf=-11, id_context=b"ctx"
    )
    data = params.to_cbor()
    assert list(cbor2.loads(data)) == [3, 4, 6, 7, 8]
    assert OscoreParameters.from_cbor(data) == params
    # Default values written out explicitly are accepted (still deterministic).
    explicit = bytes.fromhex("a4" "0329" "040a" "074101" "0840")
    assert OscoreParameters.from_cbor(explicit) == OscoreParameters(b"\x01", b"")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (bytes.fromhex("a2074101"), "truncated"),
        (bytes.fromhex("a207410108400a"), "trailing bytes"),
        (bytes.fromhex("82074101"), "array, not map"),
        (bytes.fromhex("a1074101"), "server_id missing"),
        (bytes.fromhex("a1084101"), "client_id missing"),
        (bytes.fromhex("a3074101084009f5"), "unknown key 9"),
        (bytes.fromhex("a30250000000000000000000000000000000000741010840"), "master secret"),
        (bytes.fromhex("a2084007 4101".replace(" ", "")), "keys out of order"),
        (bytes.fromhex("a3074101074102 0840".replace(" ", "")), "duplicate key"),
        (bytes.fromhex("a218074101 0840".replace(" ", "")), "non-shortest key"),
        (bytes.fromhex("bf07410108 40ff".replace(" ", "")), "indefinite-length map"),
        (bytes.fromhex("a207610108 40".replace(" ", "")), "text instead of bytes"),
        (bytes.fromhex("a207410108 41 01".replace(" ", "")), "equal IDs"),
        (bytes.fromhex("a3 04 18 63 07 41 01 08 40".replace(" ", "")), "unknown AEAD 99"),
        (bytes.fromhex("a3 03 05 07 41 01 08 40".replace(" ", "")), "unknown HKDF 5"),
        (bytes.fromhex("a2 07 48 0102030405060708 08 40".replace(" ", "")), "8-byte ID"),
        (bytes.fromhex("a3 04 0c 07 42 0102 08 40".replace(" ", "")), "ID too long for CCM-64"),
        (bytes.fromhex("a2 07 41 01 08 f6".replace(" ", "")), "null server_id"),
        (bytes.fromhex("a3 04 f5 07 41 01 08 40".replace(" ", "")), "bool alg"),
        (bytes.fromhex("a2 07 c2 41 01 08 40".replace(" ", "")), "tagged bytes"),
        (bytes.fromhex("a2 f5 41 01 08 40".replace(" ", "")), "non-integer key"),
    ],
)
def test_malformed_parameters_are_rejected(data: bytes, why: str) -> None:
    with pytest.raises(ParameterError):
        OscoreParameters.from_cbor(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_parser_raises_only_parameter_error(data: bytes) -> None:
    try:
        params = OscoreParameters.from_cbor(data)
    except ParameterError:
        return
    # Anything accepted is a deterministic map that means the same after a round trip.
    assert isinstance(cbor2.loads(data), dict)
    assert OscoreParameters.from_cbor(params.to_cbor()) == params


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=0, max_size=7),
    st.binary(min_size=0, max_size=7),
    st.sampled_from([10, 11, 1, 2, 3, 24]),
    st.sampled_from([-10, -11]),
    st.none() | st.binary(max_size=32),
)
def test_parameters_round_trip(cid: bytes, sid: bytes, aead: int, hkdf: int,
                               idc: bytes | None) -> None:
    try:
        params = OscoreParameters(cid, sid, aead, hkdf, idc)
    except ParameterError:
        assert cid == sid or max(len(cid), len(sid)) > 6  # GCM/ChaCha: 12-byte nonce
        return
    assert OscoreParameters.from_cbor(params.to_cbor()) == params


# -- exporter split and derivation ----------------------------------------------------


def test_exporter_length_and_split() -> None:
    params = OscoreParameters(b"\x01", b"")
    assert EXPORTER_LABEL == b"atls-oscore"
    assert exporter_length(params) == 32
    assert exporter_length(OscoreParameters(b"\x01", b"", aead=3)) == 64  # A256GCM
    out = bytes(range(32))
    material = split_exporter(out, params)
    assert material.master_secret == bytes(range(16))
    assert material.master_salt == bytes(range(16, 32))
    assert "00010203" not in repr(material)  # secrets stay out of reprs and logs
    with pytest.raises(KeyingError):
        split_exporter(out[:31], params)


def _over_the_wire(message: Message) -> Message:
    """Encode as a CON with some MID and decode again, as the peer would see it."""
    message.mtype = aiocoap.CON
    message.mid = 0x4242
    message.token = b"\x01"
    return Message.decode(message.encode())


def _protected_round_trip(client_exp: bytes, server_exp: bytes,
                          params: OscoreParameters) -> bytes:
    client = derive_context(client_exp, params, Role.CLIENT)
    server = derive_context(server_exp, params, Role.SERVER)
    assert client.sender_id == params.client_id == server.recipient_id
    assert client.recipient_id == params.server_id == server.sender_id
    request = Message(code=GET, uri_path=["temp"])
    request.direction = Direction.OUTGOING
    protected, client_request_id = client.protect(request)
    wire = _over_the_wire(protected)
    inner, request_id = server.unprotect(wire)
    assert inner.opt.uri_path == ("temp",)
    response = Message(code=69, payload=b"21.5")
    response.direction = Direction.OUTGOING
    protected_response, _ = server.protect(response, request_id)
    back, _ = client.unprotect(_over_the_wire(protected_response), client_request_id)
    assert back.payload == b"21.5"
    return bytes(client.sender_key)


def test_derived_contexts_of_both_roles_interoperate() -> None:
    params = OscoreParameters(client_id=b"\x42", server_id=b"", id_context=b"\x99")
    exporter = bytes(range(100, 132))
    _protected_round_trip(exporter, exporter, params)
    # A different exporter output (another handshake) gives different keys.
    key1 = derive_context(exporter, params, Role.CLIENT).sender_key
    key2 = derive_context(bytes(32), params, Role.CLIENT).sender_key
    assert key1 != key2


def _self_signed() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coaplayers-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _dtls12_pair() -> tuple[SSL.Connection, SSL.Connection]:
    """A DTLS 1.2 handshake between two pyOpenSSL connections over memory BIOs."""
    cert, key = _self_signed()
    server_ctx = SSL.Context(SSL.DTLS_METHOD)
    server_ctx.use_certificate(cert)
    server_ctx.use_privatekey(key)
    client_ctx = SSL.Context(SSL.DTLS_METHOD)
    client_ctx.set_verify(SSL.VERIFY_NONE)
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    done = {"client": False, "server": False}
    for _ in range(20):  # a handful of flights; bounded
        for name, conn in (("client", client), ("server", server)):
            try:
                conn.do_handshake()
                done[name] = True
            except SSL.WantReadError:
                pass
        for src, dst in ((client, server), (server, client)):
            while True:
                try:
                    dst.bio_write(src.bio_read(65536))
                except SSL.WantReadError:
                    break
        if all(done.values()):
            break
    assert all(done.values()), "in-memory DTLS handshake did not finish"
    assert client.get_protocol_version_name() == "DTLSv1.2"
    return client, server


def test_openssl_dtls12_exporter_keys_both_ends() -> None:
    client_conn, server_conn = _dtls12_pair()
    params = OscoreParameters(client_id=b"\x07", server_id=b"")
    # The server sends its parameters through Layer 0; the client parses them strictly.
    received = OscoreParameters.from_cbor(params.to_cbor())
    client_exp = export_keying_material(client_conn, received)
    server_exp = export_keying_material(server_conn, params)
    assert len(client_exp) == 32
    assert client_exp == server_exp
    _protected_round_trip(client_exp, server_exp, params)
    # DTLS 1.2: "no context" and "empty context" are different exporter outputs, which is
    # why docs/OSCORE-KEYING.md fixes "no context".
    empty_ctx = bytes(server_conn.export_keying_material(EXPORTER_LABEL, 32, b""))
    assert empty_ctx != server_exp


def test_documented_example() -> None:
    """The worked example of docs/OSCORE-KEYING.md, recomputed with a bare HKDF (RFC 8613
    Section 3.2.1, written out here without aiocoap) and through derive_context."""
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    params = OscoreParameters(client_id=bytes.fromhex("a1b2"), server_id=b"")
    assert params.to_cbor().hex() == "a20742a1b20840"
    exporter = bytes(range(32))
    secret, salt = exporter[:16], exporter[16:]

    def hkdf(id_: bytes, kind: str, length: int) -> bytes:
        info = cbor2.dumps([id_, None, 10, kind, length])
        return HKDF(hashes.SHA256(), length, salt, info).derive(secret)

    expected = {
        "client_key": "b338c4a582d18aa8075d1cd3f95f58ca",
        "server_key": "2569cc909c28202dc1e91db8d6b6ad4a",
        "common_iv": "847507d1e9a906eac5412bef45",
    }
    assert hkdf(bytes.fromhex("a1b2"), "Key", 16).hex() == expected["client_key"]
    assert hkdf(b"", "Key", 16).hex() == expected["server_key"]
    assert hkdf(b"", "IV", 13).hex() == expected["common_iv"]
    client = derive_context(exporter, params, Role.CLIENT)
    server = derive_context(exporter, params, Role.SERVER)
    assert client.sender_key.hex() == server.recipient_key.hex() == expected["client_key"]
    assert client.recipient_key.hex() == server.sender_key.hex() == expected["server_key"]
    assert client.common_iv.hex() == server.common_iv.hex() == expected["common_iv"]
