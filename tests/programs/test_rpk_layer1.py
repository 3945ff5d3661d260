"""Layer 1 raw public keys (RFC 7250) with the programs as real processes, configured from
coap-keys' files: coap-server and coap-proxy serve them next to PSKs on one coaps:// port,
coap-client takes them from flags or from its credentials JSON ("dtls-rpk"), and each layer
keeps its own keys (a hop key opens nothing end to end, nor the reverse)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import CLIENT, PROXY, SERVER, Keys, Running, client, run, start_proxy, start_server
from .test_rpk import fingerprint


@pytest.fixture(scope="module")
def hop_server(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """coap-server from coap-keys' server.toml: Layer 1 PSK (hop 2) and raw public keys
    (trusting proxy-rpk.pub), end-to-end raw public keys; only the listen URI overridden."""
    tmp = tmp_path_factory.mktemp("hop-server")
    server = start_server(tmp, "--config", str(keys / "server.toml"),
                          "--listen", "coaps://127.0.0.1:0", "-v", name="hop-server")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hop_proxy(keys: Keys, hop_server: Running, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Running]:
    """coap-proxy from coap-keys' proxy.toml (raw public keys trusting client-hop-rpk.pub),
    reaching the server with its own raw public key (a "dtls-rpk" upstream entry)."""
    tmp = tmp_path_factory.mktemp("hop-proxy")
    upstream = tmp / "upstream.json"
    upstream.write_text(json.dumps({"coaps://127.0.0.1*": {"dtls-rpk": {
        "key": str(keys / "proxy-rpk.key"), "peer-keys": [str(keys / "server-hop-rpk.pub")]}}}))
    proxy = start_proxy(tmp, "--config", str(keys / "proxy.toml"),
                        "--listen", "coaps://127.0.0.1:0", "--upstream-credentials", str(upstream))
    try:
        yield proxy
    finally:
        proxy.stop()


async def test_rpk_hops_directly_through_the_proxy_and_next_to_psk(
    keys: Keys, hop_server: Running, hop_proxy: Running
) -> None:
    hello = hop_server.uri("coaps") + "/hello"
    via_rpk = ["--config", str(keys / "client.toml"), "-P", hop_proxy.uri("coaps"),
               "--credentials", str(keys / "client-hop-rpk.json")]
    hop2 = keys.psk["hop2"]
    direct, proxied, e2e, oscore, psk = await asyncio.gather(
        client("-v", "--rpk-key", str(keys / "proxy-rpk.key"),
               "--rpk-server-key", str(keys / "server-hop-rpk.pub"), hello),
        client("-v", *via_rpk, hello),
        client(*via_rpk, "--layer0", "dtls", hello),
        client(*via_rpk, "--layer0", "oscore", hello),
        client("-u", hop2["identity"], "-k", hop2["key"], hello),
    )
    server_fp = fingerprint(keys / "server-hop-rpk.pub")
    proxy_fp = fingerprint(keys / "proxy-rpk.pub")
    for r in (direct, proxied, e2e, oscore, psk):
        assert r.rc == 0, r.stderr
    # The resource names the Layer 1 peer by its key's fingerprint, as Layer 0 does.
    assert direct.stdout == f"Hello from coap-server (mode plain, layer 1 peer {proxy_fp})\n"
    assert re.search(rf"layer 1: hop [^,]+, peer {server_fp}, mode rpk, cipher "
                     r"TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8", direct.stderr), direct.stderr
    # Through the proxy: hop 1 pins the proxy's key, hop 2 is the proxy's own session.
    assert proxied.stdout == f"Hello from coap-server (mode plain, layer 1 peer {proxy_fp})\n"
    assert re.search(rf"layer 1: hop [^,]+, peer {proxy_fp}, mode rpk", proxied.stderr)
    # End to end inside: Layer 0 names the client by its own (end-to-end) key, Layer 1 the
    # hop that delivered the records (the proxy).
    assert e2e.stdout == (f"Hello from coap-server (mode layer0-dtls, layer 1 peer {proxy_fp},"
                          f" layer 0 peer {fingerprint(keys / 'client-rpk.pub')})\n")
    assert oscore.stdout == (f"Hello from coap-server (mode oscore, layer 1 peer {proxy_fp},"
                             f" layer 0 peer {fingerprint(keys / 'client-rpk.pub')})\n")
    assert psk.stdout == f"Hello from coap-server (mode plain, layer 1 peer {hop2['identity']})\n"
    assert f"identity': '{proxy_fp}'" in hop_server.stderr  # the server's -v handshake log


async def test_wrong_keys_fail_clearly_and_layers_keep_their_keys(
    keys: Keys, hop_server: Running
) -> None:
    hello = hop_server.uri("coaps") + "/hello"
    wrong_server, e2e_key_at_hop, hop_key_end_to_end = await asyncio.gather(
        # The end-to-end server key is not the server's Layer 1 key.
        client("--rpk-key", str(keys / "proxy-rpk.key"),
               "--rpk-server-key", str(keys / "server-rpk.pub"), hello),
        # The client's end-to-end key opens no hop ...
        client("--rpk-key", str(keys / "client-rpk.key"),
               "--rpk-server-key", str(keys / "server-hop-rpk.pub"), hello),
        # ... and a hop key no end-to-end session (the hop itself is fine: a PSK).
        client("-u", keys.psk["hop2"]["identity"], "-k", keys.psk["hop2"]["key"],
               "--layer0", "dtls", "--e2e-rpk-key", str(keys / "proxy-rpk.key"),
               "--e2e-rpk-server-key", str(keys / "server-rpk.pub"), hello),
    )
    for r in (wrong_server, e2e_key_at_hop, hop_key_end_to_end):
        assert r.rc == 7, r.stderr  # security failure
        assert r.seconds < 20
    line = wrong_server.one_line_error()
    assert "Layer 1 security failure" in line
    assert f"server's public key {fingerprint(keys / 'server-hop-rpk.pub')} is not one we trust" \
        in line
    assert "Layer 1 security failure" in e2e_key_at_hop.one_line_error()
    assert "rejected our raw public key" in e2e_key_at_hop.one_line_error()
    assert "end-to-end security failure" in hop_key_end_to_end.one_line_error()
    client_fp = fingerprint(keys / "client-rpk.pub")
    assert f"client's public key {client_fp} is not one we trust" in hop_server.stderr


async def test_one_key_at_both_layers_is_refused(keys: Keys, tmp_path: Path) -> None:
    server_key, client_key = str(keys / "server-rpk.key"), str(keys / "client-rpk.key")
    trust = str(keys / "client-rpk.pub")
    same_trust, same_key, client_same, psk_named_like_key, bad_file = await asyncio.gather(
        run(SERVER, "--listen", "coaps://127.0.0.1:0",
            "--rpk-key", str(keys / "server-hop-rpk.key"), "--rpk-trust", trust,
            "--e2e-rpk-key", server_key, "--e2e-rpk-trust", trust),
        run(SERVER, "--listen", "coaps://127.0.0.1:0", "--rpk-key", server_key,
            "--rpk-trust", str(keys / "proxy-rpk.pub"),
            "--e2e-rpk-key", server_key, "--e2e-rpk-trust", trust),
        run(CLIENT, "--rpk-key", client_key, "--rpk-server-key", str(keys / "server-hop-rpk.pub"),
            "--layer0", "dtls", "--e2e-rpk-key", client_key,
            "--e2e-rpk-server-key", str(keys / "server-rpk.pub"), "coaps://127.0.0.1:9/"),
        run(PROXY, "--listen", "coaps://127.0.0.1:0", "--rpk-key", str(keys / "proxy-rpk.key"),
            "--rpk-trust", trust, "--psk", f"{fingerprint(keys / 'client-rpk.pub')}:secret"),
        run(PROXY, "--listen", "coaps://127.0.0.1:0", "--rpk-key", str(keys / "proxy-rpk.key"),
            "--rpk-trust", str(keys / "proxy-rpk.key")),
    )
    for r in (same_trust, same_key, client_same, psk_named_like_key, bad_file):
        assert r.rc == 2, r.stderr
    assert "--rpk-trust and --e2e-rpk-trust both list the key" in same_trust.one_line_error()
    assert "--rpk-key and --e2e-rpk-key are the same key" in same_key.one_line_error()
    assert "--rpk-key and --e2e-rpk-key are the same key" in client_same.one_line_error()
    assert "is the fingerprint of a key in --rpk-trust" in psk_named_like_key.one_line_error()
    assert "it is a private key" in bad_file.one_line_error()


def test_help_names_the_layer1_rpk_flags() -> None:
    import subprocess

    for program, flags in ((SERVER, ("--rpk-key", "--rpk-trust")),
                           (PROXY, ("--rpk-key", "--rpk-trust")),
                           (CLIENT, ("--rpk-key", "--rpk-server-key"))):
        out = subprocess.run([program, "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0
        for flag in flags:
            assert flag in out.stdout, (program, flag)
