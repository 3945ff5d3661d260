"""One ``coap-bench --quick`` run for the whole session, as a user runs it.

Its round-trip phase is the one ``--rtt`` runs alone (150 ms each way, quick's default) and its
shield phase the one ``--shield --duration 1`` runs alone: test_rtt.py and test_shield.py check
those sections of this run instead of starting the rig twice more.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BENCH = str(Path(sys.executable).with_name("coap-bench"))


@dataclass(frozen=True)
class QuickRun:
    stdout: str
    results: dict[str, Any]


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    json_file = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [BENCH, "--quick", "--json", str(json_file)],
        capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"coap-bench failed: {proc.stderr[-3000:]}"
    return QuickRun(proc.stdout, json.loads(json_file.read_text()))
