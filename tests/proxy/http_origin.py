"""A small HTTP origin for the cross-proxy tests: an ASGI app served by uvicorn.

Python's http.server (the other origin the tests use) has GET only; this one answers the
methods, headers and status codes the mapping must carry. It remembers the last request it
saw, so a test can check what the proxy sent. Run as
``python -m tests.proxy.http_origin HOST PORT [CERT KEY]``; prints ``listen URL``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from typing import Any

import uvicorn

LAST: dict[str, Any] = {}


async def _body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = await _body(receive)
    method, path = scope["method"], scope["path"]
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    if path != "/last":
        LAST.clear()
        LAST.update(method=method, path=path, query=scope["query_string"].decode(),
                    headers=headers, body=body.hex())
    status, out, reply = 200, [(b"content-type", b"text/plain")], b""
    if path == "/last":
        reply, out = json.dumps(LAST).encode(), [(b"content-type", b"application/json")]
    elif path == "/etag":
        out.append((b"etag", b'"v1-abcdef"'))
        out.append((b"cache-control", b"public, max-age=30"))
        if headers.get("if-none-match") == '"v1-abcdef"':
            status = 304
        else:
            reply = b"tagged"
    elif path == "/items" and method == "POST":
        status, reply = 201, b"made"
        out.append((b"location", b"/items/7?v=1"))
    elif path.startswith("/items/") and method in ("PUT", "DELETE"):
        status, out = 204, []
    elif path == "/echo":
        ctype = headers.get("content-type", "application/octet-stream").encode()
        reply, out = body, [(b"content-type", ctype)]
    elif path == "/redirect":
        status, out = 302, [(b"location", b"/elsewhere")]
    elif path == "/slow":
        await asyncio.sleep(30)
    elif path == "/busy":
        status, out = 503, [(b"retry-after", b"7")]
    else:
        status, reply = 404, b"no such thing"
    out.append((b"content-length", str(len(reply)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": reply})


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    tls = {"ssl_certfile": sys.argv[3], "ssl_keyfile": sys.argv[4]} if len(sys.argv) > 4 else {}
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((host, port))
    # A test stops it with SIGTERM while /slow may still be pending (or a refused TLS client
    # still connected): waiting for those would only delay the test's teardown.
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=0.1, **tls)
    server = uvicorn.Server(config)
    scheme = "https" if tls else "http"
    print(f"listen {scheme}://{host}:{sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
