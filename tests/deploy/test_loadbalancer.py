"""Scale-out behind a load balancer operators already run: nginx (stream module, UDP) in front
of two coap-proxy processes in front of a replica set of three coap-server processes, each
role in a network namespace of its own:

    clients --(10.232.1.0/24)-- nginx --(10.232.2.0/24)-- 2 proxies --(10.232.3.0/24)-- 3 servers

nginx hashes each client's address and port to a proxy (docs/DEPLOY.md, "Scaling out"). The
clients are Layer 0 DTLS and OSCORE clients with Layer 1 (DTLS PSK) to the load balancer's
address. Killing one proxy mid-run moves its clients' Layer 1 sessions to the other proxy and
costs no end-to-end handshake; killing one replica makes its clients handshake again with
another replica; every request of every client is answered right throughout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .support import ROOT, Background, ensure_debian_packages, program, run
from .support import namespaces as make_namespaces

pytestmark = pytest.mark.slow

CLIENT, LB_DEVICE = "10.232.1.2", "10.232.1.1"
LB_INNER, PROXIES = "10.232.2.1", ("10.232.2.11", "10.232.2.12")
PROXY_BACKEND, SERVERS = "10.232.3.1", ("10.232.3.20", "10.232.3.21", "10.232.3.22")
PORT = 5694
CLIENTS = 6  # of each kind

NGINX_CONF = """\
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1; daemon off; pid {run}/nginx.pid; error_log {run}/error.log info;
events {{}}
stream {{
  upstream coap_proxies {{
    hash $remote_addr$remote_port consistent;   # a client's 4-tuple sticks to one proxy
    server {p0}:{port} max_fails=1 fail_timeout=30s;
    server {p1}:{port} max_fails=1 fail_timeout=30s;
  }}
  server {{
    listen {lb}:{port} udp;
    proxy_pass coap_proxies;
    proxy_timeout 60s;
  }}
}}
"""


@dataclass
class Namespaces:
    client: str
    lb: str
    proxy: str
    server: str

    def exec(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    reason = ensure_debian_packages(["nginx", "libnginx-mod-stream"])
    if reason or shutil.which("nginx") is None:
        pytest.skip(reason or "nginx is not installed")
    tag = uuid.uuid4().hex[:6]
    ns = Namespaces(*(f"lb-{tag}-{n}" for n in ("client", "lb", "proxy", "server")))
    with make_namespaces(
        (ns.client, ns.lb, ns.proxy, ns.server),
        ((ns.client, "c0", ns.lb, "l0"), (ns.lb, "l1", ns.proxy, "p0"),
         (ns.proxy, "p1", ns.server, "s0")),
        ((ns.client, "c0", [CLIENT]), (ns.lb, "l0", [LB_DEVICE]), (ns.lb, "l1", [LB_INNER]),
         (ns.proxy, "p0", PROXIES), (ns.proxy, "p1", [PROXY_BACKEND]),
         (ns.server, "s0", SERVERS)),
    ):
        yield ns


def _exchanges(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [x for x in map(json.loads, log.read_text().splitlines())
            if x.get("event") == "exchange"]


def test_nginx_two_proxies_three_replicas_survive_a_proxy_and_a_replica_kill(
    namespaces: Namespaces, tmp_path: Path
) -> None:
    ns = namespaces
    keys = tmp_path / "keys"
    run([program("coap-keys"), str(keys), "--proxy-host", LB_DEVICE], timeout=30, check=True)
    e2e = ["--e2e-cert", str(keys / "server-e2e.pem"), "--e2e-key", str(keys / "server-e2e.key"),
           "--e2e-ca", str(keys / "e2e-ca.pem")]
    servers = [
        Background(ns.exec(ns.server, program("coap-server"), "--listen",
                           f"coap://{addr}:5683", "--replica", str(i), *e2e),
                   stderr_file=tmp_path / f"server{i}.err")
        for i, addr in enumerate(SERVERS)]
    members = ",".join(f"coap://{addr}:5683" for addr in SERVERS)
    proxy_logs = [tmp_path / f"proxy{i}.jsonl" for i in range(2)]
    proxies = [
        Background(ns.exec(ns.proxy, program("coap-proxy"), "--listen", f"coaps://{addr}:{PORT}",
                           "--psk-file", str(keys / "proxy-psk.json"), "--no-forward",
                           "--route", f"/=replicas:{members}", "--health-interval", "0.2",
                           "--health-timeout", "1", "--log-file", str(proxy_logs[i])),
                   stderr_file=tmp_path / f"proxy{i}.err")
        for i, addr in enumerate(PROXIES)]
    (tmp_path / "nginx.conf").write_text(NGINX_CONF.format(
        run=tmp_path, p0=PROXIES[0], p1=PROXIES[1], lb=LB_DEVICE, port=PORT))
    nginx = Background(ns.exec(ns.lb, "nginx", "-c", str(tmp_path / "nginx.conf")),
                       stderr_file=tmp_path / "nginx.err")
    clients: subprocess.Popen[str] | None = None
    try:
        for s in servers:
            s.wait_line("listening coap://", timeout=30)
        for p in proxies:
            p.wait_line("ready", timeout=30)
        clients = subprocess.Popen(
            ns.exec(ns.client, sys.executable, "-m", "tests.deploy.lbclients",
                    f"coaps://{LB_DEVICE}:{PORT}", str(keys), str(CLIENTS)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(tmp_path / "c.err", "w"),
            text=True, cwd=ROOT)

        def round_(tag: str) -> dict[str, Any]:
            assert clients is not None and clients.stdin and clients.stdout
            clients.stdin.write(f"round {tag}\n")
            clients.stdin.flush()
            line = clients.stdout.readline()  # each request is bounded (40 s) by the driver
            assert line, (tmp_path / "c.err").read_text()[-3000:]
            result: dict[str, Any] = json.loads(line)
            assert result["ok"] == 2 * CLIENTS, result["errors"]
            return result

        first = round_("start")
        second = round_("steady")
        assert [c["e2e"] for c in second["clients"]] == [1] * (2 * CLIENTS)
        assert {c["replica"] for c in second["clients"]} == {0, 1, 2}
        served = [len(_exchanges(log)) for log in proxy_logs]
        assert all(served), served  # nginx spread the clients over both proxies
        assert first["clients"] == second["clients"]

        # Kill proxy 0. Its clients' Layer 1 sessions move to proxy 1 (nginx takes proxy 0
        # out on the ICMP error); their Layer 0 sessions and OSCORE contexts carry on.
        proxies[0].proc.send_signal(signal.SIGKILL)
        proxies[0].proc.wait(timeout=10)
        moved = round_("proxy-killed")
        at_proxy1 = len(_exchanges(proxy_logs[1]))
        after = round_("after-proxy")
        # Every client now goes through proxy 1: at least one exchange each.
        assert len(_exchanges(proxy_logs[1])) - at_proxy1 >= 2 * CLIENTS
        for before, now in zip(second["clients"], after["clients"], strict=True):
            assert now["e2e"] == before["e2e"], (before, now)  # no end-to-end handshake
            assert now["replica"] == before["replica"]
        assert any(now["layer1"] > before["layer1"]
                   for before, now in zip(second["clients"], moved["clients"], strict=True))

        # Kill the replica holding most state: its clients handshake again with another.
        counts = {r: sum(c["replica"] == r for c in after["clients"]) for r in (0, 1, 2)}
        victim = max(counts, key=lambda r: counts[r])
        servers[victim].proc.send_signal(signal.SIGKILL)
        servers[victim].proc.wait(timeout=10)
        failed_over = round_("replica-killed")
        for before, now in zip(after["clients"], failed_over["clients"], strict=True):
            if before["replica"] == victim:
                assert now["e2e"] == before["e2e"] + 1 and now["replica"] != victim, now
            else:
                assert now == before or now["layer1"] >= before["layer1"], (before, now)
                assert now["e2e"] == before["e2e"] and now["replica"] == before["replica"]
        last = round_("end")
        assert [c["e2e"] for c in last["clients"]] == [c["e2e"] for c in failed_over["clients"]]
    finally:
        if clients is not None:
            if clients.stdin:
                clients.stdin.close()
            try:
                clients.wait(timeout=20)
            except subprocess.TimeoutExpired:
                clients.kill()
                clients.wait()
        nginx.stop()
        for p in (*proxies, *servers):
            p.stop()
