"""Raw public keys at Layer 0 without sockets: one server endpoint for PSK, certificates and
raw public keys side by side (each ClientHello reaches its own backend), the peer's mode and
identity (the SPKI fingerprint), and authorization policies that name raw-public-key peers."""

from __future__ import annotations

import pytest
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coaplayers import pki
from coaplayers.dtls import (
    CertificateCredentials,
    ConfigurationError,
    DtlsSession,
    GnuTlsSession,
    OpenSslSession,
    PskClientCredentials,
    PskStore,
    RawPublicKeyCredentials,
    TinyDtlsSession,
    build_context,
    spki_fingerprint,
)
from coaplayers.layer0 import Layer0ServerCore, Policy, ServerLimits
from coaplayers.layer0.listeners import KindListener, offers_raw_public_key
from coaplayers.layer0.policy import rpk_identity
from coaplayers.layer0.profile import DTLS_CIPHERS, handshake_tag
from coaplayers.layer0.server import layer0_config, make_listener

PEER = ("coap", "192.0.2.1:5683")
PSK = PskClientCredentials(b"dev-1", b"0123456789abcdef")


@pytest.fixture(scope="module")
def kinds() -> dict[str, object]:
    ca = pki.make_ca("test e2e CA")
    server_cert = pki.issue(ca, "app-server", names=["app-server"], client=False)
    client_cert = pki.issue(ca, "device-cert", server=False)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    return {
        "server_psk": PskStore({PSK.identity: PSK.key}),
        "server_cert": CertificateCredentials([server_cert.certificate], server_cert.private_key,
                                              [ca.certificate]),
        "server_rpk": RawPublicKeyCredentials(server_key, [client_key.public_key()]),
        "client_cert": CertificateCredentials([client_cert.certificate], client_cert.private_key,
                                              [ca.certificate], server_name="app-server"),
        "client_rpk": RawPublicKeyCredentials(client_key, [server_key.public_key()]),
        "client_key": client_key,
    }


def new_client(kind: str, k: dict[str, object]) -> DtlsSession:
    config = layer0_config()
    if kind == "psk":
        return TinyDtlsSession.client(PSK, config)
    if kind == "rpk":
        return GnuTlsSession.client(k["client_rpk"], config)  # type: ignore[arg-type]
    creds = k["client_cert"]
    ctx = build_context(creds, server=False, ciphers=DTLS_CIPHERS)  # type: ignore[arg-type]
    return OpenSslSession.client(ctx, creds, config)  # type: ignore[arg-type]


def handshake(core: Layer0ServerCore, client: DtlsSession) -> str:
    """Drive a client through Layer 0 core in memory; returns the session id."""
    client.connect(0.0)
    sid = None
    tag = b""
    queue = client.datagrams_to_send()
    for _ in range(12):
        datagram = queue.pop(0) if queue else b""
        if sid is None:
            answer = core.entry(PEER, datagram, 0.0)
        else:
            answer = core.datagram(sid, tag + datagram, 0.0)[0]
        assert answer is not None and answer.code in (Code.CREATED, Code.CHANGED), answer
        if answer.location:
            sid = answer.location[-1]
            tag = handshake_tag(answer.payload) or b""
        if answer.payload:
            client.receive_datagram(answer.payload, 0.0)
        queue += client.datagrams_to_send()
        if client.is_established and sid is not None and core.sessions[sid].established:
            return sid
    raise AssertionError("no handshake")


def test_client_hellos_are_told_apart(kinds: dict[str, object]) -> None:
    hellos = {}
    for kind in ("psk", "cert", "rpk"):
        client = new_client(kind, kinds)
        client.connect(0.0)
        hellos[kind] = client.datagrams_to_send()[0]
    assert offers_raw_public_key(hellos["rpk"])
    assert not offers_raw_public_key(hellos["cert"]) and not offers_raw_public_key(hellos["psk"])
    for junk in (b"", b"\x16\xfe\xfd", hellos["rpk"][:60], b"\xff" * 200):
        assert not offers_raw_public_key(junk)
    with pytest.raises(ValueError):
        KindListener()


def test_one_endpoint_serves_every_kind_and_names_each_peer(kinds: dict[str, object]) -> None:
    listener = make_listener([kinds["server_psk"], kinds["server_cert"], kinds["server_rpk"]])
    assert isinstance(listener, KindListener)
    core = Layer0ServerCore(listener, ServerLimits())
    peers = {}
    for kind in ("psk", "cert", "rpk"):
        sid = handshake(core, new_client(kind, kinds))
        peers[kind] = core.sessions[sid].peer
    client_key = kinds["client_key"]
    fingerprint = spki_fingerprint(client_key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert (peers["psk"].mode, peers["psk"].identity) == ("psk", "dev-1")
    assert (peers["cert"].mode, peers["cert"].identity) == ("x509", "device-cert")
    assert (peers["rpk"].mode, peers["rpk"].identity) == ("rpk", fingerprint)
    # The OSCORE mode keys from the exporter: the raw-public-key session has one.
    assert len(peers["rpk"].export_keying_material(b"EXPORTER-test", 32)) == 32


def test_raw_public_key_only_endpoint_and_wrong_kinds(kinds: dict[str, object]) -> None:
    core = Layer0ServerCore(make_listener(kinds["server_rpk"]), ServerLimits())  # type: ignore[arg-type]
    sid = handshake(core, new_client("rpk", kinds))
    assert core.sessions[sid].peer.mode == "rpk"
    with pytest.raises(TypeError, match="RawPublicKeyCredentials"):
        make_listener("not credentials")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="one of each kind"):
        make_listener([kinds["server_psk"], kinds["server_psk"]])  # type: ignore[list-item]


def test_policy_names_raw_public_key_peers(kinds: dict[str, object], tmp_path) -> None:  # type: ignore[no-untyped-def]
    client_key = kinds["client_key"]
    public = client_key.public_key()  # type: ignore[attr-defined]
    fingerprint = rpk_identity(public)
    assert len(fingerprint) == 32 and int(fingerprint, 16) >= 0
    pem = tmp_path / "client.pub"
    pem.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    # The same identity from the key, its PEM file, the private key, DER, or the hex in capitals.
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    for form in (str(pem), pem, client_key, fingerprint.upper()):
        assert rpk_identity(form) == fingerprint
    assert rpk_identity(der) == fingerprint
    with pytest.raises(ConfigurationError):
        rpk_identity(str(tmp_path / "missing.pub"))
    policy = Policy.build(protected=["/"], grants={rpk_identity(pem): ["/sensors"],
                                                   "dev-1": ["/"]})
    assert policy.allows(fingerprint, ("sensors", "t"))
    assert not policy.allows(fingerprint, ("firmware",))
    assert policy.allows("dev-1", ("firmware",)) and not policy.allows("other", ("sensors",))
    two = tmp_path / "two.pub"
    two.write_bytes(pem.read_bytes() * 2)
    with pytest.raises(ConfigurationError, match="2 public keys"):
        rpk_identity(two)
