"""coap-bench --scaling --quick: every configuration answers, the router's figure is there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = str(Path(sys.executable).parent / "coap-bench")


def test_scaling_quick(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    done = subprocess.run([BENCH, "--scaling", "--quick", "--clients", "10", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["scaling"]
    configs = results["configs"]
    want = {"coap-proxy x1 / coap-server x1", "coap-proxy x2 / coap-server x2",
            "coap-proxy x2 / coap-server x2, pinned",
            "coap-proxy reverse", "coap-proxy replica set", "aiocoap-proxy",
            "coap-proxy x1 (same server)"}
    if shutil.which("coap-server-notls"):
        want.add("libcoap proxy (C)")
    assert want <= set(configs)
    for label, points in configs.items():
        assert [p["clients"] for p in points] == [1, 10], label
        for p in points:
            assert p["errors"] == 0 and p["rps"] > 0, (label, p)
            assert p["cpu_us_per_request"]["proxy"] > 0 and p["cpu_us_per_request"]["server"] > 0
    summary = results["summary"]
    assert summary["router_cost"] < 0.05  # (may come out slightly negative: noise)
    assert summary["capacity_per_core"]["proxy"] > 0
    assert summary["sharding_cost_pinned"] is not None and "with --pin-workers" in done.stdout
    assert "router's cost at the proxy" in done.stdout
