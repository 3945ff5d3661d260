"""The ``coap-relay`` command: argument handling in-process, and the installed command as a
subprocess (reads the printed address, relays a datagram, stops on SIGTERM / SIGINT with 0)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from coaplayers.programs.relay import (
    build_parser,
    faults_from_args,
    format_address,
    main,
    parse_address,
)
from coaplayers_tools.relay import Direction, read_capture

TIMEOUT = 5.0


def relay_command() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = Path(sys.executable).parent / "coap-relay"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "coaplayers.programs.relay"]


@pytest.mark.parametrize(
    ("text", "addr"),
    [
        ("127.0.0.1:5683", ("127.0.0.1", 5683)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:5684", ("::1", 5684)),
        ("[::]:0", ("::", 0)),
    ],
)
def test_parse_and_format_address(text: str, addr: tuple[str, int]) -> None:
    assert parse_address(text) == addr
    assert format_address(addr) == text


@pytest.mark.parametrize("text", ["5683", "host:", ":5683", "[::1]5683", "[::1]:x", "h:70000"])
def test_bad_addresses_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_flags_become_faults() -> None:
    args = build_parser().parse_args(
        [
            "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:5683",
            "--loss", "0.2", "--loss-down", "0", "--delay", "50", "--jitter-up", "10",
            "--duplicate", "0.1", "--reorder-up", "0.3", "--reorder-hold", "20",
            "--blackhole", "30:5", "--blackhole", "60:1.5", "--rebind-every", "10", "--seed", "7",
        ]
    )  # fmt: skip
    f = faults_from_args(args)
    up, down = f.link(Direction.UP), f.link(Direction.DOWN)
    assert (up.loss, down.loss) == (0.2, 0.0)
    assert up.delay == down.delay == pytest.approx(0.05)
    assert (up.jitter, down.jitter) == (pytest.approx(0.01), 0.0)
    assert up.duplicate == down.duplicate == 0.1
    assert (up.reorder, down.reorder) == (0.3, 0.0)
    assert f.reorder_hold == pytest.approx(0.02)
    assert f.blackholes == ((30.0, 5.0), (60.0, 1.5))
    assert (f.rebind_every, f.seed) == (10.0, 7)


@pytest.mark.parametrize(
    "extra",
    [["--loss", "1.5"], ["--delay", "-1"], ["--blackhole", "30"], ["--max-clients", "0"],
     ["--rebind-every", "0"]],
)  # fmt: skip
def test_bad_flags_exit_2(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", *extra])
    assert e.value.code == 2
    assert "coap-relay" in capsys.readouterr().err


def test_help_gives_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "coap-relay --listen 127.0.0.1:0" in out
    assert "%%" not in out


class Echo(asyncio.DatagramProtocol):
    """Queues what it receives and, with ``echo``, sends it back."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.transport: asyncio.DatagramTransport | None = None
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        assert self.transport is not None
        self.queue.put_nowait(data)
        if self.echo:
            self.transport.sendto(data, addr)


async def run_relay_and_stop(
    extra: list[str], stop: signal.Signals, tmp_path: Path
) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    echo_t, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    client_t, client = await loop.create_datagram_endpoint(
        lambda: Echo(echo=False), local_addr=("127.0.0.1", 0)
    )
    upstream = echo_t.get_extra_info("sockname")
    proc = await asyncio.create_subprocess_exec(
        *relay_command(), "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream[1]}",
        *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode().strip()
        relay_addr = parse_address(line)
        assert relay_addr[0] == "127.0.0.1" and relay_addr[1] != 0
        client_t.sendto(b"hello through the relay", relay_addr)
        assert await asyncio.wait_for(client.queue.get(), TIMEOUT) == b"hello through the relay"
        proc.send_signal(stop)
        code = await asyncio.wait_for(proc.wait(), TIMEOUT)
        err = (await proc.stderr.read()).decode()
        return code, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        echo_t.close()
        client_t.close()


async def test_command_relays_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    capture = tmp_path / "hop.capture"
    code, err = await run_relay_and_stop(
        ["-v", "--seed", "1", "--record", str(capture)], signal.SIGTERM, tmp_path
    )
    assert code == 0, err
    # -v prints the counters on exit.
    assert "up: in 1 out 1 dropped 0" in err
    assert "down: in 1 out 1 dropped 0" in err
    # Logs name addresses and sizes, never payloads.
    assert "hello through the relay" not in err
    assert b"hello through the relay".hex() not in err
    assert [r.data for r in read_capture(capture)] == [b"hello through the relay"] * 2


async def test_command_exits_0_on_sigint(tmp_path: Path) -> None:
    code, err = await run_relay_and_stop(["-vv"], signal.SIGINT, tmp_path)
    assert code == 0, err
    assert "hello through the relay" not in err


async def test_command_reports_a_bind_failure(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    taken, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    port = taken.get_extra_info("sockname")[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            *relay_command(), "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:9",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        assert proc.returncode == 1
        assert out == b""
        assert err.decode() == (
            f"coap-relay: cannot listen on 127.0.0.1:{port}: Address already in use\n")
    finally:
        taken.close()
