"""coap-client's start-up: a run loads only what it uses (docs/BENCHMARKS.md has the times;
``coap-bench --startup`` measures them next to libcoap's and aiocoap's clients)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import BIN, Running

HEAVY = ("OpenSSL", "cryptography", "DTLSSocket", "cffi", "coaplayers.dtls.openssl",
         "coaplayers.dtls.gnutls", "coaplayers.dtls.tinydtls", "coaplayers.layer0",
         "coaplayers.layer1", "coaplayers.oscore", "asyncio")

PROBE = """
import sys
from coaplayers.programs.client.main import main
code = main(sys.argv[1:])
heavy = sorted({m.split(".")[0] if not m.startswith("coaplayers") else ".".join(m.split(".")[:3])
                for m in sys.modules if any(m == h or m.startswith(h + ".") for h in %r)})
print("LOADED", code, " ".join(heavy), file=sys.stderr)
"""


def loaded(*argv: str) -> tuple[int, set[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,), *argv],
                          capture_output=True, text=True, timeout=60)
    line = [x for x in done.stderr.splitlines() if x.startswith("LOADED ")][-1].split()
    return int(line[1]), set(line[2:])


def test_help_and_usage_errors_load_no_network_or_dtls_code() -> None:
    for argv in (["--help"], ["-r", "coap://127.0.0.1/x"], []):
        code, heavy = loaded(*argv)
        assert code in (0, 2) and heavy == set(), (argv, heavy)


def test_plain_get_loads_no_dtls_engine(app: Running) -> None:
    code, heavy = loaded(app.uri("coap") + "/hello")
    assert code == 0
    assert heavy == {"asyncio"}, heavy
    code, heavy = loaded("-u", "dev", "-k", "secret", app.uri("coaps") + "/hello")
    assert code == 0 and "coaplayers.dtls.tinydtls" in heavy  # the engines load when used


@pytest.mark.slow
def test_bench_startup_phase(tmp_path: Path) -> None:
    out = tmp_path / "startup.json"
    done = subprocess.run([str(BIN / "coap-bench"), "--startup", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    for key in ("help", "get"):
        assert 0 < results["startup"][key]["coap-client"] < 5
    assert "coap-client-notls" in results["startup"]["get"]
    assert "aiocoap-client" in results["startup"]["get"]
    targets = {t["target"]: t for t in results["targets"]}
    assert {"start-up: coap-client --help", "start-up: coap-client first plain GET on loopback"
            } <= set(targets)
    assert "coap-client-notls" in done.stdout and "first GET" in done.stdout
