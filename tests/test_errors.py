"""One exception root: every public exception class of the library derives from
CoaplayersError, and says whose side is at fault (LocalError or RemoteError) unless it is a
layer's base or by nature neither (listed here)."""

from __future__ import annotations

import importlib
import pkgutil

import coaplayers
from coaplayers.errors import CoaplayersError, LocalError, RemoteError

NEITHER = {
    "coaplayers.errors.CoaplayersError", "coaplayers.errors.LocalError",
    "coaplayers.errors.RemoteError",
    "coaplayers.dtls.errors.DtlsError", "coaplayers.layer0.errors.Layer0Error",
    "coaplayers.oscore.errors.OscoreError",
    # The context cannot go on: the server lost it (remote) or its sequence numbers are
    # used up (local); the answer is the same, a new handshake.
    "coaplayers.oscore.errors.RehandshakeRequired",
}


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(coaplayers.__path__, "coaplayers."):
        if info.name.endswith("__main__") or ".bench" in info.name or ".programs" in info.name:
            continue  # tooling and programs: not the library a user imports
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (isinstance(value, type) and issubclass(value, BaseException)
                    and not issubclass(value, Warning)
                    and value.__module__ == info.name and not name.startswith("_")):
                found[f"{info.name}.{name}"] = value
    return found


def test_every_library_exception_has_the_one_root() -> None:
    classes = _exception_classes()
    assert len(classes) > 30
    assert [n for n, c in classes.items() if not issubclass(c, CoaplayersError)] == []


def test_each_says_whose_side_is_at_fault() -> None:
    classes = _exception_classes()
    unclassified = [n for n, c in classes.items()
                    if not issubclass(c, LocalError | RemoteError) and n not in NEITHER]
    assert unclassified == []
    both = [n for n, c in classes.items() if issubclass(c, LocalError) and issubclass(
        c, RemoteError)]
    assert both == []
