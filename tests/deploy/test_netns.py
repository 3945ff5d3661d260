"""The compose topology with network namespaces: fast, no images, real separate networks.

    client ns --(device net 10.231.1.0/24)-- proxy ns --(backend net 10.231.2.0/24)-- server ns

The client namespace has an address on the device net only and no default route, the proxy
namespace is on both nets and does not forward IP (a new namespace starts with forwarding off),
the server namespace is on the backend net only. So the client reaches the application server
through coap-proxy or not at all, as in compose.yaml. The programs run with the files that
coap-keys writes: DTLS PSK on both hops, and the client's request is a Layer 0 (end-to-end
DTLS) request through the proxy, as compose.yaml's client makes it. Namespaces are named per
run and removed even when the test fails; the veth pairs are created straight inside them, so
nothing is left in the host's namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .support import Background, namespaces, program, run

DEVICE_CLIENT, DEVICE_PROXY = "10.231.1.2", "10.231.1.1"
BACKEND_PROXY, BACKEND_SERVER = "10.231.2.1", "10.231.2.2"
SERVER_PORT, PROXY_PORT = 5684, 5694  # coap-keys' defaults, in its TOML files
PLAIN_PORT = 5683


def _why_no_netns() -> str | None:
    if os.geteuid() != 0:
        return f"network namespaces need root (ip netns add); running as uid {os.geteuid()}"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"clprobe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add is not available here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Topology:
    client: str
    proxy: str
    server: str

    def exec(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]


@pytest.fixture
def topology() -> Iterator[Topology]:
    reason = _why_no_netns()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:8]
    topo = Topology(client=f"cl-{tag}-client", proxy=f"cl-{tag}-proxy", server=f"cl-{tag}-server")
    with namespaces(
        (topo.client, topo.proxy, topo.server),
        ((topo.client, "dev0", topo.proxy, "dev0"), (topo.proxy, "back0", topo.server, "back0")),
        ((topo.client, "dev0", [DEVICE_CLIENT]), (topo.proxy, "dev0", [DEVICE_PROXY]),
         (topo.proxy, "back0", [BACKEND_PROXY]), (topo.server, "back0", [BACKEND_SERVER])),
    ):
        yield topo


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    run([program("coap-keys"), str(folder), "--server-host", BACKEND_SERVER,
         "--proxy-host", DEVICE_PROXY], timeout=30, check=True)
    return folder


def _direct_plain() -> list[str]:
    """Plain CoAP straight to the server's extra coap:// listener (fails fast without a route)."""
    return [program("coap-client"), "-B", "10", f"coap://{BACKEND_SERVER}:{PLAIN_PORT}/hello"]


def _direct_layer1(keys: Path) -> list[str]:
    """Layer 1 straight to the server, with the proxy's own hop-2 credentials.

    Holding the right keys does not help without a path: this works from the proxy's
    namespace and must fail from the client's.
    """
    return [program("coap-client"), "-B", "10", "--credentials",
            str(keys / "proxy-upstream.json"), f"coaps://{BACKEND_SERVER}:{SERVER_PORT}/hello"]


def test_client_reaches_server_only_through_proxy(
    topology: Topology, keys: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    # server.toml: coaps://0.0.0.0:5684, hop-2 PSK, end-to-end credentials (plus, for the
    # reachability checks only, a plain coap:// listener);
    # proxy.toml: coaps://0.0.0.0:5694, hop-1 PSK, hop-2 upstream credentials.
    server = Background(
        topology.exec(topology.server, program("coap-server"), "--config",
                      str(keys / "server.toml"), "--listen", f"coaps://0.0.0.0:{SERVER_PORT}",
                      "--listen", f"coap://{BACKEND_SERVER}:{PLAIN_PORT}"),
        stderr_file=tmp_path / "server.err",
    )
    proxy = Background(
        topology.exec(topology.proxy, program("coap-proxy"), "--config",
                      str(keys / "proxy.toml"), "--log-file", str(tmp_path / "proxy.jsonl")),
        stderr_file=tmp_path / "proxy.err",
    )
    try:
        server.wait_line("listening coaps://", timeout=15)
        proxy.wait_line("ready", timeout=15)

        # The client namespace has no route at all to the backend net.
        route = run(topology.exec(topology.client, "ip", "route", "get", BACKEND_SERVER),
                    timeout=10)
        assert route.returncode != 0, route.stdout
        assert "unreachable" in route.stderr.lower(), route.stderr

        # Layer 0 through the proxy (client.toml names it and holds the device's credentials):
        # answered by the application server inside the end-to-end DTLS session.
        via_proxy = run(
            topology.exec(topology.client, program("coap-client"), "--config",
                          str(keys / "client.toml"), "--layer0", "dtls", "-v", "-B", "10",
                          f"coaps://{BACKEND_SERVER}:{SERVER_PORT}/hello"),
            timeout=30,
        )
        assert via_proxy.returncode == 0, (via_proxy.stdout, via_proxy.stderr,
                                           proxy.stderr(), server.stderr())
        assert "Hello from coap-server (mode layer0-dtls" in via_proxy.stdout, via_proxy.stdout
        detail = via_proxy.stderr  # -v prints the per-layer detail on stderr
        assert "layer 0: mode dtls" in detail, detail
        assert f"layer 1: hop {DEVICE_PROXY}:{PROXY_PORT}" in detail, detail
        # The proxy routed on outer options only: the tunnel, never the inner /hello.
        log = (tmp_path / "proxy.jsonl").read_text()
        assert "/.well-known/atls" in log, log
        assert "/hello" not in log, log

        # Straight to the server: fails at once (no route), long before the 10 s bound.
        # aiocoap resolves even address literals with getaddrinfo, which finds nothing usable
        # without a route: either wording means "no way there" (6 would be a timeout).
        t0 = time.monotonic()
        direct = run(topology.exec(topology.client, *_direct_plain()), timeout=30)
        direct_took = time.monotonic() - t0
        assert direct.returncode not in (0, 6), (direct.returncode, direct.stderr)
        assert "Hello" not in direct.stdout
        assert direct_took < 5, f"direct request took {direct_took:.1f} s: no fast failure"
        assert re.search(r"unreachable|no address information", direct.stderr, re.I), (
            direct.stderr)
        # With the hop-2 keys over DTLS: the kernel refuses the ClientHello (ENETUNREACH),
        # and Layer 1 fails the handshake at once with that reason, well within -B 10.
        t0 = time.monotonic()
        direct_l1 = run(topology.exec(topology.client, *_direct_layer1(keys)), timeout=30)
        direct_l1_took = time.monotonic() - t0
        assert direct_l1.returncode not in (0, 6), (direct_l1.returncode, direct_l1.stderr)
        assert "Hello" not in direct_l1.stdout
        assert direct_l1_took < 5, f"Layer 1 took {direct_l1_took:.1f} s: no fast failure"
        assert re.search(r"unreachable|no route", direct_l1.stderr, re.I), direct_l1.stderr

        # The same requests from the proxy's namespace work: the server is up and reachable
        # from where it should be, so the client's failures are the topology's doing.
        for argv in (_direct_plain(), _direct_layer1(keys)):
            from_proxy = run(topology.exec(topology.proxy, *argv), timeout=30)
            assert from_proxy.returncode == 0, (argv, from_proxy.stderr)
            assert "Hello from coap-server" in from_proxy.stdout
    finally:
        proxy.stop()
        server.stop()
    assert time.monotonic() - started < 30
