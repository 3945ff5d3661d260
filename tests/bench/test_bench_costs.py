"""coap-bench --costs: each shortcut of the request path timed next to the aiocoap call it
replaces (the figures of docs/BENCHMARKS.md, "Costs behind the code")."""

from __future__ import annotations

import json
from pathlib import Path

from coaplayers.programs.bench import main
from coaplayers_tools.bench import costs


def test_costs_run_writes_every_row(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "costs.json"
    assert main(["--costs", "--quick", "--json", str(out)]) == 0
    measured = json.loads(out.read_text())["costs"]
    assert set(measured) == {
        "copy a request (message.copy_request)",
        "protect a request (SecurityContext.protect)",
        "unprotect a request (SecurityContext.unprotect)",
    }
    for row in measured.values():
        assert row["ours"] > 0 and row["aiocoap"] > 0
    table = capsys.readouterr().out
    assert all(name in table for name in measured)


def test_render_states_the_saving() -> None:
    table = costs.render({"x": {"ours": 1.0, "aiocoap": 4.0}})
    assert table.splitlines()[1].split()[-1] == "75%"
