"""coap-bench --shield: the proxy-shield phase alone, and its targets met.

Its readers are plain clients coap-proxy has not verified, so the 3x rule answers them in small
blocks; those must come from the proxy's cache (one upstream GET), not each from the device.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = str(Path(sys.executable).with_name("coap-bench"))


@pytest.mark.timeout(240)
def test_shield_targets_are_met(tmp_path: Path) -> None:
    json_file = tmp_path / "shield.json"
    proc = subprocess.run(
        [BENCH, "--shield", "--duration", "1", "--json", str(json_file)],
        capture_output=True, text=True, timeout=200, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"coap-bench --shield failed: {proc.stderr[-3000:]}"
    assert "Shielding the device" in proc.stdout
    results = json.loads(json_file.read_text())
    reads = results["shield"]["coap-proxy"]["reads"]
    assert reads["errors"] == 0 and reads["downstream"] > 0, reads
    assert reads["upstream_per_downstream"] <= 0.1, reads
    shield = [t for t in results["targets"] if t["target"].startswith("coap-proxy")]
    assert len(shield) == 3 and all(t["result"] == "PASS" for t in shield), shield
