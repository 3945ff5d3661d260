"""coap-bench --http --quick: the cloud-proxy topology measured, as a user runs it.

No timing thresholds (the machine is shared): every mode has its figures and ratios, and the
HTTP hop's bytes per request say what each protection costs there. The byte counts are not
timing: the protected modes must carry more than plain CoAP-to-HTTP, and Layer 0's extra is
its record (header, nonce, tag) on each side.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = str(Path(sys.executable).with_name("coap-bench"))
MODES = ("http_plain", "http_l0psk", "http_l0cert", "http_l0rpk", "http_oscore")


def test_http_topology_figures(tmp_path: Path) -> None:
    json_file = tmp_path / "http.json"
    proc = subprocess.run([BENCH, "--http", "--quick", "--json", str(json_file)],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Figure 2: CoAP -> coap-proxy -> HTTP" in proc.stdout
    result = json.loads(json_file.read_text())["http"]
    assert set(result["modes"]) == set(MODES)
    clients = result["clients"]
    for mode in MODES:
        r = result["modes"][mode]
        for key in ("latency_p50_ms", "sequential_rps", f"rps_{clients}_clients",
                    f"ratio_{clients}_clients_vs_plain", "http_hop_request_bytes",
                    "http_hop_response_bytes"):
            assert isinstance(r[key], float | int) and math.isfinite(r[key]) and r[key] > 0, (
                mode, key, r)
        assert r["errors"] == 0
    plain = result["modes"]["http_plain"]
    for mode in MODES[1:]:
        extra = result["modes"][mode]["extra_request_bytes_vs_plain"]
        assert extra > 0, (mode, extra)
    # Layer 0: the same HTTP head, and the record's 29 bytes of overhead around the inner
    # message (DTLS header, explicit nonce, CCM-8 tag) minus what the inner message saves.
    l0 = result["modes"]["http_l0psk"]
    assert 20 <= l0["extra_request_bytes_vs_plain"] <= 60, l0
    assert plain["http_hop_request_bytes"] < 200
