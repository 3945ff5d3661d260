"""The OSCORE mode keyed by a PSK handshake (on OpenSSL, for its exporter), through
coap-proxy, with coap-client and coap-server as they are run."""

from __future__ import annotations

import re

import pytest

from .conftest import Keys, Running, client

pytestmark = pytest.mark.slow


async def test_oscore_keyed_by_psk_through_coap_proxy(
    app: Running, proxy: Running, keys: Keys,
) -> None:
    uri = app.uri("coap") + "/echo"
    r = await client("-m", "post", "-e", "inner secret", "-v", "--layer0", "oscore", "--no-keep",
                     *keys.e2e_psk, "-P", proxy.uri("coaps"),
                     "--credentials", str(keys / "client-hop.json"), uri)
    assert r.rc == 0, r.stderr
    assert r.stdout == "inner secret\n"
    assert re.search(r"layer 0: mode oscore \(keyed by a DTLS PSK handshake\),"
                     r" psk identity device-1, handshake cipher PSK-AES128-CCM8",
                     r.stderr), r.stderr
    assert re.search(r"layer 1: hop 127\.0\.0\.1:\d+, psk identity device-1", r.stderr)
