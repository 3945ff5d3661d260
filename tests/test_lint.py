"""ruff and mypy run with the suite (scripts/test, which CI runs): a lint or type error fails
the build like a failing test. Both read their configuration from pyproject.toml (mypy: strict
on the sans-I/O cores, normal elsewhere)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_ruff_clean() -> None:
    done = _run("ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_clean() -> None:
    done = _run("mypy")  # files and strictness per module: [tool.mypy] in pyproject.toml
    assert done.returncode == 0, done.stdout + done.stderr
