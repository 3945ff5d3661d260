"""The proxy's pure parts without sockets: routing decisions, Hop-Limit, option rules, the
token bucket, configuration parsing and the Prometheus text."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiocoap import GET, Message
from aiocoap.numbers import OptionNumber, codes
from aiocoap.optiontypes import OpaqueOption, UintOption

from coaplayers.programs.proxy import build_parser, config_from_args
from coaplayers.proxy.config import (
    ConfigError,
    ProxyConfig,
    RateLimit,
    Route,
    config_from_mapping,
    load_config_file,
)
from coaplayers.proxy.limits import RateLimiter
from coaplayers.proxy.metrics import MetricsRegistry
from coaplayers.proxy.routing import Refusal, Router, remove_dot_segments


def router(**kw: object) -> Router:
    kw.setdefault("allow", ("*", "127.0.0.0/8", "::1"))  # the routing rules, not the allow-list
    r = Router(ProxyConfig(**kw))  # type: ignore[arg-type]
    r.add_own_address("coap", "127.0.0.1", 5683)
    return r


def proxy_uri(uri: str, hop: int | None = None) -> Message:
    m = Message(code=GET)
    m.opt.proxy_uri = uri
    if hop is not None:
        m.opt.add_option(UintOption(OptionNumber.HOP_LIMIT, hop))
    return m


def refusal(r: Router, m: Message) -> Refusal:
    with pytest.raises(Refusal) as info:
        r.decide(m)
    return info.value


def test_proxy_uri_split_into_target() -> None:
    d = router().decide(proxy_uri("coap://Example.COM:5690/a/b%2Fc?x=1&y"))
    assert (d.kind, d.upstream.host, d.upstream.port) == ("forward", "example.com", 5690)
    assert d.path == ("a", "b/c") and d.query == ("x=1", "y")
    assert d.uri_host == "example.com" and d.hop_limit == 16


def test_proxy_scheme_with_uri_host_and_default_port() -> None:
    m = Message(code=GET)
    m.opt.proxy_scheme = "coap"
    m.opt.uri_host = "[::1]"
    m.opt.uri_path = ["x"]
    d = router().decide(m)
    assert (d.upstream.host, d.upstream.port, d.uri_host, d.path) == ("::1", 5683, None, ("x",))


def test_hop_limit_rules() -> None:
    r = router()
    assert r.decide(proxy_uri("coap://h/", hop=7)).hop_limit == 6
    assert refusal(r, proxy_uri("coap://h/", hop=1)).code == codes.HOP_LIMIT_REACHED
    assert refusal(r, proxy_uri("coap://h/", hop=0)).code == codes.BAD_REQUEST
    assert refusal(r, proxy_uri("coap://h/", hop=256)).code == codes.BAD_REQUEST  # RFC 8768 3
    assert router(hop_limit=3).decide(proxy_uri("coap://h/")).hop_limit == 3


@pytest.mark.parametrize(("path", "segments"), [
    ("", []), ("/", []), ("/..", []), ("/a/b/../c", ["a", "c"]), ("/a/b/..", ["a", ""]),
    ("/a/.", ["a", ""]), ("/a//b", ["a", "", "b"]), ("/../a", ["a"]), ("/a/%2e%2E/b", ["b"]),
    ("/a/.../.b", ["a", "...", ".b"]),
])
def test_proxy_uri_dot_segments_are_removed(path: str, segments: list[str]) -> None:
    """RFC 3986 5.2.4, as RFC 7252 6.4 resolves a Proxy-Uri before decomposing it."""
    assert remove_dot_segments(path) == segments
    if segments:
        d = router().decide(proxy_uri("coap://h" + path))
        assert list(d.path) == segments


def test_option_safety() -> None:
    r = router()
    m = proxy_uri("coap://h/")
    m.opt.add_option(OpaqueOption(65000, b"a"))  # safe-to-forward: fine
    m.opt.add_option(OpaqueOption(OptionNumber.OSCORE, b""))
    assert r.decide(m).kind == "forward"
    assert r.decide(m).kind == "forward"  # the same verdicts again (they are memoized)
    m.opt.add_option(OpaqueOption(65002, b"a"))
    bad = refusal(r, m)
    assert bad.code == codes.BAD_OPTION and "65002" in bad.diagnostic
    assert refusal(r, m).diagnostic == bad.diagnostic


def test_refusals_505() -> None:
    assert refusal(router(forward=False), proxy_uri("coap://h/")).code == (
        codes.PROXYING_NOT_SUPPORTED)
    assert refusal(router(allowed_schemes=("coap", "coaps")), proxy_uri("http://h/")).code == (
        codes.PROXYING_NOT_SUPPORTED)
    assert refusal(router(), proxy_uri("ftp://h/")).code == codes.PROXYING_NOT_SUPPORTED
    assert refusal(router(allowed_schemes=("coap",)), proxy_uri("coaps://h/")).kind == (
        "not_proxying")
    assert refusal(router(), Message(code=GET, uri="coap://127.0.0.1/x")).kind == "no_route"
    assert refusal(router(), proxy_uri("coap://h:notaport/")).code == codes.BAD_REQUEST


def test_reverse_routes_longest_prefix_and_host() -> None:
    r = router(routes=(
        Route.parse("/=coap://10.0.0.1"), Route.parse("/a=coap://10.0.0.2/base"),
        Route.parse("/a/b=coap://10.0.0.3"), Route.parse("Dev.Example=coap://gw.example:99"),
    ), names=("proxy.example",))
    d = r.decide(Message(code=GET, uri="coap://127.0.0.1/a/b/c"))
    assert (d.upstream.host, d.path) == ("10.0.0.3", ("a", "b", "c"))
    d = r.decide(Message(code=GET, uri="coap://127.0.0.1/a/z"))
    assert (d.upstream.host, d.path) == ("10.0.0.2", ("base", "z"))
    d = r.decide(Message(code=GET, uri="coap://127.0.0.1/q"))
    assert d.upstream.host == "10.0.0.1" and d.route == "/"
    m = Message(code=GET, uri="coap://127.0.0.1/q")
    m.opt.uri_host = "dev.example"
    d = r.decide(m)
    assert (d.upstream.host, d.upstream.port, d.uri_host) == ("gw.example", 99, "gw.example")
    m.opt.uri_host = "proxy.example"  # our own name: not a host route
    assert r.decide(m).route == "/"


def test_own_address_is_not_forwarded() -> None:
    r = router(routes=(Route.parse("/x=coap://10.0.0.9"),), names=("me.example",))
    for uri in ("coap://127.0.0.1/x/1", "coap://me.example:5683/x/1"):
        d = r.decide(proxy_uri(uri))
        assert (d.kind, d.upstream.host, d.path) == ("reverse", "10.0.0.9", ("x", "1"))
    assert r.decide(proxy_uri("coap://127.0.0.1:5999/x")).kind == "forward"  # other port
    wild = Router(ProxyConfig())
    wild.add_own_address("coap", "::", 5683)
    assert wild.is_self("coap", "localhost", 5683) and not wild.is_self("coap", "10.1.1.1", 5683)


def test_token_bucket() -> None:
    lim = RateLimiter(RateLimit(rate=2.0, burst=3.0), max_clients=2)
    assert [lim.admit("a", 0.0) for _ in range(3)] == [None, None, None]
    assert lim.admit("a", 0.0) == 1
    assert lim.admit("a", 0.5) is None  # one token back after 0.5 s at 2/s
    assert lim.admit("b", 0.5) is None
    lim.admit("c", 0.5)
    assert len(lim) == 2  # LRU bound: "a" forgotten
    slow = RateLimiter(RateLimit(rate=0.1, burst=1.0))
    assert slow.admit("x", 0.0) is None and slow.admit("x", 0.0) == 10


def test_config_file_and_flags_win(tmp_path: Path) -> None:
    f = tmp_path / "proxy.toml"
    f.write_text(
        'listen = ["coap://127.0.0.1:0"]\nforward = false\nmetrics = "127.0.0.1:9100"\n'
        'upstream_timeout = 3\nrate_limit = { rate = 5, burst = 10 }\n'
        '[routes]\n"/s" = "coap://10.0.0.5"\n"app.example" = "coap://10.0.0.6:5700"\n'
        '[layer1]\nupstream_credentials = "creds.json"\n'
    )
    cfg = load_config_file(f)
    assert cfg.forward is False and cfg.metrics == ("127.0.0.1", 9100)
    assert cfg.upstream_timeout == 3.0 and cfg.rate_limit == RateLimit(5.0, 10.0)
    assert [str(r) for r in cfg.routes] == ["/s=coap://10.0.0.5:5683",
                                            "app.example=coap://10.0.0.6:5700"]
    # relative to the configuration file's folder, as for the other programs
    assert cfg.layer1.upstream_credentials == str(tmp_path / "creds.json")
    args = build_parser().parse_args(
        ["--config", str(f), "--forward", "--route", "/t=coap://h", "--rate-limit", "1"])
    cfg2 = config_from_args(args)
    assert cfg2.forward is True and [r.match for r in cfg2.routes] == ["/t"]
    assert cfg2.rate_limit == RateLimit(1.0, 1.0) and cfg2.listen == ("coap://127.0.0.1:0",)
    f.write_text("listn = []\n")
    with pytest.raises(ConfigError, match="listn"):
        load_config_file(f)
    for bad in ("nothing", "/x=ftp://h", "/x=coap://"):
        with pytest.raises(ConfigError):
            Route.parse(bad)


def test_config_accepts_flag_names_at_top_level(tmp_path: Path) -> None:
    """What coap-keys writes: the long flag names, Layer 1 settings at the top level."""
    f = tmp_path / "proxy.toml"
    f.write_text(
        'listen = ["coaps://127.0.0.1:0"]\npsk-file = "psk.json"\n'
        'upstream-credentials = "up.json"\nroute = ["/s=coap://10.0.0.5"]\n'
    )
    cfg = load_config_file(f)
    assert cfg.layer1.psk_file == str(tmp_path / "psk.json")
    assert cfg.layer1.upstream_credentials == str(tmp_path / "up.json")
    assert [r.match for r in cfg.routes] == ["/s"]


def test_prometheus_text() -> None:
    reg = MetricsRegistry()
    c = reg.counter("x_total", "help", ["kind"])
    c.inc(kind='a"b')
    assert reg.counter("x_total", "help", ["kind"]) is c
    h = reg.histogram("lat_seconds", "latency", [0.1, 1])
    h.observe(0.05)
    h.observe(2)
    h.observe(1)  # a bound belongs to its own bucket (le = less or equal)
    h.observe(0.1)
    assert h.cumulative() == [2, 3, 4]
    reg.gauge("g", "gauge", func=lambda: 7)
    text = reg.render()
    assert 'x_total{kind="a\\"b"} 1.0' in text and "x_created" not in text
    assert 'lat_seconds_bucket{le="0.1"} 2.0' in text and 'lat_seconds_bucket{le="1.0"} 3.0' in text
    assert 'lat_seconds_bucket{le="+Inf"} 4.0' in text and "lat_seconds_sum 3.15" in text
    assert "lat_seconds_count 4.0" in text and "\ng 7.0\n" in text
    assert c.get(kind='a"b') == 1
    c.inc(kind='a"b')  # the remembered child
    c.inc(2, kind="x")
    assert c.get(kind='a"b') == 2 and c.get(kind="x") == 2
    with pytest.raises(ValueError):
        c.inc(other='a"b')  # the same value under another label is still refused


_WORKER_METRICS = """
import sys
from coaplayers.proxy.metrics import MetricsRegistry, MultiProcessMetrics
reg = MetricsRegistry()
assert reg.multiprocess
c = reg.counter("x_total", "help", ["kind"])
plain = reg.counter("y_total", "help")
for _ in range(5):
    c.inc(kind="a")
plain.inc(3)
scrape = MultiProcessMetrics(sys.argv[1])
before = scrape.render()
reg.refresh()
after = scrape.render()
print('x_total{kind="a"} 5.0' in before, 'x_total{kind="a"} 5.0' in after, "y_total 3.0" in after)
c.inc(kind="a")
print(c.get(kind="a"), 'x_total{kind="a"} 6.0' in scrape.render())
"""


def test_worker_counters_reach_the_shared_files_in_batches(tmp_path: Path) -> None:
    """A worker of a multi-process proxy adds its increments up and writes them on refresh
    (the node's half-second tick, and its stop), not with a locked file write each; reading
    a counter in the process writes first. (In a subprocess: prometheus_client picks its
    multi-process value class when imported.)"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _WORKER_METRICS, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True", "6.0", "True"]


def test_layer1_raw_public_key_settings(tmp_path: Path) -> None:
    """rpk-key and the rpk-trust list, at the top level or in [layer1], are file names
    relative to the file; the flags replace them."""
    top = tmp_path / "top.toml"
    top.write_text('rpk-key = "p.key"\nrpk-trust = ["a.pub", "/abs/b.pub"]\n')
    table = tmp_path / "table.toml"
    table.write_text('[layer1]\nrpk_key = "p.key"\nrpk_trust = "a.pub"\n')
    for f, trust in ((top, (str(tmp_path / "a.pub"), "/abs/b.pub")),
                     (table, (str(tmp_path / "a.pub"),))):
        cfg = load_config_file(f)
        assert cfg.layer1.rpk_key == str(tmp_path / "p.key")
        assert cfg.layer1.rpk_trust == trust
    args = build_parser().parse_args(
        ["--config", str(top), "--rpk-trust", "c.pub", "--rpk-trust", "d.pub"])
    cfg = config_from_args(args)
    assert cfg.layer1.rpk_trust == ("c.pub", "d.pub")
    assert cfg.layer1.rpk_key == str(tmp_path / "p.key")
    with pytest.raises(ConfigError, match="rpk_trust"):
        config_from_mapping({"layer1": {"rpk_trust": [1]}})
