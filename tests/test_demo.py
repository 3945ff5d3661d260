"""The main job: the end-to-end demo (``scripts/demo`` after set-up) tells one short story per
mode, the client's, the proxy's and the server's view of the same request, and shows that only
Layer 1 alone lets the proxy read the application's data."""

from __future__ import annotations

import re
import sys

from coaplayers.programs.demo import MARKER

from .conftest import run_program

SENT = f"'{MARKER}: 21.5 C'"


async def test_demo_runs_every_mode_and_the_proxy_sees_the_marker_only_with_layer1() -> None:
    code, out, err = await run_program(sys.executable, "-m", "coaplayers.programs.demo",
                                       timeout=180)
    text = out.decode()
    assert code == 0, text + err.decode()
    # The set-up says why hop 2 is plain CoAP here while a deployment uses coaps on it.
    intro = text.split("\n== 1/8 ", 1)[0]
    assert "Hop 2 is plain CoAP here on purpose" in intro, intro
    assert "Deployed, hop 2 is coaps too" in intro, intro
    scenes = dict(re.findall(r"^== \d/8 (.+?) =+\n(.*?)(?=^== )", text, re.S | re.M))
    expected = {
        "Layer 1 only": "YES",
        "Layer 0 DTLS (PSK)": "no",
        "Layer 0 DTLS (certificates)": "no",
        "Layer 0 DTLS (raw public keys, RFC 7250)": "no",
        "OSCORE mode": "no",
        "Layer 1 and Layer 0 with raw public keys": "no",
        # Figure 2: the proxy speaks HTTP to the server; its view stays ciphertext.
        "CoAP to HTTP: Layer 0 DTLS (PSK)": "no",
        "CoAP to HTTP: OSCORE mode": "no",
    }
    assert set(scenes) == set(expected), list(scenes)
    summary, loss = text.split("\n== summary ", 1)[1].split("\n== losing a proxy ", 1)
    # The payoff: proxy A dies, B takes over; Layer 1 starts again, OSCORE carries on.
    before, killed, after = (" ".join(part.split()) for part in loss.partition("proxy A  killed"))
    assert killed, loss
    assert "client via A layer 1 hop " in before, loss
    assert "mode oscore (keyed by a DTLS certificate handshake)" in before, loss
    assert "client via B layer 1 hop " in after, loss
    assert "mode oscore (keyed by a DTLS certificate handshake)" in after, loss
    assert "context kept from an earlier run" in after, loss
    assert "handshake cipher" not in after, loss  # no new end-to-end handshake via B
    assert "it carried on: no new end-to-end handshake" in after, loss
    for title, clear in expected.items():
        scene = scenes[title]
        # The client's view ...
        assert f"  client   sent     POST /echo {SENT}\n" in scene, scene
        assert f"  client   got back {SENT}\n" in scene, scene
        # ... never calls its own PSK identity the peer's ...
        assert "peer device-1" not in scene.split("  proxy ")[0], scene
        # ... the proxy's: as many requests listed as it says it forwarded ...
        forwarded = re.search(r"hop 2: forwarded (\d+) (?:HTTP )?requests?, each with its answer:\n"
                              r"((?: {13}\S.*\n)+)", scene)
        assert forwarded, scene
        rows = forwarded[2].splitlines()
        assert len(rows) == int(forwarded[1]), scene
        assert all(re.search(r" -> 2(\.\d\d|\d\d) ", row) for row in rows), rows
        assert f"           the marker in clear: {clear}\n" in scene, scene
        # ... and the application's, after Layer 0 / OSCORE were taken off.
        assert "  server   received POST " in scene and " received POST /echo (" in scene, scene
        assert re.search(rf"^  {re.escape(title)} +{forwarded[1]}  {clear}$", summary, re.M), (
            summary)
        if clear == "no":  # only tunnel paths or OSCORE's outer "/" cross the proxy
            assert all(re.match(r" {13}(POST|DELETE) /(\.well-known/atls|~\S+| kid )", row)
                       for row in rows), rows
    assert "psk identity device-1" in scenes["Layer 0 DTLS (PSK)"]
    assert "OSCORE ciphertext" in scenes["OSCORE mode"]
    http_l0 = scenes["CoAP to HTTP: Layer 0 DTLS (PSK)"]
    assert "forwarded 4 HTTP requests" in http_l0 and "POST /.well-known/atls" in http_l0
    assert " -> 201 " in http_l0  # the session created over HTTP
    assert re.search(r"POST / +kid \S+ +\d+ B  OSCORE ciphertext +-> 200 ",
                     scenes["CoAP to HTTP: OSCORE mode"])
    assert "With Layer 1 alone it read" in summary
