"""Start-up time of the programs, next to libcoap's and aiocoap's clients.

Shell loops of ``coap-client`` are a real use, so what a run costs before its first datagram
counts. Each figure is the median wall time of fresh processes (cold imports, as a shell
loop sees them; the OS file cache is warm, as it is in such a loop): ``--help`` of every
program, and a first plain GET on loopback against a coap-server started here.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HELP_TARGET = 0.12
"""Seconds: coap-client --help (docs/BENCHMARKS.md)."""
GET_TARGET = 0.15
"""Seconds: coap-client's first plain GET on loopback."""

PROGRAMS = ("coap-client", "coap-server", "coap-proxy", "coap-keys", "coap-relay")


def _bin(name: str) -> str | None:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else shutil.which(name)


def _median_seconds(argv: list[str], runs: int) -> float | None:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=30)
        times.append(time.perf_counter() - t0)
        if done.returncode not in (0, 1):  # libcoap's client prints its usage with status 1
            return None
    return statistics.median(times)


def measure(runs: int = 7) -> dict[str, Any]:
    """``{"help": {program: s}, "get": {client: s}}``; a program that is not installed, or
    that fails, is left out."""
    results: dict[str, Any] = {"runs": runs, "help": {}, "get": {}}
    for program in PROGRAMS:
        exe = _bin(program)
        if exe is not None:
            results["help"][program] = _median_seconds([exe, "--help"], runs)
    for name, argv in (("aiocoap-client", ["--help"]), ("coap-client-notls", [])):
        exe = _bin(name)
        if exe is not None:
            results["help"][name] = _median_seconds([exe, *argv], runs)
    server = _bin("coap-server")
    assert server is not None, "coap-server is not installed"
    proc = subprocess.Popen([server, "--listen", "coap://127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().split()
        if len(line) != 2 or line[0] != "listening":
            raise RuntimeError(f"coap-server did not start: {line}")
        uri = line[1] + "/hello"
        for name, argv in (("coap-client", [uri]), ("coap-client-notls", [uri]),
                           ("aiocoap-client", [uri])):
            exe = _bin(name)
            if exe is not None:
                results["get"][name] = _median_seconds([exe, *argv], runs)
    finally:
        proc.terminate()
        proc.wait(10)
    return results


def render(results: dict[str, Any]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1000 * x:.0f} ms"

    lines = [f"start-up (median of {results['runs']} fresh processes)",
             f"  {'program':<20} {'--help':>8} {'first GET':>10}"]
    names = list(dict.fromkeys([*results["help"], *results["get"]]))
    for name in names:
        lines.append(f"  {name:<20} {ms(results['help'].get(name)):>8}"
                     f" {ms(results['get'].get(name)):>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m coaplayers_tools.bench.startup [RUNS]``: the start-up table alone."""
    args = sys.argv[1:] if argv is None else argv
    print(render(measure(int(args[0]) if args else 7)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
