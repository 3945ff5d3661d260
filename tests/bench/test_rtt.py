"""coap-bench's round trips to the first protected answer, counted through a delaying relay.

The counts are exact (the relay's delay dwarfs the processing; the JSON says how much was left
over), so this test pins what each mode costs today, cold and warm, and the reference line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import QuickRun

pytestmark = pytest.mark.slow

BENCH = str(Path(sys.executable).with_name("coap-bench"))

#: (cold, warm) round trips to the first answer per mode, as measured on the wire.
EXPECTED = {
    "plain": (1, 1),
    # PSK: no cookie exchange, but no False Start either (no forward secrecy): 2 flights and
    # the request.
    "l0psk": (3, 3),
    # Certificates and raw public keys: no cookie exchange while the server is not under
    # handshake load, the ClientHello padded so that coap-proxy's 3x rule lets the server's
    # first flight through without an Echo, and the request with the client's Finished (RFC
    # 7918 False Start). Warm, certificates resume (the request with the Finished too).
    "l0cert": (2, 2),
    "l0rpk": (2, 2),
    # The OSCORE mode: that handshake, whose last flights carry the keying (ALPN
    # atls-oscore; docs/OSCORE-KEYING.md 9.1), then the request.
    "oscore": (3, 1),
    # Keyed by PSK: no cookie exchange, no Echo (the flights fit the 3x rule): 2 + 1.
    "oscore_psk": (3, 1),
    # Keyed by raw public keys (GnuTLS, whose ALPN folds the keying the same way): 2 + 1.
    "oscore_rpk": (3, 1),
    "aio_oscore": (1, 1),
}


@pytest.fixture(scope="module")
def rtt(quick_run: QuickRun) -> dict:
    """The round-trip section of the session's ``coap-bench --quick`` run: the phase ``--rtt``
    runs alone, at the same 150 ms each way."""
    assert "Round trips to the first protected answer" in quick_run.stdout
    return quick_run.results["rtt"]


@pytest.mark.timeout(450)
def test_round_trips_per_mode_cold_and_warm(rtt: dict) -> None:
    assert rtt["delay_ms"] == 150
    assert rtt["reference"] == {"label": "EDHOC + OSCORE (RFC 9668)", "cold": 2, "warm": 1}
    got = {m: (rtt["modes"][m]["cold"]["round_trips"], rtt["modes"][m]["warm"]["round_trips"])
           for m in EXPECTED}
    assert got == EXPECTED
    for mode, entry in rtt["modes"].items():
        for run in ("cold", "warm"):
            r = entry[run]
            # What the count rests on: processing stays inside one round trip's time.
            assert 0 <= r["processing_s"] < 0.3, (mode, run, r)
            if r["coap_requests_up"] is not None:
                # Every round trip to the server is at least one CoAP request of the client.
                assert r["coap_requests_up"] >= r["round_trips"], (mode, run, r)


@pytest.mark.timeout(400)
def test_one_shot_latency_under_loss_answers_every_run(tmp_path: Path) -> None:
    json_file = tmp_path / "loss.json"
    proc = subprocess.run(
        [BENCH, "--loss", "1", "--json", str(json_file)],
        capture_output=True, text=True, timeout=380, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"coap-bench --loss failed: {proc.stderr[-3000:]}"
    assert "One-shot latency at 20% loss" in proc.stdout
    loss = json.loads(json_file.read_text())["loss"]
    assert loss["loss"] == 0.2
    assert set(loss["modes"]) == {"l0psk", "l0cert", "oscore"}
    for entry in loss["modes"].values():
        for run in ("cold", "warm"):
            point = entry[run]
            # Every run answered (and client.post checked the answer); the times are numbers.
            assert point["answered"] == point["runs"] == 1, point
            assert 0 <= point["median_s"] <= point["max_s"] < 120
