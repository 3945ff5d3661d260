"""``coap-proxy``: command-line flags and a TOML file into a ``ProxyConfig``, then run."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from coaplayers.loglimit import LogLimits, install_log_limits
from coaplayers.proxy.accesslog import EXCHANGE_LINE_RATE, AccessLog
from coaplayers.proxy.config import (
    ConfigError,
    Layer1Settings,
    ProxyConfig,
    RateLimit,
    Route,
    load_config_file,
    parse_hostport,
)
from coaplayers.workers import (
    Supervisor,
    parse_workers,
    self_command,
    serve_supervised,
    worker_role,
)

from .config import cannot_listen

if TYPE_CHECKING:
    from coaplayers.proxy.node import ProxyNode

EPILOG = """\
examples:
  forward proxy on the default port (clients send Proxy-Uri or Proxy-Scheme) to the
  servers of 10.0.0.0/24 and app.example port 5684, and nowhere else:
    coap-proxy --listen coap://[::]:5683 --allow 10.0.0.0/24 --allow app.example:5684
  reverse proxy: /sensors/... to one server, Uri-Host app.example to another, nothing else:
    coap-proxy --no-forward --listen coap://0.0.0.0:5683 \\
        --route /sensors=coap://10.0.0.5 --route app.example=coap://10.0.0.6:5683
  ephemeral port, metrics, a rate limit of 20 requests/s (bursts of 40) per client:
    coap-proxy --listen coap://127.0.0.1:0 --metrics 127.0.0.1:9100 --rate-limit 20/40
  a replica set: sessions and OSCORE kids to the coap-server --replica N that holds them,
  new handshakes and plain requests hashed over the members that answer their probes:
    coap-proxy --no-forward --route /=replicas:coap://10.0.0.5,coap://10.0.0.6 \
        --route app.example=replicas:coap://app-server:5683   (every address of the name)
  a CoAP-to-HTTP cross-proxy (the cloud server of Figure 2): devices speak CoAP, the
  application server HTTP; Layer 0 and OSCORE cross it unread:
    coap-proxy --no-forward --route /=https://app.example:8443 --http-ca web-ca.pem
  everything from a file, one flag overriding it:
    coap-proxy --config /etc/coap-proxy.toml --log-file /var/log/coap-proxy.jsonl

At start, each bound listen URI is printed on stdout as "listening URI" (port 0 shows the real
port), then "metrics http://HOST:PORT/metrics" if enabled, then "ready".
Exit status: 0 after SIGINT/SIGTERM, 2 for configuration errors, 1 if binding failed.
See docs/PROXY.md for the configuration file, logs and metrics.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coap-proxy",
        description="CoAP forward and reverse proxy routing on outer options only "
        "(Layer 0 / OSCORE payloads pass untouched).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.toml", help="configuration file; flags win")
    p.add_argument("--listen", metavar="URI", action="append",
                   help="listen URI, repeatable (default coap://[::]:5683)")
    p.add_argument("--route", metavar="NAME_OR_PREFIX=UPSTREAM_URI", action="append",
                   help="reverse route by Uri-Host name or /path/prefix, repeatable")
    p.add_argument("--forward", action=argparse.BooleanOptionalAction, default=None,
                   help="act as a forward proxy for Proxy-Uri / Proxy-Scheme (default on)")
    p.add_argument("--allow", metavar="HOST[:PORT]", action="append",
                   help="a forward-proxy upstream allowed, repeatable: a name, an address or a"
                   " CIDR prefix ([v6]:PORT for IPv6), or '*' for any address except loopback,"
                   " link-local, unspecified, multicast and this host's own (default: none)")
    p.add_argument("--name", metavar="NAME", action="append",
                   help="a name this proxy is known by (requests for it are not forwarded)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus text at http://HOST:PORT/metrics (port 0: any)")
    p.add_argument("--rate-limit", metavar="RATE[/BURST]",
                   help="per-client requests per second (answers 4.29 beyond)")
    p.add_argument("--log-file", metavar="FILE", help="JSON-lines log (default stderr)")
    p.add_argument("--log-rate", metavar="LINES", type=float,
                   help="log lines per second at most beyond a burst; warnings of one kind"
                   " repeat a few times per 10 s, then are counted (0: no bound)")
    p.add_argument("--log-exchanges", action=argparse.BooleanOptionalAction, default=None,
                   help="one JSON line per request in the log (default on; events are always"
                   " logged)")
    p.add_argument("--upstream-timeout", metavar="SECONDS", type=float,
                   help="answer 5.04 after this long without an upstream answer (default 10)")
    p.add_argument("--no-response-wait", metavar="SECONDS", type=float,
                   help="how long a request whose No-Response suppresses success waits for an"
                   " upstream answer before the exchange ends in silence (default 2)")
    p.add_argument("--ack-timeout", metavar="SECONDS", type=float,
                   help="first CoAP retransmission timeout towards upstreams (default 2; lower"
                   " it on fast but lossy back-end links)")
    p.add_argument("--downstream-ack-timeout", metavar="SECONDS", type=float,
                   help="first CoAP retransmission timeout of separate responses and CON"
                   " notifications towards clients (default 2)")
    p.add_argument("--max-in-flight", metavar="N", type=int,
                   help="exchanges waiting on upstreams at once; 5.03 beyond (default 256)")
    p.add_argument("--aggregate-observations", action=argparse.BooleanOptionalAction,
                   default=None, help="clients observing the same unprotected resource share"
                   " one upstream observation (default on)")
    p.add_argument("--fast-path", action=argparse.BooleanOptionalAction, default=None,
                   help="forward plain requests that need no block-wise transfer, Observe,"
                   " Echo, No-Response or cache as datagrams, below aiocoap (default on)")
    p.add_argument("--cache-entries", metavar="N", type=int,
                   help="answers the response cache may hold (default 1024; 0: no cache)")
    p.add_argument("--cache-bytes", metavar="N", type=int,
                   help="bytes the response cache may hold (default 1048576)")
    p.add_argument("--upstream-sockets", metavar="N", type=int,
                   help="upstream sockets; each client sticks to one (default 32)")
    p.add_argument("--resolve-ttl", metavar="SECONDS", type=float,
                   help="reuse a resolved coap:// upstream address this long (default 30;"
                   " 0: resolve on every exchange)")
    p.add_argument("--health-interval", metavar="SECONDS", type=float,
                   help="probe every replica set member this often (default 1)")
    p.add_argument("--health-timeout", metavar="SECONDS", type=float,
                   help="a member silent this long is down until it answers again (default 3)")
    p.add_argument("--workers", metavar="N|auto",
                   help="processes sharing the listen ports, one scrape for all (default 1;"
                   " auto: one per core)")
    p.add_argument("--pin-workers", action=argparse.BooleanOptionalAction, default=None,
                   help="run worker i on the i-th CPU the proxy may use (default: off)")
    p.add_argument("--amplification-factor", metavar="F", type=float,
                   help="answers to plain clients not yet verified (no Layer 1 session, no"
                   " echoed Echo value) stay within F times the request's size (default 3;"
                   " 0: no limit)")
    p.add_argument("--hop-limit", metavar="N", type=int,
                   help="Hop-Limit inserted when a request has none (default 16)")
    p.add_argument("--shutdown-grace", metavar="SECONDS", type=float,
                   help="how long in-flight exchanges may take at shutdown (default 5)")
    hx = p.add_argument_group("http:// and https:// upstreams (CoAP-to-HTTP cross-proxy)")
    hx.add_argument("--http-max-body", metavar="BYTES", type=int,
                    help="largest request body reassembled from Block1 and largest HTTP"
                    " response body read (default 262144)")
    hx.add_argument("--http-connections", metavar="N", type=int,
                    help="HTTP connections kept open at most (default 64)")
    hx.add_argument("--http-ca", metavar="PEM",
                    help="CAs https:// upstreams are checked against (default: the system's)")
    l1 = p.add_argument_group("Layer 1 (coaps://), wired in by the Layer 1 transport")
    l1.add_argument("--psk", metavar="ID:KEY", action="append",
                    help="PSK for coaps listeners, repeatable")
    l1.add_argument("--psk-file", metavar="FILE", help="JSON object identity -> key")
    l1.add_argument("--cert", metavar="PEM")
    l1.add_argument("--key", metavar="PEM")
    l1.add_argument("--ca", metavar="PEM")
    l1.add_argument("--rpk-key", metavar="PEM",
                    help="raw public keys (RFC 7250) for coaps listeners: our P-256 private key")
    l1.add_argument("--rpk-trust", metavar="PEM", action="append",
                    help="public key(s) of accepted raw-public-key clients, repeatable")
    l1.add_argument("--upstream-credentials", metavar="FILE",
                    help="aiocoap credentials JSON for coaps upstreams")
    return p


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """The file (if any) first, then each flag that was given replaces that setting."""
    cfg = load_config_file(args.config) if args.config else ProxyConfig()
    changes: dict[str, Any] = {}
    if args.listen:
        changes["listen"] = tuple(args.listen)
    if args.route:
        changes["routes"] = tuple(Route.parse(r) for r in args.route)
    if args.forward is not None:
        changes["forward"] = args.forward
    if args.aggregate_observations is not None:
        changes["aggregate_observations"] = args.aggregate_observations
    if args.pin_workers is not None:
        changes["pin_workers"] = args.pin_workers
    if args.fast_path is not None:
        changes["fast_path"] = args.fast_path
    if args.log_exchanges is not None:
        changes["log_exchanges"] = args.log_exchanges
    if args.name:
        changes["names"] = tuple(args.name)
    if args.allow:
        changes["allow"] = tuple(args.allow)
    if args.metrics:
        changes["metrics"] = parse_hostport(args.metrics, "--metrics")
    if args.rate_limit:
        changes["rate_limit"] = RateLimit.parse(args.rate_limit)
    if args.workers is not None:
        try:
            changes["workers"] = parse_workers(args.workers)
        except ValueError as exc:
            raise ConfigError(f"--workers: {exc}") from exc
    for flag in (
        "log_file", "log_rate", "upstream_timeout", "ack_timeout", "downstream_ack_timeout",
        "max_in_flight", "upstream_sockets", "resolve_ttl", "hop_limit", "shutdown_grace",
        "no_response_wait", "cache_entries", "cache_bytes", "health_interval",
        "health_timeout", "amplification_factor",
    ):
        value = getattr(args, flag)
        if value is not None:
            changes[flag] = value
    hx: dict[str, Any] = {}
    for flag, name in (("http_max_body", "max_body"), ("http_connections", "connections"),
                       ("http_ca", "ca")):
        if getattr(args, flag) is not None:
            hx[name] = getattr(args, flag)
    l1: dict[str, Any] = {}
    if args.psk:
        l1["psk"] = tuple(args.psk)
    if args.rpk_trust:
        l1["rpk_trust"] = tuple(args.rpk_trust)
    for flag in ("psk_file", "cert", "key", "ca", "rpk_key", "upstream_credentials"):
        if getattr(args, flag) is not None:
            l1[flag] = getattr(args, flag)
    if l1:
        changes["layer1"] = replace(cfg.layer1 or Layer1Settings(), **l1)
    try:
        if hx:
            changes["http"] = replace(cfg.http, **hx)
        return replace(cfg, **changes)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def _announce(node: ProxyNode) -> None:
    # Everything built so far (modules, configuration, sockets) lives as long as the process:
    # out of the collector's way, a full collection only walks what requests leave behind.
    gc.freeze()
    for uri in node.bound_uris:
        print(f"listening {uri}")
    if node.metrics_address is not None:
        from coaplayers.proxy.transport import format_uri

        print(f"metrics http://{format_uri('x', *node.metrics_address)[4:]}/metrics")
    print("ready", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if worker_role() is not None:
            # One of a supervisor's workers: it serves the metrics of all of them.
            config = replace(config, workers=1, metrics=None)
        elif config.workers > 1:
            return _supervise(config, argv)
        access_log = AccessLog(config.log_file,
                               exchange_rate=EXCHANGE_LINE_RATE if config.log_rate else 0.0)
    except ConfigError as exc:
        print(f"coap-proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"coap-proxy: cannot open log file: {exc}", file=sys.stderr)
        return 2
    role = worker_role()
    if role is not None:
        access_log.tag = f',"worker":{role.index}'
    # aiocoap's own warnings go to the same JSON-lines destination.
    root = logging.getLogger()
    root.addHandler(access_log.handler)
    root.setLevel(logging.WARNING)
    install_log_limits(LogLimits(rate=config.log_rate), handlers=[access_log.handler])
    from coaplayers.proxy.node import ProxyNode

    node = ProxyNode(config, access_log=access_log)
    try:
        asyncio.run(node.run(on_ready=_announce))
    except ConfigError as exc:
        print(f"coap-proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"coap-proxy: {cannot_listen(config.listen, exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        root.removeHandler(access_log.handler)
        access_log.close()
    return 0


def _supervise(config: ProxyConfig, argv: list[str]) -> int:
    """``--workers N``: N proxies on the same ports (coaplayers.workers), one scrape."""
    from coaplayers.proxy.metrics import MULTIPROC_ENV, MetricsServer, MultiProcessMetrics
    from coaplayers.proxy.transport import format_uri

    folder = tempfile.mkdtemp(prefix="coap-proxy-metrics-")
    metrics = MultiProcessMetrics(folder)
    supervisor = Supervisor(
        "coap-proxy", self_command("coaplayers.programs.proxy", argv), config.workers,
        env={**os.environ, MULTIPROC_ENV: folder}, on_exit=metrics.process_gone,
        pin=config.pin_workers)

    server = MetricsServer(metrics)

    async def serve_metrics() -> list[str]:
        if config.metrics is None:
            return []
        address = await server.start(*config.metrics)
        return [f"metrics http://{format_uri('x', *address)[4:]}/metrics"]

    async def run() -> int:
        try:
            return await serve_supervised(supervisor, ready=serve_metrics, ready_word="ready")
        finally:
            await server.close()

    try:
        return asyncio.run(run())
    except OSError as exc:
        print(f"coap-proxy: cannot serve metrics: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
