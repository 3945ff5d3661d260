"""No peer makes coap-server or coap-proxy write more than a bounded number of log lines: a
flood of 3,000 unparsable datagrams (each a warning) leaves a few lines and one summary."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .conftest import start_proxy, start_server

GARBAGE = b"\xff\x00"

pytestmark = pytest.mark.slow  # several processes each


def flood(uri: str, batches: int = 60, per_batch: int = 50) -> None:
    """Garbage in batches, each followed by a CON GET that must be answered: the program has
    read the batch before the next one is sent (no datagram lost to a full socket buffer)."""
    parts = urlsplit(uri)
    address = (parts.hostname, parts.port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        for batch in range(batches):
            for _ in range(per_batch):
                s.sendto(GARBAGE, address)
            mid = batch.to_bytes(2, "big")
            s.sendto(b"\x41\x01" + mid + b"\x07\xb5hello", address)  # CON GET /hello, token 7
            while True:
                data = s.recv(2048)
                if data[2:4] == mid:
                    break


async def test_a_flood_of_unparsable_datagrams_leaves_a_bounded_log(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--listen", "coap://127.0.0.1:0")
    proxy = start_proxy(tmp_path, "--listen", "coap://127.0.0.1:0", "--no-log-exchanges")
    try:
        await asyncio.gather(asyncio.to_thread(flood, server.uri("coap")),
                             asyncio.to_thread(flood, proxy.uri("coap")))
    finally:
        assert server.stop() == 0
        assert proxy.stop() == 0
    server_lines = server.stderr.splitlines()
    assert len(server_lines) <= 15, server_lines[:20]
    assert "held back 2990 log lines" in server_lines[-1] and "unparsable" in server_lines[-1]
    assert proxy.log_file is not None
    events = [json.loads(line) for line in proxy.log_file.read_text().splitlines()]
    logged = [e for e in events if e.get("event") == "log"]
    assert len(logged) <= 15, logged[:20]
    assert "held back 2990 log lines" in logged[-1]["message"]
    assert not any("Traceback" in line for line in server_lines), os.linesep.join(server_lines)
