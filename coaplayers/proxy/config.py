"""What an operator configures: one dataclass, filled from TOML and then from flags (flags win).

Kept free of aiocoap and asyncio so that configuration mistakes are found (and tested) before any
socket is opened.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import LocalError
from ..workers import parse_workers

DEFAULT_PORTS = {"coap": 5683, "coaps": 5684, "http": 80, "https": 443}


class ConfigError(LocalError, ValueError):
    """The configuration cannot work; the message names the offending setting."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a route sends requests: scheme, host, port and an optional base path."""

    scheme: str
    host: str
    port: int
    path: tuple[str, ...] = ()
    # The URI had a path ("/" and "/." included): a prefix route mounts the upstream there,
    # replacing the prefix in requests and rewriting Location-Path in answers.
    mount: bool = False

    @classmethod
    def parse(cls, uri: str) -> Upstream:
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ConfigError(f"upstream {uri!r}: scheme must be coap, coaps, http or https")
        if not parts.hostname:
            raise ConfigError(f"upstream {uri!r} names no host")
        if parts.query or parts.fragment:
            raise ConfigError(f"upstream {uri!r}: no query or fragment allowed")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"upstream {uri!r}: bad port") from exc
        path = _remove_dot_segments(unquote(s) for s in parts.path.split("/")[1:])
        return cls(scheme, parts.hostname, DEFAULT_PORTS[scheme] if port is None else port, path,
                   mount=parts.path != "")

    @property
    def hostinfo(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.hostinfo}" + "".join("/" + s for s in self.path)


def _remove_dot_segments(segments: Iterable[str]) -> tuple[str, ...]:
    """RFC 3986 5.2.4 on path segments: "." goes, ".." removes its parent; empty ones go."""
    out: list[str] = []
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg not in (".", ""):
            out.append(seg)
    return tuple(out)


REPLICAS_PREFIX = "replicas:"


@dataclass(frozen=True, slots=True)
class Route:
    """A reverse-proxy rule: requests for a Uri-Host name, or under a path prefix, go upstream.

    ``NAME=URI`` matches the request's Uri-Host (case-insensitive); ``/PREFIX=URI`` matches
    whole Uri-Path segments. With no path in the upstream URI (``coap://h:p``), the request
    path is forwarded unchanged (so Layer 0 session paths stay valid); with one (``coap://h:p/``
    or ``coap://h:p/base``), the upstream is mounted at the prefix: the prefix is replaced by
    that path going up, and Location-Path answers under it are rewritten back coming down.
    """

    match: str
    upstream: Upstream
    # A replica set (``replicas:URI,URI...`` or a TOML list): the servers that serve this
    # route's origin together; ``upstream`` is the first. See coaplayers.proxy.replicas.
    members: tuple[Upstream, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Route:
        key, sep, uri = spec.partition("=")
        if not sep or not key or not uri:
            raise ConfigError(f"route {spec!r}: expected NAME_OR_PREFIX=UPSTREAM_URI")
        return cls.make(key, uri)

    @classmethod
    def make(cls, key: str, uri: str | list[str] | tuple[str, ...]) -> Route:
        key = key.strip()
        if not key.startswith("/"):
            key = key.lower()
        if isinstance(uri, str) and uri.strip().startswith(REPLICAS_PREFIX):
            uri = [u for u in uri.strip()[len(REPLICAS_PREFIX):].split(",") if u.strip()]
        if isinstance(uri, str):
            return cls(key, Upstream.parse(uri.strip()))
        members = tuple(Upstream.parse(u.strip()) for u in uri)
        if not members:
            raise ConfigError(f"route {key!r}: a replica set needs at least one URI")
        first = members[0]
        if any((m.scheme, m.path, m.mount) != (first.scheme, first.path, first.mount)
               for m in members):
            raise ConfigError(f"route {key!r}: a replica set's URIs differ only in host and port")
        return cls(key, first, members)

    @property
    def is_set(self) -> bool:
        return bool(self.members)

    @property
    def is_prefix(self) -> bool:
        return self.match.startswith("/")

    @property
    def prefix(self) -> tuple[str, ...]:
        return tuple(s for s in self.match.split("/") if s != "")

    def __str__(self) -> str:
        if self.members:
            return f"{self.match}={REPLICAS_PREFIX}" + ",".join(str(m) for m in self.members)
        return f"{self.match}={self.upstream}"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token bucket per client: ``rate`` requests per second, bursts of up to ``burst``."""

    rate: float
    burst: float

    @classmethod
    def parse(cls, spec: str) -> RateLimit:
        """``RATE`` or ``RATE/BURST`` (requests per second; burst defaults to the rate, min 1)."""
        rate_s, _, burst_s = spec.partition("/")
        try:
            rate = float(rate_s)
            burst = float(burst_s) if burst_s else max(rate, 1.0)
        except ValueError as exc:
            raise ConfigError(f"rate limit {spec!r}: expected RATE or RATE/BURST") from exc
        if rate <= 0 or burst < 1:
            raise ConfigError(f"rate limit {spec!r}: rate must be > 0 and burst >= 1")
        return cls(rate, burst)


def parse_hostport(spec: str, what: str) -> tuple[str, int]:
    """``127.0.0.1:9100`` or ``[::1]:9100`` -> (host, port)."""
    host, sep, port_s = spec.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ConfigError(f"{what} {spec!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_s)


@dataclass(frozen=True, slots=True)
class Layer1Settings:
    """Layer 1 (coaps://) credentials: parsed here, used by ``transport.build_context``.

    Downstream (listener) and upstream keys are separate policies, as issue 4 asks. The Layer 1
    transport wires these into the context; until then any of them set is refused with a clear
    message rather than silently ignored.
    """

    psk: tuple[str, ...] = ()  # "IDENTITY:KEY" entries for coaps listeners
    psk_file: str | None = None  # JSON object identity -> key
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    rpk_key: str | None = None  # raw public keys (RFC 7250): our ECDSA P-256 private key ...
    rpk_trust: tuple[str, ...] = ()  # ... and PEM files of the client keys we accept
    upstream_credentials: str | None = None  # aiocoap credentials JSON for upstream coaps

    def any_set(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Bounds and trust of the CoAP-to-HTTP cross-proxy (``http.py``)."""

    # Largest request body reassembled from Block1 and largest HTTP response body read.
    max_body: int = 256 * 1024
    # Open HTTP connections kept at most (all origins together); idle ones are reused.
    connections: int = 64
    # PEM bundle of the CAs https:// upstreams are checked against; None: the system's.
    ca: str | None = None
    # Answers held for Block2 continuations of methods that cannot be repeated, at most.
    held_bodies: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.max_body <= 64 * 1024 * 1024:
            raise ConfigError("http max_body must be between 1 byte and 64 MiB")
        if not 1 <= self.connections <= 4096 or not 1 <= self.held_bodies <= 65536:
            raise ConfigError("http connections must be 1..4096 and held_bodies 1..65536")


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything coap-proxy can be told; the CLI and the TOML file fill the same fields."""

    listen: tuple[str, ...] = ("coap://[::]:5683",)
    routes: tuple[Route, ...] = ()
    forward: bool = True
    # Names (Uri-Host values) that mean this proxy itself, besides its bound addresses.
    names: tuple[str, ...] = ()
    allowed_schemes: tuple[str, ...] = ("coap", "coaps", "http", "https")
    # Forward-proxy targets allowed (HOST[:PORT], HOST a name, address, CIDR prefix or "*");
    # empty: forward proxying reaches nothing (see allow.py).
    allow: tuple[str, ...] = ()
    upstream_timeout: float = 10.0
    # RFC 7967: a request whose No-Response suppresses 2.xx waits at most this long upstream
    # (silence is then its expected answer); a NON one suppressing every class waits not at all.
    no_response_wait: float = 2.0
    # First CoAP retransmission timeout towards upstreams (RFC 7252 ACK_TIMEOUT); None: 2 s.
    ack_timeout: float | None = None
    # The same towards clients, for separate responses and CON notifications; None: 2 s.
    downstream_ack_timeout: float | None = None
    hop_limit: int = 16
    max_in_flight: int = 256
    upstream_sockets: int = 32
    # How long a resolved coap:// upstream address is reused (0: resolve on every exchange).
    resolve_ttl: float = 30.0
    max_observations: int = 1024
    # Replica sets (docs/PROXY.md): probe every member this often; one that has not answered
    # for health_timeout is down (routed around) until it answers again.
    health_interval: float = 1.0
    health_timeout: float = 3.0
    # Clients observing the same unprotected resource share one upstream observation.
    aggregate_observations: bool = True
    # Requests that need nothing of aiocoap's (no block-wise, Observe, Echo, No-Response,
    # cache) are forwarded as datagrams (fastpath.py), plain or Layer 1's plaintext.
    fast_path: bool = True
    # Its bounds: upstream sockets and Layer 1 sessions in all, routing decisions remembered,
    # upstream names being looked up at once.
    fast_path_sockets: int = 256
    fast_path_decisions: int = 16384
    fast_path_lookups: int = 16
    # Processes sharing the listen ports (coaplayers.workers); "auto" in TOML and on the
    # command line means one per core.
    workers: int = 1
    # Worker i runs on the i-th CPU the proxy may use (coaplayers.workers.worker_cpus).
    pin_workers: bool = False
    # The response cache (docs/PROXY.md, Caching): entries (0: off) and bytes it may hold.
    cache_entries: int = 1024
    cache_bytes: int = 1 << 20
    rate_limit: RateLimit | None = None
    rate_limit_clients: int = 10000
    shutdown_grace: float = 5.0
    metrics: tuple[str, int] | None = None
    log_file: str | None = None
    # One "exchange" line per request in the log (events and warnings are always logged).
    log_exchanges: bool = True
    # Log lines per second at most beyond a burst (coaplayers.loglimit; 0: no bound). Exchange
    # lines have a bucket of their own, EXCHANGE_LINE_RATE.
    log_rate: float = 50.0
    # Answers to plain clients not yet verified stay within this many times the request's
    # size (smaller Block2 blocks or 4.01 + Echo; see coaplayers.amplification); 0: no limit.
    amplification_factor: float = 3.0
    layer1: Layer1Settings = field(default_factory=Layer1Settings)
    # http:// and https:// upstreams (the CoAP-to-HTTP cross-proxy, http.py).
    http: HttpSettings = field(default_factory=lambda: HttpSettings())

    def __post_init__(self) -> None:
        if not self.listen:
            raise ConfigError("at least one listen URI is needed")
        if not 1 <= self.hop_limit <= 255:
            raise ConfigError("hop_limit must be between 1 and 255")
        for name in ("ack_timeout", "downstream_ack_timeout"):
            value = getattr(self, name)
            if value is not None and not 0.05 <= value <= 60:
                raise ConfigError(f"{name} must be between 0.05 and 60 seconds")
        if not 0.05 <= self.no_response_wait <= 60:
            raise ConfigError("no_response_wait must be between 0.05 and 60 seconds")
        if self.upstream_timeout <= 0 or self.shutdown_grace < 0:
            raise ConfigError("upstream_timeout must be > 0 and shutdown_grace >= 0")
        if not 1 <= self.upstream_sockets <= 1024:
            raise ConfigError("upstream_sockets must be between 1 and 1024")
        if (not 1 <= self.fast_path_sockets <= 65536
                or not 16 <= self.fast_path_decisions <= 1 << 24
                or not 1 <= self.fast_path_lookups <= 1024):
            raise ConfigError("fast_path_sockets must be 1..65536, fast_path_decisions"
                              " 16..16777216 and fast_path_lookups 1..1024")
        if not 0.05 <= self.health_interval <= 60 or not 0.1 <= self.health_timeout <= 600:
            raise ConfigError("health_interval must be 0.05..60 s and health_timeout 0.1..600 s")
        if not 1 <= self.workers <= 64:
            raise ConfigError("workers must be 1 to 64 (or auto)")
        if not 0 <= self.resolve_ttl <= 86400:
            raise ConfigError("resolve_ttl must be between 0 and 86400 seconds")
        if self.log_rate < 0:
            raise ConfigError("log_rate must be >= 0")
        if not 0 <= self.cache_entries <= 1_000_000 or not 0 <= self.cache_bytes <= 1 << 32:
            raise ConfigError("cache_entries must be 0..1000000 and cache_bytes 0..4 GiB")
        if self.amplification_factor and self.amplification_factor < 1:
            raise ConfigError("amplification_factor must be 0 (no limit) or at least 1")
        if self.max_in_flight < 1 or self.max_observations < 0:
            raise ConfigError("max_in_flight must be >= 1 and max_observations >= 0")
        from .allow import AllowRule  # (allow.py imports ConfigError from here)

        for spec in self.allow:
            AllowRule.parse(spec)
        bad = set(self.allowed_schemes) - set(DEFAULT_PORTS)
        if bad:
            raise ConfigError(f"allowed_schemes: unknown scheme(s) {sorted(bad)}")


_SCALARS: dict[str, type] = {
    "forward": bool,
    "aggregate_observations": bool,
    "fast_path": bool,
    "fast_path_sockets": int,
    "fast_path_decisions": int,
    "fast_path_lookups": int,
    "pin_workers": bool,
    "upstream_timeout": float,
    "no_response_wait": float,
    "ack_timeout": float,
    "downstream_ack_timeout": float,
    "hop_limit": int,
    "max_in_flight": int,
    "upstream_sockets": int,
    "resolve_ttl": float,
    "max_observations": int,
    "health_interval": float,
    "health_timeout": float,
    "cache_entries": int,
    "cache_bytes": int,
    "rate_limit_clients": int,
    "shutdown_grace": float,
    "log_file": str,
    "log_exchanges": bool,
    "log_rate": float,
    "amplification_factor": float,
}
_LISTS = ("listen", "names", "allowed_schemes", "allow")
_LAYER1_LISTS = ("psk", "rpk_trust")
_LAYER1_SCALARS = ("psk_file", "cert", "key", "ca", "rpk_key", "upstream_credentials")


def _typed(name: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def _strings(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name}: expected a list of strings")
    return tuple(value)


def config_from_mapping(data: dict[str, Any], base: ProxyConfig | None = None) -> ProxyConfig:
    """Apply a parsed TOML document to ``base``; unknown keys are errors (typos must not pass)."""
    cfg = base or ProxyConfig()
    changes: dict[str, Any] = {}
    data = _normalise(data)
    for key, value in data.items():
        if key in _SCALARS:
            changes[key] = _typed(key, value, _SCALARS[key])
        elif key in _LISTS:
            changes[key] = _strings(key, value)
        elif key == "routes":
            if not isinstance(value, dict):
                raise ConfigError('routes: expected a table like { "/sensors" = "coap://..." }')
            changes["routes"] = tuple(
                Route.make(k, _strings(f"routes.{k}", v) if isinstance(v, list)
                           else _typed(f"routes.{k}", v, str))
                for k, v in value.items()
            )
        elif key == "workers":
            try:
                changes["workers"] = parse_workers(value if isinstance(value, str | int)
                                                   and not isinstance(value, bool) else "")
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        elif key == "metrics":
            changes["metrics"] = parse_hostport(_typed(key, value, str), "metrics")
        elif key == "rate_limit":
            if isinstance(value, dict):
                unknown = set(value) - {"rate", "burst"}
                if unknown or "rate" not in value:
                    raise ConfigError("rate_limit: expected { rate = N, burst = M }")
                rate = float(_typed("rate_limit.rate", value["rate"], float))
                burst = float(_typed("rate_limit.burst", value.get("burst", max(rate, 1.0)), float))
                changes["rate_limit"] = RateLimit.parse(f"{rate}/{burst}")
            else:
                changes["rate_limit"] = RateLimit.parse(str(value))
        elif key == "layer1":
            if not isinstance(value, dict):
                raise ConfigError("layer1: expected a table")
            l1: dict[str, Any] = {}
            for k, v in value.items():
                if k in _LAYER1_LISTS:
                    l1[k] = _strings(f"layer1.{k}", v)
                elif k in _LAYER1_SCALARS:
                    l1[k] = _typed(f"layer1.{k}", v, str)
                else:
                    raise ConfigError(f"layer1: unknown setting {k!r}")
            changes["layer1"] = replace(cfg.layer1, **l1)
        elif key == "http":
            if not isinstance(value, dict):
                raise ConfigError("http: expected a table")
            kinds = {"max_body": int, "connections": int, "ca": str, "held_bodies": int}
            h: dict[str, Any] = {}
            for k, v in value.items():
                k = k.replace("-", "_")
                if k not in kinds:
                    raise ConfigError(f"http: unknown setting {k!r}")
                h[k] = _typed(f"http.{k}", v, kinds[k])
            changes["http"] = replace(cfg.http, **h)
        else:
            raise ConfigError(f"unknown setting {key!r}")
    try:
        return replace(cfg, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def _normalise(data: dict[str, Any]) -> dict[str, Any]:
    """Accept the long flag names too (``psk-file``, ``upstream-credentials``, ...), as the
    other programs do, and Layer 1 settings at the top level as well as in ``[layer1]``."""
    out: dict[str, Any] = {}
    layer1: dict[str, Any] = {}
    for key, value in data.items():
        key = key.replace("-", "_")
        if key in _LAYER1_LISTS or key in _LAYER1_SCALARS:
            layer1[key] = value
        elif key == "layer1" and isinstance(value, dict):
            layer1.update({k.replace("-", "_"): v for k, v in value.items()})
        elif key == "route":  # the flag's name: a list of NAME_OR_PREFIX=UPSTREAM_URI
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ConfigError("route: expected a list of NAME_OR_PREFIX=UPSTREAM_URI")
            routes = out.setdefault("routes", {})
            for item in items:
                name, sep, uri = item.partition("=")
                if not sep:
                    raise ConfigError(f"route {item!r}: expected NAME_OR_PREFIX=UPSTREAM_URI")
                routes[name] = uri
        else:
            out[key] = value
    if layer1:
        out["layer1"] = layer1
    return out


def load_config_file(path: str | Path, base: ProxyConfig | None = None) -> ProxyConfig:
    """Read a TOML file (top-level keys as in ``ProxyConfig``; see docs/PROXY.md).

    Relative file names in it are taken relative to the file's folder, so a configuration set
    (such as the one coap-keys writes) can be moved as a whole.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    # The same words as coap-server's and coap-client's (coaplayers.programs.config.load_toml).
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # tomllib decodes the whole file before parsing it
        raise ConfigError(f"configuration {path} is not UTF-8 text: {exc}") from exc
    data = _normalise(data)
    folder = Path(path).parent
    layer1 = data.get("layer1")
    if isinstance(layer1, dict):
        for key in _LAYER1_SCALARS:
            if isinstance(layer1.get(key), str):
                layer1[key] = str(folder / layer1[key])
        trust = layer1.get("rpk_trust")  # file names too (PSKs, the other list, are not)
        if isinstance(trust, str | list):
            items = [trust] if isinstance(trust, str) else trust
            layer1["rpk_trust"] = [str(folder / t) if isinstance(t, str) else t for t in items]
    if isinstance(data.get("log_file"), str):
        data["log_file"] = str(folder / data["log_file"])
    http = data.get("http")
    if isinstance(http, dict) and isinstance(http.get("ca"), str):
        http["ca"] = str(folder / http["ca"])
    return config_from_mapping(data, base)
