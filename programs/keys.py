"""coap-keys: create a demo credential set and ready configuration files for the three programs.

Two certificate authorities, one per layer, so that a hop certificate can never authenticate
an end-to-end session (nor the reverse); fresh random PSKs for each hop and for end to end; an
end-to-end raw public key pair (RFC 7250, ECDSA P-256) for the server and for the client, each
pinning the other's public key. Key files are written owner-readable only, and nothing existing
is overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coaplayers import pki
from coaplayers.dtls import spki_fingerprint
from coaplayers.errors import LocalError


class Refused(LocalError):
    """The target holds keys already: overwriting them could lock out deployed devices."""


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _toml(table: dict[str, object]) -> bytes:
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items()).encode()


class RawKey:
    """An end-to-end raw public key pair: the private key PEM (PKCS#8) and the public key PEM."""

    def __init__(self) -> None:
        self.private_key = ec.generate_private_key(ec.SECP256R1())

    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def fingerprint(self) -> str:
        """The identity the peer sees (Layer 0 logs, resources, policies)."""
        return spki_fingerprint(self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def create(
    folder: Path,
    *,
    server_host: str = "127.0.0.1",
    proxy_host: str = "127.0.0.1",
    server_port: int = 5684,
    proxy_port: int = 5694,
    device: str = "device-1",
) -> list[Path]:
    """Write the credential set into ``folder``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [
        "hop-ca.pem", "hop-ca.key", "e2e-ca.pem", "e2e-ca.key",
        "proxy.pem", "proxy.key", "server-hop.pem", "server-hop.key",
        "server-e2e.pem", "server-e2e.key", "client-e2e.pem", "client-e2e.key",
        "server-rpk.key", "server-rpk.pub", "client-rpk.key", "client-rpk.pub",
        "client-hop-rpk.key", "client-hop-rpk.pub", "proxy-rpk.key", "proxy-rpk.pub",
        "server-hop-rpk.key", "server-hop-rpk.pub", "client-hop-rpk.json",
        "psk.json", "server-psk.json", "proxy-psk.json", "proxy-upstream.json", "client-hop.json",
        "server.toml", "proxy.toml", "client.toml",
    ]
    existing = [n for n in names if (folder / n).exists()]
    if existing:
        raise Refused(
            f"{folder} already holds {', '.join(existing[:4])}"
            f"{' ...' if len(existing) > 4 else ''}; refusing to overwrite keys (choose another"
            " folder or remove them first)"
        )
    hop_ca = pki.make_ca("coaplayers hop CA")  # short names: every leaf carries its issuer's
    e2e_ca = pki.make_ca("coaplayers e2e CA")
    proxy = pki.issue(hop_ca, proxy_host if not proxy_host[0].isdigit() else "proxy",
                      names=sorted({proxy_host, "proxy", "localhost", "127.0.0.1", "::1"}))
    server_names = sorted({server_host, "app-server", "localhost", "127.0.0.1", "::1"})
    server_hop = pki.issue(hop_ca, "app-server-hop", names=server_names)
    # The end-to-end certificates are for one role each (and the client's names no host).
    server_e2e = pki.issue(e2e_ca, "app-server", names=server_names, client=False)
    client_e2e = pki.issue(e2e_ca, device, server=False)
    # Raw public keys: one pair per end to end, and separate pairs per hop (each layer is its
    # own authorization domain: a hop key opens nothing end to end).
    server_rpk, client_rpk = RawKey(), RawKey()
    hop_rpk = {"client-hop": RawKey(), "proxy": RawKey(), "server-hop": RawKey()}
    psks = {
        "hop1": (device, secrets.token_hex(16)),  # device <-> proxy
        "hop2": ("proxy", secrets.token_hex(16)),  # proxy <-> application server
        "e2e": (device, secrets.token_hex(16)),  # device <-> application server, end to end
    }
    # Credentials patterns match whole URIs, where an IPv6 address stands in brackets.
    server_uri_host = f"[{server_host}]" if ":" in server_host else server_host
    proxy_uri_host = f"[{proxy_host}]" if ":" in proxy_host else proxy_host
    files: dict[str, tuple[bytes, bool]] = {
        "hop-ca.pem": (hop_ca.cert_pem(), False),
        "hop-ca.key": (hop_ca.key_pem(), True),
        "e2e-ca.pem": (e2e_ca.cert_pem(), False),
        "e2e-ca.key": (e2e_ca.key_pem(), True),
        "proxy.pem": (proxy.cert_pem(), False),
        "proxy.key": (proxy.key_pem(), True),
        "server-hop.pem": (server_hop.cert_pem(), False),
        "server-hop.key": (server_hop.key_pem(), True),
        "server-e2e.pem": (server_e2e.cert_pem(), False),
        "server-e2e.key": (server_e2e.key_pem(), True),
        "client-e2e.pem": (client_e2e.cert_pem(), False),
        "client-e2e.key": (client_e2e.key_pem(), True),
        "server-rpk.key": (server_rpk.key_pem(), True),
        "server-rpk.pub": (server_rpk.public_pem(), False),
        "client-rpk.key": (client_rpk.key_pem(), True),
        "client-rpk.pub": (client_rpk.public_pem(), False),
        **{f"{name}-rpk.key": (k.key_pem(), True) for name, k in hop_rpk.items()},
        **{f"{name}-rpk.pub": (k.public_pem(), False) for name, k in hop_rpk.items()},
        # The device's first hop with raw public keys instead of client-hop.json's PSK.
        "client-hop-rpk.json": (json.dumps({
            f"coaps://{proxy_uri_host}*": {"dtls-rpk": {
                "key": "client-hop-rpk.key", "peer-keys": ["proxy-rpk.pub"],
            }},
        }, indent=2).encode(), False),
        # Everything secret about PSKs in one owner-only overview, for the operator.
        "psk.json": (json.dumps({k: {"identity": i, "key": "0x" + v} for k, (i, v) in psks.items()},
                                indent=2).encode(), True),
        "server-psk.json": (json.dumps({psks["hop2"][0]: "0x" + psks["hop2"][1]}).encode(), True),
        "proxy-psk.json": (json.dumps({psks["hop1"][0]: "0x" + psks["hop1"][1]}).encode(), True),
        "proxy-upstream.json": (json.dumps({
            f"coaps://{server_uri_host}*": {"dtls": {
                "psk": {"hex": psks["hop2"][1]},
                "client-identity": {"ascii": psks["hop2"][0]},
            }},
        }, indent=2).encode(), True),
        "client-hop.json": (json.dumps({
            f"coaps://{proxy_uri_host}*": {"dtls": {
                "psk": {"hex": psks["hop1"][1]},
                "client-identity": {"ascii": psks["hop1"][0]},
            }},
        }, indent=2).encode(), True),
    }
    files["server.toml"] = (_toml({
        "listen": [f"coaps://{'[::]' if ':' in server_host else '0.0.0.0'}:{server_port}"],
        "psk-file": "server-psk.json",
        "rpk-key": "server-hop-rpk.key",
        "rpk-trust": ["proxy-rpk.pub"],
        "e2e-psk": [f"{psks['e2e'][0]}:0x{psks['e2e'][1]}"],
        "e2e-cert": "server-e2e.pem",
        "e2e-key": "server-e2e.key",
        "e2e-ca": "e2e-ca.pem",
        "e2e-rpk-key": "server-rpk.key",
        "e2e-rpk-trust": ["client-rpk.pub"],
    }), True)
    files["proxy.toml"] = (_toml({
        "listen": [f"coaps://{'[::]' if ':' in proxy_host else '0.0.0.0'}:{proxy_port}"],
        "psk-file": "proxy-psk.json",
        "rpk-key": "proxy-rpk.key",
        "rpk-trust": ["client-hop-rpk.pub"],
        "upstream-credentials": "proxy-upstream.json",
        # Forward proxying reaches the application server and nothing else (the proxy is
        # closed by default; a loopback server address has to be listed to be reached).
        "allow": [f"{server_uri_host}:{server_port}" if server_port else server_host],
    }), False)
    files["client.toml"] = (_toml({
        "proxy": f"coaps://{proxy_uri_host}:{proxy_port}",
        "credentials": "client-hop.json",
        "e2e-psk-identity": psks["e2e"][0],
        "e2e-psk": "0x" + psks["e2e"][1],
        "e2e-ca": "e2e-ca.pem",
        "e2e-cert": "client-e2e.pem",
        "e2e-key": "client-e2e.key",
        "e2e-rpk-key": "client-rpk.key",
        "e2e-rpk-server-key": ["server-rpk.pub"],
    }), True)
    written = []
    for name in names:
        data, secret = files[name]
        _write(folder / name, data, secret=secret)
        written.append(folder / name)
    (folder / "README.txt").write_text(
        f"Demo credentials made by coap-keys.\n"
        f"  coap-server --config {folder}/server.toml\n"
        f"  coap-proxy --config {folder}/proxy.toml\n"
        f"  coap-client --config {folder}/client.toml --layer0 dtls"
        f" coaps://{server_uri_host}:{server_port}/hello\n"
        f"End to end, client.toml holds every kind; --layer0 dtls and --layer0 oscore use the raw\n"
        f"public keys unless --e2e-auth psk|cert picks another.\n"
        f"Raw public key identities (SPKI fingerprints, as both layers name the peers):\n"
        f"  server-rpk.pub      {server_rpk.fingerprint}  (end to end)\n"
        f"  client-rpk.pub      {client_rpk.fingerprint}  (end to end)\n"
        + "".join(f"  {name + '-rpk.pub':<18}  {k.fingerprint}  (Layer 1)\n"
                  for name, k in hop_rpk.items())
        + f"Layer 1 takes PSKs and raw public keys side by side; for the first hop with raw\n"
        f"public keys instead of client-hop.json's PSK:\n"
        f"  coap-client --config {folder}/client.toml --credentials"
        f" {folder}/client-hop-rpk.json ...\n"
    )
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="coap-keys",
        description="Create a demo credential set and configuration files for coap-server,\n"
        "coap-proxy and coap-client (server.toml, proxy.toml, client.toml). Each layer has\n"
        "its own: one CA per layer with certificates for every side, fresh PSKs for hop 1,\n"
        "hop 2 and end to end, and raw public key pairs (RFC 7250) for every side at Layer 1\n"
        "and end to end. client.toml sends through the proxy; FOLDER/README.txt says how to\n"
        "start each program.",
        epilog="examples:\n"
        "  coap-keys creds                                  # all on 127.0.0.1, ports 5684/5694\n"
        "  coap-keys creds --server-port 6684 --proxy-port 6694    # those ports are taken\n"
        "  coap-keys /keys --server-host app-server --proxy-host proxy   # compose.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", metavar="FOLDER",
                   help="where to write (created if missing; never overwritten)")
    p.add_argument("--server-host", default="127.0.0.1",
                   help="application server's name or address")
    p.add_argument("--proxy-host", default="127.0.0.1", help="proxy's name or address")
    p.add_argument("--server-port", type=int, default=5684, metavar="PORT",
                   help="the application server's coaps:// port in server.toml (default 5684)")
    p.add_argument("--proxy-port", type=int, default=5694, metavar="PORT",
                   help="the proxy's coaps:// port in proxy.toml and client.toml (default 5694)")
    p.add_argument("--device", default="device-1", help="the client's identity at both layers")
    args = p.parse_args(argv)
    try:
        written = create(
            Path(args.folder), server_host=args.server_host, proxy_host=args.proxy_host,
            server_port=args.server_port, proxy_port=args.proxy_port, device=args.device,
        )
    except Refused as exc:
        print(f"coap-keys: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} files to {args.folder} (key files mode 600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
