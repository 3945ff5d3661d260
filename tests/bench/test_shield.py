"""coap-bench's proxy-shield phase, and its targets met.

Its readers are plain clients coap-proxy has not verified, so the 3x rule answers them in small
blocks; those must come from the proxy's cache (one upstream GET), not each from the device.
"""

from __future__ import annotations

import pytest

from .conftest import QuickRun

pytestmark = pytest.mark.slow


@pytest.mark.timeout(450)
def test_shield_targets_are_met(quick_run: QuickRun) -> None:
    """The shield phase of the session's ``coap-bench --quick`` run (the one ``--shield
    --duration 1`` runs alone)."""
    assert "Shielding the device" in quick_run.stdout
    results = quick_run.results
    reads = results["shield"]["coap-proxy"]["reads"]
    assert reads["errors"] == 0 and reads["downstream"] > 0, reads
    assert reads["upstream_per_downstream"] <= 0.1, reads
    shield = [t for t in results["targets"]
              if t["target"].startswith(("coap-proxy upstream", "coap-proxy answering"))]
    assert len(shield) == 3 and all(t["result"] == "PASS" for t in shield), shield
