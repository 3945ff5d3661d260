"""coap-keys: the files it writes, their modes, no overwriting, and that the configurations it
writes work end to end: coap-server --config server.toml, coap-proxy --config proxy.toml,
coap-client --config client.toml, through the proxy, in each mode and with each end-to-end
credential kind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import stat
import tomllib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..conftest import free_udp_port
from .conftest import KEYS, Keys, client, run, start, start_proxy

SECRET = {
    "hop-ca.key", "e2e-ca.key", "proxy.key", "server-hop.key", "server-e2e.key",
    "client-e2e.key", "psk.json", "server-psk.json", "proxy-psk.json", "proxy-upstream.json",
    "client-hop.json", "server.toml", "client.toml", "server-rpk.key", "client-rpk.key",
    "client-hop-rpk.key", "proxy-rpk.key", "server-hop-rpk.key",
}
PUBLIC = {"hop-ca.pem", "e2e-ca.pem", "proxy.pem", "server-hop.pem", "server-e2e.pem",
          "client-e2e.pem", "proxy.toml", "server-rpk.pub", "client-rpk.pub",
          "client-hop-rpk.pub", "proxy-rpk.pub", "server-hop-rpk.pub", "client-hop-rpk.json"}


def test_files_and_modes(keys: Keys) -> None:
    names = {p.name for p in keys.dir.iterdir()}
    assert SECRET | PUBLIC <= names
    for name in SECRET:
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600, name
    for name in PUBLIC:
        assert stat.S_IMODE((keys / name).stat().st_mode) & 0o077 in (0o044, 0o004, 0o040, 0)
        assert b"PRIVATE KEY" not in (keys / name).read_bytes(), name
    # Fresh, distinct PSKs per hop and end to end.
    k = {layer: entry["key"] for layer, entry in keys.psk.items()}
    assert set(k) == {"hop1", "hop2", "e2e"} and len(set(k.values())) == 3
    assert all(v.startswith("0x") and len(v) == 34 for v in k.values())


def test_raw_public_key_pairs_and_configuration_entries(keys: Keys) -> None:
    """Two fresh P-256 pairs, each side's configuration pinning the other side's public key,
    and README.txt naming each key by the fingerprint Layer 0 will report."""
    readme = (keys / "README.txt").read_text()
    fingerprints = []
    for side in ("server", "client", "server-hop", "client-hop", "proxy"):  # end to end, Layer 1
        private = serialization.load_pem_private_key((keys / f"{side}-rpk.key").read_bytes(), None)
        public = serialization.load_pem_public_key((keys / f"{side}-rpk.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP256R1)
        der = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        assert private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == der
        fingerprint = hashlib.sha256(der).digest()[:16].hex()
        assert re.search(rf"{side}-rpk\.pub\s+{fingerprint}", readme), readme
        fingerprints.append(fingerprint)
    assert len(set(fingerprints)) == 5  # each layer and each side its own key
    server = tomllib.loads((keys / "server.toml").read_text())
    client = tomllib.loads((keys / "client.toml").read_text())
    proxy = tomllib.loads((keys / "proxy.toml").read_text())
    assert (server["rpk-key"], server["rpk-trust"]) == ("server-hop-rpk.key", ["proxy-rpk.pub"])
    assert (proxy["rpk-key"], proxy["rpk-trust"]) == ("proxy-rpk.key", ["client-hop-rpk.pub"])
    hop1 = json.loads((keys / "client-hop-rpk.json").read_text())
    assert list(hop1.values()) == [{"dtls-rpk": {"key": "client-hop-rpk.key",
                                                 "peer-keys": ["proxy-rpk.pub"]}}]
    assert server["e2e-rpk-key"] == "server-rpk.key"
    assert server["e2e-rpk-trust"] == ["client-rpk.pub"]
    assert client["e2e-rpk-key"] == "client-rpk.key"
    assert client["e2e-rpk-server-key"] == ["server-rpk.pub"]
    # The other kinds are still there, side by side.
    assert {"e2e-psk", "e2e-cert", "e2e-key", "e2e-ca"} <= set(server)
    assert {"e2e-psk", "e2e-psk-identity", "e2e-cert", "e2e-key", "e2e-ca"} <= set(client)


async def test_refuses_to_overwrite_and_has_help(keys: Keys, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in keys.dir.iterdir()}
    r = await run(KEYS, str(keys.dir))
    assert r.rc == 1 and "refusing to overwrite" in r.one_line_error()
    assert {p.name: p.read_bytes() for p in keys.dir.iterdir()} == before
    # One existing key file is enough to refuse, and nothing else gets written.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "proxy.key").write_text("keep me")
    r = await run(KEYS, str(partial))
    assert r.rc == 1 and "proxy.key" in r.stderr
    assert [p.name for p in partial.iterdir()] == ["proxy.key"]
    assert (partial / "proxy.key").read_text() == "keep me"
    h = await run(KEYS, "--help")
    assert h.rc == 0 and "example" in h.stdout and "--server-host" in h.stdout


async def test_generated_configurations_work_through_the_proxy_in_each_mode(
    tmp_path: Path,
) -> None:
    server_port, proxy_port = free_udp_port(), free_udp_port()
    creds = tmp_path / "creds"
    r = await run(KEYS, str(creds), "--server-port", str(server_port),
                  "--proxy-port", str(proxy_port))
    assert r.rc == 0, r.stderr
    server_cfg = tomllib.loads((creds / "server.toml").read_text())
    assert server_cfg["listen"] == [f"coaps://0.0.0.0:{server_port}"]
    proxy_cfg = tomllib.loads((creds / "proxy.toml").read_text())
    assert proxy_cfg["allow"] == [f"127.0.0.1:{server_port}"]
    server = start([str(Path(KEYS).with_name("coap-server")), "--config",
                    str(creds / "server.toml")], tmp_path / "server.err")
    try:
        # The allow-list coap-keys wrote (the application server, nothing else) is enough.
        proxy = start_proxy(tmp_path, "--config", str(creds / "proxy.toml"),
                            "--upstream-timeout", "2", loopback=False)
        try:
            assert server.uris == [f"coaps://0.0.0.0:{server_port}"]
            assert proxy.uris == [f"coaps://0.0.0.0:{proxy_port}"]
            uri = f"coaps://127.0.0.1:{server_port}/echo"
            cfg = ["--config", str(creds / "client.toml"), "-m", "post", "-v"]
            # Run from another folder: the file's relative paths are the file's folder's.
            hop_only, dtls, oscore, wrong_scheme, psk, cert, oscore_cert = await asyncio.gather(
                client(*cfg, "-e", "layer 1 only", uri, cwd="/"),
                client(*cfg, "-e", "layer 0", "--layer0", "dtls", uri, cwd="/"),
                client(*cfg, "-e", "oscore", "--layer0", "oscore", uri, cwd="/"),
                # coap:// to the server's coaps port: the proxy times out upstream (5.04).
                client(*cfg, "-e", "x", "--layer0", "dtls", uri.replace("coaps:", "coap:"),
                       cwd="/"),
                # The file holds every kind: --e2e-auth picks the others.
                client(*cfg, "-e", "psk", "--layer0", "dtls", "--e2e-auth", "psk", uri, cwd="/"),
                client(*cfg, "-e", "cert", "--layer0", "dtls", "--e2e-auth", "cert", uri, cwd="/"),
                client(*cfg, "-e", "oscore cert", "--layer0", "oscore", "--e2e-auth", "cert", uri,
                       cwd="/"),
            )
            direct = await client("--config", str(creds / "client.toml"), "-P", "",
                                  "-B", "4", uri, cwd="/")
        finally:
            assert proxy.stop() == 0
    finally:
        assert server.stop() == 0
    for r, text in ((hop_only, "layer 1 only"), (dtls, "layer 0"), (oscore, "oscore"),
                    (psk, "psk"), (cert, "cert"), (oscore_cert, "oscore cert")):
        assert r.rc == 0, r.stderr
        assert r.stdout == text + "\n"
        assert (f"layer 1: hop 127.0.0.1:{proxy_port}" in r.stderr
                or "layer 1: psk identity device-1" in r.stderr)
    # With every kind in client.toml, the raw public keys are used unless --e2e-auth says.
    server_rpk = re.search(r"server-rpk\.pub\s+([0-9a-f]{32})",
                           (creds / "README.txt").read_text())
    assert server_rpk is not None
    assert f"layer 0: mode dtls rpk, peer {server_rpk[1]}" in dtls.stderr
    assert "layer 0: mode oscore (keyed by a DTLS raw-public-key handshake)" in oscore.stderr
    assert "layer 0: mode dtls psk" in psk.stderr
    assert "layer 0: mode dtls certificate, peer app-server" in cert.stderr
    assert "layer 0: mode oscore (keyed by a DTLS certificate handshake)" in oscore_cert.stderr
    assert "layer 0" not in hop_only.stderr
    assert wrong_scheme.rc == 6
    assert "5.04 Gateway Timeout" in wrong_scheme.one_line_error()
    assert "scheme" in wrong_scheme.stderr and "wrong --e2e-psk" not in wrong_scheme.stderr
    # The client's hop-1 key opens the proxy, not the server: going direct, it fails.
    assert direct.rc == 7, direct
    assert proxy.log_file is not None
    assert proxy.log_file.read_text().count('"event":"exchange"') >= 3
