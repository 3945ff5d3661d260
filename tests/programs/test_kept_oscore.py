"""coap-client --layer0 oscore keeps its context between runs: the next run's first request is
one round trip, server restarts are recovered by themselves, and no nonce is ever reused,
also when a run is killed.

A recording relay stands in front of coap-server; each run's datagrams are cut from its
capture, so "one round trip" is counted on the wire (one CoAP request up, its answer down).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiocoap import Message

from coaplayers_tools.relay import FaultRelay
from coaplayers_tools.relay.capture import read_capture
from coaplayers_tools.relay.faults import Direction

from .conftest import CLIENT, Keys, Running, client, start_server

pytestmark = pytest.mark.slow

PAYLOAD = "kept-context-check"


def serve(tmp: Path, keys: Keys, port: int = 0, *extra: str) -> Running:
    e2e = keys.psk["e2e"]
    return start_server(
        tmp, "--listen", f"coap://127.0.0.1:{port}",
        "--e2e-cert", str(keys / "server-e2e.pem"), "--e2e-key", str(keys / "server-e2e.key"),
        "--e2e-ca", str(keys / "e2e-ca.pem"), "--e2e-psk", f"{e2e['identity']}:{e2e['key']}",
        "--e2e-rpk-key", str(keys / "server-rpk.key"),
        "--e2e-rpk-trust", str(keys / "client-rpk.pub"), *extra, name="kept")


@dataclass
class Rig:
    tmp: Path
    keys: Keys
    relay: FaultRelay
    capture: Path
    server: Running
    port: int
    state: Path
    extra: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"coap://127.0.0.1:{self.relay.address[1]}/echo"

    def argv(self, *more: str) -> list[str]:
        return ["-m", "post", "-e", PAYLOAD, "--layer0", "oscore", *self.keys.e2e_cert,
                "--state-dir", str(self.state), "-v", "5", "-B", "30", *more, self.uri]

    def restart(self) -> None:
        self.server.stop()
        self.server = serve(self.tmp, self.keys, self.port, *self.extra)

    def lines(self) -> int:
        with open(self.capture, "rb") as f:
            return sum(1 for _ in f)

    def requests_since(self, start: int) -> list[Message]:
        """The distinct CoAP requests the client sent (retransmissions once)."""
        seen: dict[int, Message] = {}
        for g in read_capture(self.capture)[start:]:
            if g.direction is Direction.UP:
                msg = Message.decode(g.data)
                if msg.code.is_request():
                    seen.setdefault(msg.mid, msg)
        return list(seen.values())


@pytest.fixture
async def rig(keys: Keys, tmp_path: Path) -> AsyncIterator[Rig]:
    yield await _rig(keys, tmp_path)


async def _rig(keys: Keys, tmp: Path, *extra: str) -> Rig:
    server = serve(tmp, keys, 0, *extra)
    port = int(server.uri("coap").rsplit(":", 1)[1])
    capture = tmp / "hop.cap"
    relay = FaultRelay(upstream=("127.0.0.1", port), record=capture)
    await relay.start()
    return Rig(tmp, keys, relay, capture, server, port, tmp / "state", extra)


async def _close(r: Rig) -> None:
    r.relay.close()
    r.server.stop()


async def one_run(r: Rig, *more: str) -> tuple[list[Message], str]:
    start = r.lines()
    res = await client(*r.argv(*more))
    assert res.rc == 0, res.stderr
    assert res.stdout.rstrip("\n") == PAYLOAD, res.stdout  # the right answer, every time
    return r.requests_since(start), res.stderr


def oscore_ids(requests: list[Message]) -> list[tuple[bytes, int]]:
    """(kid, Partial IV) of every OSCORE request (RFC 8613 section 6.1 option value)."""
    out = []
    for msg in requests:
        value = msg.opt.oscore
        if value is None or not value:
            continue
        flags, rest = value[0], value[1:]
        n = flags & 0x07
        piv, rest = rest[:n], rest[n:]
        if flags & 0x10:
            rest = rest[1 + rest[0]:]
        kid = rest if flags & 0x08 else b""
        out.append((kid, int.from_bytes(piv, "big")))
    return out


@pytest.mark.timeout(120)
async def test_second_run_is_one_round_trip_and_no_keep_keys_afresh(rig: Rig) -> None:
    try:
        first, _ = await one_run(rig)
        assert len(first) >= 3  # two handshake flights (the keying folded in), the request
        second, err = await one_run(rig)
        assert len(second) == 1, [str(m) for m in second]
        assert oscore_ids(second)  # the one request is the protected POST itself
        assert "context kept from an earlier run" in err
        # Owner-only folder and files: they hold keys.
        assert stat.S_IMODE(rig.state.stat().st_mode) == 0o700
        assert stat.S_IMODE((rig.state / "oscore").stat().st_mode) == 0o700
        files = list((rig.state / "oscore").glob("*.json"))
        assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
        before = files[0].read_bytes()
        third, _ = await one_run(rig, "--no-keep")
        assert len(third) >= 3  # keyed afresh
        fourth, _ = await one_run(rig)
        assert len(fourth) == 1  # --no-keep neither used nor replaced the kept one
        ids = oscore_ids(first + second + third + fourth)
        assert len(set(ids)) == len(ids)
        assert files[0].read_bytes() != before  # each run stores a mark ahead of use
    finally:
        await _close(rig)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["psk", "rpk"])
async def test_other_credential_kinds_keep_their_own_context(rig: Rig, kind: str) -> None:
    try:
        creds = rig.keys.e2e_psk if kind == "psk" else rig.keys.e2e_rpk
        first, _ = await one_run(rig, *creds, "--e2e-auth", kind)
        assert len(first) >= 3
        second, err = await one_run(rig, *creds, "--e2e-auth", kind)
        assert len(second) == 1 and "context kept" in err
        # The certificate's slot is another one: nothing kept there yet.
        third, err = await one_run(rig)
        assert len(third) >= 3 and "context kept" not in err
        assert len(list((rig.state / "oscore").glob("*.json"))) == 2
    finally:
        await _close(rig)


@pytest.mark.timeout(120)
async def test_a_group_readable_state_folder_is_refused(rig: Rig) -> None:
    try:
        rig.state.mkdir(mode=0o750)
        rig.state.chmod(0o750)
        res = await client(*rig.argv())
        assert res.rc != 0
        assert "owner-only" in res.one_line_error()
    finally:
        await _close(rig)


@pytest.mark.timeout(120)
async def test_server_restart_without_state_rekeys_by_itself(rig: Rig) -> None:
    try:
        await one_run(rig)
        (kept,) = (rig.state / "oscore").glob("*.json")
        keys_before = json.loads(kept.read_text())["sender_key"]
        rig.restart()  # the server lost every context
        second, err = await one_run(rig)
        # The kept context's request is refused (4.01 context not found), then a handshake
        # and keying with the prior= check, then the request again under the new context.
        assert len(second) >= 5
        assert "context kept" not in err
        assert json.loads(kept.read_text())["sender_key"] != keys_before  # the new context
        third, _ = await one_run(rig)
        assert len(third) == 1
    finally:
        await _close(rig)


@pytest.mark.timeout(120)
async def test_server_restart_with_state_answers_after_echo(keys: Keys, tmp_path: Path) -> None:
    r = await _rig(keys, tmp_path, "--oscore-state", str(tmp_path / "server-state"))
    try:
        await one_run(r)
        r.restart()  # the server restores its contexts, with unknown replay windows
        second, _ = await one_run(r)
        assert len(second) == 2  # 4.01 + Echo, then the request with the Echo
        third, _ = await one_run(r)
        assert len(third) == 1
    finally:
        await _close(r)


KILL_AFTER_RESERVING = """
import os, signal, sys
from coaplayers import dtls
from coaplayers.oscore.client import origin_of
from coaplayers.oscore.kept import KeptContexts
creds = dtls.CertificateCredentials.from_files(sys.argv[2], sys.argv[3], sys.argv[4],
                                               server_name="127.0.0.1")
slot = KeptContexts(sys.argv[1] + "/oscore").slot(origin_of(sys.argv[5]), creds)
sc = slot.load()
print(sc.new_sequence_number(), flush=True)  # reserved (on disk), never used
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.timeout(120)
async def test_killed_client_never_reuses_a_nonce(rig: Rig) -> None:
    try:
        first, _ = await one_run(rig)
        # Killed between reserving a sequence number and using it.
        k = rig.keys
        done = subprocess.run(
            [sys.executable, "-c", KILL_AFTER_RESERVING, str(rig.state),
             str(k / "client-e2e.pem"), str(k / "client-e2e.key"), str(k / "e2e-ca.pem"),
             rig.uri], capture_output=True, text=True, timeout=30)
        assert done.returncode == -signal.SIGKILL, done.stderr
        reserved = int(done.stdout)
        # Killed while sending: coap-client with three requests a second apart, killed once
        # the first one is answered.
        start = rig.lines()
        proc = await asyncio.create_subprocess_exec(
            CLIENT, *rig.argv("-G", "3"), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            async with asyncio.timeout(30):
                while not any(g.direction is Direction.DOWN
                              for g in read_capture(rig.capture)[start:]):
                    await asyncio.sleep(0.02)  # polling the capture, bounded above
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        killed = rig.requests_since(start)
        after, _ = await one_run(rig)
        assert len(after) == 1
        ids = oscore_ids(first + killed + after)
        assert len(set(ids)) == len(ids), ids
        assert all(piv > reserved for _, piv in oscore_ids(killed + after))
    finally:
        await _close(rig)


def test_state_files_are_not_world_readable_even_with_a_loose_umask(tmp_path: Path) -> None:
    from coaplayers.oscore import SecurityContext
    from coaplayers.oscore.kept import KeptContexts

    old = os.umask(0)
    try:
        kept = KeptContexts(tmp_path / "s")
        slot = kept.slot("coap://example.net:5683", _psk())
        assert slot is not None
        slot.save(SecurityContext(master_secret=bytes(16), master_salt=b"",
                                  sender_id=b"\x01", recipient_id=b""))
        assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
        for f in (tmp_path / "s").iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        # A second user of the same slot waits for nobody: it gets no slot.
        assert kept.slot("coap://example.net:5683", _psk()) is None
        slot.release()
        assert kept.slot("coap://example.net:5683", _psk()) is not None
    finally:
        os.umask(old)


def test_the_folder_is_bounded(tmp_path: Path) -> None:
    from coaplayers.oscore import SecurityContext
    from coaplayers.oscore.kept import KeptContexts

    kept = KeptContexts(tmp_path, max_servers=3)
    for n in range(5):
        slot = kept.slot(f"coap://host{n}.example:5683", _psk())
        assert slot is not None
        slot.save(SecurityContext(master_secret=bytes(16), master_salt=b"",
                                  sender_id=b"\x01", recipient_id=b""))
        slot.release()
    assert len(list(tmp_path.glob("*.json"))) == 3


def _psk() -> object:
    from coaplayers import dtls

    return dtls.PskClientCredentials(b"dev", b"secret")
