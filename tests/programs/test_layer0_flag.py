"""coap-client's Layer 0 mode: ``--layer0 dtls|oscore``, with ``--e2e`` (the flag's earlier
name) still accepted, on the command line and as a TOML key. In process: no program runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from coaplayers.dtls import ConfigurationError
from coaplayers.programs.client import options

URI = "coap://127.0.0.1/hello"


@pytest.mark.parametrize("flag", ["--layer0", "--e2e"])
def test_the_flag_and_its_earlier_name(flag: str) -> None:
    assert options.load([flag, "oscore", URI]).layer0.mode == "oscore"
    assert options.load([f"{flag}=dtls", URI]).layer0.mode == "dtls"
    assert options.load([URI]).layer0.mode is None


@pytest.mark.parametrize("key", ["layer0", "e2e"])
def test_the_toml_key_and_its_earlier_name(tmp_path: Path, key: str) -> None:
    path = tmp_path / "client.toml"
    path.write_text(f'{key} = "dtls"\n')
    assert options.load(["--config", str(path), URI]).layer0.mode == "dtls"
    # The command line wins over the file, whichever name either uses.
    assert options.load(["--config", str(path), "--e2e", "oscore", URI]).layer0.mode == "oscore"
    path.write_text(f'{key} = "tls"\n')
    with pytest.raises(ConfigurationError, match="must be one of dtls, oscore"):
        options.load(["--config", str(path), URI])


def test_help_names_layer0_first() -> None:
    text = options.build_parser().format_help()
    assert "--layer0 {dtls,oscore}, --e2e {dtls,oscore}" in text
