"""coap-server against libcoap's coap-client: No-Response (RFC 7967), unknown critical options
and Accept (RFC 7252 5.4.1, 5.10.4), the cases libcoap's client found answered wrongly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import need_program, run_program

from .conftest import Running, start_server

pytestmark = pytest.mark.interop


async def libcoap(tmp_path: Path, tag: str, *args: str, wait: int = 2) -> tuple[str, bytes]:
    """Run coap-client-notls; (the response code line it printed, the payload it saved)."""
    out = tmp_path / f"{tag}.out"
    _, stdout, stderr = await run_program(need_program("coap-client-notls"), "-B", str(wait),
                                          "-o", str(out), *args, timeout=wait + 15)
    payload = out.read_bytes() if out.exists() else b""
    return (stdout + stderr).decode(errors="replace").strip(), payload


async def test_no_response_suppresses_each_class_it_names(app: Running, tmp_path: Path) -> None:
    uri = app.uri("coap")
    cases = {
        # tag: (libcoap flags, path, whether an answer may come back)
        "non-all": (["-N", "-O", "258,0x1a"], "/hello", False),
        "non-4xx": (["-N", "-O", "258,0x08"], "/nope", False),
        "con-4xx": (["-O", "258,0x08"], "/nope", False),  # an empty ACK, nothing else
        "non-2xx-error": (["-N", "-O", "258,0x02"], "/nope", True),  # 4.04 not suppressed
        "non-plain": (["-N"], "/hello", True),
    }
    results = await asyncio.gather(*(
        libcoap(tmp_path, tag, *flags, uri + path) for tag, (flags, path, _) in cases.items()
    ))
    got = dict(zip(cases, results, strict=True))
    for tag, (_, _, answered) in cases.items():
        text, payload = got[tag]
        assert bool(text or payload) == answered, (tag, text, payload)
    assert "4.04" in got["non-2xx-error"][0]
    assert got["non-plain"][1].startswith(b"Hello from coap-server")


async def test_unknown_critical_option_is_4_02_and_elective_is_ignored(
    app: Running, tmp_path: Path
) -> None:
    uri = app.uri("coap") + "/hello"
    (crit, crit_payload), (elective, elective_payload), (non, non_payload) = await asyncio.gather(
        libcoap(tmp_path, "crit", "-O", "65001,0x01", uri),
        libcoap(tmp_path, "elective", "-O", "65000,0x01", uri),
        libcoap(tmp_path, "non", "-N", "-O", "65001,0x01", uri),  # rejected silently
    )
    assert "4.02" in crit and b"Hello" not in crit_payload, (crit, crit_payload)
    assert elective_payload.startswith(b"Hello from coap-server"), elective
    assert not non and not non_payload, (non, non_payload)


async def test_accept_answers_4_06_for_a_format_the_resource_lacks(
    app: Running, tmp_path: Path
) -> None:
    base = app.uri("coap")
    (json_temp, temp_payload), (_, text_temp), (_, json_time) = await asyncio.gather(
        libcoap(tmp_path, "tj", "-A", "50", base + "/sensors/temperature"),
        libcoap(tmp_path, "tt", "-A", "0", base + "/sensors/temperature"),
        libcoap(tmp_path, "time", "-A", "50", base + "/time"),
    )
    assert "4.06" in json_temp and not temp_payload.endswith(b" C"), (json_temp, temp_payload)
    assert text_temp.endswith(b" C"), text_temp
    assert json_time.startswith(b'{"time": '), json_time


async def test_psk_hello_without_a_suite_we_have_gets_handshake_failure(tmp_path: Path) -> None:
    """openssl s_client offering only PSK-AES128-GCM-SHA256 waited in silence until it gave up
    (tinydtls, the Layer 1 PSK backend, drops a hello without CCM_8)."""
    openssl = need_program("openssl")
    server = start_server(tmp_path, "--listen", "coaps://127.0.0.1:0", "--psk", "dev:secret")
    try:
        port = server.uri("coaps").rsplit(":", 1)[1]
        t0 = time.monotonic()
        _, out, err = await run_program(
            openssl, "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}",
            "-psk_identity", "dev", "-psk", b"secret".hex(), "-cipher", "PSK-AES128-GCM-SHA256",
            stdin=b"", timeout=30)
        elapsed = time.monotonic() - t0
        # the suite we do have still works
        _, ok_out, _ = await run_program(
            openssl, "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}",
            "-psk_identity", "dev", "-psk", b"secret".hex(), "-cipher", "PSK-AES128-CCM8",
            stdin=b"", timeout=30)
    finally:
        server.stop()
    text = (out + err).decode(errors="replace")
    assert "alert handshake failure" in text, text
    assert elapsed < 5, elapsed
    assert "Cipher is PSK-AES128-CCM8" in ok_out.decode(errors="replace")
