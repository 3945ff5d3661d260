"""What coap-proxy remembers between exchanges to keep each one cheap: the upstream resolution
(with its TTL, and forgotten after a failure), client addresses, and the exchange log line
format written without ``logging``."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import pytest
from aiocoap import POST, Message
from aiocoap.message import UndecidedRemote
from aiocoap.transports.udp6 import UDP6EndpointAddress

from coaplayers.programs.proxy import build_parser, config_from_args
from coaplayers.proxy.accesslog import AccessLog, JsonLinesFormatter
from coaplayers.proxy.config import ConfigError, ProxyConfig
from coaplayers.proxy.metrics import MetricsRegistry
from coaplayers.proxy.site import ProxySite
from coaplayers.proxy.transport import ResolvedAddress, UpstreamPool


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def silent_upstream() -> AsyncIterator[str]:
    """A bound UDP socket that never answers (so no ICMP errors either): its coap:// URI."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"coap://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.fixture
async def client_ctx() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield ctx
    finally:
        await ctx.shutdown()


def counting(ctx: aiocoap.Context) -> list[int]:
    """Count the context's resolutions (aiocoap's find_remote_and_interface calls)."""
    calls: list[int] = []
    real = ctx.find_remote_and_interface

    async def find(message: Message) -> Any:
        calls.append(1)
        return await real(message)

    ctx.find_remote_and_interface = find  # type: ignore[method-assign]
    return calls


def upstream_message(target: str) -> Message:
    m = Message(code=POST, payload=b"x")
    m.mtype = aiocoap.NON
    m.opt.uri_path = ("echo",)
    scheme, hostinfo = target.split("://", 1)
    m.remote = UndecidedRemote(scheme, hostinfo)
    return m


async def test_upstream_resolution_is_reused_for_its_ttl_and_forgotten_on_failure(
    client_ctx: aiocoap.Context, silent_upstream: str
) -> None:
    clock = Clock()
    pool = UpstreamPool([client_ctx], resolve_ttl=30.0, clock=clock)
    calls = counting(client_ctx)
    requests = []

    async def send() -> Message:
        m = upstream_message(silent_upstream)
        requests.append(await pool.request("client-a", m, silent_upstream))
        return m

    first = await send()
    assert isinstance(first.remote, UDP6EndpointAddress) and len(calls) == 1
    second = await send()
    assert second.remote == first.remote and len(calls) == 1  # from the cache
    assert isinstance(second.remote, ResolvedAddress) and hash(second.remote) == hash(first.remote)
    assert second.remote.hostinfo == first.remote.hostinfo == silent_upstream.split("//")[1]
    assert second.remote.is_multicast is False
    clock.now += 29
    await send()
    assert len(calls) == 1
    clock.now += 2  # past the TTL: resolved again
    await send()
    assert len(calls) == 2
    pool.forget("client-a", silent_upstream)  # after a failure towards it
    await send()
    assert len(calls) == 3
    for r in requests:
        r.response.cancel()
    await asyncio.sleep(0)


async def test_resolve_ttl_zero_resolves_every_exchange(
    client_ctx: aiocoap.Context, silent_upstream: str
) -> None:
    pool = UpstreamPool([client_ctx], resolve_ttl=0)
    calls = counting(client_ctx)
    requests = [
        await pool.request("c", upstream_message(silent_upstream), silent_upstream)
        for _ in range(3)
    ]
    assert len(calls) == 3
    for r in requests:
        r.response.cancel()
    await asyncio.sleep(0)


async def test_unresolvable_upstream_raises_from_request(client_ctx: aiocoap.Context) -> None:
    pool = UpstreamPool([client_ctx])
    target = "coap://no-such-host.invalid:5683"
    with pytest.raises(aiocoap.error.ResolutionError):
        await pool.request("c", upstream_message(target), target)


def test_resolve_ttl_setting() -> None:
    assert ProxyConfig().resolve_ttl == 30.0
    args = build_parser().parse_args(["--resolve-ttl", "0"])
    assert config_from_args(args).resolve_ttl == 0
    with pytest.raises(ConfigError):
        ProxyConfig(resolve_ttl=-1)


class Interface:
    """Stands in for the socket a UDP6EndpointAddress (weakly) refers to."""


async def test_client_hostinfo_is_remembered_per_address() -> None:
    site = ProxySite(ProxyConfig(), MetricsRegistry(), AccessLog(stream=io.StringIO()))
    sockaddr = ("::ffff:127.0.0.1", 40000, 0, 0)
    iface = Interface()
    remote = UDP6EndpointAddress(sockaddr, interface=iface)
    assert site.client_hostinfo(remote) == "127.0.0.1:40000" == remote.hostinfo
    assert site.client_hostinfo(UDP6EndpointAddress(sockaddr, interface=iface)) == (
        "127.0.0.1:40000")
    v6 = UDP6EndpointAddress(("2001:db8::1", 5683, 0, 0), interface=iface)
    assert site.client_hostinfo(v6) == "[2001:db8::1]" == v6.hostinfo


def test_exchange_line_matches_the_formatter() -> None:
    out = io.StringIO()
    log = AccessLog(stream=out)
    entry = {"event": "exchange", "client": "127.0.0.1:1", "identity": None,
             "routing": {"uri_query": ["a=1", 'q"'], "oscore": True}, "latency_ms": 1.25}
    log.exchange(entry)
    log.event("stop", clean=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    direct = json.loads(lines[0])
    assert list(direct) == ["ts", *entry] and {k: direct[k] for k in entry} == entry
    assert isinstance(direct["ts"], float)
    # Byte for byte what the logging formatter makes of the same fields (but the time).
    import logging

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "exchange", None, None)
    record.fields = entry
    record.created = direct["ts"]
    assert JsonLinesFormatter().format(record) == lines[0]
    assert json.loads(lines[1])["event"] == "stop"
