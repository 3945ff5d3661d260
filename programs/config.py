"""Configuration shared by the programs: TOML files under command-line flags.

Every program takes ``--config FILE.toml`` whose keys are the long flag names (``listen``,
``psk``, ``e2e-psk``, ...); a flag given on the command line wins over the file. Repeatable flags
are TOML arrays.
"""

from __future__ import annotations

import argparse
import errno
import os
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coaplayers.credentials import (
    certificate_from,
    check_layers_apart,
    parse_psk_pair,
    psk_store_from,
)
from coaplayers.dtls import ConfigurationError

# The credential builders live in the library (coaplayers.credentials); they are named here
# too, so that a program reaches all of its configuration through one module. cryptography is
# imported by the functions that build credentials: reading a TOML file or merging flags never
# loads it (start-up time, docs/BENCHMARKS.md).

if TYPE_CHECKING:
    from coaplayers.dtls.credentials import raw_public_key_from as raw_public_key_from


def __getattr__(name: str) -> Any:
    if name == "raw_public_key_from":
        from coaplayers.dtls.credentials import raw_public_key_from

        return raw_public_key_from
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "cannot_listen", "certificate_from", "check_layers_apart", "load_toml", "merge_config",
    "parse_psk_pair", "psk_store_from", "raw_public_key_from",
]


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigurationError(f"cannot read configuration {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"configuration {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # tomllib decodes the whole file before parsing it
        raise ConfigurationError(f"configuration {path} is not UTF-8 text: {exc}") from exc
    return data


def cannot_listen(uris: Iterable[str], exc: OSError) -> str:
    """The one line coap-server and coap-proxy print when a listener cannot be bound.

    A port in use is the first thing a newcomer meets (another instance, or another CoAP
    program on 5683/5684), so that case names the way out.
    """
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    text = f"cannot listen on {', '.join(uris)}: {reason}"
    if exc.errno == errno.EADDRINUSE:
        text += ("; another program holds the port: choose another with --listen, or write"
                 " the demo configurations for other ports with"
                 " coap-keys DIR --server-port N --proxy-port M")
    return text


def merge_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, config: dict[str, Any],
    *, base: Path | None = None,
) -> argparse.Namespace:
    """Fill every option the command line left unset from ``config``; unknown keys are errors.

    Relative paths in the file are taken relative to the file's folder, so a configuration
    set can be moved as a whole.
    """
    if base is None:
        base = Path(getattr(args, "_config_dir", "."))
    by_key = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    by_name: dict[str, argparse.Action] = {}
    for known in by_key.values():
        for opt in known.option_strings:
            if opt.startswith("--"):
                by_name[opt[2:]] = known
    for key, value in config.items():
        action = by_name.get(key) or by_key.get(key.replace("-", "_"))
        if action is None:
            raise ConfigurationError(f"unknown configuration key {key!r}")
        current = getattr(args, action.dest)
        if not _unset(action, current):
            continue  # the command line wins
        value = _checked(key, action, value)
        if isinstance(action, argparse._AppendAction):
            value = [_path(base, action, v) for v in value]
        elif isinstance(value, str):
            value = _path(base, action, value)
        setattr(args, action.dest, value)
    return args


def _unset(action: argparse.Action, current: Any) -> bool:
    if isinstance(action, argparse._CountAction):
        return not current
    return current is None or current == [] or current is False


def _checked(key: str, action: argparse.Action, value: Any) -> Any:
    """The file's value in the form the flag would have produced, or a clear error."""
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise ConfigurationError(f"configuration key {key!r} must be a string or a list of"
                                     " strings")
        return items
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction
                  | argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigurationError(f"configuration key {key!r} must be true or false")
        return value
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool):
            return int(value)
        if not isinstance(value, int) or value < 0:
            raise ConfigurationError(f"configuration key {key!r} must be a number or a boolean")
        return value
    if action.type in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigurationError(f"configuration key {key!r} must be a number")
        try:
            value = action.type(value)
        except ValueError as exc:
            raise ConfigurationError(f"configuration key {key!r} must be a number") from exc
    elif not isinstance(value, str):
        raise ConfigurationError(f"configuration key {key!r} must be a string")
    if action.choices is not None and value not in action.choices:
        raise ConfigurationError(
            f"configuration key {key!r} must be one of {', '.join(map(str, action.choices))}"
        )
    return value


_PATH_METAVARS = ("FILE", "PEM", "DIR")


def _path(base: Path, action: argparse.Action, value: Any) -> Any:
    """Options whose metavar says they name a file are resolved against the config's folder."""
    if isinstance(value, str) and action.metavar in _PATH_METAVARS and value != "-":
        p = Path(value)
        return str(p if p.is_absolute() else base / p)
    return value
