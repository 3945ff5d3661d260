"""The main job: the end-to-end demo (``scripts/demo`` after set-up) runs every mode and shows
that only Layer 1 alone lets the proxy read the application's data."""

from __future__ import annotations

import re
import sys

from coaplayers.demo import MARKER

from .conftest import run_program


async def test_demo_runs_every_mode_and_the_proxy_sees_the_marker_only_with_layer1() -> None:
    code, out, err = await run_program(sys.executable, "-m", "coaplayers.demo", timeout=180)
    text = out.decode()
    assert code == 0, text + err.decode()
    scenes = dict(re.findall(r"^== (.+?) =+\n(.*?)(?=^== )", text, re.S | re.M))
    expected = {
        "Layer 1 only": "YES",
        "Layer 0 DTLS (PSK)": "no",
        "Layer 0 DTLS (certificates)": "no",
        "Layer 0 DTLS (raw public keys, RFC 7250)": "no",
        "OSCORE mode": "no",
        "Layer 1 and Layer 0 with raw public keys": "no",
    }
    for title, clear in expected.items():
        scene = scenes[title]
        assert f"client got back   '{MARKER}: 21.5 C'" in scene, scene
        assert f"marker in clear: {clear}\n" in scene, scene
        assert "server received   POST /echo" in scene, scene
    assert "== done ==" in text
