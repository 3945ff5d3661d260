"""``coap-relay``: the fault relay as a command, for tests, scripts and people trying a deployment.

The first line on stdout is the bound listening address (``HOST:PORT``, IPv6 in brackets) and
nothing else, so a script can start the relay on port 0 and read where it went. Logs go to
stderr. SIGINT and SIGTERM stop it cleanly with exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from coaplayers.loglimit import LogLimits, install_log_limits
from coaplayers_tools.relay.faults import Faults
from coaplayers_tools.relay.relay import Address, FaultRelay

__all__ = ["faults_from_args", "format_address", "main", "parse_address"]

EPILOG = """\
Probabilities are between 0 and 1; delays are in milliseconds; blackhole and rebind times are in
seconds. A plain flag (--loss) applies both ways; --X-up (client -> upstream) and --X-down
(upstream -> client) override it for one direction.

examples:
  # 20% loss both ways in front of a CoAP server; the first output line is the bound address
  coap-relay --listen 127.0.0.1:0 --upstream 127.0.0.1:5683 --loss 0.2 --seed 1

  # 50 ms +- 20 ms of delay, 5% duplicates and 10% reordering, only towards the client
  coap-relay --listen [::1]:6683 --upstream [::1]:5683 \\
      --delay-down 50 --jitter-down 20 --duplicate-down 0.05 --reorder-down 0.1

  # NAT rebinding every 10 s, a 5 s blackhole 30 s after start, counters printed on exit
  coap-relay --listen 0.0.0.0:5684 --upstream 127.0.0.1:5684 --rebind-every 10 \\
      --blackhole 30:5 -v

  # record every datagram seen (time, direction, hex) to check what crossed the hop
  coap-relay --listen 127.0.0.1:0 --upstream 127.0.0.1:5684 --record hop1.capture
"""


def parse_address(text: str) -> Address:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT``."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [IPV6]:PORT, got {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return (host, port)


def format_address(addr: Address) -> str:
    """The inverse of :func:`parse_address`."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address_arg(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _blackhole_arg(text: str) -> tuple[float, float]:
    start, sep, duration = text.partition(":")
    try:
        if not sep:
            raise ValueError
        window = (float(start), float(duration))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:DURATION in seconds, got {text!r}"
        ) from None
    if window[0] < 0 or window[1] < 0:
        raise argparse.ArgumentTypeError(f"blackhole times must not be negative: {text!r}")
    return window


def _probability(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability is between 0 and 1, got {text!r}")
    return p


def _milliseconds(text: str) -> float:
    try:
        ms = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if ms < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return ms


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coap-relay",
        description="A UDP relay for one hop that loses, duplicates, reorders and delays\n"
        "datagrams, blackholes the hop for a while and changes source ports like a NAT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        required=True,
        type=_address_arg,
        metavar="HOST:PORT",
        help="address to listen on (port 0: any free port, printed on stdout)",
    )
    p.add_argument(
        "--upstream",
        required=True,
        type=_address_arg,
        metavar="HOST:PORT",
        help="address every datagram is forwarded to",
    )
    faults = p.add_argument_group("faults")
    for name, kind, unit, helptext in (
        ("loss", _probability, "P", "drop each datagram with probability P"),
        ("duplicate", _probability, "P", "send each datagram twice with probability P"),
        (
            "reorder",
            _probability,
            "P",
            "hold a datagram back with probability P until the next one of its client has gone",
        ),
        ("delay", _milliseconds, "MS", "delay each datagram by MS milliseconds"),
        ("jitter", _milliseconds, "MS", "spread the delay uniformly by +-MS milliseconds"),
    ):
        faults.add_argument(
            f"--{name}", type=kind, default=0.0, metavar=unit, help=helptext + " (both ways)"
        )
        faults.add_argument(
            f"--{name}-up",
            type=kind,
            default=None,
            metavar=unit,
            help=f"--{name} for client -> upstream only",
        )
        faults.add_argument(
            f"--{name}-down",
            type=kind,
            default=None,
            metavar=unit,
            help=f"--{name} for upstream -> client only",
        )
    faults.add_argument(
        "--reorder-hold",
        type=_milliseconds,
        default=50.0,
        metavar="MS",
        help="longest a reordered datagram waits for a successor (default 50)",
    )
    faults.add_argument(
        "--blackhole",
        type=_blackhole_arg,
        action="append",
        default=[],
        metavar="START:DURATION",
        help="drop everything from START for DURATION seconds after start (repeatable)",
    )
    faults.add_argument(
        "--rebind-every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give every client a new upstream source port this often (NAT rebinding)",
    )
    faults.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="seed the random faults, for a reproducible run",
    )
    table = p.add_argument_group("client mappings")
    table.add_argument(
        "--max-clients",
        type=int,
        default=256,
        metavar="N",
        help="most clients mapped at once; the least recently used goes first (default 256)",
    )
    table.add_argument(
        "--idle-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="close a client's mapping after this long without traffic (default 120)",
    )
    p.add_argument(
        "--record",
        metavar="FILE",
        help="write every datagram seen to FILE: 'seconds direction hex' per line",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log to stderr and print the counters on exit; -vv for debug logs",
    )
    return p


def faults_from_args(args: argparse.Namespace) -> Faults:
    """The :class:`Faults` for parsed command-line arguments (milliseconds become seconds)."""

    def ms(value: float | None) -> float | None:
        return None if value is None else value / 1000.0

    return Faults(
        loss=args.loss,
        loss_up=args.loss_up,
        loss_down=args.loss_down,
        duplicate=args.duplicate,
        duplicate_up=args.duplicate_up,
        duplicate_down=args.duplicate_down,
        reorder=args.reorder,
        reorder_up=args.reorder_up,
        reorder_down=args.reorder_down,
        delay=args.delay / 1000.0,
        delay_up=ms(args.delay_up),
        delay_down=ms(args.delay_down),
        jitter=args.jitter / 1000.0,
        jitter_up=ms(args.jitter_up),
        jitter_down=ms(args.jitter_down),
        reorder_hold=args.reorder_hold / 1000.0,
        blackholes=tuple(args.blackhole),
        rebind_every=args.rebind_every,
        seed=args.seed,
    )


async def _run(args: argparse.Namespace, faults: Faults) -> int:
    relay = FaultRelay(
        listen=args.listen,
        upstream=args.upstream,
        faults=faults,
        max_clients=args.max_clients,
        idle_timeout=args.idle_timeout,
        record=args.record,
    )
    try:
        await relay.start()
    except socket.gaierror as e:
        relay.close()
        print(f"coap-relay: cannot resolve --upstream {format_address(args.upstream)} or"
              f" --listen {format_address(args.listen)}: {e.strerror}", file=sys.stderr)
        return 1
    except OSError as e:
        relay.close()
        # The words of coap-server's and coap-proxy's bind errors.
        reason = os.strerror(e.errno) if e.errno else str(e)
        print(f"coap-relay: cannot listen on {format_address(args.listen)}: {reason}",
              file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(format_address(relay.address), flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        stats = relay.stats
        relay.close()
    if args.verbose:
        print(stats.format(), file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_clients < 1:
        parser.error("--max-clients must be at least 1")
    if args.idle_timeout <= 0:
        parser.error("--idle-timeout must be positive")
    if args.rebind_every is not None and args.rebind_every <= 0:
        parser.error("--rebind-every must be positive")
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose >= 2
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    install_log_limits(LogLimits(tracebacks=args.verbose >= 2))
    try:
        faults = faults_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(args, faults))
    return 0


if __name__ == "__main__":
    sys.exit(main())
