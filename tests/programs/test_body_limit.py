"""coap-server's body limit (--max-body) holds for block-wise requests in plain CoAP, inside
Layer 0 and under OSCORE: the same resource reassembles all three."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from .conftest import Keys, client, start_server

pytestmark = pytest.mark.slow  # several processes each


async def test_max_body_in_every_mode(keys: Keys, tmp_path: Path) -> None:
    e2e = keys.psk["e2e"]
    server = start_server(
        tmp_path, "--listen", "coap://127.0.0.1:0", "--max-body", "2048",
        "--e2e-psk", f"{e2e['identity']}:{e2e['key']}",
        "--e2e-cert", str(keys / "server-e2e.pem"), "--e2e-key", str(keys / "server-e2e.key"),
        "--e2e-ca", str(keys / "e2e-ca.pem"),
    )
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(os.urandom(2000))
    big.write_bytes(os.urandom(3000))
    uri = server.uri("coap") + "/echo"
    modes = [[], ["--layer0", "dtls", *keys.e2e_psk], ["--layer0", "oscore", *keys.e2e_cert]]
    try:
        fits = await asyncio.gather(*(client(*m, "-m", "post", "-o", "-", "-f", str(small), uri)
                                      for m in modes))
        refused = await asyncio.gather(*(client(*m, "-m", "post", "-f", str(big), uri)
                                         for m in modes))
    finally:
        assert server.stop() == 0
    for r in fits:
        assert r.rc == 0 and r.out == small.read_bytes(), r.stderr
    for r in refused:
        assert r.rc == 4, r.stderr
        assert "4.13" in r.one_line_error()
    assert "Traceback" not in server.stderr
