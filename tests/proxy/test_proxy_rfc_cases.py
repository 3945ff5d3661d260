"""One RFC 7252 / 7641 / 7959 / 7967 / 8768 case list, run against coap-proxy, aiocoap-proxy
and libcoap's proxy (coap-server-notls -P) in front of the same origin.

coap-proxy must pass every case and more cases than each of the others; the table of who passes
what is printed (``pytest -s``), so the comparison is there to read, not only asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiocoap
import pytest
from aiocoap import GET, NON, POST, Message
from aiocoap.numbers import codes
from aiocoap.optiontypes import OpaqueOption, UintOption

from tests.conftest import background, free_udp_port, need_program, wait_udp_bound

from .conftest import Running, start_proxy
from .echo_server import BIG

pytestmark = [pytest.mark.interop, pytest.mark.slow]

CASE_TIMEOUT = 5.0


class Via:
    """Requests through one proxy, in the form it accepts (aiocoap-proxy refuses Proxy-Uri)."""

    def __init__(self, name: str, hostport: str, origin: str, ctxs: list[aiocoap.Context]):
        self.name, self.hostport, self.origin, self.ctxs = name, hostport, origin, ctxs

    def message(self, path: str, code: aiocoap.Code = GET, **opts: object) -> Message:
        m = Message(code=code, uri=f"coap://{self.hostport}/", **opts)  # type: ignore[arg-type]
        if self.name == "aiocoap-proxy":
            host, port = self.origin.rsplit(":", 1)
            m.opt.proxy_scheme = "coap"
            m.opt.uri_host = host
            m.opt.uri_port = int(port)
            m.opt.uri_path = [s for s in path.split("/") if s]
        else:
            m.opt.proxy_uri = f"coap://{self.origin}/{path}"
        return m

    async def ask(self, m: Message, ctx: int = 0) -> Message:
        return await asyncio.wait_for(self.ctxs[ctx].request(m).response, CASE_TIMEOUT)


async def unknown_unsafe_refused(v: Via) -> bool:
    m = v.message("x")
    m.opt.add_option(OpaqueOption(65003, b"u"))
    return (await v.ask(m)).code == codes.BAD_OPTION


async def unknown_safe_forwarded(v: Via) -> bool:
    m = v.message("x")
    m.opt.add_option(OpaqueOption(65000, b"e"))
    m.opt.add_option(OpaqueOption(65001, b"c"))
    r = await v.ask(m)
    options = json.loads(r.payload)["options"]
    return [65000, "65"] in options and [65001, "63"] in options


async def hop_limit_decremented(v: Via) -> bool:
    m = v.message("x")
    m.opt.add_option(UintOption(16, 5))
    r = await v.ask(m)
    return [16, "04"] in json.loads(r.payload)["options"]


async def fresh_answer_from_cache(v: Via) -> bool:
    a, b = await v.ask(v.message("count")), await v.ask(v.message("count"))
    return a.code == b.code == codes.CONTENT and a.payload == b.payload


async def cached_max_age_is_what_is_left(v: Via) -> bool:
    await v.ask(v.message("count"))
    r = await v.ask(v.message("count"))
    return r.code == codes.CONTENT and r.opt.max_age is not None and r.opt.max_age <= 60


async def max_age_0_never_served_again(v: Via) -> bool:
    a, b = await v.ask(v.message("count0")), await v.ask(v.message("count0"))
    return a.code == b.code == codes.CONTENT and a.payload != b.payload


async def block2_transfer(v: Via) -> bool:
    r = await v.ask(v.message("big"))
    return r.code == codes.CONTENT and r.payload == BIG


async def block1_transfer(v: Via) -> bool:
    body = os.urandom(3000)
    r = await v.ask(v.message("echo", POST, payload=body))
    return r.code == codes.CHANGED and r.payload == body


async def no_response_nothing_relayed(v: Via) -> bool:
    m = v.message("x", no_response=0x1A)
    m.mtype = NON
    try:
        await asyncio.wait_for(v.ctxs[0].request(m).response, 1.5)
    except TimeoutError:
        return True
    return False


async def observe_in_order(v: Via) -> bool:
    req = v.ctxs[0].request(v.message("obs", observe=0))
    first = await asyncio.wait_for(req.response, CASE_TIMEOUT)
    if first.opt.observe is None:
        return False
    seen = [int(first.payload)]

    async def collect() -> None:
        async for n in req.observation:
            seen.append(int(n.payload))
            if len(seen) == 4:
                return

    try:
        await asyncio.wait_for(collect(), CASE_TIMEOUT)
    finally:
        req.observation.cancel()
    return seen == sorted(seen) and len(set(seen)) == 4


async def observers_share_one_registration(v: Via) -> bool:
    before = int((await v.ask(v.message("obscount"), 1)).payload)
    reqs = [v.ctxs[i].request(v.message("obs", observe=0)) for i in (0, 1)]
    try:
        firsts = [await asyncio.wait_for(r.response, CASE_TIMEOUT) for r in reqs]
        if any(f.opt.observe is None for f in firsts):
            return False
        # a fresh counter read (Max-Age 0 would be cleaner; the JSON path is never cached)
        after = int((await v.ask(v.message("obscount?x=" + os.urandom(4).hex()), 1)).payload)
    finally:
        for r in reqs:
            if r.observation is not None:
                r.observation.cancel()
    # at most one: the observation of the case before may still be up (its client left
    # without a word; the proxy learns it at the next notification) and be joined instead
    return after - before <= 1


CASES: list[tuple[str, Callable[[Via], Awaitable[bool]]]] = [
    ("RFC 7252 5.7.1 unknown proxy-unsafe option: 4.02", unknown_unsafe_refused),
    ("RFC 7252 5.7.1 unknown safe-to-forward options forwarded", unknown_safe_forwarded),
    ("RFC 8768 Hop-Limit decremented", hop_limit_decremented),
    ("RFC 7252 5.6 a fresh answer is served from the cache", fresh_answer_from_cache),
    ("RFC 7252 5.6.1 a cached answer's Max-Age is what is left", cached_max_age_is_what_is_left),
    ("RFC 7252 5.10.5 Max-Age 0 is never served again", max_age_0_never_served_again),
    ("RFC 7959 Block2 transfer through the proxy", block2_transfer),
    ("RFC 7959 Block1 transfer through the proxy", block1_transfer),
    ("RFC 7967 NON with No-Response 26: nothing relayed", no_response_nothing_relayed),
    ("RFC 7641 notifications relayed in order", observe_in_order),
    ("RFC 7641 5 two observers, one upstream registration", observers_share_one_registration),
]


async def run_cases(v: Via) -> dict[str, bool]:
    out = {}
    for name, case in CASES:
        try:
            out[name] = await case(v)
        except Exception:  # a timeout or an error answer is a failed case
            out[name] = False
    return out


async def test_case_list_against_three_proxies(
    tmp_path: Path, origin: Running, proxies: list[Running]
) -> None:
    proxies.append(ours := await start_proxy(tmp_path))
    aio_port, lc_port = free_udp_port(), free_udp_port()
    env = dict(os.environ, AIOCOAP_SERVER_TRANSPORT="udp6", AIOCOAP_CLIENT_TRANSPORT="udp6")
    aiocoap_proxy = str(Path(sys.executable).with_name("aiocoap-proxy"))
    libcoap = need_program("coap-server-notls")
    ctxs = [await aiocoap.Context.create_client_context(transports=["udp6"]) for _ in range(2)]
    results: dict[str, dict[str, bool]] = {}
    try:
        async with background(aiocoap_proxy, "--forward", "--bind", f"127.0.0.1:{aio_port}",
                              env=env), \
                background(libcoap, "-A", "127.0.0.1", "-p", str(lc_port), "-P", ",lcproxy"):
            await wait_udp_bound("127.0.0.1", aio_port)
            await wait_udp_bound("127.0.0.1", lc_port)
            for name, hostport in (("coap-proxy", ours.hostport),
                                   ("aiocoap-proxy", f"127.0.0.1:{aio_port}"),
                                   ("libcoap proxy", f"127.0.0.1:{lc_port}")):
                results[name] = await run_cases(Via(name, hostport, origin.hostport, ctxs))
    finally:
        for c in ctxs:
            await c.shutdown()
    width = max(len(n) for n, _ in CASES)
    print("\n" + "case".ljust(width) + "  " + "  ".join(results))
    for name, _ in CASES:
        print(name.ljust(width) + "  " + "  ".join(
            ("pass" if results[p][name] else "FAIL").ljust(len(p)) for p in results))
    score = {p: sum(r.values()) for p, r in results.items()}
    print("passed: " + ", ".join(f"{p} {n}/{len(CASES)}" for p, n in score.items()))
    assert all(results["coap-proxy"].values()), results["coap-proxy"]
    assert score["coap-proxy"] > score["aiocoap-proxy"], score
    assert score["coap-proxy"] > score["libcoap proxy"], score
