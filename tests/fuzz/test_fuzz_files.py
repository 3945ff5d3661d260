"""Fuzzing the parsers of files an operator writes: the programs' TOML configuration, PSK JSON
files and ``ID:KEY`` pairs, Layer 1 credentials JSON (aiocoap's format plus ``dtls-cert``).

Contract: every rejection is a :class:`coaplayers.dtls.ConfigurationError` (the programs turn
it into one line on stderr and exit status 2), for coap-proxy its :class:`ConfigError`;
nothing else escapes, whatever the bytes, the types inside the document, or the nesting.
"""

from __future__ import annotations

import json
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from coaplayers.dtls import CertificateCredentials, ConfigurationError, PskClientCredentials
from coaplayers.layer1.credentials import ClientCredentials
from coaplayers.programs import config as cfg
from coaplayers.programs.client import main as client_main
from coaplayers.programs.client import options as client_options
from coaplayers.programs.client import run as client_run
from coaplayers.programs.client import security as client_security
from coaplayers.programs.server import main as server_main
from coaplayers.proxy.config import ConfigError, load_config_file

from .common import (
    FUZZ,
    bytes_input,
    corpus,
    corpus_files,
    json_mutated,
    only,
    toml_document,
    toml_values,
)

TOML = corpus_files("config_toml")
PSK_JSON = corpus("psk_json")
CREDENTIALS = corpus("credentials_json")


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@st.composite
def toml_mutated(draw: st.DrawFn, samples: list[bytes]) -> bytes:
    """A real configuration with values swapped for arbitrary TOML values (any type, nested
    tables, arrays), keys added or removed: gets past the TOML parser into the settings."""
    table: dict[str, Any] = tomllib.loads(draw(st.sampled_from(samples)).decode())
    keys = sorted(table)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "add", "remove"]))
        if op == "replace" and keys:
            table[draw(st.sampled_from(keys))] = draw(toml_values)
        elif op == "add":
            name = draw(st.sampled_from(["listen", "psk", "psk-file", "e2e-psk", "e2e", "cert",
                                         "verbose", "e2e-required", "-B", "timeout", "m",
                                         "method", "credentials", "e2e_psk_identity"])
                        | st.text(min_size=1, max_size=10))
            table[name] = draw(toml_values)
        elif op == "remove" and keys:
            table.pop(draw(st.sampled_from(keys)), None)
    return toml_document(table)


def toml_inputs(samples: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(toml_mutated(samples), bytes_input(samples, max_size=200))


# ------------------------------------------------------------------------- TOML + programs


@FUZZ
@given(data=toml_inputs([TOML["server.toml"]]))
@example(data=TOML["server.toml"])
@example(data=b"listen = \"\xff\xfe\"\n")  # not UTF-8
@example(data=b"psk = [1, 2]\n")
@example(data=b"e2e-psk = [\"a:0xzz\"]\n")
@example(data=b"verbose = \"loud\"\n")
@example(data=b"listen = [{}]\n")
def test_server_configuration(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, "server.toml", data)
    with only(ConfigurationError) as rejected:
        args = server_main.parse_args(["--config", str(path)])
        # what serve() builds from the settings before it binds anything
        cfg.psk_store_from(args.psk, args.psk_file)
        cfg.certificate_from(args.cert, args.key, args.ca, require_peer=bool(args.ca))
        cfg.psk_store_from(args.e2e_psk)
        cfg.certificate_from(args.e2e_cert, args.e2e_key, args.e2e_ca, what="e2e-")
        from coaplayers.layer1.context import parse_listen_uri

        for uri in args.listen:
            parse_listen_uri(uri)
    if not rejected:
        assert isinstance(args.listen, list) and all(isinstance(u, str) for u in args.listen)
        assert isinstance(args.verbose, int)


@FUZZ
@given(data=toml_inputs([TOML["client.toml"]]))
@example(data=TOML["client.toml"])
@example(data=b"e2e = \"tls\"\n")
@example(data=b"method = \"brew\"\n")
@example(data=b"timeout = \"soon\"\n")
@example(data=b"proxy = 5\n")
def test_client_configuration(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, "client.toml", data)
    with only(ConfigurationError) as rejected:
        config = client_options.load(["--config", str(path), "coap://127.0.0.1/hello"])
        client_security.layer1_credentials(config.layer1)
        client_security.e2e_options(config, client_main.RunState())
        client_run.build_request(config)
    if not rejected:
        assert config.method in client_options.METHODS
        assert isinstance(config.timeout, int | float)


def utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@FUZZ
@given(data=toml_inputs([TOML["proxy.toml"]]).filter(utf8))  # see the xfail test below
@example(data=TOML["proxy.toml"])
def test_proxy_configuration(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, "proxy.toml", data)
    with only(ConfigError):
        load_config_file(path)


def test_proxy_configuration_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config_file(write(tmp_path, "proxy.toml", b"listen = \"\xff\"\n"))


# ----------------------------------------------------------------------------- PSK files


@FUZZ
@given(data=st.one_of(json_mutated(PSK_JSON), bytes_input(PSK_JSON, max_size=200)))
@example(data=b"\xff\xfe")
@example(data=b"[" * 100_000)
@example(data=b'{"": "key"}')
@example(data=b'{"id": ""}')
@example(data=b'{"id": "0x0"}')
@example(data=json.dumps({"i" * 200: "k"}).encode())
def test_psk_json_file(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, "psk.json", data)
    with only(ConfigurationError) as rejected:
        store = cfg.psk_store_from(files=[str(path)])
    if not rejected and store is not None:
        for identity in store.identities():
            PskClientCredentials(identity, store.get(identity) or b"")  # every entry is usable


@FUZZ
@given(text=st.text(max_size=40) | st.sampled_from(["a:b", "a:0x", "a:0xg", ":k", "a:", "0x:0x"]))
def test_psk_pair(text: str) -> None:
    with only(ConfigurationError) as rejected:
        identity, key = cfg.parse_psk_pair(text)
        cfg.psk_store_from([text])
    if not rejected:
        assert identity and key


def test_psk_file_readable_by_others_is_warned_about(tmp_path: Path) -> None:
    path = write(tmp_path, "psk.json", PSK_JSON[0])
    path.chmod(0o644)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg.psk_store_from(files=[str(path)])
    assert any("accessible by other users" in str(w.message) for w in caught)


# ---------------------------------------------------------------------- credentials JSON


@FUZZ
@given(data=st.one_of(json_mutated(CREDENTIALS), bytes_input(CREDENTIALS, max_size=200)))
@example(data=b"\xff\xfe")
@example(data=b"[" * 100_000)
@example(data=b'{"coaps://*": {"dtls": {"psk": {"hex": "zz"}, "client-identity": "x"}}}')
@example(data=b'{"coaps://*": {"dtls-cert": {"cert": 1, "key": []}}}')
@example(data=b'{"coaps://*": {"dtls": {"psk": {"ascii": ""}, "client-identity": {"ascii": ""}}}}')
@example(data=b'{"coaps://*": {"oscore": {"contextfile": "nowhere"}}}')
@example(data=b'{"coaps://*": {"unknown": {}}}')
@example(data=b'{"coaps://*": ":other"}')
@example(data=b'{"coaps://*": ":b", "b": ":coaps://*"}')
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # aiocoap __del__
def test_credentials_json(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, "credentials.json", data)
    with only(ConfigurationError) as rejected:
        creds = ClientCredentials.from_file(path)
        for uri in ("coaps://127.0.0.1:5684/x", "coaps://[2001:db8::1]/", "coaps://gateway.example"):
            try:
                found = creds.for_uri(uri)
            except ConfigurationError:
                continue
            assert isinstance(found, PskClientCredentials | CertificateCredentials)
    del rejected
