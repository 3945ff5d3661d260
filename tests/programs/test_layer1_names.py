"""Layer 1 certificates are checked for the host the programs connect to: coap-client's
first hop (--ca, or a dtls-cert entry without a server name) and coap-proxy's coaps
upstreams. The server here holds a certificate of the right CA for another name."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from coaplayers import pki

from .conftest import Keys, client, start_proxy, start_server

pytestmark = pytest.mark.slow  # several processes each


def _evil_files(keys: Keys, tmp_path: Path) -> list[str]:
    ca = pki.Issued(
        x509.load_pem_x509_certificate((keys / "hop-ca.pem").read_bytes()),
        serialization.load_pem_private_key(  # type: ignore[arg-type]
            (keys / "hop-ca.key").read_bytes(), None),
    )
    evil = pki.issue(ca, "evil.example", names=["evil.example"])
    (tmp_path / "evil.pem").write_bytes(evil.cert_pem())
    (tmp_path / "evil.key").write_bytes(evil.key_pem())
    (tmp_path / "evil.key").chmod(0o600)
    return ["--cert", str(tmp_path / "evil.pem"), "--key", str(tmp_path / "evil.key")]


def _evil_server(keys: Keys, tmp_path: Path):  # type: ignore[no-untyped-def]
    return start_server(tmp_path, "--listen", "coaps://127.0.0.1:0", *_evil_files(keys, tmp_path))


async def test_the_proxy_is_checked_for_its_own_name_with_p(
    keys: Keys, tmp_path: Path
) -> None:
    proxy = start_proxy(tmp_path, "--listen", "coaps://127.0.0.1:0", *_evil_files(keys, tmp_path))
    try:
        r = await client("-P", proxy.uri("coaps"), "--ca", str(keys / "hop-ca.pem"), "-B", "10",
                         "coap://127.0.0.1:9/hello")
    finally:
        assert proxy.stop(signal.SIGINT) == 0
    assert r.rc == 7, r.stderr
    line = r.one_line_error()
    assert "not for '127.0.0.1'" in line and "evil.example" in line, line


async def test_a_wrong_name_certificate_of_the_right_ca_fails_with_exit_7(
    keys: Keys, tmp_path: Path
) -> None:
    server = _evil_server(keys, tmp_path)
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"coaps://*": {"dtls-cert": {
        "cert": str(keys / "proxy.pem"), "key": str(keys / "proxy.key"),
        "ca": str(keys / "hop-ca.pem")}}}))
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"coaps://*": {"dtls-cert": {
        "cert": str(keys / "proxy.pem"), "key": str(keys / "proxy.key"),
        "ca": str(keys / "hop-ca.pem"), "server-name": "evil.example"}}}))
    proxy = start_proxy(
        tmp_path, "--listen", "coaps://127.0.0.1:0", "--psk", "gw:secret", "--no-forward",
        "--route", f"/evil={server.uri('coaps')}", "--upstream-credentials", str(creds),
    )
    try:
        uri = server.uri("coaps") + "/hello"
        by_ca, by_file, by_name, via_proxy = await asyncio.gather(
            client("--ca", str(keys / "hop-ca.pem"), "-B", "10", uri),
            client("--credentials", str(creds), "-B", "10", uri),
            client("--credentials", str(named), "-B", "10", uri),
            client("-u", "gw", "-k", "secret", "-B", "10", proxy.uri("coaps") + "/evil/hello"),
        )
    finally:
        assert server.stop() == 0
        assert proxy.stop(signal.SIGINT) == 0
    for refused in (by_ca, by_file):
        assert refused.rc == 7, refused.stderr
        line = refused.one_line_error()
        assert "not for '127.0.0.1'" in line and "evil.example" in line, line
    # A dtls-cert entry that names the server checks that name instead of the URI's host.
    assert by_name.rc == 0, by_name.stderr
    # coap-proxy checks its coaps upstream's name the same way.
    assert via_proxy.rc == 5 and "5.02" in via_proxy.one_line_error(), via_proxy.stderr
