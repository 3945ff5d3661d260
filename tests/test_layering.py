"""Dependencies point one way (docs/ARCHITECTURE.md): the DTLS engine knows no layer, Layer 1
and the OSCORE mode do not know each other, and no library layer imports the programs'
configuration. Checked on the import statements (function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "coaplayers.dtls": ("coaplayers.layer0", "coaplayers.layer1", "coaplayers.oscore",
                        "coaplayers.proxy", "coaplayers.config", "coaplayers.programs"),
    "coaplayers.layer1": ("coaplayers.layer0", "coaplayers.oscore", "coaplayers.proxy",
                          "coaplayers.config", "coaplayers.programs"),
    "coaplayers.oscore": ("coaplayers.layer1", "coaplayers.proxy", "coaplayers.config",
                          "coaplayers.programs"),
    "coaplayers.layer0": ("coaplayers.layer1", "coaplayers.oscore", "coaplayers.config",
                          "coaplayers.programs"),
}
EXAMPLES = {"coaplayers/layer0/http_examples.py"}  # runs the whole stack to print an example


def _module(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every coaplayers import in ``path``."""
    here = _module(path)
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return [(line, m) for line, m in found if m.startswith("coaplayers")]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    wrong = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        if path.relative_to(ROOT).as_posix() in EXAMPLES:
            continue
        for line, module in imports(path):
            if module.startswith(FORBIDDEN[package]):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert wrong == []
