"""coap-client as a drop-in for libcoap 4.3's coap-client: each libcoap flag against the same
targets as libcoap's own client (libcoap's coap-server-notls, our coap-server, and a capturing
UDP socket that records what each client put on the wire), the flags it refuses, and the
output rules.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiocoap
import pytest

from coaplayers.programs.server.resources import Firmware
from tests.conftest import free_udp_port, need_program, wait_udp_bound

from .conftest import CLIENT, PSK_TEXT, Keys, Result, Running, client, run

pytestmark = pytest.mark.interop

IMAGE = Firmware().image


def libcoap_client() -> str:
    return need_program("coap-client-notls")


@pytest.fixture(scope="module")
def libcoap_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """libcoap's coap-server-notls on an ephemeral port (its resources: /, /time, ...)."""
    import subprocess

    exe = need_program("coap-server-notls")
    port = free_udp_port()
    log = open(tmp_path_factory.mktemp("libcoap") / "server.log", "wb")
    proc = subprocess.Popen([exe, "-A", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    asyncio.run(wait_udp_bound("127.0.0.1", port))
    try:
        yield f"coap://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


class Capture(asyncio.DatagramProtocol):
    """A UDP socket that records each CoAP request and answers it 2.05 "ok" (piggybacked for
    CON, a NON for NON), so that both clients finish normally."""

    def __init__(self) -> None:
        self.requests: list[tuple[aiocoap.Message, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        msg = aiocoap.Message.decode(data)
        if not msg.code.is_request():
            return
        self.requests.append((msg, addr))
        self.arrived.set()
        answer = aiocoap.Message(
            mtype=aiocoap.ACK if msg.mtype == aiocoap.CON else aiocoap.NON,
            mid=msg.mid if msg.mtype == aiocoap.CON else (msg.mid + 1) % 65536,
            code=aiocoap.CONTENT, payload=b"ok",
        )
        answer.token = msg.token
        assert self.transport is not None
        self.transport.sendto(answer.encode(), addr)


@asynccontextmanager
async def capture() -> AsyncIterator[tuple[Capture, int]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Capture, local_addr=("127.0.0.1", 0))
    try:
        yield proto, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def wire(msg: aiocoap.Message, token: bool) -> tuple[object, ...]:
    """What a request put on the wire, without what differs by nature (MID; the token unless
    -T fixes it)."""
    options = [(int(o.number), o.encode()) for o in msg.opt.option_list()]
    return (msg.mtype, msg.code, msg.token if token else None, options, msg.payload)


async def both(argv: list[str], uri: str) -> tuple[Result, Result]:
    """libcoap's client and ours with the same flags, one after the other."""
    theirs = await run(libcoap_client(), *argv, uri, timeout=30)
    ours = await client(*argv, uri)
    return theirs, ours


# ------------------------------------------------------------------------- flags on the wire


@pytest.mark.parametrize("flags", [
    ["-m", "PUT", "-N", "-T", "cafe", "-e", "a%20b%00c", "-t", "0"],
    ["-m", "Post", "-O", "2048,0x0102ff", "-O", "65001,text", "-H", "5", "-A", "50"],
    ["-T", "12345678", "-m", "fetch", "-e", "{}", "-t", "50"],
    ["-m", "post", "-e", "-v"],  # getopt: "-v" is -e's value
])
async def test_request_flags_put_the_same_message_on_the_wire_as_libcoap(
    flags: list[str], libcoap_server: str, app: Running,
) -> None:
    async with capture() as (cap, port):
        uri = f"coap://127.0.0.1:{port}/a/b?q=1"
        theirs, ours = await both(flags, uri)
        assert theirs.rc == 0 and ours.rc == 0, (theirs, ours)
    assert len(cap.requests) == 2, cap.requests
    (lib, _), (us, _) = cap.requests
    assert wire(us, "-T" in flags) == wire(lib, "-T" in flags)
    # And against real servers, libcoap's and ours: the same output from both clients. (With
    # the critical option 65001, libcoap's client waits out -B at libcoap's server.)
    for target in (libcoap_server + "/", app.uri("coap") + "/echo"):
        theirs, ours = await both(["-B", "3", *flags], target)
        assert ours.out == theirs.out, (target, theirs, ours)


async def test_libcoap_flags_from_the_configuration_file(tmp_path: Path) -> None:
    conf = tmp_path / "client.toml"
    conf.write_text('non = true\ntoken = "ab"\noption = ["2048,0x01"]\nhop-limit = 3\n'
                    'method = "put"\ntext = "x"\n')
    async with capture() as (cap, port):
        uri = f"coap://127.0.0.1:{port}/x"
        from_file = await client("--config", str(conf), uri)
        from_flags = await client("-N", "-T", "ab", "-O", "2048,0x01", "-H", "3", "-m", "put",
                                  "-e", "x", uri)
    assert from_file.rc == from_flags.rc == 0
    (a, _), (b, _) = cap.requests
    assert wire(a, True) == wire(b, True)
    assert a.mtype == aiocoap.NON and a.token == b"ac" and a.opt.hop_limit == 3


async def test_uri_host_by_default_and_never_with_U() -> None:
    async with capture() as (cap, port):
        uri = f"coap://localhost:{port}/x"
        await both([], uri)
        await both(["-U"], uri)
    hosts = [(m.opt.uri_host, m.opt.uri_port) for m, _ in cap.requests]
    assert hosts == [("localhost", port)] * 2 + [(None, None)] * 2


async def test_local_address_and_port() -> None:
    async with capture() as (cap, port):
        uri = f"coap://127.0.0.1:{port}/x"
        local_theirs, local_ours = free_udp_port(), free_udp_port()
        theirs = await run(libcoap_client(), "-a", "127.0.0.1", "-p", str(local_theirs), uri)
        ours = await client("-a", "127.0.0.1", "-p", str(local_ours), uri)
    assert theirs.rc == ours.rc == 0
    assert [addr for _, addr in cap.requests] == [("127.0.0.1", local_theirs),
                                                  ("127.0.0.1", local_ours)]


async def test_local_address_refused_for_a_coaps_first_hop() -> None:
    r = await client("-p", str(free_udp_port()), "-u", "dev", "-k", "x", "coaps://127.0.0.1/x")
    assert r.rc == 2 and "-a/-p" in r.one_line_error()


async def test_keepalive_interval_registers_a_silent_observation_again(app: Running) -> None:
    """-K: no notification for that long, and the observation is registered again (libcoap
    sends a CoAP ping, which reaches only the first hop); notifications keep coming."""
    r = await client("-s", "2.6", "-K", "0.4", "-w", "-o", "-", "-v", "7",
                     app.uri("coap") + "/sensors/temperature")
    assert r.rc == 0, r.stderr
    registrations = re.findall(r"sent \S+ v:1 t:CON c:GET .*Observe:0", r.stderr)
    assert len(registrations) >= 2, r.stderr
    assert len(r.stdout.splitlines()) >= 2


async def test_repeat_count() -> None:
    async with capture() as (cap, port):
        theirs, ours = await both(["-G", "2"], f"coap://127.0.0.1:{port}/x")
    assert theirs.rc == ours.rc == 0
    assert len(cap.requests) == 4
    assert ours.out == theirs.out == b"okok\n"


async def test_loss_list_drops_the_first_datagram_and_the_retransmission_gets_through(
    app: Running,
) -> None:
    r = await client("-l", "1", "-v", "7", app.uri("coap") + "/hello")
    assert r.rc == 0 and r.stdout.startswith("Hello from coap-server")
    dropped = [line for line in r.stderr.splitlines() if "dropped (-l)" in line]
    sent = [line for line in r.stderr.splitlines() if ": sent " in line or " sent " in line]
    assert len(dropped) == 1 and "c:GET" in dropped[0]
    assert len(sent) >= 1


# ---------------------------------------------------------------------------- output rules


async def test_output_is_byte_for_byte_libcoaps(libcoap_server: str, app: Running,
                                                 tmp_path: Path) -> None:
    """stdout: the payload and one newline at the end; -o -: exactly the payload; -w: a
    newline after each payload; -o FILE: the payload."""
    for uri in (libcoap_server + "/", app.uri("coap") + "/hello"):
        for flags in ([], ["-o", "-"], ["-w"], ["-w", "-o", "-"]):
            theirs, ours = await both(flags, uri)
            assert theirs.rc == ours.rc == 0
            assert ours.out == theirs.out, (uri, flags)
        f_theirs, f_ours = tmp_path / "theirs", tmp_path / "ours"
        await run(libcoap_client(), "-o", str(f_theirs), uri)
        r = await client("-o", str(f_ours), uri)
        assert r.rc == 0 and r.out == b"" and f_ours.read_bytes() == f_theirs.read_bytes()
    # An answer without payload: nothing at all, with or without -w.
    for flags in ([], ["-w"]):
        theirs, ours = await both(["-m", "post", *flags], app.uri("coap") + "/echo")
        assert ours.rc == 0 and ours.out == theirs.out == b""
    fw = await client("-o", "-", app.uri("coap") + "/firmware")
    assert fw.rc == 0 and fw.out == IMAGE


async def test_observe_into_a_file_appends_each_notification_like_libcoap(
    libcoap_server: str, tmp_path: Path,
) -> None:
    uri = libcoap_server + "/time"
    f_theirs, f_ours = tmp_path / "theirs", tmp_path / "ours"
    theirs, ours = await asyncio.gather(
        run(libcoap_client(), "-s", "2.5", "-o", str(f_theirs), uri, timeout=30),
        client("-s", "2.5", "-o", str(f_ours), uri))
    assert theirs.rc == ours.rc == 0 and ours.out == b""
    # /time answers "Mmm dd hh:mm:ss" (15 bytes) once a second: all of them, one file.
    pattern = rb"([A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d){3,5}"
    assert re.fullmatch(pattern, f_theirs.read_bytes()), f_theirs.read_bytes()
    assert re.fullmatch(pattern, f_ours.read_bytes()), f_ours.read_bytes()


async def test_missing_payload_file_and_closed_stdout(app: Running) -> None:
    missing = await client("-m", "put", "-f", "/nonexistent/payload", app.uri("coap") + "/echo")
    assert missing.rc == 2
    assert missing.one_line_error() == (
        "coap-client: -f /nonexistent/payload: cannot read it: No such file or directory")
    # A reader that goes away (| head -c 1): a quiet exit, no traceback.
    proc = await asyncio.create_subprocess_exec(
        CLIENT, "-o", "-", app.uri("coap") + "/firmware", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert len(await asyncio.wait_for(proc.stdout.read(1), 30)) == 1
    proc.stdout.feed_eof()
    transport = proc._transport
    transport.get_pipe_transport(1).close()
    err = await asyncio.wait_for(proc.stderr.read(), 30)
    await asyncio.wait_for(proc.wait(), 10)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err


async def test_exit_zero_for_scripts_that_expect_libcoaps_status(app: Running) -> None:
    uri = app.uri("coap") + "/no/such/resource"
    closed = f"coap://127.0.0.1:{free_udp_port()}/x"
    theirs = await run(libcoap_client(), "-B", "3", uri)
    ours, zero, silent, usage = await asyncio.gather(
        client(uri), client("--exit-zero", uri), client("--exit-zero", "-B", "3", closed),
        client("--exit-zero", "-m", "jump", uri))
    assert theirs.rc == 0 and ours.rc == 4 and zero.rc == 0
    assert "4.04 Not Found" in zero.one_line_error()  # still said on stderr
    assert silent.rc == 0 and "no answer" in silent.one_line_error()
    assert usage.rc == 2


# --------------------------------------------------------------------------------- refused


@pytest.mark.parametrize(("argv", "flag", "word"), [
    (["-r"], "-r", "TCP"),
    (["-n"], "-n", "always checked"),
    (["-X", "2048"], "-X", "TCP"),
    (["-J", "1234"], "-J", "PKCS #11"),
    (["-L", "2"], "-L", "block-wise"),
    (["-S", "sni.txt"], "-S", "SNI"),
    (["-h", "hints.txt"], "-h hints.txt", "hint"),
])
async def test_unsupported_libcoap_flags_are_refused_naming_the_flag(
    argv: list[str], flag: str, word: str,
) -> None:
    r = await client(*argv, "coap://127.0.0.1:9/x")
    assert r.rc == 2
    line = r.one_line_error()
    assert line.startswith(f"coap-client: {flag}: ") and word in line, line


async def test_help_and_verbosity_levels(app: Running) -> None:
    uri = app.uri("coap") + "/hello"
    h, help_, level7, level5, bare, unknown, tcp = await asyncio.gather(
        client("-h"), client("--help"), client("-v", "7", uri), client("-v", "5", uri),
        client("-v", uri), client("-Z", "5", uri), client("coap+tcp://127.0.0.1/x"))
    assert h.rc == help_.rc == 0 and h.out == help_.out
    for flag in ("-b", "-N", "-T", "-O", "-H", "-a", "-p", "-U", "-w", "-G", "-K", "-l", "-c",
                 "-j", "-C", "-R", "-M", "--exit-zero", "--pretty"):
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}[\s\],]", help_.stdout), flag
    assert "libcoap compatibility" in help_.stdout and "deliberate differences" in help_.stdout
    assert level7.rc == 0 and level7.stdout.startswith("Hello from coap-server")
    sent = re.search(r"sent 127\.0\.0\.1:\d+: v:1 t:CON c:GET i:\d+ \{[0-9a-f]+\} "
                     r"\[ Uri-Port:\d+, Uri-Path:hello \] :: 0 bytes", level7.stderr)
    got = re.search(r"received 127\.0\.0\.1:\d+: v:1 t:ACK c:2\.05 Content i:\d+ "
                    r"\{[0-9a-f]+\} \[ Content-Format:0 .*\] :: \d+ bytes", level7.stderr)
    assert sent and got, level7.stderr
    assert "response: 2.05 Content" in level5.stderr and " sent " not in level5.stderr
    assert "response: 2.05 Content" in bare.stderr and bare.rc == 0
    assert unknown.rc == 2 and "-Z" in unknown.one_line_error()
    assert tcp.rc == 2 and "TCP" in tcp.one_line_error()


# -------------------------------------------------------------------------------- block size


async def test_block_size_for_downloads_and_uploads(app: Running, libcoap_server: str,
                                                    tmp_path: Path) -> None:
    fw = app.uri("coap") + "/firmware"
    theirs, ours = await both(["-b", "64", "-o", "-"], fw)
    assert theirs.out == ours.out == IMAGE
    dumped = await client("-b", "64", "-v", "7", "-o", "/dev/null", fw)
    asked = re.findall(r"sent \S+ v:1 t:CON c:GET .*Block2:(\d+)/0/(\d+)", dumped.stderr)
    # -b 64 asks for 64-byte blocks; coap-server may answer smaller ones to an address it
    # has not verified (the 3x rule), and the client then follows its size (RFC 7959 2.4).
    assert asked[0] == ("0", "64"), asked[:3]
    assert all(int(size) <= 64 for _, size in asked)
    assert sum(int(size) for _, size in asked) >= len(IMAGE)
    # Block1 with a payload: our upload in 32-byte blocks, read back by libcoap's client.
    data = bytes(range(256)) * 2
    store = libcoap_server + "/example_data"
    up = await client("-m", "put", "-b", "32", "-v", "7", "-f", "-", store, stdin=data)
    assert up.rc == 0, up.stderr
    sizes = re.findall(r"sent \S+ v:1 t:CON c:PUT .*Block1:\d+/[01]/(\d+)", up.stderr)
    assert len(sizes) == 16 and set(sizes) == {"32"}
    back_theirs, back_ours = await both(["-o", "-"], store)
    assert back_theirs.out == back_ours.out == data
    # NUM,SIZE: that one block, as libcoap's client gives it.
    from_2_theirs, from_2_ours = await both(["-b", "2,64", "-o", "-"], store)
    assert from_2_ours.out == from_2_theirs.out == data[128:192]
    bad = await client("-b", "100", fw)
    assert bad.rc == 2 and "-b 100" in bad.one_line_error()


# ----------------------------------------------------------------------- certificate flags


async def test_libcoap_certificate_flags_are_ours(app: Running, keys: Keys) -> None:
    """-C (CA), -c (certificate) and -j (key) as libcoap names them; -M is --rpk-key and
    still wants the server's key pinned."""
    uri = app.uri("coaps") + "/hello"
    trust, trust_r, mutual, rpk = await asyncio.gather(
        client("-C", str(keys / "hop-ca.pem"), uri),
        client("-R", str(keys / "hop-ca.pem"), uri),
        client("-C", str(keys / "hop-ca.pem"), "-c", str(keys / "proxy.pem"),
               "-j", str(keys / "proxy.key"), uri),
        client("-M", str(keys / "client-hop-rpk.key"), uri),
    )
    assert trust.rc == 0 and trust.stdout.startswith("Hello from coap-server"), trust.stderr
    assert trust_r.rc == 0 and trust_r.stdout == trust.stdout
    assert mutual.rc == 0, mutual.stderr
    assert rpk.rc == 2 and "--rpk-server-key" in rpk.one_line_error()


async def test_psk_flags_win_over_the_configuration_file(app: Running, tmp_path: Path) -> None:
    """Layer 1 credentials given as flags replace the file's (they used to lose to its
    per-URI credentials file)."""
    creds = tmp_path / "hop.json"
    creds.write_text(json.dumps({"coaps://127.0.0.1*": {"dtls": {
        "psk": {"ascii": PSK_TEXT[1]}, "client-identity": {"ascii": PSK_TEXT[0]}}}}))
    creds.chmod(0o600)
    conf = tmp_path / "client.toml"
    conf.write_text('credentials = "hop.json"\n')
    uri = app.uri("coaps") + "/hello"
    from_file, intruder = await asyncio.gather(
        client("--config", str(conf), uri),
        client("--config", str(conf), "-u", "intruder", "-k", "wrongkey", "-B", "3", uri))
    assert from_file.rc == 0, from_file.stderr
    assert intruder.rc == 7 and intruder.out == b"", intruder
    assert "Layer 1 security failure" in intruder.one_line_error()

