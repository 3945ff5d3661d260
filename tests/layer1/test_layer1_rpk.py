"""Layer 1 raw public keys (RFC 7250, RFC 7925's profile) over real UDP sockets: both sides
pin each other, an untrusted key is refused on either side with a typed error, and PSK,
certificate and raw-public-key clients share one coaps:// port; libcoap's GnuTLS client and
server interoperate."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coaplayers import dtls
from coaplayers.layer1 import ClientCredentials, Layer1Error, create_context

from ..conftest import (
    background,
    fingerprint,
    free_udp_port,
    need_program,
    run_program,
    until,
    wait_udp_bound,
)
from .test_layer1 import IDENT, KEY, get, psk_creds, refused, site

SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_pair(folder: Path, name: str, key: ec.EllipticCurvePrivateKey) -> None:
    (folder / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (folder / f"{name}.key").chmod(0o600)
    (folder / f"{name}.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


class Keys:
    """A server and a client key pair, plus a stranger's, as PEM files in one folder."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.server, self.client, self.stranger = new_key(), new_key(), new_key()
        for name in ("server", "client", "stranger"):
            write_pair(folder, name, getattr(self, name))

    def server_credentials(self, *trusted: ec.EllipticCurvePrivateKey
                           ) -> dtls.RawPublicKeyCredentials:
        return dtls.RawPublicKeyCredentials(
            self.server, frozenset(k.public_key().public_bytes(*SPKI)
                                   for k in (trusted or (self.client,))))

    def client_json(self, key: str = "client.key", peers: tuple[str, ...] = ("server.pub",),
                    pattern: str = "coaps://127.0.0.1*") -> ClientCredentials:
        """A credentials file as a user writes it: file names relative to the file."""
        path = self.dir / f"creds-{os.urandom(3).hex()}.json"
        path.write_text(json.dumps({pattern: {"dtls-rpk": {"key": key,
                                                           "peer-keys": list(peers)}}}))
        return ClientCredentials.from_file(path)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


async def test_rpk_request_both_sides_named_by_fingerprint(keys: Keys) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    srv = await create_context(site(), listen=["coaps://127.0.0.1:0"],
                               raw_public_key=keys.server_credentials(),
                               on_event=lambda kind, f: events.append((kind, f)))
    cli = await create_context(client_credentials=keys.client_json())
    try:
        resp = await get(cli, srv.bound[0] + "/hello")
        big = os.urandom(3000)  # block-wise: several requests in the one session
        echo = await asyncio.wait_for(cli.context.request(aiocoap.Message(
            code=aiocoap.POST, uri=srv.bound[0] + "/echo", payload=big)).response, 20)
        server_identity = resp.remote.peer_identity
    finally:
        await cli.shutdown()
        await srv.shutdown()
    assert resp.code == aiocoap.CONTENT
    assert resp.payload == f"hello {fingerprint(keys.client)}".encode()  # the resource's view
    assert echo.payload == big
    assert server_identity == fingerprint(keys.server)  # the client pinned the server's key
    handshakes = [f for kind, f in events if kind == "handshake"]
    assert handshakes and handshakes[0]["identity"] == fingerprint(keys.client)
    assert handshakes[0]["cipher"] == "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8"


async def test_untrusted_server_key_is_refused_by_the_client(keys: Keys) -> None:
    srv = await create_context(site(), listen=["coaps://127.0.0.1:0"],
                               raw_public_key=keys.server_credentials())
    cli = await create_context(client_credentials=keys.client_json(peers=("stranger.pub",)))
    t0 = time.monotonic()
    try:
        with pytest.raises(Layer1Error) as info:
            await get(cli, srv.bound[0] + "/hello", timeout=15)
        # The client's fatal alert ends the server's half of the handshake too.
        await asyncio.wait_for(until(lambda: srv.layer1.stats["handshakes_failed"] == 1), 5)
    finally:
        await cli.shutdown()
        await srv.shutdown()
    assert time.monotonic() - t0 < 5
    assert isinstance(info.value.cause, dtls.AuthenticationFailed)
    assert f"server's public key {fingerprint(keys.server)} is not one we trust" in str(info.value)
    assert srv.layer1.stats["handshakes_ok"] == 0


async def test_untrusted_client_key_is_refused_by_the_server(keys: Keys) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    srv = await create_context(site(), listen=["coaps://127.0.0.1:0"],
                               raw_public_key=keys.server_credentials(),
                               on_event=lambda kind, f: events.append((kind, f)))
    cli = await create_context(client_credentials=keys.client_json(key="stranger.key"))
    err = await refused(cli, srv.bound[0] + "/hello", stop=[srv])
    assert isinstance(err.cause, dtls.AuthenticationFailed | dtls.PeerAlert)
    assert "rejected our raw public key" in str(err)  # the server's fatal alert, in RPK terms
    failed = [f for kind, f in events if kind == "handshake_failed"]
    assert len(failed) == 1
    assert f"client's public key {fingerprint(keys.stranger)} is not one we trust" in (
        failed[0]["error"])
    assert not [kind for kind, _ in events if kind == "handshake"]


async def test_psk_certificate_and_rpk_clients_share_one_port(keys: Keys, demo_pki) -> None:  # type: ignore[no-untyped-def]
    p = demo_pki
    srv = await create_context(
        site(), listen=["coaps://127.0.0.1:0"],
        psk_store=dtls.PskStore({IDENT.encode(): KEY.encode()}),
        certificate=dtls.CertificateCredentials(
            [p["server"].certificate], p["server"].private_key, [p["ca"].certificate]),
        raw_public_key=keys.server_credentials(),
    )
    cert = ClientCredentials()
    cert.add_certificate("coaps://*", dtls.CertificateCredentials(
        [p["client"].certificate], p["client"].private_key, [p["ca"].certificate],
        server_name="127.0.0.1"))
    clients = [await create_context(client_credentials=c)
               for c in (psk_creds(), cert, keys.client_json())]
    try:
        answers = await asyncio.gather(*(get(c, srv.bound[0] + "/hello") for c in clients))
        server_identities = [a.remote.peer_identity for a in answers]
    finally:
        for c in clients:
            await c.shutdown()
        await srv.shutdown()
    assert [a.payload for a in answers] == [
        b"hello dev1", b"hello device-1", f"hello {fingerprint(keys.client)}".encode()]
    # Each client names the server; a PSK names no one, so the client reports its own identity.
    assert server_identities == [b"dev1", "server.test", fingerprint(keys.server)]


async def test_rpk_client_against_a_psk_only_server_fails_fast(keys: Keys) -> None:
    srv = await create_context(site(), listen=["coaps://127.0.0.1:0"],
                               psk_store=dtls.PskStore({IDENT.encode(): KEY.encode()}))
    cli = await create_context(client_credentials=keys.client_json())
    err = await refused(cli, srv.bound[0] + "/hello", stop=[srv])  # the endpoint's alert
    assert isinstance(err.cause, dtls.AuthenticationFailed)
    assert "handshake_failure" in str(err) and "no common cipher suite" in str(err)


async def test_server_restart_rehandshakes_with_the_same_keys(keys: Keys) -> None:
    """The lost-session alert of a restarted server makes the client handshake again at once
    (the client's GnuTLS context is reused); the retried request is answered."""
    creds = keys.server_credentials()
    srv = await create_context(site(), listen=["coaps://127.0.0.1:0"], raw_public_key=creds)
    uri = srv.bound[0]
    port = int(uri.rsplit(":", 1)[1])
    cli = await create_context(client_credentials=keys.client_json())
    t0 = time.monotonic()
    try:
        first = await get(cli, uri + "/hello")
        await srv.shutdown()  # all server state is gone
        srv = await create_context(site(), listen=[f"coaps://127.0.0.1:{port}"],
                                   raw_public_key=creds)
        second = await get(cli, uri + "/hello", timeout=30)
    finally:
        await cli.shutdown()
        await srv.shutdown()
    assert first.payload == second.payload == f"hello {fingerprint(keys.client)}".encode()
    assert cli.layer1.stats["handshakes_ok"] == 2
    assert len(cli.layer1._rpk_contexts) == 1
    assert time.monotonic() - t0 < 10  # not after CoAP's retransmissions gave up


def test_credentials_file_errors_are_clear(keys: Keys) -> None:
    with pytest.raises(dtls.ConfigurationError, match="dtls-rpk needs 'peer-keys'"):
        ClientCredentials().load_from_dict({"coaps://*": {"dtls-rpk": {"key": "client.key"}}})
    with pytest.raises(dtls.ConfigurationError, match="no member 'trust'"):
        ClientCredentials().load_from_dict(
            {"coaps://*": {"dtls-rpk": {"key": "k", "peer-keys": ["p"], "trust": ["p"]}}})
    # Files are read when the entry is first used, relative to the credentials file.
    creds = keys.client_json(peers=("client.pub",))
    with pytest.raises(dtls.ConfigurationError, match="lists our own public key"):
        creds.for_uri("coaps://127.0.0.1/hello")
    creds = keys.client_json(peers=("missing.pub",))
    with pytest.raises(dtls.ConfigurationError, match='dtls-rpk "peer-keys"'):
        creds.for_uri("coaps://127.0.0.1/hello")
    loaded = keys.client_json().for_uri("coaps://127.0.0.1:5684/x")
    assert isinstance(loaded, dtls.RawPublicKeyCredentials)
    assert loaded.fingerprint == fingerprint(keys.client)


async def test_psk_identity_spelled_like_a_trusted_fingerprint_is_refused(keys: Keys) -> None:
    ident = fingerprint(keys.client).encode()
    with pytest.raises(dtls.ConfigurationError, match="is the fingerprint of a key"):
        await create_context(site(), listen=["coaps://127.0.0.1:0"],
                             psk_store=dtls.PskStore({ident: b"secret"}),
                             raw_public_key=keys.server_credentials())


def libcoap_key_file(keys: Keys, name: str) -> Path:
    """libcoap's -M wants one PEM file with the private and the public key."""
    path = keys.dir / f"{name}-libcoap.pem"
    path.write_bytes((keys.dir / f"{name}.key").read_bytes()
                     + (keys.dir / f"{name}.pub").read_bytes())
    return path


@pytest.mark.interop
async def test_libcoap_gnutls_client_with_a_raw_public_key(keys: Keys) -> None:
    need_program("coap-client-gnutls")
    srv = await create_context(site(), listen=["coaps://127.0.0.1:0"],
                               raw_public_key=keys.server_credentials())
    try:
        _, out, err = await run_program(
            "coap-client-gnutls", "-M", str(libcoap_key_file(keys, "client")), "-B", "10",
            srv.bound[0] + "/hello")
        # A key we do not trust gets nothing (libcoap exits 0 either way: judge its output).
        _, out_bad, _ = await run_program(
            "coap-client-gnutls", "-M", str(libcoap_key_file(keys, "stranger")), "-B", "5",
            srv.bound[0] + "/hello")
        stats = dict(srv.layer1.stats)
    finally:
        await srv.shutdown()
    assert out.strip() == f"hello {fingerprint(keys.client)}".encode(), (out, err)
    assert b"hello" not in out_bad
    assert stats["handshakes_ok"] == 1 and stats["handshakes_failed"] >= 1


@pytest.mark.interop
async def test_our_client_with_a_raw_public_key_against_libcoap_gnutls_server(
    keys: Keys,
) -> None:
    need_program("coap-server-gnutls")
    port = free_udp_port()
    async with background("coap-server-gnutls", "-A", "127.0.0.1", "-p", str(port),
                          "-M", str(libcoap_key_file(keys, "server"))):
        await wait_udp_bound("127.0.0.1", port + 1)  # libcoap serves DTLS on P+1
        cli = await create_context(client_credentials=keys.client_json())
        wrong = await create_context(client_credentials=keys.client_json(
            peers=("stranger.pub",)))
        try:
            resp = await get(cli, f"coaps://127.0.0.1:{port + 1}/")
            server_identity = resp.remote.peer_identity
            with pytest.raises(Layer1Error) as info:
                await get(wrong, f"coaps://127.0.0.1:{port + 1}/", timeout=15)
        finally:
            await cli.shutdown()
            await wrong.shutdown()
    assert resp.code == aiocoap.CONTENT and b"libcoap" in resp.payload
    assert server_identity == fingerprint(keys.server)
    assert isinstance(info.value.cause, dtls.AuthenticationFailed)
