"""Forward proxying is closed by default: the allow-list, the special addresses and the Layer 1
rule, as pure routing decisions (the process-level tests are in test_proxy_closed.py)."""

from __future__ import annotations

import ipaddress

import pytest
from aiocoap import GET, Message
from aiocoap.numbers import codes

from coaplayers.programs.proxy import build_parser, config_from_args
from coaplayers.proxy.allow import AllowList, AllowRule, Verdict
from coaplayers.proxy.config import ConfigError, ProxyConfig, Route, config_from_mapping
from coaplayers.proxy.routing import Refusal, Router

OWN = ipaddress.ip_address("192.0.2.7")  # stands for an address of this host's interfaces


def local(ip: object) -> bool:
    return ip == OWN


def router(*allow: str, **kw: object) -> Router:
    r = Router(ProxyConfig(allow=allow, **kw), local_address=local)  # type: ignore[arg-type]
    r.add_own_address("coap", "0.0.0.0", 5683)
    return r


def forward(uri: str) -> Message:
    m = Message(code=GET)
    m.opt.proxy_uri = uri
    return m


def refused(r: Router, uri: str) -> Refusal:
    with pytest.raises(Refusal) as info:
        r.decide(forward(uri))
    return info.value


def test_default_reaches_nothing() -> None:
    r = router()
    for uri in ("coap://127.0.0.1:9999/x", "coap://10.0.0.5/x", "coap://app.example/x",
                "coaps://app.example/x"):
        refusal = refused(r, uri)
        assert refusal.code == codes.FORBIDDEN and refusal.kind == "not_allowed"
        assert "not allowed" in refusal.diagnostic
    # The proxy's own listener is not forwarding: it routes as a reverse request (no route).
    assert refused(r, "coap://127.0.0.1:5683/x").kind == "no_route"


def test_names_addresses_prefixes_and_ports() -> None:
    r = router("app.example:5684", "10.0.0.0/24", "[2001:db8::/32]:5683", "203.0.113.9")
    assert r.decide(forward("coaps://APP.example:5684/x")).upstream.host == "app.example"
    # Another port could still be a name in 10.0.0.0/24: checked once resolved.
    assert r.decide(forward("coap://app.example:5690/x")).check_address
    assert refused(router("app.example:5684"), "coap://app.example:5690/x").kind == "not_allowed"
    assert r.decide(forward("coap://10.0.0.200:1234/x")).kind == "forward"
    assert refused(r, "coap://10.0.1.1/x").kind == "not_allowed"
    assert r.decide(forward("coap://[2001:db8::5]/x")).kind == "forward"
    assert refused(r, "coap://[2001:db8::5]:5684/x").kind == "not_allowed"
    assert r.decide(forward("coap://203.0.113.9:7/x")).kind == "forward"
    # A name only a prefix could allow is checked again once resolved.
    assert r.decide(forward("coap://other.example/x")).check_address
    assert not r.decide(forward("coaps://app.example:5684/x")).check_address


def test_star_opens_everything_but_special_and_own_addresses() -> None:
    r = router("*")
    assert r.decide(forward("coap://198.51.100.1:9/x")).kind == "forward"
    for uri, kind in [
        ("coap://127.0.0.1:22/x", "loopback"), ("coap://127.9.9.9/x", "loopback"),
        ("coap://[::1]:5684/x", "loopback"), ("coap://[::ffff:127.0.0.1]:53/x", "loopback"),
        ("coap://[fe80::1]/x", "link-local"), ("coap://169.254.1.1/x", "link-local"),
        ("coap://0.0.0.0:9/x", "unspecified"), ("coap://[::]:9/x", "unspecified"),
        ("coap://224.0.1.187/x", "multicast"), ("coap://192.0.2.7:22/x", "own"),
    ]:
        refusal = refused(r, uri)
        assert refusal.code == codes.FORBIDDEN and f"({kind} address)" in refusal.diagnostic, uri
    assert r.decide(forward("coap://localhost:9/x")).check_address  # a name: checked resolved
    assert not r.allow.address_allowed("127.0.0.1", 9)
    assert r.allow.address_allowed("198.51.100.1", 9)
    # A /0 prefix is '*' by another name; listing the special address opens it.
    assert not router("0.0.0.0/0").allow.address_allowed("127.0.0.1", 9)
    opened = router("*", "127.0.0.1:5690")
    assert opened.decide(forward("coap://127.0.0.1:5690/x")).kind == "forward"
    assert refused(opened, "coap://127.0.0.1:5691/x").kind == "not_allowed"
    assert router("127.0.0.0/8").decide(forward("coap://127.0.0.2/x")).kind == "forward"


def test_reverse_routes_are_allowed_without_entries() -> None:
    r = router(routes=(Route.parse("/s=coap://127.0.0.1:6000"),))
    m = Message(code=GET, uri_path=("s", "x"))
    d = r.decide(m)
    assert (d.kind, d.upstream.host, d.upstream.port) == ("reverse", "127.0.0.1", 6000)


def test_allow_list_verdicts_and_parsing() -> None:
    allow = AllowList(["*:5683", "app.example"], local_address=local)
    assert allow.check_target("198.51.100.1", 5683) is Verdict.ALLOWED
    assert allow.check_target("198.51.100.1", 5684) is Verdict.REFUSED
    assert allow.check_target("x.example", 5683) is Verdict.CHECK_ADDRESS
    assert allow.check_target("x.example", 5684) is Verdict.REFUSED
    assert allow.check_target("APP.example.", 1) is Verdict.ALLOWED
    assert AllowRule.parse("[::1]").network == ipaddress.ip_network("::1/128")
    assert AllowRule.parse("fd00::/8").network == ipaddress.ip_network("fd00::/8")
    assert AllowRule.parse("10.1.2.3/8:5683").port == 5683
    for bad in ("", "x:y", "host:0", "[::1", "[::1]x", "a b", "10.0.0.0/33"):
        with pytest.raises(ConfigError):
            AllowRule.parse(bad)


def test_allow_from_flags_and_toml() -> None:
    args = build_parser().parse_args(["--allow", "10.0.0.0/8", "--allow", "*"])
    assert config_from_args(args).allow == ("10.0.0.0/8", "*")
    assert config_from_mapping({"allow": ["app.example:5684"]}).allow == ("app.example:5684",)
    assert ProxyConfig().allow == ()
    with pytest.raises(ConfigError, match="allow"):
        config_from_mapping({"allow": ["10.0.0.0/99"]})
