"""Layer 1 clients check the server certificate's name: the URI's host (the first hop's, so
the proxy's for a proxied request) unless the credentials name a server themselves."""

from __future__ import annotations

import datetime

import aiocoap
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coaplayers import dtls, pki
from coaplayers.layer1 import ClientCredentials, Layer1Error, create_context
from tests.layer1.test_layer1 import get, refused, site


async def _server(ca: pki.Issued, leaf: pki.Issued):  # type: ignore[no-untyped-def]
    return await create_context(
        site(), listen=["coaps://127.0.0.1:0"],
        certificate=dtls.CertificateCredentials(
            [leaf.certificate], leaf.private_key, [ca.certificate], require_peer=False),
    )


def _trusting(ca: pki.Issued, pattern: str = "coaps://*", **kw: str) -> ClientCredentials:
    creds = ClientCredentials()
    creds.add_certificate(pattern, dtls.CertificateCredentials([], None, [ca.certificate],
                                                               True, kw.get("server_name")))
    return creds


async def test_a_certificate_of_the_right_ca_for_another_name_is_refused(demo_pki) -> None:  # type: ignore[no-untyped-def]
    ca = demo_pki["ca"]
    srv = await _server(ca, pki.issue(ca, "evil.example", names=["evil.example"]))
    cli = await create_context(client_credentials=_trusting(ca))
    err = await refused(cli, srv.bound[0] + "/hello", stop=[srv])
    assert isinstance(err.cause, dtls.AuthenticationFailed)
    assert "not for '127.0.0.1'" in str(err) and "evil.example" in str(err)


async def test_the_uri_host_is_checked_against_address_names(demo_pki) -> None:  # type: ignore[no-untyped-def]
    """An address host needs an iPAddress name: a DNS name or common name spelled like the
    address is not one."""
    ca = demo_pki["ca"]
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    spelled = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca.certificate.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("127.0.0.1")]), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    srv = await _server(ca, pki.Issued(spelled, key))
    cli = await create_context(client_credentials=_trusting(ca))
    err = await refused(cli, srv.bound[0] + "/hello", stop=[srv])
    assert "not for '127.0.0.1'" in str(err)
    assert not dtls.certificate_matches(spelled, "127.0.0.1")


async def test_matching_names_pass_and_a_named_entry_keeps_its_name(demo_pki) -> None:  # type: ignore[no-untyped-def]
    ca = demo_pki["ca"]
    srv = await _server(ca, demo_pki["server"])  # server.test, 127.0.0.1, ::1
    by_address = await create_context(client_credentials=_trusting(ca))
    other_name = await create_context(
        client_credentials=_trusting(ca, server_name="elsewhere.test"))
    try:
        ok = await get(by_address, srv.bound[0] + "/hello")
        with pytest.raises(Layer1Error, match=r"not for 'elsewhere\.test'"):
            await get(other_name, srv.bound[0] + "/hello")
    finally:
        for ctx in (by_address, other_name, srv):
            await ctx.shutdown()
    assert ok.code == aiocoap.CONTENT


async def test_another_name_for_the_same_address_does_not_reuse_the_session(demo_pki) -> None:  # type: ignore[no-untyped-def]
    """A session authenticated for one name carries requests for another name to the same
    address only if its certificate is for that name too (DNS can point any name anywhere)."""
    ca = demo_pki["ca"]
    srv = await _server(ca, pki.issue(ca, "only.test", names=["only.test"]))
    creds = _trusting(ca)
    creds.add_certificate("coaps://127.0.0.1*/named*", dtls.CertificateCredentials(
        [], None, [ca.certificate], True, "only.test"))
    cli = await create_context(client_credentials=creds)
    cli.context.resolve_ttl = 0  # a remembered remote would keep the first request's entry
    try:
        named = await get(cli, srv.bound[0] + "/named")  # opens the session, checked for only.test
        with pytest.raises(Layer1Error, match=r"authenticated for 'only\.test'.*'127\.0\.0\.1'"):
            await get(cli, srv.bound[0] + "/hello")
    finally:
        await cli.shutdown()
        await srv.shutdown()
    assert named.code == aiocoap.NOT_FOUND  # the session itself was fine


@pytest.mark.parametrize(("names", "host", "expected"), [
    (["a.example"], "A.Example.", True),
    (["*.example"], "a.example", True),
    (["*.example"], "b.a.example", False),
    (["a.example"], "b.example", False),
    (["::1"], "[::1]", True),
    (["::1"], "127.0.0.1", False),
])
def test_certificate_matches(demo_pki, names: list[str], host: str, expected: bool) -> None:  # type: ignore[no-untyped-def]
    cert = pki.issue(demo_pki["ca"], "cn.example", names=names).certificate
    assert dtls.certificate_matches(cert, host) is expected


def test_common_name_counts_only_without_dns_names(demo_pki) -> None:  # type: ignore[no-untyped-def]
    ca = demo_pki["ca"]
    bare = pki.issue(ca, "cn.example", names=[]).certificate
    with_san = pki.issue(ca, "cn.example", names=["other.example"]).certificate
    assert dtls.certificate_matches(bare, "cn.example")
    assert not dtls.certificate_matches(with_san, "cn.example")


@pytest.mark.parametrize(("server_host", "proxy_host"), [
    ("127.0.0.1", "127.0.0.1"), ("app-server", "proxy"), ("2001:db8::5", "gw.example"),
])
def test_coap_keys_certificates_are_for_the_hosts_it_configures(
    tmp_path, server_host: str, proxy_host: str
) -> None:  # type: ignore[no-untyped-def]
    import json
    import tomllib
    from urllib.parse import urlsplit

    from coaplayers.programs import keys

    keys.create(tmp_path, server_host=server_host, proxy_host=proxy_host)
    proxy_uri = tomllib.loads((tmp_path / "client.toml").read_text())["proxy"]
    (upstream,) = json.loads((tmp_path / "proxy-upstream.json").read_text())
    for pem, host in (("proxy.pem", urlsplit(proxy_uri).hostname),
                      ("server-hop.pem", urlsplit(upstream.rstrip("*")).hostname),
                      ("server-hop.pem", "localhost")):
        cert = x509.load_pem_x509_certificate((tmp_path / pem).read_bytes())
        assert host and dtls.certificate_matches(cert, host), (pem, host)


async def test_a_host_name_never_rides_on_a_session_a_client_opened(demo_pki) -> None:  # type: ignore[no-untyped-def]
    """A server calls a client back over the client's session by address; a name resolving
    to that address gets a session of its own, whose certificate is checked for the name."""
    import socket

    from coaplayers.layer1 import Layer1Limits

    if socket.getaddrinfo("localhost", 1, type=socket.SOCK_DGRAM)[0][4][0] != "127.0.0.1":
        pytest.skip("localhost does not resolve to 127.0.0.1 first here")
    ca = demo_pki["ca"]
    server_cert = dtls.CertificateCredentials(
        [demo_pki["server"].certificate], demo_pki["server"].private_key, [ca.certificate],
        require_peer=False)
    srv = await create_context(site(), listen=["coaps://127.0.0.1:0"], certificate=server_cert,
                               client_credentials=_trusting(ca),
                               limits=Layer1Limits(handshake_timeout=2))
    device = await create_context(site(), client_credentials=_trusting(ca))
    try:
        await get(device, srv.bound[0] + "/hello")  # the device's session to the server
        (back,) = [p.remote for p in srv.layer1._peers.values()]
        port = back.address[1]
        by_address = await get(srv, f"coaps://127.0.0.1:{port}/hello")
        with pytest.raises(Layer1Error):
            await get(srv, f"coaps://localhost:{port}/hello")
    finally:
        await device.shutdown()
        await srv.shutdown()
    assert by_address.code == aiocoap.CONTENT  # the call back by address still works
