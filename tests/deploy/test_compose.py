"""compose.yaml brought up for real with podman-compose (the recipe of CONTAINERS.md).

No Docker engine runs on the project's machines and no container registry is reachable, so:
- podman (with runc) runs the containers as root, with a containers.conf of our own passed in
  CONTAINERS_CONF (no rlimits copied into containers, runc not crun), leaving /etc alone;
- the base image is made locally with debootstrap and imported as
  localhost/debian-base:bookworm (once per machine: podman keeps it, and later runs reuse it);
- the image is built with ``podman build`` (so that the host's CA bundle can be mounted for pip
  and the host's apt archive for apt), tagged with the name compose.yaml is told to use;
  podman's layer cache keeps rebuilds to the changed source layers.
The stack gets a project name of its own per run; its containers, networks and volume are
removed whatever happens. The image and the base image stay, as the cache.
"""

from __future__ import annotations

import fcntl
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

from .support import ROOT, ensure_debian_packages, run, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

CACHE = ROOT / ".deploy-cache"
BASE_IMAGE = "localhost/debian-base:bookworm"
IMAGE = "localhost/coaplayers:compose-test"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
APT_ARCHIVES = Path("/var/cache/apt/archives")
MIRROR = "http://deb.debian.org/debian"
CONTAINERS_CONF = ('[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n'
                   '[network]\nnetwork_backend = "netavark"\n')


@dataclass
class Podman:
    env: dict[str, str]

    def __call__(self, *argv: str, timeout: float = 120,
                 check: bool = False) -> subprocess.CompletedProcess[str]:
        return run(["podman", *argv], timeout=timeout, check=check, env=self.env)

    def compose(self, project: str, *argv: str, timeout: float = 180,
                check: bool = False) -> subprocess.CompletedProcess[str]:
        return run(["podman-compose", "-p", project, "-f", str(ROOT / "compose.yaml"), *argv],
                   timeout=timeout, check=check, env=self.env, cwd=ROOT)


def _podman_env() -> dict[str, str]:
    CACHE.mkdir(exist_ok=True)
    conf = CACHE / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.write_text(CONTAINERS_CONF)
    return dict(os.environ, CONTAINERS_CONF=str(conf), COAPLAYERS_IMAGE=IMAGE,
                BASE=BASE_IMAGE)


@pytest.fixture(scope="module")
def podman() -> Podman:
    if os.geteuid() != 0:
        pytest.skip("podman runs compose's networks here only as root (CONTAINERS.md)")
    # netavark and aardvark-dns: podman's network backend with service-name DNS across a
    # container's networks (the proxy is on two). Recommended by podman's dependencies, so
    # --no-install-recommends leaves them out, and podman then falls back to CNI, whose DNS
    # plugin answers only for one network per container.
    problem = ensure_debian_packages(["podman", "podman-compose", "debootstrap", "runc",
                                      "netavark", "aardvark-dns"])
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


def _ensure_base_image(pod: Podman) -> None:
    """Debootstrap + import, once per machine; a lock keeps two runs from doing it twice."""
    with open(CACHE / "base-image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if pod("image", "exists", BASE_IMAGE).returncode == 0:
            return
        rootfs = CACHE / f"rootfs-{uuid.uuid4().hex[:8]}"
        try:
            # The host's apt archive as debootstrap's package cache: packages the host has
            # already downloaded are not fetched again (debootstrap checks their sums).
            cache = ([f"--cache-dir={APT_ARCHIVES}"] if APT_ARCHIVES.is_dir() else [])
            run(["debootstrap", "--variant=minbase", *cache,
                 "--include=python3,python3-venv,python3-pip",
                 "bookworm", str(rootfs), MIRROR], timeout=900, check=True)
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."],
                                   stdout=subprocess.PIPE)
            imported = subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout,
                                      capture_output=True, text=True, env=pod.env, timeout=300)
            assert tar.stdout is not None
            tar.stdout.close()
            assert tar.wait(timeout=60) == 0
            assert imported.returncode == 0, imported.stderr
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)


def _build_image(pod: Podman) -> None:
    volumes = ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    if APT_ARCHIVES.is_dir():
        volumes += ["-v", f"{APT_ARCHIVES}:/var/cache/apt/archives"]
    # The host's network for the build (pip reaches PyPI): a build needs no isolation, and
    # a machine whose podman ran with CNI before keeps that bridge and its subnet, which
    # then leave netavark's default network without outbound NAT and DNS.
    pod("build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}", *volumes, "-t",
        IMAGE, str(ROOT),
        timeout=900, check=True)


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


def _cleanup(pod: Podman, project: str) -> None:
    pod.compose(project, "down", "-v", "-t", "2", timeout=120)
    label = f"label=io.podman.compose.project={project}"
    for ids in (pod("ps", "-aq", "--filter", label).stdout.split(),
                pod("ps", "-aq", "--filter", f"name={project}_").stdout.split()):
        if ids:
            pod("rm", "-f", "-t", "0", *ids)
    for net in pod("network", "ls", "-q", "--filter", label).stdout.split():
        pod("network", "rm", "-f", net)
    pod("volume", "rm", "-f", f"{project}_keys")


@pytest.fixture(scope="module")
def stack(podman: Podman) -> Iterator[tuple[Podman, str]]:
    t0 = time.monotonic()
    _ensure_base_image(podman)
    t1 = time.monotonic()
    _build_image(podman)
    t2 = time.monotonic()
    print(f"base image {t1 - t0:.0f} s, build {t2 - t1:.0f} s")
    project = f"cltest{uuid.uuid4().hex[:8]}"
    try:
        podman.compose(project, "up", "-d", check=True)
        _pin_bridge_macs(podman, project)
        yield podman, project
    finally:
        _cleanup(podman, project)
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
    assert '"upstream":"coaps://app-server:5684/.well-known/atls' in proxy_log, proxy_log
    assert "/hello" not in proxy_log, proxy_log

    # A container on the device network, like the client: through the proxy it works ...
    device = _probe(pod, project, "device")
    via = _until_ok(pod, device, "coap-client", "--config", "/keys/client.toml",
                    "--e2e", "dtls", "-B", "10", "coaps://app-server:5684/hello")
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
