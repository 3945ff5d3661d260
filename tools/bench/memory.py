"""Memory per established Layer 0 session and per OSCORE context, one fresh process per figure.

``python -m coaplayers_tools.bench.memory KIND COUNT`` prints one JSON object. KIND is ``psk``,
``cert`` or ``rpk`` (Layer 0 sessions: the server's :class:`Layer0ServerCore` with its real
listener, clients in memory), ``cert-release-buffers`` (kept for report compatibility: the
product's context already sets OpenSSL's ``SSL_MODE_RELEASE_BUFFERS``, and an established
certificate session no longer holds an SSL object at all, so it measures the same as
``cert``), or ``oscore`` (server security contexts as the OSCORE mode's keying resource
derives them, in a :class:`ContextStore`).

Why in memory and not over the wire: coap-server bounds its sessions (256 by default), and
10,000 certificate handshakes through CoAP take longer than this benchmark's budget. The
server's state per session is the same: the Layer0ServerCore session table, the engine session and
its backend object. Each client session is dropped right after its handshake, so the memory it
used is reused by the next one and the growth is the server's.

The core is the product's, idle-session scan included (:meth:`Layer0ServerCore.entry` runs it on
every ClientHello; it stops at the first session that is not idle). What one scan costs at the
final count is also reported (``expire_scan_ms``).

RSS growth is measured after a warm-up (50 handshakes whose sessions are removed again) so
that one-time allocations (OpenSSL's tables, caches, the interpreter's arenas) do not count.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .procs import rss_of

WARMUP = 50


def _layer0(kind: str, count: int, creds: str | None) -> dict[str, Any]:
    from .inmem import Peers, handshake

    peers = Peers(Path(creds) if creds else None)
    backend = kind if kind in ("psk", "rpk") else "cert"
    core = peers.core(backend, max_sessions=count + WARMUP + 10,
                      release_buffers=kind == "cert-release-buffers")
    for i in range(WARMUP):
        client = peers.client(backend)
        result = handshake(core, client, ("2001:db8::1", 10000 + i))
        client.abort()
        core.remove(result.sid)
    gc.collect()
    before = rss_of()
    t0 = time.perf_counter()
    server_time_tail = 0.0
    tail = max(1, min(100, count // 10))
    for i in range(count):
        client = peers.client(backend)
        result = handshake(core, client, ("2001:db8::2", i % 60000, i // 60000))
        client.abort()
        del client
        if i >= count - tail:
            server_time_tail += result.server_seconds
    elapsed = time.perf_counter() - t0
    gc.collect()
    after = rss_of()
    t1 = time.perf_counter()
    core.expire(0.0)  # the product's scan, at this many sessions (expires none)
    scan = time.perf_counter() - t1
    if core.established_count != count:
        raise RuntimeError(f"{core.established_count} sessions established, wanted {count}")
    return {
        "kind": kind,
        "count": count,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_item": (after - before) / count,
        "seconds": elapsed,
        "server_ms_per_handshake_at_end": 1000 * server_time_tail / tail,
        "expire_scan_ms": 1000 * scan,
        "method": "in-process: coaplayers.layer0.core.Layer0ServerCore with its real listener,"
                  " client engines in memory, RSS growth / count",
    }


def _oscore(count: int) -> dict[str, Any]:
    from coaplayers.oscore import (
        ContextStore,
        OscoreParameters,
        Role,
        derive_context,
        exporter_length,
    )

    store = ContextStore(max_contexts=count + WARMUP + 10)

    def one() -> Any:
        params = OscoreParameters(client_id=store.allocate_client_id(3), server_id=b"")
        secret = os.urandom(exporter_length(params))
        return derive_context(secret, params, Role.SERVER, peer="bench-device")

    warm = [one() for _ in range(WARMUP)]
    for sc in warm:
        store.add(sc)
    for sc in warm:
        store.remove(sc)
    del warm
    gc.collect()
    before = rss_of()
    t0 = time.perf_counter()
    for _ in range(count):
        store.add(one())
    elapsed = time.perf_counter() - t0
    gc.collect()
    after = rss_of()
    if len(store) != count:
        raise RuntimeError(f"{len(store)} contexts stored, wanted {count}")
    return {
        "kind": "oscore",
        "count": count,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_item": (after - before) / count,
        "seconds": elapsed,
        "method": "in-process: server SecurityContexts from derive_context (as the keying "
                  "resource makes them) in a ContextStore, RSS growth / count",
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3) or args[0] not in ("psk", "cert", "rpk", "cert-release-buffers",
                                                "oscore"):
        print("usage: python -m coaplayers_tools.bench.memory psk|cert|cert-release-buffers|oscore"
              " COUNT [CREDS_FOLDER]", file=sys.stderr)
        return 2
    kind, count = args[0], int(args[1])
    creds = args[2] if len(args) == 3 else None
    out = _oscore(count) if kind == "oscore" else _layer0(kind, count, creds)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
