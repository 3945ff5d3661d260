"""coap-client --layer0 dtls with certificates keeps its Layer 0 session between runs: the next
run resumes (no cookie exchange, no certificates), and a server that forgot the session
(restart) gets a full handshake, with the right answer every time. Counted on the wire."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from aiocoap.numbers.codes import Code

from coaplayers.dtls import records
from coaplayers_tools.relay.capture import read_capture
from coaplayers_tools.relay.faults import Direction

from .conftest import Keys
from .test_kept_oscore import Rig, _close, _rig, one_run

pytestmark = pytest.mark.slow


async def l0_run(r: Rig, *more: str) -> tuple[int, str, bool]:
    """(CoAP requests sent, stderr, whether a Certificate crossed the hop) of one run."""
    start = r.lines()
    requests, err = await one_run(r, "--layer0", "dtls", *more)
    certificate = False
    for g in read_capture(r.capture)[start:]:
        if g.direction is Direction.DOWN and b"\x0b\x00" in g.data:
            certificate = certificate or _has_certificate(g.data)
    # Up to its answer: the session's DELETE at the end is after it.
    return sum(1 for m in requests if m.code != Code.DELETE), err, certificate


def _has_certificate(datagram: bytes) -> bool:
    from aiocoap import Message

    payload = bytes(Message.decode(datagram).payload)
    try:
        recs = records.split_records(payload)
    except Exception:
        return False
    return any(records.content_type(rec) == records.CONTENT_HANDSHAKE
               and records.epoch(rec) == 0 and rec[records.HEADER_LEN] == 11 for rec in recs)


@pytest.mark.timeout(120)
async def test_second_run_resumes_and_a_restarted_server_gets_a_full_handshake(
        keys: Keys, tmp_path: Path) -> None:
    r = await _rig(keys, tmp_path)
    try:
        n1, err1, cert1 = await l0_run(r)
        # ClientHello / the server's flight (no cookie exchange at an idle server), then our
        # last flight with the request (False Start) / the server's Finished with the answer.
        assert cert1 and n1 == 2
        assert "resumed False" in err1 and "false start yes" in err1, err1
        (kept,) = (r.state / "layer0").glob("*.session")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert stat.S_IMODE((r.state / "layer0").stat().st_mode) == 0o700
        n2, err2, cert2 = await l0_run(r)
        assert "resumed True" in err2 and not cert2
        assert n2 == 2  # ClientHello answered at once; the Finished with the request
        before = kept.read_bytes()
        r.restart()  # the server forgot every session: resumption refused
        n3, err3, cert3 = await l0_run(r)
        assert "resumed False" in err3 and cert3 and n3 == 2
        assert kept.read_bytes() != before  # the new session replaced the old one
        n4, err4, _ = await l0_run(r)
        assert "resumed True" in err4 and n4 == 2
        n5, err5, _ = await l0_run(r, "--no-keep")
        assert "resumed False" in err5 and n5 == 2
    finally:
        await _close(r)
