"""Clients for the load-balancer test (test_loadbalancer.py), run inside its client namespace.

``python -m tests.deploy.lbclients ORIGIN KEYS N``: N Layer 0 DTLS clients and N OSCORE
clients, each on a socket of its own (so the load balancer sees N*2 clients), all with
Layer 1 (DTLS PSK) to ORIGIN. For each ``round TAG`` line on stdin every client sends one PUT
and the driver prints one JSON line: how many were answered right, the errors, and per client
its Layer 0 handshakes (or OSCORE keyings), the replica holding its state and its Layer 1
handshakes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiocoap

from coaplayers import dtls, layer1
from coaplayers.layer0 import Layer0Client
from coaplayers.layer0_modes import OscoreModeRequester
from coaplayers.layer1.credentials import ClientCredentials
from coaplayers.replica import replica_of_kid, replica_of_session


async def main(origin: str, keys: Path, n: int) -> None:
    hop = ClientCredentials.from_file(keys / "client-hop.json")
    e2e = dtls.CertificateCredentials.from_files(
        keys / "client-e2e.pem", keys / "client-e2e.key", keys / "e2e-ca.pem")
    layer1_handshakes: dict[int, int] = {}
    clients: list[tuple[str, Any, Any]] = []
    for i in range(2 * n):

        def count(kind: str, fields: dict[str, Any], i: int = i) -> None:
            if kind == "handshake":
                layer1_handshakes[i] = layer1_handshakes.get(i, 0) + 1

        ctx = await layer1.create_context(client_credentials=hop, on_event=count)
        if i < n:
            clients.append(("layer0", ctx, Layer0Client(ctx.context, origin, e2e)))
        else:
            clients.append(("oscore", ctx, OscoreModeRequester(ctx, origin, None, e2e)))

    async def put(requester: Any, text: bytes) -> str | None:
        message = aiocoap.Message(code=aiocoap.PUT, uri=origin + "/echo", payload=text)
        try:
            response = await asyncio.wait_for(requester.request(message).response, 40)
        except Exception as exc:  # reported, counted by the test
            return f"{type(exc).__name__}: {exc}"
        if response.code != aiocoap.CHANGED or response.payload != text:
            return f"wrong answer {response.code} {bytes(response.payload)!r}"
        return None

    def state(i: int, kind: str, r: Any) -> dict[str, Any]:
        if kind == "layer0":
            path = r.session_path
            return {"kind": kind, "e2e": r.handshakes, "layer1": layer1_handshakes.get(i, 0),
                    "replica": replica_of_session(path[0]) if path else None}
        params = r.requester.parameters
        return {"kind": kind, "e2e": r.requester.keyings, "layer1": layer1_handshakes.get(i, 0),
                "replica": replica_of_kid(params.client_id) if params else None}

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := (await reader.readline()).decode().split():
            if line[0] != "round":
                break
            tag = line[1]
            errors = await asyncio.gather(*(put(r, f"{tag}-{i}".encode())
                                            for i, (_, _, r) in enumerate(clients)))
            print(json.dumps({
                "round": tag, "ok": sum(e is None for e in errors),
                "errors": [e for e in errors if e is not None],
                "clients": [state(i, k, r) for i, (k, _, r) in enumerate(clients)],
            }), flush=True)
    finally:
        for _, ctx, r in clients:
            await r.close()
            await ctx.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])))
