"""compose.yaml brought up for real by the command docs/DEPLOY.md gives: ``scripts/compose podman``.

No Docker engine runs on the project's machines and no container registry is reachable, so the
script's podman path is the one exercised: its own containers.conf (runc, netavark), a base
image made locally with debootstrap once per machine, the build on the host's network. The test
runs the command exactly as DEPLOY.md shows it, with a project name of its own
(COMPOSE_PROJECT_NAME), compares what it prints with the output DEPLOY.md shows, then probes the
topology. The stack is removed whatever happens (``scripts/compose podman down``, then anything
left by label); the images stay, as the cache.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .support import ROOT, ensure_debian_packages, run, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CACHE = ROOT / ".deploy-cache"
IMAGE = "localhost/coaplayers:latest"  # scripts/compose's default COAPLAYERS_IMAGE
CONTAINERS_CONF = ('[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n'
                   '[network]\nnetwork_backend = "netavark"\n')
HEX = re.compile(r"[0-9a-f]{32}")


@dataclass
class Podman:
    env: dict[str, str]

    def __call__(self, *argv: str, timeout: float = 120,
                 check: bool = False) -> subprocess.CompletedProcess[str]:
        return run(["podman", *argv], timeout=timeout, check=check, env=self.env)


def _podman_env() -> dict[str, str]:
    """The test's own podman calls use the configuration scripts/compose writes."""
    CACHE.mkdir(exist_ok=True)
    conf = CACHE / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.write_text(CONTAINERS_CONF)
    return dict(os.environ, CONTAINERS_CONF=str(conf))


def deploy_recipe() -> tuple[list[str], list[str]]:
    """DEPLOY.md's podman command and the output it shows for it."""
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    found = re.search(r"^With podman:\n\n```\n(.*?)```\n\n.*?\n```\n(.*?)```", text, re.S | re.M)
    assert found, "docs/DEPLOY.md: no 'With podman:' command followed by its output"
    return found[1].splitlines(), found[2].splitlines()


@pytest.fixture(scope="module")
def podman() -> Podman:
    if os.geteuid() != 0:
        pytest.skip("podman runs compose's networks here only as root")
    # What scripts/compose installs, checked here first so that a machine that cannot have
    # them skips with the reason instead of failing.
    problem = ensure_debian_packages(["podman", "podman-compose", "debootstrap", "runc",
                                      "netavark", "aardvark-dns", "iptables"])
    if problem:
        pytest.skip(f"podman cannot run: {problem}")
    pod = Podman(_podman_env())
    try:
        info = pod("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("podman cannot run: `podman info` did not answer within 60 s")
    if info.returncode != 0:
        pytest.skip(f"podman cannot run: podman info: {info.stderr.strip()[-500:]}")
    return pod


def _pin_bridge_macs(pod: Podman, project: str) -> None:
    """Fix each stack bridge's MAC address at its current value.

    A Linux bridge whose address was never set takes the lowest MAC among its ports, so it
    changes whenever a container joins or leaves; netavark 1.4 (podman 4.3) does not set one.
    Containers that cached the old gateway MAC then send their DNS queries to 10.89.x.1 into
    another container's port for ~5 s (seen here: the proxy's upstream look-ups of app-server
    stalled 5 s each after a new container joined the device network). Docker sets the bridge
    MAC itself, so this is a workaround for the podman run only.
    """
    for net in ("device", "backend"):
        bridge = pod("network", "inspect", "-f", "{{.NetworkInterface}}",
                     f"{project}_{net}").stdout.strip()
        if not bridge:
            continue
        mac = Path(f"/sys/class/net/{bridge}/address")
        if mac.exists():
            run(["ip", "link", "set", "dev", bridge, "address", mac.read_text().strip()],
                timeout=10, check=True)


def _cleanup(pod: Podman, project: str, env: dict[str, str]) -> None:
    # The test's own probes first: `down` removes the stack's networks with `network rm -f`,
    # which would stop a probe still attached with SIGTERM, ignored by `sleep` as PID 1, and
    # wait out podman's 10 s stop timeout for each.
    probes = pod("ps", "-aq", "--filter", f"name={project}_probe_").stdout.split()
    if probes:
        pod("rm", "-f", "-t", "0", *probes)
    run(["scripts/compose", "podman", "down"], timeout=180, env=env, cwd=ROOT)
    label = f"label=io.podman.compose.project={project}"
    for ids in (pod("ps", "-aq", "--filter", label).stdout.split(),
                pod("ps", "-aq", "--filter", f"name={project}_").stdout.split()):
        if ids:
            pod("rm", "-f", "-t", "0", *ids)
    for net in pod("network", "ls", "-q", "--filter", label).stdout.split():
        pod("network", "rm", "-f", net)
    pod("volume", "rm", "-f", f"{project}_keys")


def _matches(shown: str, printed: str, project: str) -> bool:
    """A line DEPLOY.md shows against one the script printed: fingerprints and the base
    image depend on the run and the machine, the project name on the test."""
    pattern = HEX.sub("[0-9a-f]{32}", re.escape(shown.replace("project coaplayers",
                                                                f"project {project}")))
    pattern = re.sub(r"base\\ image\\ \S+", r"base\\ image\\ \\S+", pattern)
    return re.fullmatch(pattern, printed) is not None


@pytest.fixture(scope="module")
def stack(podman: Podman) -> Iterator[tuple[Podman, str]]:
    command, shown = deploy_recipe()
    assert command == ["scripts/compose podman"], command
    project = f"cltest{uuid.uuid4().hex[:8]}"
    # The command as written; only the project name is the test's, through the variable
    # DEPLOY.md names for it. The script writes its own containers.conf.
    env = {k: v for k, v in os.environ.items() if k != "CONTAINERS_CONF"}
    env["COMPOSE_PROJECT_NAME"] = project
    try:
        t0 = time.monotonic()
        up = run(shlex.split(command[0]), timeout=1400, env=env, cwd=ROOT)
        print(f"scripts/compose podman: {time.monotonic() - t0:.0f} s")
        assert up.returncode == 0, (up.stdout, up.stderr)
        printed = up.stdout.splitlines()
        # The script's own lines in order; the client's log (indented) in any order, since
        # its stderr (-v) and stdout interleave as the engine keeps them.
        ours = [line for line in printed if line.startswith("compose:")]
        wanted = [line for line in shown if line.startswith("compose:")]
        assert len(ours) == len(wanted), (printed, shown)
        for want, got in zip(wanted, ours, strict=True):
            assert _matches(want, got, project), (want, got)
        logged = sorted(line for line in printed if not line.startswith("compose:"))
        logged_shown = sorted(line for line in shown if not line.startswith("compose:"))
        assert len(logged) == len(logged_shown), (printed, shown)
        for want in logged_shown:
            assert any(_matches(want, got, project) for got in logged), (want, printed)
        _pin_bridge_macs(podman, project)
        yield podman, project
    finally:
        _cleanup(podman, project, env)
        left = podman("ps", "-aq", "--filter", f"name={project}_").stdout.split()
        nets = podman("network", "ls", "--format", "{{.Name}}").stdout.split()
        assert not left and not [n for n in nets if n.startswith(project)], (left, nets)


def _state(pod: Podman, name: str) -> tuple[str, int]:
    out = pod("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name).stdout.split()
    return (out[0], int(out[1])) if len(out) == 2 else ("missing", -1)


def _logs(pod: Podman, name: str) -> str:
    res = pod("logs", name)
    return res.stdout + res.stderr


def _probe(pod: Podman, project: str, network: str) -> str:
    """A long-lived container of the stack's image on one of its networks, to exec into.

    One container per network for all checks: on this sandbox a container that has just
    joined a bridge may wait seconds for ARP to settle, so each check that must succeed
    first waits (bounded) for the path to work, and then every other check reuses it.
    """
    name = f"{project}_probe_{network}"
    pod("run", "-d", "--name", name, "--network", f"{project}_{network}",
        "-v", f"{project}_keys:/keys:ro", IMAGE, "sleep", "900", check=True)
    return name


def _until_ok(pod: Podman, probe: str, *argv: str,
              within: float = 90) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``probe`` until it exits 0 or ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        res = pod("exec", probe, *argv, timeout=60)
        if res.returncode == 0 or time.monotonic() > deadline:
            return res


# A Layer 1 request straight to app-server (by name or address, $1) with the proxy's own
# hop-2 credentials, retargeted at $1: with the right keys, only the path is missing.
DIRECT = (
    'sed "s/app-server/$1/" /keys/proxy-upstream.json > /tmp/hop2.json && '
    'exec coap-client -B 4 --credentials /tmp/hop2.json "coaps://$1:5684/hello"'
)


def test_client_reaches_app_server_only_through_proxy(stack: tuple[Podman, str]) -> None:
    pod, project = stack
    server, proxy, client = (f"{project}_{s}_1" for s in ("app-server", "proxy", "client"))

    wait_for(lambda: "listening coaps://" in _logs(pod, server), timeout=60,
             what="app-server listening")
    wait_for(lambda: "ready" in _logs(pod, proxy), timeout=60, what="proxy ready")
    # The compose client service: one Layer 0 request through the proxy, then it exits.
    wait_for(lambda: _state(pod, client)[0] in ("exited", "stopped"), timeout=120,
             what="the client service to finish its request")
    status, code = _state(pod, client)
    client_log = _logs(pod, client)
    assert code == 0, (status, code, client_log, _logs(pod, proxy), _logs(pod, server))
    assert "Hello from coap-server (mode layer0-dtls" in client_log, client_log
    assert "layer 0: mode dtls" in client_log, client_log
    assert "layer 1: hop proxy:5694" in client_log, client_log
    # The proxy forwarded the tunnel to app-server and never saw the inner /hello.
    proxy_log = _logs(pod, proxy)
    # (app-server is a replica set of the addresses the name resolves to: one address here.)
    assert re.search(r'"upstream":"coaps://[0-9.]+:5684/\.well-known/atls","route":"app-server"',
                     proxy_log), proxy_log
    assert "/hello" not in proxy_log, proxy_log

    # A container on the device network, like the client: through the proxy it works ...
    device = _probe(pod, project, "device")
    via = _until_ok(pod, device, "coap-client", "--config", "/keys/client.toml",
                    "--layer0", "dtls", "-B", "10", "coaps://app-server:5684/hello")
    assert via.returncode == 0, (via.stderr, _logs(pod, proxy)[-2000:])
    assert "Hello from coap-server (mode layer0-dtls" in via.stdout

    # ... straight to app-server by name it does not even resolve ...
    by_name = pod("exec", device, "sh", "-c", DIRECT, "direct", "app-server", timeout=60)
    assert by_name.returncode != 0 and "Hello" not in by_name.stdout, by_name
    assert re.search(r"resolve|name or service not known", by_name.stderr, re.I), (
        by_name.stderr)

    # ... and by address nothing answers (the backend network is internal).
    address = pod("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                  server, check=True).stdout.strip()
    assert address, "app-server has no address"
    by_address = pod("exec", device, "sh", "-c", DIRECT, "direct", address, timeout=60)
    assert by_address.returncode != 0 and "Hello" not in by_address.stdout, by_address

    # Control: from the backend network the same requests are answered, so the failures
    # above are the topology's doing, not the probe's.
    backend = _probe(pod, project, "backend")
    for target in ("app-server", address):
        control = _until_ok(pod, backend, "sh", "-c", DIRECT, "direct", target)
        assert control.returncode == 0, (target, control.stderr)
        assert "Hello from coap-server" in control.stdout


def test_three_app_server_replicas(podman: Podman) -> None:
    """APP_SERVERS=3 scripts/compose podman: three app-server replicas behind the proxy (the
    name app-server resolves to all three, each numbers itself by its address); Layer 0 and
    OSCORE clients through the proxy are answered, their sessions spread over the replicas."""
    project = f"clscale{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k != "CONTAINERS_CONF"}
    env.update(COMPOSE_PROJECT_NAME=project, APP_SERVERS="3")
    try:
        up = run(["scripts/compose", "podman"], timeout=1400, env=env, cwd=ROOT)
        assert up.returncode == 0, (up.stdout, up.stderr)
        _pin_bridge_macs(podman, project)
        servers = podman("ps", "-q", "--filter", f"name={project}_app-server_").stdout.split()
        assert len(servers) == 3
        answers = [
            run(["scripts/compose", "podman", "client", "--layer0", mode, *extra,
                 "coaps://app-server:5684/hello"], timeout=120, env=env, cwd=ROOT)
            for mode, extra in [("dtls", [])] * 6 + [("oscore", ["--no-keep"])] * 2]
        for a in answers:
            assert a.returncode == 0 and "Hello from coap-server" in a.stdout, a.stderr
        proxy = f"{project}_proxy_1"
        lines = [json.loads(x) for x in _logs(podman, proxy).splitlines() if x.startswith("{")]
        sets = [x for x in lines if x.get("event") == "replica_set"]
        assert sets and len(sets[0]["healthy"]) == 3, sets
        sessions = {x["upstream"].split("/")[2] for x in lines
                    if x.get("event") == "exchange" and "/~" in x.get("upstream", "")}
        assert len(sessions) >= 2, sessions  # 8 sessions: all on one replica is 3 * 3**-8
    finally:
        _cleanup(podman, project, env)
