"""aiocoap's and pyOpenSSL's internals are reached from one module each.

The tree (``coaplayers/``, ``client/``, ``server/``) is parsed: a private aiocoap name (one
aiocoap's own source defines with a leading underscore, and coaplayers does not define for
itself) used as an attribute or imported, or a pyOpenSSL internal, outside
``coaplayers/_aiocoap.py`` and ``coaplayers/_openssl.py`` fails the test, unless the seam
module lists it (with its reason) in ``EXCEPTIONS``. The versions the seams were checked
against must be the installed ones.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import aiocoap
import pytest

from coaplayers import _aiocoap, _openssl

ROOT = Path(__file__).resolve().parent.parent
TREE = ("coaplayers", "client", "server")
SEAMS = {"coaplayers/_aiocoap.py", "coaplayers/_openssl.py"}

PYOPENSSL_INTERNALS = re.compile(
    r"\b(?:SSL|crypto)\._\w+"  # SSL._lib, SSL._ffi, ...
    r"|\._ssl\b|\._reverse_mapping\b"  # Connection internals
    r"|\bsession\._session\b|\b(?:ctx|ssl_context)\._context\b"  # Session, Context pointers
    r"|\b_lib\.SSL_|\b_ffi\.callback\b"  # the binding itself, however it was reached
)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_names(tree: ast.AST) -> Iterator[str]:
    """Names a module defines: functions, classes, assignments, ``self._x = ...``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.name
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            yield node.attr
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            yield node.id


def _aiocoap_private_names() -> set[str]:
    names: set[str] = set()
    for path in Path(aiocoap.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names.update(n for n in _defined_names(tree) if _private(n))
        names.update(node.attr for node in ast.walk(tree)
                     if isinstance(node, ast.Attribute) and _private(node.attr))
    return names


def _sources(root: Path = ROOT) -> Iterator[tuple[str, str]]:
    for top in TREE:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel not in SEAMS:
                yield rel, path.read_text()


def private_aiocoap_uses(root: Path = ROOT, *, excepting: bool = True
                         ) -> list[tuple[str, int, str]]:
    """(file, line, name) of every private aiocoap name used outside the seam (but for the
    seam's ``EXCEPTIONS``, unless ``excepting`` is False)."""
    sources = list(_sources(root))
    trees = {rel: ast.parse(text) for rel, text in sources}
    ours = {n for tree in trees.values() for n in _defined_names(tree) if _private(n)}
    theirs = _aiocoap_private_names()
    found: list[tuple[str, int, str]] = []
    for rel, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiocoap"):
                found += [(rel, node.lineno, a.name) for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and node.attr in theirs:
                via_super = (isinstance(node.value, ast.Call)
                             and getattr(node.value.func, "id", None) == "super")
                if node.attr not in ours or via_super:
                    found.append((rel, node.lineno, node.attr))
        found += _overrides(rel, tree, theirs)
    if not excepting:
        return found
    return [f for f in found if (f[0], f[2]) not in _aiocoap.EXCEPTIONS]


def _module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    if parts[0] in ("client", "server"):
        parts = ["coaplayers", "programs", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _overrides(rel: str, tree: ast.AST, theirs: set[str]) -> list[tuple[str, int, str]]:
    """Private methods of aiocoap classes that a class of ours (derived from them) overrides:
    found on the live classes, through their method resolution order."""
    if rel.endswith("__main__.py") or not any(
            isinstance(node, ast.ClassDef) and node.bases for node in ast.walk(tree)):
        return []
    module = importlib.import_module(_module_name(rel))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef) or not node.bases:
            continue
        cls = getattr(module, node.name, None)
        if not isinstance(cls, type):
            continue
        upstream = [c for c in cls.__mro__ if c.__module__.startswith("aiocoap")]
        found += [(rel, item.lineno, item.name) for item in node.body
                  if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                  and item.name in theirs and any(item.name in vars(c) for c in upstream)]
    return found


def pyopenssl_internals(root: Path = ROOT) -> list[tuple[str, int, str]]:
    found = []
    for rel, text in _sources(root):
        if rel == "coaplayers/dtls/gnutls.py":
            # GnuTLS through its own cffi binding (_ffi, _lib there are GnuTLS's, not OpenSSL's)
            text = re.sub(r"\b_(?:lib|ffi)\b", "gnutls", text)
        for number, line in enumerate(text.splitlines(), 1):
            match = PYOPENSSL_INTERNALS.search(line)
            if match:
                found.append((rel, number, match.group(0)))
    return found


def test_private_aiocoap_names_only_in_the_seam() -> None:
    assert private_aiocoap_uses() == []


def test_exceptions_are_still_needed() -> None:
    """Every listed exception is found where it says (else it should leave the list)."""
    found = {(rel, name) for rel, _, name in private_aiocoap_uses(excepting=False)}
    for where, reason in _aiocoap.EXCEPTIONS.items():
        assert reason and where in found, where


def test_pyopenssl_internals_only_in_the_seam() -> None:
    assert pyopenssl_internals() == []


@pytest.mark.parametrize("seam", [_aiocoap, _openssl], ids=["aiocoap", "openssl"])
def test_installed_versions_are_the_checked_ones(seam: object) -> None:
    for distribution, checked in seam.CHECKED_AGAINST.items():  # type: ignore[attr-defined]
        installed = metadata.version(distribution)
        # The same release line; a newer one means checking the seam module again.
        assert installed.split(".")[:2] == checked.split(".")[:2], (distribution, installed)
