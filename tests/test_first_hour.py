"""What a newcomer meets in the first hour, checked against the text they read.

README's "A first session by hand" is parsed from README.md and run as written (only the
ports move, the way the README itself says to move them), and its expected output is
compared line by line; the port-in-use error, ``coap-keys --help`` and the project's own
metadata (a clean set-up builds it with no warning) are checked the same way.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import free_udp_port
from .deploy.support import Background, run

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
BIN = VENV / "bin"
FINGERPRINT = re.compile(r"[0-9a-f]{32}")


def readme_section(heading: str) -> tuple[str, list[list[str]]]:
    """The text of README.md's section ``heading`` and its code blocks, as lists of lines."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{heading}\n")
    end = re.compile(r"^#{1,3} ", re.M).search(text, start + len(heading) + 2)
    section = text[start:end.start() if end else len(text)]
    blocks = re.findall(r"^```\n(.*?)^```$", section, re.S | re.M)
    return section, [block.splitlines() for block in blocks]


def _argv(line: str) -> tuple[list[str], bool]:
    """A README command line as argv, and whether it ends with ``&`` (runs in the background)."""
    words = shlex.split(line, comments=True)
    background = words[-1] == "&"
    return (words[:-1] if background else words), background


@pytest.mark.slow
def test_readme_first_session_by_hand_runs_as_written(tmp_path: Path) -> None:
    section, blocks = readme_section("### A first session by hand")
    commands, expected, moved = blocks
    assert len(commands) == 4 and len(moved) == 2, blocks
    # The README's way to move the ports is the only change the test makes: its own
    # "other ports" block must be the first session's lines with ports moved, and the test
    # runs that block with ports of its own choosing.
    assert "--server-port" in section and "--proxy-port" in section
    assert moved[0] == f"rm -rf creds && {commands[0]} --server-port 6684 --proxy-port 6694"
    assert moved[1] == commands[3].replace(":5684/", ":6684/")
    server_port, proxy_port = free_udp_port(), free_udp_port()

    def ported(line: str) -> str:
        return (line.replace("6684", str(server_port)).replace("6694", str(proxy_port))
                .replace("5684", str(server_port)).replace("5694", str(proxy_port)))

    # Run where a clone's .venv is: a folder with .venv in it, so ".venv/bin/..." is as written.
    (tmp_path / ".venv").symlink_to(VENV)
    keys = run(["bash", "-c", ported(moved[0])], timeout=60, cwd=tmp_path, check=True)
    started: list[Background] = []
    try:
        for line, ready in ((commands[1], "listening "), (commands[2], "ready")):
            argv, background = _argv(line)
            assert background, line
            proc = Background([str(tmp_path / argv[0]), *argv[1:]], cwd=tmp_path,
                              stderr_file=tmp_path / f"{Path(argv[0]).name}.err")
            started.append(proc)
            proc.wait_line(ready, timeout=30)
        server, proxy = started
        argv, background = _argv(ported(moved[1]))
        assert not background
        client = run([str(tmp_path / argv[0]), *argv[1:]], timeout=60, cwd=tmp_path)
        assert client.returncode == 0, client.stderr
        printed = [*keys.stdout.splitlines(), *server.lines, *proxy.lines,
                   *client.stdout.splitlines()]
        wanted = [ported(line) for line in expected]
        assert len(printed) == len(wanted), (printed, wanted)
        for got, want in zip(printed, wanted, strict=True):
            pattern = FINGERPRINT.sub("[0-9a-f]{32}", re.escape(want))
            assert re.fullmatch(pattern, got), (got, want)
        # "the fingerprint is the client's end-to-end key's, in creds/README.txt"
        shown = FINGERPRINT.findall(printed[-1])
        assert shown and re.search(rf"client-rpk\.pub +{shown[0]}",
                                   (tmp_path / "creds" / "README.txt").read_text())
        # "it forwarded /.well-known/atls and /~<session>, never /hello"
        log = proxy.stderr()
        assert "/.well-known/atls" in log and '"uri_path":"/~' in log and "/hello" not in log
    finally:
        for proc in reversed(started):
            proc.stop()
    # "coaps on 5684 ... coaps on 5694": the files name the ports the README says.
    assert "proxy = " in section and "coaps://127.0.0.1:5694" in section


@pytest.mark.parametrize("program", ["coap-server", "coap-proxy"])
def test_a_port_in_use_names_the_way_out(program: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        res = run([str(BIN / program), "--listen", f"coap://127.0.0.1:{port}"], timeout=30)
    assert res.returncode == 1 and res.stdout == "", res
    assert res.stderr.strip() == (
        f"{program}: cannot listen on coap://127.0.0.1:{port}: Address already in use;"
        " another program holds the port: choose another with --listen, or write the demo"
        " configurations for other ports with coap-keys DIR --server-port N --proxy-port M"
    )


@pytest.mark.parametrize("program", ["coap-server", "coap-proxy"])
def test_servers_announce_listeners_alike(program: str, tmp_path: Path) -> None:
    proc = Background([str(BIN / program), "--listen", "coap://127.0.0.1:0"],
                      stderr_file=tmp_path / "err")
    try:
        line = proc.wait_line("listening ", timeout=30)
    finally:
        proc.stop()
    assert re.fullmatch(r"listening coap://127\.0\.0\.1:[1-9]\d*", line), proc.lines


def test_coap_keys_help_says_what_it_makes_and_what_the_ports_are() -> None:
    res = run([str(BIN / "coap-keys"), "--help"], timeout=30, check=True)
    text = " ".join(res.stdout.split())
    assert "PSKs for hop 1, hop 2 and end to end" in text, text
    assert "raw public key pairs (RFC 7250) for every side at Layer 1 and end to end" in text
    assert ("--server-port PORT the application server's coaps:// port in server.toml"
            " (default 5684)") in text
    assert ("--proxy-port PORT the proxy's coaps:// port in proxy.toml and client.toml"
            " (default 5694)") in text


def test_the_projects_metadata_builds_without_a_warning() -> None:
    """What scripts/setup's pip does first (the build back-end reading pyproject.toml)."""
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "-e", str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


def test_compose_script_says_what_is_missing(tmp_path: Path) -> None:
    """DEPLOY's Docker command where Docker has no compose plugin and no docker-compose: one
    line that says so, not a compose error. (No Docker engine runs here: a stand-in ``docker``
    that fails every command, as one without the plugin fails ``docker compose version``.)"""
    (tmp_path / "docker").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "docker").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path)}
    res = run([str(ROOT / "scripts" / "compose"), "docker"], timeout=30, env=env)
    assert res.returncode == 2 and res.stdout == "", res
    assert res.stderr == ("compose: docker has no compose plugin and docker-compose is missing"
                          " (Debian: apt-get install docker-compose)\n")
    usage = run([str(ROOT / "scripts" / "compose")], timeout=30, env=env)
    assert usage.returncode == 2
    assert usage.stderr == ("compose: usage: scripts/compose docker|podman"
                            " [up | client ARGS... | down]\n")


def test_programs_word_configuration_errors_alike(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = [\n")
    missing = tmp_path / "missing.toml"
    for program in ("coap-server", "coap-proxy", "coap-client"):
        target = ["coap://127.0.0.1:9/x"] if program == "coap-client" else []
        gone = run([str(BIN / program), "--config", str(missing), *target], timeout=30)
        assert gone.returncode == 2, gone
        assert gone.stderr == (f"{program}: cannot read configuration {missing}:"
                               " No such file or directory\n"), gone.stderr
        broken = run([str(BIN / program), "--config", str(bad), *target], timeout=30)
        assert broken.returncode == 2, broken
        assert broken.stderr.startswith(f"{program}: configuration {bad} is not valid TOML: ")


@pytest.mark.slow
def test_setup_shows_no_build_warning(tmp_path: Path) -> None:
    """scripts/setup as a clean clone runs it, into a fresh virtual environment of its own;
    only the project itself is installed (its dependencies are the same wheels every time,
    and their build is not ours)."""
    env = dict(os.environ, COAPLAYERS_VENV=str(tmp_path / "venv"),
               PIP_NO_DEPS="yes")
    env.pop("PYTHONWARNINGS", None)
    res = run([str(ROOT / "scripts" / "setup")], timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "venv" / ".coaplayers-installed").exists()
    said = res.stdout + res.stderr
    for word in ("BuildBackendWarning", "pyproject.toml", "setuptools", "Editable installation"):
        assert word not in said, said
