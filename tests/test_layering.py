"""Dependencies point one way (docs/ARCHITECTURE.md): the DTLS engine knows no layer, Layer 1
and the OSCORE mode do not know each other, the library imports neither the programs nor the
tooling, and only programs parse command lines. Checked on the import statements
(function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ABOVE_THE_LIBRARY = ("coaplayers.programs", "coaplayers_tools")
FORBIDDEN = {
    "coaplayers.dtls": ("coaplayers.layer0", "coaplayers.layer1", "coaplayers.oscore",
                        "coaplayers.proxy", *ABOVE_THE_LIBRARY),
    "coaplayers.layer1": ("coaplayers.layer0", "coaplayers.oscore", "coaplayers.proxy",
                          *ABOVE_THE_LIBRARY),
    "coaplayers.oscore": ("coaplayers.layer1", "coaplayers.proxy", *ABOVE_THE_LIBRARY),
    "coaplayers.layer0": ("coaplayers.layer1", "coaplayers.oscore", *ABOVE_THE_LIBRARY),
    "coaplayers": ABOVE_THE_LIBRARY,  # the whole library, its top-level modules included
}
EXAMPLES = {"coaplayers/layer0/http_examples.py"}  # runs the whole stack to print an example


def _module(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path`` (a module of the library)."""
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
    return found


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


def test_no_program_or_tooling_inside_the_library() -> None:
    """The library's own folder holds no program and no tooling: they moved to programs/ and
    tools/, which install as coaplayers.programs and coaplayers_tools."""
    assert not (ROOT / "coaplayers" / "programs").exists()
    assert not (ROOT / "coaplayers" / "bench").exists()
    assert not (ROOT / "coaplayers" / "relay").exists()


# Only the programs parse command lines: the library and the tooling take typed settings.
PARSERS = ("argparse", "getopt", "optparse")


@pytest.mark.parametrize("top", ["coaplayers", "tools"])
def test_only_programs_parse_command_lines(top: str) -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / top).rglob("*.py"))
        for line, module in imports(path)
        if module.split(".")[0] in PARSERS
    ]
    assert wrong == []


SANS_IO = ("coaplayers/dtls/session.py", "coaplayers/layer0/core.py",
           "coaplayers/layer0/clientcore.py", "coaplayers/proxy/fastpath.py")
IO_MODULES = ("asyncio", "socket", "selectors", "threading", "time")


@pytest.mark.parametrize("path", SANS_IO)
def test_sans_io_cores_have_no_loop_socket_or_clock(path: str) -> None:
    """Time reaches these only as ``now`` arguments, bytes only through their methods."""
    wrong = [f"{path}:{line} imports {module}" for line, module in imports(ROOT / path)
             if module.split(".")[0] in IO_MODULES]
    assert wrong == []
