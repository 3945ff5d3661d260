"""coap-server: the application server (resources behind Layer 1, Layer 0 and OSCORE)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from coaplayers import dtls
from coaplayers.blockwise import BlockwiseLimits
from coaplayers.loglimit import LogLimits, install_log_limits
from coaplayers.replica import auto_replica, check_replica
from coaplayers.workers import (
    Supervisor,
    parse_workers,
    self_command,
    serve_supervised,
    worker_role,
)

# The engines and the site load in serve() and main(): --help and flag errors never pay for
# them (start-up time, docs/BENCHMARKS.md).

EPILOG = """\
examples:
  coap-server --listen coap://[::]:5683
  coap-server --listen coaps://0.0.0.0:5684 --psk proxy:0x6b6579 --e2e-psk dev1:secret
  coap-server --listen coaps://[::]:0 --cert server.pem --key server.key --ca ca.pem \\
              --e2e-cert e2e-server.pem --e2e-key e2e-server.key --e2e-ca ca.pem --e2e-required
  coap-server --listen coaps://[::]:5684 --rpk-key server-hop-rpk.key \\
              --rpk-trust client-hop-rpk.pub --psk proxy:0x6b6579
  coap-server --listen coap://[::]:5683 --e2e-rpk-key server-rpk.key \\
              --e2e-rpk-trust client-rpk.pub --e2e-rpk-trust more-clients.pub
  coap-server --listen coap://[::]:5683 --listen http://127.0.0.1:8080 --e2e-psk dev1:secret
  coap-server --config server.toml

resources: /hello /time /echo (POST, PUT) /sensors/temperature (observable) /firmware (64 KiB)
Request bodies sent block-wise are taken up to --max-body (4.13 with Size1 beyond it), in
plain CoAP, inside Layer 0 and under OSCORE alike.
Layer 1 credentials of every kind given (--psk, --cert, --rpk-key) are served side by side on
each coaps:// listener; a raw-public-key client's Layer 1 identity is its key's fingerprint.
Each layer keeps its own keys: a key in both --rpk-trust and --e2e-rpk-trust, or one private
key for --rpk-key and --e2e-rpk-key, is refused.
End-to-end credentials of every kind given (PSK, certificate, raw public key) are accepted side
by side on the same listeners; each client's handshake picks one. A raw-public-key client's
identity is its key's fingerprint (32 hex digits, as -v logs and coap-keys prints).
An http:// listener serves the same resources over HTTP (RFC 8075 mapping), Layer 0 by ATLS's
HTTP binding (POST /.well-known/atls, application/atls) and OSCORE by RFC 8613 section 11: the
Figure 2 deployment, behind a CoAP-to-HTTP coap-proxy (docs/DEPLOY.md).
Each bound address is printed on stdout as "listening URI" (port 0 -> the real port).
A key file readable by other users gets a warning on stderr.
Exit status: 0 after SIGINT/SIGTERM, 2 for configuration errors, 1 if binding failed.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coap-server",
        description="CoAP application server with hop-by-hop (Layer 1) and end-to-end "
        "(Layer 0 DTLS or OSCORE) security.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.toml", help="configuration file (flags win)")
    p.add_argument("--listen", action="append", default=[], metavar="URI",
                   help="coap://HOST:PORT, coaps://HOST:PORT or http://HOST:PORT (repeatable;"
                   " default coap://[::]:5683)")
    l1 = p.add_argument_group("Layer 1 (hop-by-hop DTLS on coaps:// listeners)")
    l1.add_argument("--psk", action="append", default=[], metavar="ID:KEY",
                    help="accepted PSK identity and key (KEY as text or 0x-hex; repeatable)")
    l1.add_argument("--psk-file", action="append", default=[], metavar="FILE",
                    help="JSON object identity -> key (repeatable)")
    l1.add_argument("--cert", metavar="PEM", help="server certificate")
    l1.add_argument("--key", metavar="PEM", help="server private key")
    l1.add_argument("--ca", metavar="PEM", help="CA that client certificates must chain to")
    l1.add_argument("--rpk-key", metavar="PEM",
                    help="raw public key mode (RFC 7250): our ECDSA P-256 private key")
    l1.add_argument("--rpk-trust", action="append", default=[], metavar="PEM",
                    help="public key(s) of accepted raw-public-key clients (PEM PUBLIC KEY "
                    "blocks; repeatable)")
    l0 = p.add_argument_group("Layer 0 (end-to-end DTLS and OSCORE through proxies)")
    l0.add_argument("--e2e-psk", action="append", default=[], metavar="ID:KEY",
                    help="accepted end-to-end PSK identity and key (repeatable)")
    l0.add_argument("--e2e-cert", metavar="PEM", help="end-to-end server certificate")
    l0.add_argument("--e2e-key", metavar="PEM", help="end-to-end server private key")
    l0.add_argument("--e2e-ca", metavar="PEM", help="CA for end-to-end client certificates")
    l0.add_argument("--e2e-rpk-key", metavar="PEM",
                    help="end-to-end raw public key mode (RFC 7250): our ECDSA P-256 private key")
    l0.add_argument("--e2e-rpk-trust", action="append", default=[], metavar="PEM",
                    help="public key(s) of accepted raw-public-key clients (PEM PUBLIC KEY "
                    "blocks; repeatable)")
    l0.add_argument("--e2e-required", action="store_true", default=None,
                    help="application resources answer only inside Layer 0 or OSCORE")
    l0.add_argument("--oscore-state", metavar="DIR",
                    help="keep OSCORE contexts in this folder (one owner-only file each), so"
                    " that clients keep them across a restart without a new handshake")
    p.add_argument("--replica", type=_replica, metavar="N",
                   help="this server's number (0-15) in a replica set behind coap-proxy: it"
                   " goes into every Layer 0 session name and OSCORE client ID, and"
                   " /.well-known/replica answers it; auto: the last byte of this host's"
                   " address modulo 16 (containers of one network, as compose --scale makes)")
    p.add_argument("--workers", metavar="N|auto",
                   help="processes sharing the listen ports (1-16; auto: one per core, at most"
                   " 16); Layer 0 sessions and OSCORE contexts reach their worker by the"
                   " kernel's choice (default 1)")
    p.add_argument("--pin-workers", action="store_true",
                   help="run worker i on the i-th CPU the server may use (default: off)")
    p.add_argument("--amplification-factor", metavar="F", type=float, default=None,
                   help="answers to plain requests from addresses not yet verified (no Layer 1"
                   " session, no echoed Echo value) stay within F times the request's size:"
                   " smaller Block2 blocks, or 4.01 with an Echo option (default 3; 0: no"
                   " limit)")
    p.add_argument("--max-body", type=int, metavar="BYTES",
                   help="largest request body a resource takes block-wise (4.13 beyond it;"
                   f" default {BlockwiseLimits().max_body})")
    p.add_argument("--log-rate", type=float, metavar="LINES",
                   help="log lines per second at most, beyond a burst; warnings of one kind"
                   " repeat a few times per 10 s, then are counted (0: no bound; default"
                   f" {LogLimits().rate:g})")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log output (-vv: tracebacks too)")
    return p


def _replica(text: str) -> int:
    if text == "auto":
        return auto_replica()
    try:
        return check_replica(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        from coaplayers.programs import config as cfg

        args._config_dir = str(Path(args.config).parent)
        cfg.merge_config(parser, args, cfg.load_toml(args.config))
    if not args.listen:
        args.listen = ["coap://[::]:5683"]
    return args


async def serve(args: argparse.Namespace, ready: asyncio.Event | None = None) -> int:
    from coaplayers import layer1
    from coaplayers.amplification import AmplificationGuard, AmplificationLimits
    from coaplayers.asgi import CoapAsgiApp, HttpListener
    from coaplayers.layer0.server import Layer0Site, answer_inline
    from coaplayers.layer0_modes import Layer0ServerOptions, wrap_site
    from coaplayers.programs import config as cfg
    from coaplayers.rules import RulesSite

    from .resources import build_site

    psk_store = cfg.psk_store_from(args.psk, args.psk_file)
    certificate = cfg.certificate_from(args.cert, args.key, args.ca, require_peer=bool(args.ca))
    raw_public_key = cfg.raw_public_key_from(args.rpk_key, args.rpk_trust,
                                             key_flag="--rpk-key", trust_flag="--rpk-trust")
    e2e = Layer0ServerOptions(
        psk_store=cfg.psk_store_from(args.e2e_psk),
        certificate=cfg.certificate_from(
            args.e2e_cert, args.e2e_key, args.e2e_ca, require_peer=bool(args.e2e_ca),
            what="e2e-",
        ),
        required=bool(args.e2e_required),
        raw_public_key=cfg.raw_public_key_from(args.e2e_rpk_key, args.e2e_rpk_trust),
        oscore_state=Path(args.oscore_state) if args.oscore_state else None,
        replica=args.replica,
        worker=(role.index, role.count) if (role := worker_role()) is not None else None,
    )
    dtls.check_identities(e2e.psk_store, e2e.raw_public_key, psk_flag="--e2e-psk",
                          trust_flag="--e2e-rpk-trust")
    cfg.check_layers_apart(raw_public_key, e2e.raw_public_key)
    # eager: the server's own resources answer without asyncio.timeout() (see Layer0Site).
    try:
        blockwise = BlockwiseLimits(**(
            {"max_body": args.max_body} if args.max_body is not None else {}))
    except ValueError as exc:
        raise dtls.ConfigurationError(f"--max-body: {exc}") from exc
    # RulesSite innermost: 4.02, 4.06 and No-Response apply to plain and protected requests.
    factor = 3.0 if args.amplification_factor is None else args.amplification_factor
    if factor and factor < 1:
        raise dtls.ConfigurationError("--amplification-factor must be 0 (off) or at least 1")
    guard = AmplificationGuard(AmplificationLimits(factor=factor)) if factor else None
    site: Any = wrap_site(RulesSite(build_site(blockwise, args.replica, guard)), e2e, eager=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    coap_listen, http_listen = split_listen(args.listen)
    ctx = await layer1.create_context(
        site, listen=coap_listen, psk_store=psk_store, certificate=certificate,
        raw_public_key=raw_public_key, loggername="coap-server",
    ) if coap_listen else None
    if ctx is not None and isinstance(site, Layer0Site):
        answer_inline(ctx.context, site)
    http_listeners = []
    try:
        for host, port in http_listen:
            listener = HttpListener(CoapAsgiApp(site), host, port)
            http_listeners.append(listener)
            await listener.start()
    except BaseException:
        for listener in http_listeners:
            await listener.close()
        if ctx is not None:
            await ctx.shutdown()
        raise
    # Everything built so far lives as long as the process: out of the collector's way, a
    # full collection only walks what requests leave behind.
    gc.freeze()
    if role is not None and role.index == 0 and ctx is not None:
        from coaplayers import steering

        for sock in ctx.plain_sockets:  # coaps:// groups keep the address hash (DTLS)
            steering.attach(sock, role.count)
    for uri in [*(ctx.bound if ctx is not None else ()), *(h.uri for h in http_listeners)]:
        print(f"listening {uri}", flush=True)
    if role is not None:
        print("ready", flush=True)  # the supervisor waits for it (coaplayers.workers)
    if ready is not None:
        ready.set()
    await stop.wait()
    for listener in http_listeners:
        await listener.close()
    if ctx is not None:
        await ctx.shutdown()
    return 0


def split_listen(uris: list[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """The CoAP listen URIs, and (host, port) of the http:// ones."""
    coap: list[str] = []
    http: list[tuple[str, int]] = []
    for uri in uris:
        parts = urlsplit(uri)
        if parts.scheme != "http":
            coap.append(uri)
            continue
        try:
            port = parts.port
        except ValueError as exc:
            raise dtls.ConfigurationError(f"bad port in {uri!r}") from exc
        if parts.hostname is None or parts.path not in ("", "/") or parts.query:
            raise dtls.ConfigurationError(f"listen URI {uri!r}: expected http://HOST:PORT")
        http.append((parts.hostname, 80 if port is None else port))
    return coap, http


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        workers = _workers(args.workers)
    except dtls.ConfigurationError as exc:
        print(f"coap-server: {exc}", file=sys.stderr)
        return 2
    if workers > 1 and worker_role() is None:
        return _supervise(argv, workers, pin=args.pin_workers)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        install_log_limits(LogLimits(
            **({"rate": args.log_rate} if args.log_rate is not None else {}),
            tracebacks=args.verbose >= 2))
    except ValueError as exc:
        print(f"coap-server: --log-rate: {exc}", file=sys.stderr)
        return 2
    warnings.showwarning = _warn_line
    from coaplayers.programs import config as cfg

    from .speedups import remember_local_multicast

    remember_local_multicast()
    try:
        return asyncio.run(serve(args))
    except dtls.ConfigurationError as exc:
        print(f"coap-server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"coap-server: {cfg.cannot_listen(args.listen, exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


MAX_WORKERS = 16
"""Every worker index is reachable by the session names' steering character (steering.py)."""


def _workers(value: Any) -> int:
    if value is None:
        return 1
    try:
        n = parse_workers(str(value))
    except ValueError as exc:
        raise dtls.ConfigurationError(f"--workers: {exc}") from exc
    if value == "auto":
        return min(n, MAX_WORKERS)
    if n > MAX_WORKERS:
        raise dtls.ConfigurationError(f"--workers: at most {MAX_WORKERS}")
    return n


def _supervise(argv: list[str], workers: int, *, pin: bool = False) -> int:
    """--workers N: N servers on the same ports (coaplayers.workers, coaplayers.steering)."""
    supervisor = Supervisor(
        "coap-server", self_command("coaplayers.programs.server.main", argv), workers,
        pin=pin)

    return asyncio.run(serve_supervised(supervisor))


def _warn_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Warnings (such as a key file readable by others) as one line on stderr."""
    print(f"coap-server: warning: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
