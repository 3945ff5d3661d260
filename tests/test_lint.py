"""ruff and mypy run with the suite (scripts/test, which CI runs): a lint or type error fails
the build like a failing test. Both read their configuration from pyproject.toml (mypy: strict
on the sans-I/O cores, normal elsewhere)."""

from __future__ import annotations

import re
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


# A measured cost ("~35 us of CPU per request") ages in a docstring; docs/BENCHMARKS.md keeps
# such figures ("Costs behind the code"). tools/bench measures, so it may name units.
_TIMING = re.compile(r"\d\s?(?:us|µs)\b|\d\s?ms (?:of CPU|per (?:request|message))"
                     r"|(?:ms|us) (?:less|more) per")


def test_no_timing_figures_in_the_code() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for top in ("coaplayers", "programs", "client", "server", "tools")
        for path in sorted((ROOT / top).rglob("*.py"))
        if "bench" not in path.relative_to(ROOT).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if _TIMING.search(line)
    ]
    assert found == [], "timing figures belong in docs/BENCHMARKS.md"
