"""coap-bench --scaling --quick: every configuration answers, the router's figure is there;
the worker configurations are compared round by round and at the same paced load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coaplayers_tools.bench.procs import task_stats
from coaplayers_tools.bench.scaling import X1, X2, X2_PINNED, paired_rounds

BENCH = str(Path(sys.executable).parent / "coap-bench")


@pytest.mark.slow
def test_scaling_quick(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    done = subprocess.run([BENCH, "--scaling", "--quick", "--clients", "10", "--duration", "0.5",
                           "--json", str(out)],
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
    # Round by round against x1, the client as the control, and at the same paced load.
    paced = results["paced"]
    assert set(paced) == {X1, X2, X2_PINNED}
    for label, p in paced.items():
        assert p["rate"] == results["paced_rate"] and p["errors"] == 0, (label, p)
        assert p["rps"] <= 1.2 * p["rate"], (label, p)  # paced, not each at its most
    for key in ("x2", "x2_pinned", "x2_client", "x2_paced", "x2_paced_client"):
        assert summary[f"paired_{key}"]["rounds"] == 1, key
    assert summary["paired_x2"]["median"] == pytest.approx(summary["sharding_cost"])
    for label in (X1, X2):
        one_client = configs[label][0]["switches_per_request"]
        # One client at a time: every process of each role waits for each request.
        assert one_client["proxy"]["voluntary"] > 0.5 and one_client["server"]["voluntary"] > 0.5
    assert "paired with x1 in each round" in done.stdout
    assert "context switches per request" in done.stdout


def _point(proxy: float, server: float, client: float) -> dict[str, object]:
    return {"cpu_us_per_request": {"proxy": proxy, "server": server},
            "client_cpu_us_per_request": client}


def test_paired_rounds_compare_each_round_with_its_own_x1() -> None:
    closed = {X1: [_point(100, 100, 50), _point(200, 200, 50)],
              X2: [_point(110, 110, 55), _point(200, 200, 50)],
              X2_PINNED: [_point(100, 100, 50)]}
    paced = {X1: [_point(100, 50, 10)], X2: [_point(120, 60, 10)]}
    r = paired_rounds(closed, paced)
    # Round 2 is slower for both: paired, it shows no cost; medians of each would show +0 too,
    # but a drift between the configurations' rounds would not cancel out.
    assert r["x2"] == pytest.approx([0.10, 0.0])
    assert r["x2_client"] == pytest.approx([0.10, 0.0])
    assert r["x2_pinned"] == pytest.approx([0.0])  # only as many rounds as both have
    assert r["x2_paced"] == pytest.approx([0.2]) and r["x2_paced_client"] == pytest.approx([0.0])
    assert r["x2_pinned_paced"] == []


def test_task_stats_count_every_thread_in_nanoseconds() -> None:
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, threading\n"
        "t = threading.Thread(target=lambda: sum(range(3_000_000)))\n"  # a fixed work
        "t.start(); t.join()\n"
        "print('done', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        after = task_stats(child.pid)
        main_thread = int(Path(f"/proc/{child.pid}/schedstat").read_text().split()[0]) / 1e9
    finally:
        child.kill()
        child.wait(10)
    # The ended thread's CPU is counted, not only the main thread's; finer than a tick.
    assert after.cpu - main_thread > 0.02
    assert after.cpu != round(after.cpu, 2)
    assert after.voluntary > 0  # it waited for the thread, then for its input
