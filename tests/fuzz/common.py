"""Shared pieces of the fuzz suite: settings, the seed corpus, mutations, and the contract check.

Every parser that reads network or file input has a contract here: the exception types it may
raise on bad input (:func:`only`). Anything else escaping is a bug. The seed corpus
(``tests/fuzz/corpus/<parser>/``) holds real, valid samples made by the implementation itself
(``python -m tests.fuzz.make_corpus`` regenerates them); the tests use each sample as an
explicit example and as a base that :func:`mutated` bends.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

CORPUS = Path(__file__).parent / "corpus"

FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
"""Bounded so that the whole suite stays well under a minute on two cores."""


def corpus(parser: str) -> list[bytes]:
    """The seed samples of one parser, sorted by file name (deterministic examples)."""
    folder = CORPUS / parser
    samples = [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]
    assert samples, f"empty seed corpus {folder}"
    return samples


def corpus_files(parser: str) -> dict[str, bytes]:
    folder = CORPUS / parser
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class UnexpectedException(AssertionError):
    """A parser let an exception type escape that is not in its contract."""


@contextmanager
def only(*allowed: type[BaseException]) -> Iterator[list[BaseException]]:
    """Run a parser call; a rejection must be one of ``allowed``, anything else fails the test.

    Yields a list that holds the rejection (if any), so the caller can tell accepted input
    from rejected input and check each separately.
    """
    caught: list[BaseException] = []
    try:
        yield caught
    except allowed as exc:
        caught.append(exc)
    except Exception as exc:
        raise UnexpectedException(
            f"{type(exc).__name__} escaped (allowed: {[a.__name__ for a in allowed]}): {exc!r}"
        ) from exc


# ----------------------------------------------------------------------------- mutations


@st.composite
def mutated(draw: st.DrawFn, bases: list[bytes], max_ops: int = 4) -> bytes:
    """A sample with a few byte-level edits: bit flips, byte sets, inserts, deletes,
    truncation, duplicated slices and splices with another sample (libFuzzer's usual set)."""
    data = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(
            ["flip", "set", "insert", "delete", "truncate", "duplicate", "splice", "interesting"]
        ))
        n = len(data)
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            data[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
        elif op == "interesting" and n:
            i = draw(st.integers(0, n - 1))
            value = draw(st.sampled_from([b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff",
                                          b"\x00\x00", b"\x01\x00", b"\xfe\xfd"]))
            data[i : i + len(value)] = value
        elif op == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            data[i : i + draw(st.integers(1, 16))] = b""
        elif op == "truncate" and n:
            del data[draw(st.integers(0, n - 1)) :]
        elif op == "duplicate" and n:
            i = draw(st.integers(0, n - 1))
            chunk = data[i : i + draw(st.integers(1, 32))]
            j = draw(st.integers(0, n))
            data[j:j] = chunk
        elif op == "splice":
            other = draw(st.sampled_from(bases))
            i = draw(st.integers(0, n))
            j = draw(st.integers(0, len(other)))
            data = data[:i] + bytearray(other[j:])
    return bytes(data)


def bytes_input(bases: list[bytes], max_size: int = 300) -> st.SearchStrategy[bytes]:
    """Mutations of the samples, the samples themselves, and plain random bytes."""
    return st.one_of(
        mutated(bases),
        st.sampled_from(bases),
        st.binary(max_size=max_size),
    )


json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
    | st.sampled_from(["0x", "0xzz", "0x00", "", "coaps://*", "-", ".", "\x00", "ascii", "hex"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


@st.composite
def json_mutated(draw: st.DrawFn, bases: list[bytes]) -> bytes:
    """A JSON sample with one subtree replaced by an arbitrary JSON value, or a key renamed,
    added or removed: structure-aware, so the parser gets past json.loads and is exercised."""
    doc = json.loads(draw(st.sampled_from(bases)))
    paths = list(_json_paths(doc))
    path = draw(st.sampled_from(paths))
    op = draw(st.sampled_from(["replace", "add", "remove", "rename"]))
    doc = _json_edit(doc, path, op, draw)
    return json.dumps(doc).encode()


def _json_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _json_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _json_paths(v, (*prefix, i))


def _json_edit(doc: Any, path: tuple[Any, ...], op: str, draw: Callable[..., Any]) -> Any:
    if not path:
        return draw(json_values) if op == "replace" else doc
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if op == "replace" or not isinstance(parent, dict):
        parent[last] = draw(json_values)
    elif op == "add":
        parent[draw(st.text(max_size=12))] = draw(json_values)
    elif op == "remove":
        del parent[last]
    elif op == "rename":
        parent[draw(st.text(max_size=12))] = parent.pop(last)
    return doc


def toml_value(value: Any) -> str:
    """A tiny TOML writer for what the strategies make (no tomli-w dependency)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(table: dict[str, Any]) -> bytes:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in table.items()).encode()


toml_scalars = (
    st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=24)
    | st.sampled_from(["coaps://127.0.0.1:0", "coap://[::]:0", "x:y", "a:0xzz", "a:", ":b",
                       "-", "dtls", "oscore", "get", "nonexistent.pem", "0x00"])
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(min_size=1, max_size=10), children, max_size=3),
    max_leaves=8,
)
