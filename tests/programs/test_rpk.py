"""Raw public keys end to end (RFC 7250) with the programs as real processes: coap-client and
coap-server with coap-keys' key pairs, directly and through coap-proxy, in the Layer 0 DTLS and
OSCORE modes; a wrong server key and an untrusted client key fail clearly; flags and
configuration keys are checked with one clear line each."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..conftest import fingerprint
from .conftest import CLIENT, SERVER, Keys, Running, client, run, start_server


def new_pair(folder: Path, name: str, curve: ec.EllipticCurve | None = None) -> tuple[Path, Path]:
    """A fresh key pair as PEM files (private key mode 600), like coap-keys writes them."""
    key = ec.generate_private_key(curve or ec.SECP256R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


async def test_rpk_end_to_end_directly_and_through_the_proxy(
    app: Running, proxy: Running, keys: Keys
) -> None:
    """The shared server takes PSK, certificates and raw public keys side by side; the client
    names the server by its key's fingerprint, the server names the client by its own."""
    uri = app.uri("coap") + "/echo"
    post = ["-m", "post", "-v"]
    via = ["-P", proxy.uri("coaps"), "--credentials", str(keys / "client-hop.json")]
    direct, proxied, oscore, oscore_proxied, hello = await asyncio.gather(
        client(*post, "-e", "direct", "--layer0", "dtls", *keys.e2e_rpk, uri),
        client(*post, "-e", "via proxy", "--layer0", "dtls", *keys.e2e_rpk, *via, uri),
        client(*post, "-e", "oscore", "--layer0", "oscore", *keys.e2e_rpk, uri),
        client(*post, "-e", "oscore via proxy", "--layer0", "oscore", *keys.e2e_rpk, *via, uri),
        client("--layer0", "dtls", *keys.e2e_rpk, *via, app.uri("coap") + "/hello"),
    )
    server_fp = fingerprint(keys / "server-rpk.pub")
    client_fp = fingerprint(keys / "client-rpk.pub")
    for r, text in ((direct, "direct"), (proxied, "via proxy"), (oscore, "oscore"),
                    (oscore_proxied, "oscore via proxy")):
        assert r.rc == 0, r.stderr
        assert r.stdout == text + "\n"
    for r in (direct, proxied):
        assert (f"layer 0: mode dtls rpk, peer {server_fp}, cipher "
                "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8") in r.stderr
    for r in (oscore, oscore_proxied):
        assert re.search(rf"layer 0: mode oscore \(keyed by a DTLS raw-public-key handshake\), "
                         rf"peer {server_fp}", r.stderr), r.stderr
    # Through the proxy, the first hop is Layer 1 PSK to the proxy, the inner session is ours.
    assert re.search(r"layer 1: hop 127\.0\.0\.1:\d+, psk identity device-1, mode psk",
                     proxied.stderr)
    # The application sees the client's key fingerprint as its Layer 0 identity.
    assert hello.rc == 0, hello.stderr
    assert f"mode layer0-dtls, layer 0 peer {client_fp}" in hello.stdout
    assert f"layer 0 peer {client_fp}" in app.stderr  # the server's -v request log
    assert "established (rpk" in app.stderr


async def test_wrong_server_key_and_untrusted_client_key_fail_clearly(
    app: Running, keys: Keys, tmp_path: Path
) -> None:
    uri = app.uri("coap") + "/hello"
    other_key, other_pub = new_pair(tmp_path, "other")
    wrong_server, untrusted, untrusted_oscore = await asyncio.gather(
        client("--layer0", "dtls", "--e2e-rpk-key", str(keys / "client-rpk.key"),
               "--e2e-rpk-server-key", str(other_pub), "-B", "10", uri),
        client("--layer0", "dtls", "--e2e-rpk-key", str(other_key),
               "--e2e-rpk-server-key", str(keys / "server-rpk.pub"), "-B", "10", uri),
        client("--layer0", "oscore", "--e2e-rpk-key", str(other_key),
               "--e2e-rpk-server-key", str(keys / "server-rpk.pub"), "-B", "10", uri),
    )
    server_fp = fingerprint(keys / "server-rpk.pub")
    assert wrong_server.rc == 7, wrong_server
    line = wrong_server.one_line_error()
    assert f"public key {server_fp} is not one we trust" in line
    assert "--e2e-rpk-server-key" in line
    for r in (untrusted, untrusted_oscore):
        assert r.rc == 7, r
        line = r.one_line_error()
        assert "the server rejected our raw public key" in line
        assert fingerprint(other_pub) in line and "--e2e-rpk-trust" in line
        assert r.out == b""  # nothing from the application reached the client
    # The server refused the untrusted key in the handshake: no session was established for it.
    assert f"layer 0 peer {fingerprint(other_pub)}" not in app.stderr


async def test_rpk_client_against_a_server_without_raw_public_keys(
    keys: Keys, tmp_path: Path
) -> None:
    server = start_server(
        tmp_path, "--listen", "coap://127.0.0.1:0",
        "--e2e-cert", str(keys / "server-e2e.pem"), "--e2e-key", str(keys / "server-e2e.key"),
        "--e2e-ca", str(keys / "e2e-ca.pem"),
    )
    try:
        r = await client("--layer0", "dtls", *keys.e2e_rpk, "-B", "10",
                         server.uri("coap") + "/hello")
    finally:
        assert server.stop() == 0
    assert r.rc == 7
    line = r.one_line_error()
    assert "presented no raw public key" in line and "--e2e-auth" in line


async def test_server_accepts_several_client_keys_and_rpk_alone(
    keys: Keys, tmp_path: Path
) -> None:
    """--e2e-rpk-trust is repeatable and a file may hold several keys; a server with raw
    public keys only (no other end-to-end kind) works, and --e2e-required holds with it."""
    second_key, second_pub = new_pair(tmp_path, "second")
    third_key, third_pub = new_pair(tmp_path, "third")
    both = tmp_path / "both.pub"
    both.write_bytes(second_pub.read_bytes() + third_pub.read_bytes())
    server = start_server(
        tmp_path, "--listen", "coap://127.0.0.1:0",
        "--e2e-rpk-key", str(keys / "server-rpk.key"),
        "--e2e-rpk-trust", str(keys / "client-rpk.pub"), "--e2e-rpk-trust", str(both),
        "--e2e-required",
    )
    uri = server.uri("coap") + "/hello"
    pin = ["--e2e-rpk-server-key", str(keys / "server-rpk.pub")]
    try:
        first, second, third, plain, psk = await asyncio.gather(
            client("--layer0", "dtls", *keys.e2e_rpk, uri),
            client("--layer0", "dtls", "--e2e-rpk-key", str(second_key), *pin, uri),
            client("--layer0", "oscore", "--e2e-rpk-key", str(third_key), *pin, uri),
            client(uri),
            client("--layer0", "dtls", *keys.e2e_psk, "-B", "10", uri),
        )
    finally:
        assert server.stop() == 0
    assert first.rc == 0 and fingerprint(keys / "client-rpk.pub") in first.stdout, first.stderr
    assert second.rc == 0 and fingerprint(second_pub) in second.stdout, second.stderr
    assert third.rc == 0 and f"mode oscore, layer 0 peer {fingerprint(third_pub)}" in \
        third.stdout, third.stderr
    assert plain.rc == 4 and "4.01" in plain.stderr
    # A PSK client reaches a server that holds no PSK: refused, not answered.
    assert psk.rc != 0 and psk.out == b""


async def test_client_picks_one_kind(app: Running, keys: Keys, tmp_path: Path) -> None:
    """Every kind in the file: raw public keys by default, --e2e-auth picks another, and a
    kind given on the command line wins over the file's."""
    cfg = tmp_path / "client.toml"
    e2e = keys.psk["e2e"]
    cfg.write_text(
        f'e2e-psk-identity = "{e2e["identity"]}"\n'
        f'e2e-psk = "{e2e["key"]}"\n'
        f'e2e-ca = "{keys / "e2e-ca.pem"}"\n'
        f'e2e-cert = "{keys / "client-e2e.pem"}"\n'
        f'e2e-key = "{keys / "client-e2e.key"}"\n'
        f'e2e-rpk-key = "{keys / "client-rpk.key"}"\n'
        f'e2e-rpk-server-key = "{keys / "server-rpk.pub"}"\n'
    )
    uri = app.uri("coap") + "/hello"
    base = ["--config", str(cfg), "-v"]
    default, auth_psk, auth_cert, flag_wins, no_rpk, oscore_psk = await asyncio.gather(
        client(*base, "--layer0", "dtls", uri),
        client(*base, "--layer0", "dtls", "--e2e-auth", "psk", uri),
        client(*base, "--layer0", "dtls", "--e2e-auth", "cert", uri),
        client(*base, "--layer0", "dtls", *keys.e2e_cert, uri),
        client("--layer0", "dtls", "--e2e-auth", "rpk", *keys.e2e_psk, uri),
        client(*base, "--layer0", "oscore", "--e2e-auth", "psk", "--no-keep", uri),
    )
    assert default.rc == 0 and "layer 0: mode dtls rpk" in default.stderr, default.stderr
    assert auth_psk.rc == 0 and "layer 0: mode dtls psk" in auth_psk.stderr
    assert auth_cert.rc == 0 and "layer 0: mode dtls certificate" in auth_cert.stderr
    assert flag_wins.rc == 0 and "layer 0: mode dtls certificate" in flag_wins.stderr
    assert no_rpk.rc == 2 and "--e2e-auth rpk needs --e2e-rpk-key" in no_rpk.one_line_error()
    # The OSCORE mode keys from a PSK handshake too (on OpenSSL, for its exporter).
    assert oscore_psk.rc == 0, oscore_psk.stderr
    assert "layer 0: mode oscore (keyed by a DTLS PSK handshake)" in oscore_psk.stderr


async def test_bad_rpk_configuration_exits_2_with_one_clear_line(
    keys: Keys, tmp_path: Path
) -> None:
    p384_key, p384_pub = new_pair(tmp_path, "p384", ec.SECP384R1())
    server_fp = fingerprint(keys / "client-rpk.pub")
    file_cfg = tmp_path / "server.toml"
    file_cfg.write_text('e2e-rpk-key = "nothere.key"\ne2e-rpk-trust = ["client.pub"]\n')
    trust = ["--e2e-rpk-trust", str(keys / "client-rpk.pub")]
    server_cases = [
        (["--e2e-rpk-key", str(keys / "server-rpk.key")],
         "--e2e-rpk-key needs --e2e-rpk-trust"),
        (trust, "--e2e-rpk-trust needs --e2e-rpk-key"),
        (["--e2e-rpk-key", str(p384_key), *trust], "is not an ECDSA P-256 private key"),
        (["--e2e-rpk-key", str(tmp_path / "missing.key"), *trust],
         "--e2e-rpk-key: cannot read key file"),
        (["--e2e-rpk-key", str(keys / "server-rpk.key"), "--e2e-rpk-trust", str(p384_pub)],
         "not ECDSA P-256"),
        (["--e2e-rpk-key", str(keys / "server-rpk.key"), "--e2e-rpk-trust",
          str(keys / "client-e2e.pem")], "it is a certificate"),
        (["--e2e-rpk-key", str(keys / "server-rpk.key"), "--e2e-rpk-trust",
          str(keys / "client-rpk.key")], "it is a private key"),
        (["--e2e-rpk-key", str(keys / "server-rpk.key"), "--e2e-rpk-trust",
          str(tmp_path / "missing.pub")], "cannot read public key file"),
        (["--e2e-rpk-key", str(keys / "server-rpk.key"), *trust, "--e2e-psk",
          f"{server_fp}:secret"], "is the fingerprint of a key in --e2e-rpk-trust"),
        # Relative paths in the file are the file's folder's: the message names that path.
        (["--config", str(file_cfg)], str(tmp_path / "nothere.key")),
    ]
    client_cases = [
        (["--layer0", "dtls", "--e2e-rpk-key", str(keys / "client-rpk.key")],
         "--e2e-rpk-key needs --e2e-rpk-server-key"),
        (["--layer0", "dtls", "--e2e-rpk-key", str(keys / "client-rpk.key"),
          "--e2e-rpk-server-key", str(keys / "client-rpk.pub")], "lists our own public key"),
        (["--layer0", "dtls", "--e2e-rpk-server-key", str(keys / "server-rpk.pub")],
         "--e2e-rpk-server-key needs --e2e-rpk-key"),
        (["--e2e-rpk-key", str(keys / "client-rpk.key")], "without --layer0 dtls|oscore"),
        (["--layer0", "dtls", "--e2e-rpk-key", str(p384_key), "--e2e-rpk-server-key",
          str(keys / "server-rpk.pub")], "is not an ECDSA P-256 private key"),
    ]
    results = await asyncio.gather(
        *(run(SERVER, "--listen", "coap://127.0.0.1:0", *argv, timeout=30)
          for argv, _ in server_cases),
        *(run(CLIENT, *argv, "coap://127.0.0.1:9/hello", timeout=30)
          for argv, _ in client_cases),
    )
    for (argv, words), r in zip(server_cases + client_cases, results, strict=True):
        assert r.rc == 2, (argv, r)
        line = r.one_line_error()
        assert words in line, (argv, line)
        assert line.startswith(("coap-server: ", "coap-client: "))


def test_help_names_the_rpk_flags() -> None:
    server = subprocess.run([SERVER, "--help"], capture_output=True, text=True, timeout=30)
    cli = subprocess.run([CLIENT, "--help"], capture_output=True, text=True, timeout=30)
    for flag in ("--e2e-rpk-key", "--e2e-rpk-trust"):
        assert flag in server.stdout
    for flag in ("--e2e-rpk-key", "--e2e-rpk-server-key", "--e2e-auth"):
        assert flag in cli.stdout
    assert re.search(r"side\s+by\s+side", server.stdout) and "rpk" in cli.stdout
