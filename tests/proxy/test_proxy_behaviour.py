"""RFC 7252 5.7 and RFC 8768 behaviour, routes, limits and shutdown of a real coap-proxy."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import aiocoap
from aiocoap import GET, POST, Message
from aiocoap.numbers import OptionNumber, codes
from aiocoap.optiontypes import OpaqueOption, UintOption

from tests.conftest import free_udp_port

from .conftest import Running, http_get, metric, poll_metric, start_proxy


def via(proxy: Running, target: str, code: aiocoap.numbers.Code = GET,
        payload: bytes = b"") -> Message:
    m = Message(code=code, payload=payload, uri=f"coap://{proxy.hostport}/")
    m.opt.proxy_uri = target
    return m


async def ask(ctx: aiocoap.Context, msg: Message, timeout: float = 10.0) -> Message:
    return await asyncio.wait_for(ctx.request(msg).response, timeout)


async def test_proxy_forwarding_to_itself_answers_508_within_a_second(
    tmp_path: Path, proxies: list[Running], client: aiocoap.Context
) -> None:
    port = free_udp_port()
    own = f"coap://127.0.0.1:{port}"
    proxies.append(proxy := await start_proxy(tmp_path, "--listen", own, "--route", f"/={own}"))
    for _ in range(2):
        t0 = time.monotonic()
        r = await ask(client, Message(code=GET, uri=f"{own}/loop"), timeout=5)
        elapsed = time.monotonic() - t0
        assert r.code == codes.HOP_LIMIT_REACHED
        assert elapsed < 1.0, elapsed
    # Each hop prefixed its identity (RFC 8768 trace): 16 hops after the inserted 16.
    assert r.payload.split() == [f"127.0.0.1:{port}".encode()] * 16
    # An Observe registration or a cacheable GET does not wait for itself on the way round
    # (the proxy merges concurrent requests for one resource, and observations of it).
    t0 = time.monotonic()
    r = await ask(client, Message(code=GET, uri=f"{own}/loop2", observe=0), timeout=5)
    assert r.code == codes.HOP_LIMIT_REACHED and time.monotonic() - t0 < 1.0
    warnings = [e for e in proxy.log_lines() if e["event"] == "warning"]
    assert warnings, "the self-route should be flagged at start"


async def test_hop_limit_decremented_and_exhausted(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path))
    m = via(proxy, f"coap://{origin.hostport}/hl")
    m.opt.add_option(UintOption(OptionNumber.HOP_LIMIT, 5))
    r = await ask(client, m)
    assert [16, "04"] in json.loads(r.payload)["options"]
    m = via(proxy, f"coap://{origin.hostport}/hl")
    m.opt.add_option(UintOption(OptionNumber.HOP_LIMIT, 1))
    r = await ask(client, m)
    assert r.code == codes.HOP_LIMIT_REACHED


async def test_unknown_options_safe_forwarded_unsafe_refused(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path))
    m = via(proxy, f"coap://{origin.hostport}/opts")
    m.opt.add_option(OpaqueOption(65000, b"\x01\x02\xff"))  # elective, safe-to-forward
    m.opt.add_option(OpaqueOption(65001, b"crit-safe"))  # critical, safe-to-forward
    m.opt.add_option(OpaqueOption(OptionNumber.OSCORE, b"\x09\x00\x42"))  # untouched
    r = await ask(client, m)
    assert r.code == codes.CONTENT
    options = json.loads(r.payload)["options"]
    assert [65000, "0102ff"] in options
    assert [65001, b"crit-safe".hex()] in options
    assert [9, "090042"] in options

    for number in (65002, 65003):  # elective-unsafe, critical-unsafe
        m = via(proxy, f"coap://{origin.hostport}/opts")
        m.opt.add_option(OpaqueOption(number, b"x"))
        r = await ask(client, m)
        assert r.code == codes.BAD_OPTION, (number, r)
        assert str(number).encode() in r.payload


async def test_upstream_down_answers_504_within_timeout(
    tmp_path: Path, proxies: list[Running], client: aiocoap.Context
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path, "--upstream-timeout", "1.0"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))  # bound, never answers: a hung server
        t0 = time.monotonic()
        r = await ask(client, via(proxy, f"coap://127.0.0.1:{hole.getsockname()[1]}/x"))
        elapsed = time.monotonic() - t0
    assert r.code == codes.GATEWAY_TIMEOUT
    assert 0.9 <= elapsed < 3.0, elapsed
    # Nothing listening at all (ICMP port unreachable): also 5.04, at once.
    t0 = time.monotonic()
    r = await ask(client, via(proxy, f"coap://127.0.0.1:{free_udp_port()}/x"))
    assert r.code == codes.GATEWAY_TIMEOUT
    assert time.monotonic() - t0 < 1.5


async def test_reverse_routes_by_prefix_and_uri_host(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    o = origin.hostport
    proxies.append(proxy := await start_proxy(
        tmp_path, "--no-forward",
        "--route", f"/sensors=coap://{o}",
        "--route", f"/api/v1=coap://{o}/inner",
        "--route", f"App.Example=coap://{o}/vhost",
    ))
    base = f"coap://{proxy.hostport}"
    r = await ask(client, Message(code=GET, uri=f"{base}/sensors/t?unit=c"))
    rep = json.loads(r.payload)
    assert (rep["path"], rep["query"]) == (["sensors", "t"], ["unit=c"])

    r = await ask(client, Message(code=GET, uri=f"{base}/api/v1/items/3"))
    assert json.loads(r.payload)["path"] == ["inner", "items", "3"]

    m = Message(code=GET, uri=f"{base}/x")
    m.opt.uri_host = "app.example"
    r = await ask(client, m)
    rep = json.loads(r.payload)
    assert rep["path"] == ["vhost", "x"]
    assert rep["uri_host"] is None  # the upstream is an IP literal

    r = await ask(client, Message(code=GET, uri=f"{base}/elsewhere"))
    assert r.code == codes.PROXYING_NOT_SUPPORTED
    r = await ask(client, via(proxy, f"coap://{o}/x"))
    assert r.code == codes.PROXYING_NOT_SUPPORTED  # --no-forward

    r = await ask(client, via(proxy, "http://example.com/"))
    assert r.code == codes.PROXYING_NOT_SUPPORTED

    log = [e for e in proxy.log_lines() if e["event"] == "exchange"]
    assert {e.get("route") for e in log} >= {"/sensors", "/api/v1", "app.example"}


async def test_forward_request_naming_the_proxy_is_routed_not_looped(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    port = free_udp_port()
    proxies.append(proxy := await start_proxy(
        tmp_path, "--listen", f"coap://127.0.0.1:{port}", "--name", "proxy.test",
        "--route", f"/r=coap://{origin.hostport}",
    ))
    for target in (f"coap://127.0.0.1:{port}/r/a", f"coap://proxy.test:{port}/r/a"):
        r = await ask(client, via(proxy, target))
        assert r.code == codes.CONTENT, target
        assert json.loads(r.payload)["path"] == ["r", "a"]
    kinds = [e["kind"] for e in proxy.log_lines() if e["event"] == "exchange"]
    assert kinds == ["reverse", "reverse"]


async def test_rate_limit_answers_429_with_max_age(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path, "--rate-limit", "0.5/3"))
    codes_seen = []
    max_ages = []
    for i in range(6):
        r = await ask(client, via(proxy, f"coap://{origin.hostport}/r{i}"))
        codes_seen.append(r.code)
        if r.code == codes.TOO_MANY_REQUESTS:
            max_ages.append(r.opt.max_age)
    assert codes_seen[:3] == [codes.CONTENT] * 3
    assert codes_seen[3:] == [codes.TOO_MANY_REQUESTS] * 3
    assert all(a is not None and a >= 1 for a in max_ages)


async def test_in_flight_bound_answers_503(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    proxies.append(proxy := await start_proxy(
        tmp_path, "--max-in-flight", "1", "--metrics", "127.0.0.1:0"))
    # Two clients (two source ports): one waits on /slow, the other is refused meanwhile.
    a = await aiocoap.Context.create_client_context(transports=["udp6"])
    b = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        slow = asyncio.ensure_future(ask(a, via(proxy, f"coap://{origin.hostport}/slow?1.5")))
        await poll_metric(proxy, "coap_proxy_in_flight", 1)
        r = await ask(b, via(proxy, f"coap://{origin.hostport}/x"))
        assert r.code == codes.SERVICE_UNAVAILABLE
        assert r.opt.max_age is not None
        assert (await slow).code == codes.CONTENT
        await poll_metric(proxy, "coap_proxy_in_flight", 0)
        assert metric(await http_get(proxy.metrics or ""),
                      'coap_proxy_errors_total{kind="overloaded"}') == 1
    finally:
        await a.shutdown()
        await b.shutdown()


async def test_graceful_shutdown_finishes_in_flight_and_refuses_new(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    proxies.append(proxy := await start_proxy(
        tmp_path, "--metrics", "127.0.0.1:0", "--shutdown-grace", "5"))
    a = await aiocoap.Context.create_client_context(transports=["udp6"])
    b = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        slow = asyncio.ensure_future(ask(a, via(proxy, f"coap://{origin.hostport}/slow?1.0")))
        await poll_metric(proxy, "coap_proxy_in_flight", 1)
        t0 = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        # The stop line is logged once draining has begun; a new request is refused then.
        deadline = time.monotonic() + 5
        refused = None
        while refused is None and time.monotonic() < deadline:
            r = await ask(b, via(proxy, f"coap://{origin.hostport}/x"), timeout=5)
            if r.code == codes.SERVICE_UNAVAILABLE:
                refused = r
        assert refused is not None and b"shutting down" in refused.payload
        done = await slow
        assert done.code == codes.CONTENT and done.payload == b"slow done"
        assert await asyncio.wait_for(proxy.proc.wait(), 6) == 0
        assert time.monotonic() - t0 < 6
        stop = [e for e in proxy.log_lines() if e["event"] == "stop"]
        assert stop and stop[0]["clean"] is True
    finally:
        await a.shutdown()
        await b.shutdown()


async def test_metrics_and_logs(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path, "--metrics", "127.0.0.1:0"))
    assert proxy.metrics is not None and proxy.metrics.startswith("http://127.0.0.1:")
    marker = b"PAYLOAD-MARKER-7f3a9c"
    for _ in range(3):
        r = await ask(client, via(proxy, f"coap://{origin.hostport}/echo", POST, marker * 10))
        assert r.payload == marker * 10
    m = via(proxy, f"coap://{origin.hostport}/opts")
    m.opt.add_option(OpaqueOption(65002, b"x"))
    assert (await ask(client, m)).code == codes.BAD_OPTION
    text = await http_get(proxy.metrics)
    assert metric(text, 'coap_proxy_requests_total{kind="forward"}') == 3
    assert metric(text, 'coap_proxy_requests_total{kind="refused"}') == 1
    assert metric(text, 'coap_proxy_errors_total{kind="bad_option"}') == 1
    assert metric(text, 'coap_proxy_responses_total{code="2.04"}') == 3
    assert metric(text, "coap_proxy_upstream_latency_seconds_count") == 3
    assert "# TYPE coap_proxy_upstream_latency_seconds histogram" in text

    raw = proxy.log_file.read_bytes() if proxy.log_file else b""
    assert marker not in raw
    exchanges = [e for e in proxy.log_lines() if e["event"] == "exchange"]
    assert len(exchanges) == 4
    first = exchanges[0]
    assert first["routing"] == {
        "proxy_uri": f"coap://{origin.hostport}/echo"}  # type: ignore[comparison-overlap]
    assert first["code"] == "2.04" and first["request_bytes"] == len(marker) * 10
    assert first["client"].startswith("127.0.0.1:")  # type: ignore[union-attr]
    assert "identity" in first and isinstance(first["latency_ms"], float)
    assert exchanges[-1]["reason"] == "bad_option"


async def test_unusable_upstream_answer_gives_502_and_oscore_passes_untouched(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path))
    r = await ask(client, via(proxy, f"coap://{origin.hostport}/badopt"))
    assert r.code == codes.BAD_GATEWAY and b"65002" in r.payload
    # An OSCORE-flagged POST: option and (ciphertext-like) payload reach the origin as sent.
    body = bytes(range(256)) * 2
    m = via(proxy, f"coap://{origin.hostport}/echo", POST, body)
    m.opt.add_option(OpaqueOption(OptionNumber.OSCORE, b"\x09\x07\x01"))
    r = await ask(client, m)
    assert r.code == codes.CHANGED and r.payload == body


async def test_observation_ends_upstream_when_client_leaves(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    proxies.append(proxy := await start_proxy(tmp_path, "--metrics", "127.0.0.1:0"))
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        m = via(proxy, f"coap://{origin.hostport}/obs")
        m.opt.observe = 0
        req = ctx.request(m)
        assert (await asyncio.wait_for(req.response, 10)).opt.observe is not None
        await poll_metric(proxy, "coap_proxy_observations", 1)
    finally:
        await ctx.shutdown()  # the client goes away: its next notification is answered RST
    await poll_metric(proxy, "coap_proxy_observations", 0)


async def test_separate_response_retransmits_on_the_downstream_ack_timeout(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    """A slow upstream: the proxy acknowledges the request empty, then sends the answer as a
    CON of its own. Unacknowledged, that answer comes again after --downstream-ack-timeout
    (0.2-0.3 s here), not after aiocoap's default 2-3 s."""
    proxies.append(proxy := await start_proxy(tmp_path, "--downstream-ack-timeout", "0.2"))
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(("127.0.0.1", proxy.port))
    try:
        request = Message(code=GET)  # a raw datagram: type, MID and token set by hand
        request.mtype, request.mid, request.token = aiocoap.CON, 0x1234, b"sep"
        request.opt.proxy_uri = f"coap://{origin.hostport}/slow?0.5"
        sock.send(request.encode())

        async def receive() -> tuple[float, Message]:
            data = await asyncio.wait_for(loop.sock_recv(sock, 1500), 10)
            return time.monotonic(), Message.decode(data)

        _, ack = await receive()
        assert (ack.mtype, ack.mid, ack.code) == (aiocoap.ACK, 0x1234, codes.EMPTY)
        first_at, first = await receive()
        assert (first.mtype, first.token, first.payload) == (aiocoap.CON, b"sep", b"slow done")
        again_at, again = await receive()  # not acknowledged: sent again
        assert (again.mtype, again.mid, again.payload) == (aiocoap.CON, first.mid, b"slow done")
        assert again_at - first_at < 1.0
        done = Message(code=codes.EMPTY)
        done.mtype, done.mid, done.token = aiocoap.ACK, first.mid, b""
        sock.send(done.encode())
    finally:
        sock.close()


def test_downstream_ack_timeout_is_bounded() -> None:
    from coaplayers.proxy.config import ConfigError, ProxyConfig, config_from_mapping

    assert ProxyConfig(downstream_ack_timeout=0.2).downstream_ack_timeout == 0.2
    assert config_from_mapping({"downstream_ack_timeout": 0.3}).downstream_ack_timeout == 0.3
    assert ProxyConfig().downstream_ack_timeout is None  # aiocoap's 2 s
    for bad in (0.0, 61.0):
        try:
            ProxyConfig(downstream_ack_timeout=bad)
        except ConfigError as exc:
            assert "downstream_ack_timeout" in str(exc)
        else:
            raise AssertionError(f"{bad} accepted")
