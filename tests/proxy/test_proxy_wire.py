"""coap-proxy's forwarding as seen on the wire (RFC 7252, 8768, 9175 and the 3x rule).

The client is a raw UDP socket and the datagrams are built and parsed here, byte by byte, not
by the library under test; the main upstream is a scripted raw UDP origin in this process
(``RawOrigin``), which records every datagram the proxy sends it and can misbehave on demand
(answer late, separately, with RST, with unknown options, or never). coap-proxy runs as a real
process; the interop group adds libcoap's coap-client and the aiocoap and coap-server origins.

The processes are shared by the whole module (one event loop for it); each test uses its own
paths and tokens, so tests do not see each other's exchanges.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from tests.conftest import (
    PROXY,
    UdpCollector,
    background,
    free_udp_port,
    need_program,
    run_program,
    until,
    wait_udp_bound,
)
from tests.conftest import stop_process as _stop

from .conftest import ROOT, Running, _read_until, http_get, metric, start_origin, start_proxy

pytestmark = pytest.mark.asyncio(loop_scope="module")

CON, NON, ACK, RST = 0, 1, 2, 3
EMPTY, GET, POST, PUT, DELETE = 0x00, 0x01, 0x02, 0x03, 0x04


def code(text: str) -> int:
    """``"2.05"`` -> 0x45."""
    cls, detail = text.split(".")
    return int(cls) << 5 | int(detail)


# Option numbers (RFC 7252 5.10, 7959, 8613, 8768, 9175)
IF_MATCH, URI_HOST, ETAG, IF_NONE_MATCH, URI_PORT, LOCATION_PATH = 1, 3, 4, 5, 7, 8
OSCORE, URI_PATH, CONTENT_FORMAT, MAX_AGE, URI_QUERY = 9, 11, 12, 14, 15
HOP_LIMIT, ACCEPT, LOCATION_QUERY, SIZE2, PROXY_URI = 16, 17, 20, 28, 35
PROXY_SCHEME, SIZE1, ECHO, OBSERVE, BLOCK2 = 39, 60, 252, 6, 23
ROUTING = {URI_HOST, URI_PORT, PROXY_URI, PROXY_SCHEME}

UPSTREAM_TIMEOUT = 1.0  # the shared proxy's --upstream-timeout
UPSTREAM_ACK_TIMEOUT = 0.3  # its --ack-timeout (first retransmission of a CON upstream)
WAIT = 5.0  # the longest any single datagram is waited for


# -- the wire format, independent of aiocoap ---------------------------------------------------


def _nibble(n: int) -> tuple[int, bytes]:
    if n < 13:
        return n, b""
    if n < 269:
        return 13, bytes([n - 13])
    return 14, (n - 269).to_bytes(2, "big")


@dataclass
class Datagram:
    """One CoAP message as it is on the wire; options in wire order, values as sent."""

    mtype: int
    code: int
    mid: int
    token: bytes = b""
    options: list[tuple[int, bytes]] = field(default_factory=list)
    payload: bytes = b""
    source: tuple[str, int] | None = field(default=None, compare=False)  # who sent it
    at: float = field(default=0.0, compare=False)  # when it arrived (the loop's clock)

    def encode(self) -> bytes:
        tkl, extra = _nibble(len(self.token))  # RFC 8974: 13 and 14 take extra length bytes
        out = bytearray([0x40 | self.mtype << 4 | tkl, self.code, self.mid >> 8, self.mid & 0xFF])
        out += extra + self.token
        last = 0
        for number, value in sorted(self.options, key=lambda o: o[0]):  # stable: repeats kept
            d, dx = _nibble(number - last)
            n, nx = _nibble(len(value))
            out += bytes([d << 4 | n]) + dx + nx + value
            last = number
        if self.payload:
            out += b"\xff" + self.payload
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Datagram:
        assert data[0] >> 6 == 1, data
        tkl, i = data[0] & 0x0F, 4
        assert tkl != 15, data
        if tkl == 13:
            tkl, i = data[4] + 13, 5
        elif tkl == 14:
            tkl, i = int.from_bytes(data[4:6], "big") + 269, 6
        msg = cls((data[0] >> 4) & 3, data[1], int.from_bytes(data[2:4], "big"), data[i:i + tkl])
        i, number = i + tkl, 0
        while i < len(data):
            if data[i] == 0xFF:
                msg.payload = data[i + 1:]
                assert msg.payload, "payload marker without a payload"
                break
            head = data[i]
            i += 1
            parts = []
            for nib in (head >> 4, head & 0x0F):
                assert nib != 15, data
                if nib == 13:
                    parts.append(data[i] + 13)
                    i += 1
                elif nib == 14:
                    parts.append(int.from_bytes(data[i:i + 2], "big") + 269)
                    i += 2
                else:
                    parts.append(nib)
            number += parts[0]
            msg.options.append((number, data[i:i + parts[1]]))
            i += parts[1]
        return msg

    def opt(self, number: int) -> list[bytes]:
        return [v for n, v in self.options if n == number]

    def one(self, number: int) -> bytes | None:
        values = self.opt(number)
        assert len(values) <= 1, (number, values)
        return values[0] if values else None

    @property
    def path(self) -> list[str]:
        return [v.decode() for v in self.opt(URI_PATH)]

    @property
    def query(self) -> dict[str, str]:
        return dict(v.decode().partition("=")[::2] for v in self.opt(URI_QUERY))


def uint(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


_mids = iter(range(0x1000, 0x10000))


def request(mtype: int, method: int, target: str | None = None, *, path: str | None = None,
            token: bytes = b"tk", options: Iterable[tuple[int, bytes]] = (),
            payload: bytes = b"") -> Datagram:
    """A request to the proxy: forward (``target``, a Proxy-Uri) or reverse (``path``)."""
    opts = list(options)
    if target is not None:
        opts.append((PROXY_URI, target.encode()))
    if path is not None:
        path, _, query = path.partition("?")
        opts += [(URI_PATH, s.encode()) for s in path.strip("/").split("/") if s]
        opts += [(URI_QUERY, q.encode()) for q in query.split("&") if q]
    return Datagram(mtype, method, next(_mids), token, opts, payload)


# -- the raw client ----------------------------------------------------------------------------


class Client:
    """A raw UDP socket talking to the proxy; every datagram it receives is kept in order."""

    def __init__(self, transport: asyncio.DatagramTransport, proto: UdpCollector,
                 proxy: tuple[str, int]):
        self.transport, self.proto, self.proxy = transport, proto, proxy
        self.sent: list[bytes] = []

    def send(self, msg: Datagram | bytes) -> bytes:
        data = msg if isinstance(msg, bytes) else msg.encode()
        self.sent.append(data)
        self.transport.sendto(data, self.proxy)
        return data

    async def recv_raw(self, timeout: float = WAIT) -> bytes:
        return await asyncio.wait_for(self.proto.queue.get(), timeout)

    async def recv(self, timeout: float = WAIT) -> Datagram:
        return Datagram.decode(await self.recv_raw(timeout))

    def ack(self, msg: Datagram) -> None:
        self.send(Datagram(ACK, EMPTY, msg.mid))

    async def answer(self, req: Datagram, timeout: float = WAIT) -> tuple[Datagram, list[Datagram]]:
        """The response to ``req`` (a separate CON one acknowledged), and every datagram seen
        on the way (the empty ACK of a separate response, repetitions)."""
        seen: list[Datagram] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.recv(max(0.0, deadline - loop.time()))
            seen.append(msg)
            if msg.mtype == ACK and msg.code == EMPTY:
                assert msg.mid == req.mid and req.mtype == CON, msg
                continue
            if msg.token != req.token:
                continue  # a late answer to an earlier request
            if msg.mtype == CON:
                self.ack(msg)
            return msg, seen


async def new_client(port: int, host: str = "127.0.0.1") -> Client:
    """A client of the proxy on ``host``:``port``, from a port of its own (close its
    transport)."""
    transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(
        UdpCollector, local_addr=(host, 0))
    return Client(transport, proto, (host, port))


@pytest_asyncio.fixture(loop_scope="module")
async def client(proxy: Running) -> AsyncIterator[Client]:
    made = await new_client(proxy.port)
    try:
        yield made
    finally:
        made.transport.close()


# -- the scripted raw origin -------------------------------------------------------------------


class RawOrigin:
    """A CoAP origin in raw datagrams whose behaviour the first Uri-Path segment (after an
    ``inner`` a mount adds) picks:

    - ``ok`` 2.05 "ok"; ``say/W?d=S`` 2.05 "W" after S seconds; ``slow?d=S`` 2.05 "slow ok"
      after S seconds;
    - ``sep?d=S`` an empty ACK at once, then a CON 2.05 after S seconds (``acks`` tells when
      it was acknowledged);
    - ``sepdup`` the same, its CON answer sent twice;
    - ``late?d=S`` silence, then 2.05 "too late" after S seconds; ``rst`` RST;
      ``forged`` a 2.05 "forged" from another socket, then the real 2.05 "real";
    - ``blocky`` 100 bytes in 64-byte blocks (Block2 whether asked for or not);
      ``challenge`` 4.01 with an Echo value, 2.04 "echoed" to a request carrying it;
      ``observed`` a 2.05 with an Observe option to a plain GET;
    - ``opts?cf=N`` a 2.05 carrying ``answer_options(N)``; ``unsafe?n=N`` a 2.05 with option
      N; ``create/X`` 2.01 with Location-Path ``.../create/made``; ``loc?p=A/B`` 2.01 with
      that Location-Path; ``hop508`` a 5.08 "origin-trace"; ``big`` 2.04 with 900 bytes;
      ``counted`` to a GET how many POST, PUT or DELETE requests it had (Max-Age 60);
      ``raw?c=HEX&rest=HEX`` an answer with code HEX and those bytes after the token.

    Answers to CON requests are piggybacked, to NON ones NON. Every datagram received is kept
    in ``received``.
    """

    def __init__(self) -> None:
        self.transports: list[asyncio.DatagramTransport] = []
        self.received: list[Datagram] = []
        self.acks: dict[int, asyncio.Future[None]] = {}  # MID of our CON -> its ACK came
        self.separate: dict[bytes, int] = {}  # token -> MID of our separate CON answer
        self.late: set[str] = set()  # paths of "late" requests answered
        self.changes: dict[str, int] = {}  # "counted" path -> unsafe requests it had
        self.spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.spoofer.bind(("127.0.0.1", 0))
        self._mid = 0x7000

    def requests(self, first: str) -> list[Datagram]:
        """Requests whose path is ``first`` (the whole path, joined), one per sender and MID:
        a CON the proxy retransmitted is one request."""
        mids, out = set(), []
        for m in self.received:
            if 1 <= m.code < 32 and "/".join(m.path) == first and (m.source, m.mid) not in mids:
                mids.add((m.source, m.mid))
                out.append(m)
        return out

    def handle(self, data: bytes, addr: tuple[str, int],
               transport: asyncio.DatagramTransport) -> None:
        msg = Datagram.decode(data)
        msg.source, msg.at = addr[:2], asyncio.get_running_loop().time()
        self.received.append(msg)
        if msg.code == EMPTY:
            if msg.mtype == ACK and msg.mid in self.acks and not self.acks[msg.mid].done():
                self.acks[msg.mid].set_result(None)
            return
        if not 1 <= msg.code < 32:
            return
        if any(m.mid == msg.mid and m.source == msg.source and m.code == msg.code
               for m in self.received[:-1]):
            return  # a retransmission: the answer (if any) is on its way
        path, query = msg.path, msg.query
        kind = (path[1:] if path[:1] == ["inner"] else path or [""])[0]  # /inner: mounted
        loop = asyncio.get_running_loop()

        def send(answer: Datagram) -> None:
            transport.sendto(answer.encode(), addr)

        def reply(rcode: int, options: list[tuple[int, bytes]] | None = None,
                  payload: bytes = b"") -> None:
            if msg.mtype == CON:
                send(Datagram(ACK, rcode, msg.mid, msg.token, options or [], payload))
            else:
                send(Datagram(NON, rcode, self.next_mid(), msg.token, options or [], payload))

        if kind == "ok":
            reply(code("2.05"), payload=b"ok")
        elif kind == "say":
            loop.call_later(float(query.get("d", "0")), reply, code("2.05"), None,
                            "/".join(path[1:]).encode())
        elif kind == "forged":
            # First a well-formed answer from another port of this host (what a spoofer next
            # to the origin could send: the right token, the wrong address), then the real one.
            forged = Datagram(ACK if msg.mtype == CON else NON, code("2.05"),
                              msg.mid if msg.mtype == CON else self.next_mid(), msg.token, [],
                              b"forged")
            self.spoofer.sendto(forged.encode(), addr)
            loop.call_later(0.1, reply, code("2.05"), None, b"real")
        elif kind == "slow":
            loop.call_later(float(query.get("d", "1")), reply, code("2.05"), None, b"slow ok")
        elif kind == "sep":
            send(Datagram(ACK, EMPTY, msg.mid))
            mid = self.next_mid()
            self.acks[mid] = loop.create_future()
            self.separate[msg.token] = mid
            loop.call_later(float(query.get("d", "0.3")), send,
                            Datagram(CON, code("2.05"), mid, msg.token, [], b"separate ok"))
        elif kind == "sepdup":  # the separate answer twice, as if our first ACK was lost
            send(Datagram(ACK, EMPTY, msg.mid))
            mid = self.next_mid()
            self.separate[msg.token] = mid
            answer = Datagram(CON, code("2.05"), mid, msg.token, [], b"separate once")
            loop.call_later(0.2, send, answer)
            loop.call_later(0.35, send, answer)
        elif kind == "late":  # answers after S seconds, when the proxy has given up
            def late() -> None:
                reply(code("2.05"), None, b"too late")
                self.late.add("/".join(path))

            loop.call_later(float(query["d"]), late)
        elif kind == "blocky":  # a 100-byte answer in 64-byte blocks, asked for or not
            body = bytes(range(100))
            num = int.from_bytes(msg.one(BLOCK2) or b"", "big") >> 4
            piece = body[num * 64:num * 64 + 64]
            more = int(num * 64 + 64 < len(body))
            reply(code("2.05"), [(BLOCK2, uint(num << 4 | more << 3 | 2) or b"")], piece)
        elif kind == "challenge":  # RFC 9175: 4.01 + Echo, then the answer to the repetition
            if msg.one(ECHO) == b"\x0e\x0c\x80":
                reply(code("2.04"), payload=b"echoed")
            else:
                reply(code("4.01"), [(ECHO, b"\x0e\x0c\x80")])
        elif kind == "observed":  # an Observe option in the answer to a plain GET
            reply(code("2.05"), [(OBSERVE, uint(7))], b"seen")
        elif kind == "rst":
            send(Datagram(RST, EMPTY, msg.mid))
        elif kind == "opts":
            reply(code("2.05"), answer_options(int(query.get("cf", "60"))), b"opts body")
        elif kind == "unsafe":
            reply(code("2.05"), [(int(query["n"]), b"u")], b"x")
        elif kind == "create":
            reply(code("2.01"), [(LOCATION_PATH, s.encode()) for s in [*path[:-1], "made"]])
        elif kind == "loc":
            reply(code("2.01"), [(LOCATION_PATH, s.encode()) for s in query["p"].split("/")]
                  + [(LOCATION_QUERY, b"q=1")])
        elif kind == "hop508":
            reply(code("5.08"), payload=b"origin-trace")
        elif kind == "big":
            reply(code("2.04"), payload=b"z" * 900)
        elif kind == "raw":  # an answer with the code and the bytes after the token given
            mtype = ACK if msg.mtype == CON else NON
            mid = msg.mid if msg.mtype == CON else self.next_mid()
            head = bytes([0x40 | mtype << 4 | len(msg.token), int(query["c"], 16)])
            transport.sendto(head + mid.to_bytes(2, "big") + msg.token
                             + bytes.fromhex(query.get("rest", "")), addr)
        elif kind == "counted":  # GET: how many unsafe requests it had (Max-Age 60)
            key = "/".join(path)
            if msg.code == GET:
                reply(code("2.05"), [(MAX_AGE, uint(60))],
                      str(self.changes.get(key, 0)).encode())
            else:
                self.changes[key] = self.changes.get(key, 0) + 1
                reply({POST: code("2.04"), PUT: code("2.04"), DELETE: code("2.02")}.get(
                    msg.code, code("4.05")))
        else:
            reply(code("4.04"))

    def next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid


class _Socket(asyncio.DatagramProtocol):
    """One of the raw origin's sockets."""

    def __init__(self, origin: RawOrigin) -> None:
        self.origin = origin
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.origin.transports.append(self.transport)  # type: ignore[arg-type]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.origin.handle(data, addr, self.transport)

    def error_received(self, exc: Exception) -> None:
        pass


def answer_options(content_format: int) -> list[tuple[int, bytes]]:
    """What ``opts`` answers with: ETag, Location-Path, an (empty) OSCORE option,
    Content-Format, Max-Age, Size2 and unknown safe-to-forward options, elective (65000) and
    critical (65001)."""
    return [(ETAG, b"\x01\x02\x03\x04"), (LOCATION_PATH, b"l1"), (LOCATION_PATH, b"l2"),
            (OSCORE, b""), (CONTENT_FORMAT, uint(content_format)), (MAX_AGE, uint(120)),
            (SIZE2, uint(9)), (65000, b"elective-safe"), (65001, b"\x00critical-safe")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def upstream() -> AsyncIterator[tuple[RawOrigin, int]]:
    """The raw origin on 127.0.0.1 and, where it can, on [::1] with the same port (the name
    ``localhost`` may resolve to either)."""
    loop = asyncio.get_running_loop()
    origin = RawOrigin()
    await loop.create_datagram_endpoint(lambda: _Socket(origin), local_addr=("127.0.0.1", 0))
    port = origin.transports[0].get_extra_info("sockname")[1]
    try:
        await loop.create_datagram_endpoint(lambda: _Socket(origin), local_addr=("::1", port))
    except OSError:
        pass
    try:
        yield origin, port
    finally:
        for t in origin.transports:
            t.close()
        origin.spoofer.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def echo_origin(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    run = await start_origin(tmp_path_factory.mktemp("origin"))
    try:
        yield run
    finally:
        await _stop(run.proc)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def coap_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """coaplayers' coap-server on a plain listener; its host:port."""
    err = tmp_path_factory.mktemp("server") / "server.err"
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("coap-server")), "--listen", "coap://127.0.0.1:0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=open(err, "wb"))
    try:
        line = (await _read_until(proc, "listening", 20))[-1]
        yield line.split()[-1].split("://", 1)[1]
    finally:
        await _stop(proc)


PROXY_ARGS = (
    "--upstream-timeout", str(UPSTREAM_TIMEOUT), "--downstream-ack-timeout", "0.2",
    "--ack-timeout", str(UPSTREAM_ACK_TIMEOUT),
    "--cache-entries", "0", "--allow", "127.0.0.1", "--allow", "::1", "--allow", "localhost",
    "--metrics", "127.0.0.1:0",
)


def _has_flag(flag: str) -> bool:
    help_text = subprocess.run([PROXY, "--help"], capture_output=True, text=True, timeout=30,
                               check=False).stdout
    return flag in help_text


@pytest.fixture
def aiocoap_gap(request: pytest.FixtureRequest,
                path_args: tuple[str, ...]) -> Callable[[str], None]:
    """Marks a test as a known failure (strict) where the proxy forwards through aiocoap:
    ``aiocoap_gap(reason)``, for what the fast path does as RFC 7252 asks and aiocoap not."""

    def mark(reason: str) -> None:
        if path_args or not _has_flag("--no-fast-path"):
            request.node.add_marker(pytest.mark.xfail(reason=reason, strict=True))

    return mark


@pytest.fixture
def fast_path_gap(request: pytest.FixtureRequest,
                  path_args: tuple[str, ...]) -> Callable[[str], None]:
    """Marks a test as a known failure (strict) where the proxy forwards on its fast path:
    what aiocoap's path does and the fast path not yet."""

    def mark(reason: str) -> None:
        if not path_args and _has_flag("--no-fast-path"):
            request.node.add_marker(pytest.mark.xfail(reason=reason, strict=True))

    return mark


@pytest.fixture(scope="module", params=["default", "no-fast-path"])
def path_args(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """Every proxy test runs twice: as coap-proxy starts by default (plain requests take the
    fast path) and with --no-fast-path (everything through aiocoap), so that both ways of
    forwarding are held to the same wire behaviour."""
    if request.param == "default":
        return ()
    if not _has_flag("--no-fast-path"):
        pytest.skip("this coap-proxy has no --no-fast-path")
    return ("--no-fast-path",)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def proxy(tmp_path_factory: pytest.TempPathFactory, upstream: tuple[RawOrigin, int],
                echo_origin: Running, coap_server: str,
                path_args: tuple[str, ...]) -> AsyncIterator[Running]:
    """Forwarding (no cache, no 3x rule), with prefix routes: ``/mnt`` mounts the raw
    origin's ``/inner``, ``/ao`` the aiocoap origin's root, ``/cs`` coap-server's; on
    127.0.0.1 and, where the host has it, [::1]."""
    port = upstream[1]
    v6 = ("--listen", "coap://[::1]:0") if len(upstream[0].transports) > 1 else ()
    run = await start_proxy(
        tmp_path_factory.mktemp("proxy"), *PROXY_ARGS, *path_args,
        "--listen", "coap://127.0.0.1:0", *v6,
        "--route", f"/mnt=coap://127.0.0.1:{port}/inner",
        "--route", f"/ao=coap://{echo_origin.hostport}/",
        "--route", f"/cs=coap://{coap_server}/")
    try:
        yield run
    finally:
        await _stop(run.proc)


def up(port: int, rest: str) -> str:
    return f"coap://127.0.0.1:{port}/{rest}"


def tag() -> str:
    return os.urandom(4).hex()


# -- message layer: types, MIDs, tokens --------------------------------------------------------


async def test_plain_requests_take_the_fast_path_unless_it_is_off(
    client: Client, proxy: Running, upstream: tuple[RawOrigin, int], path_args: tuple[str, ...]
) -> None:
    """What the two runs of this module compare: by default a plain GET and POST are
    forwarded on the fast path (its counter), with --no-fast-path through aiocoap."""
    _, port = upstream
    assert proxy.metrics is not None
    name = "coap_proxy_fast_path_total"
    text = await http_get(proxy.metrics)
    if not path_args and name not in text:
        pytest.skip("this coap-proxy has no fast path")
    before = metric(text, name)
    t = tag()
    for req in (request(CON, GET, up(port, f"ok/{t}"), token=b"f1"),
                request(NON, POST, up(port, f"ok/{t}/2"), token=b"f2")):
        client.send(req)
        answer, _ = await client.answer(req)
        assert answer.code == code("2.05")
    forwarded = metric(await http_get(proxy.metrics), name) - before
    assert forwarded == (0 if path_args else 2)


@pytest.mark.parametrize("token", [b"", b"\x01", b"\xaa\xbb\xcc\xdd", bytes(range(1, 9))])
async def test_con_request_answered_by_piggybacked_ack_with_its_mid_and_token(
    client: Client, upstream: tuple[RawOrigin, int], echo_origin: Running, token: bytes
) -> None:
    origin, port = upstream
    t = tag()
    req = client.send(get := request(CON, GET, up(port, f"ok/{t}"), token=token))
    answer = await client.recv()
    assert (answer.mtype, answer.mid, answer.token) == (ACK, get.mid, token), (req, answer)
    assert (answer.code, answer.payload) == (code("2.05"), b"ok")
    assert len(origin.requests(f"ok/{t}")) == 1
    # A POST to the aiocoap origin, too: its echo comes back in the ACK.
    body = os.urandom(40)
    client.send(post := request(CON, POST, f"coap://{echo_origin.hostport}/echo", token=token,
                                payload=body))
    answer = await client.recv()
    assert (answer.mtype, answer.mid, answer.token) == (ACK, post.mid, token)
    assert (answer.code, answer.payload) == (code("2.04"), body)


@pytest.mark.parametrize("token", [b"", b"\x02", bytes(range(11, 19))])
async def test_non_request_answered_non_with_its_token(
    client: Client, upstream: tuple[RawOrigin, int], echo_origin: Running, token: bytes
) -> None:
    origin, port = upstream
    t = tag()
    client.send(request(NON, GET, up(port, f"ok/{t}"), token=token))
    answer = await client.recv()
    assert (answer.mtype, answer.token, answer.code, answer.payload) == (
        NON, token, code("2.05"), b"ok")
    (seen,) = origin.requests(f"ok/{t}")
    assert seen.mtype == NON  # forwarded as NON too
    body = os.urandom(40)
    client.send(request(NON, POST, f"coap://{echo_origin.hostport}/echo", token=token,
                        payload=body))
    answer = await client.recv()
    assert (answer.mtype, answer.token, answer.code, answer.payload) == (
        NON, token, code("2.04"), body)


async def test_duplicate_con_is_executed_once_and_answered_again(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """RFC 7252 4.5: the same CON again (same MID) gets the same answer, and the upstream is
    asked once."""
    origin, port = upstream
    t = tag()
    data = client.send(req := request(CON, POST, up(port, f"ok/{t}"), token=b"dup1",
                                      payload=b"once"))
    first = await client.recv_raw()
    client.send(data)
    again = await client.recv_raw()
    assert again == first, (Datagram.decode(first), Datagram.decode(again))
    assert Datagram.decode(first).mid == req.mid
    assert len(origin.requests(f"ok/{t}")) == 1


async def test_duplicate_con_while_upstream_works_is_not_forwarded_again(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """The same CON again while the upstream still works on it: acknowledged (empty) or
    ignored, never a second upstream request; the one answer comes as a separate CON."""
    origin, port = upstream
    t = tag()
    data = client.send(req := request(CON, POST, up(port, f"slow/{t}?d=0.6"), token=b"dup2"))
    client.send(data)  # at once: before the proxy could have acknowledged it
    ack = await client.recv()
    assert (ack.mtype, ack.code, ack.mid, ack.token) == (ACK, EMPTY, req.mid, b"")
    client.send(data)  # after the empty ACK, before the answer
    answer, seen = await client.answer(req)
    assert (answer.mtype, answer.code, answer.payload) == (CON, code("2.05"), b"slow ok")
    assert all(m.mid == req.mid and m.code == EMPTY for m in seen[:-1]), seen
    assert len(origin.requests(f"slow/{t}")) == 1
    # Once more after the answer: the empty ACK again, or the answer's repetition, no more.
    client.send(data)
    later = await client.recv()
    assert later.mid in (req.mid, answer.mid) and later.code in (EMPTY, answer.code), later
    assert len(origin.requests(f"slow/{t}")) == 1


async def test_duplicate_non_is_not_executed_twice(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    origin, port = upstream
    t = tag()
    data = client.send(req := request(NON, POST, up(port, f"ok/{t}"), token=b"dup3",
                                      payload=b"first"))
    first = await client.recv()
    assert (first.mtype, first.token, first.code) == (NON, req.token, code("2.05"))
    client.send(data)
    # A request after it, on the same path through the same proxy: once its answer is here,
    # the duplicate would have reached the origin before it.
    client.send(marker := request(NON, POST, up(port, f"ok/{t}"), token=b"mark",
                                  payload=b"marker"))
    answer, seen = await client.answer(marker)
    assert answer.code == code("2.05")
    for m in seen[:-1]:  # whatever came for the duplicate is the first answer again
        assert (m.token, m.code, m.payload) == (first.token, first.code, first.payload), m
    assert [m.payload for m in origin.requests(f"ok/{t}")] == [b"first", b"marker"]


# -- more of the message layer -----------------------------------------------------------------


async def test_concurrent_requests_are_answered_by_token(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """Requests of one client overlap upstream and are answered in another order: each answer
    carries its own request's token (and a piggybacked one its MID)."""
    _, port = upstream
    t = tag()
    reqs = {}
    for i, delay in enumerate((0.4, 0.0, 0.2, 0.05, 0.3)):
        mtype = CON if i % 2 == 0 else NON
        r = request(mtype, GET, up(port, f"say/{t}-{i}?d={delay}"), token=b"c%d" % i)
        reqs[r.token] = r
        client.send(r)
    got: dict[bytes, Datagram] = {}
    while len(got) < len(reqs):
        msg = await client.recv()
        if msg.code == EMPTY:
            assert msg.mtype == ACK and msg.mid in {r.mid for r in reqs.values()}, msg
            continue
        if msg.mtype == CON:
            client.ack(msg)
        assert msg.token in reqs and msg.token not in got, msg
        got[msg.token] = msg
    for token, msg in got.items():
        i = int(token[1:])
        assert msg.payload == f"{t}-{i}".encode(), msg
        assert msg.mtype in ((ACK, CON) if reqs[token].mtype == CON else (NON,)), msg
        if msg.mtype == ACK:
            assert msg.mid == reqs[token].mid


async def test_same_mid_and_token_from_two_clients_are_two_requests(
    client: Client, proxy: Running, upstream: tuple[RawOrigin, int]
) -> None:
    """Deduplication is per client endpoint (RFC 7252 4.5): another port's message with the
    same MID and token is a request of its own."""
    origin, port = upstream
    t = tag()
    other = await new_client(proxy.port)
    try:
        a = request(CON, POST, up(port, f"ok/{t}"), token=b"same", payload=b"from a")
        b = Datagram(a.mtype, a.code, a.mid, a.token,
                     [o for o in a.options], b"from b")
        client.send(a)
        other.send(b)
        (answer_a, _), (answer_b, _) = await asyncio.gather(client.answer(a), other.answer(b))
    finally:
        other.transport.close()
    assert (answer_a.mid, answer_a.code) == (a.mid, code("2.05"))
    assert (answer_b.mid, answer_b.code) == (a.mid, code("2.05"))
    assert sorted(m.payload for m in origin.requests(f"ok/{t}")) == [b"from a", b"from b"]


async def test_ping_is_answered_with_rst(client: Client) -> None:
    """An empty CON (a CoAP ping, RFC 7252 4.3) gets an RST with its MID."""
    client.send(Datagram(CON, EMPTY, 0x2A2A))
    assert await client.recv_raw() == Datagram(RST, EMPTY, 0x2A2A).encode()


@pytest.mark.parametrize(("data", "rejected"), [
    (bytes([0x4F, GET, 0x30, 0x01]) + b"1" * 16, True),  # token length 15 (RFC 8974: error)
    (bytes([0x40, GET, 0x30, 0x02, 0xF0]), True),  # option delta 15
    (bytes([0x40, GET, 0x30, 0x04, 0xD5, 0x02, 0x61]), True),  # option value cut short
    (bytes([0x42, GET, 0x30]), False),  # shorter than a header: no message ID to reset
    (bytes([0x80, GET, 0x30, 0x05]), False),  # version 2: silently ignored (RFC 7252 3)
    (bytes([0x40, GET, 0x30, 0x03, 0xFF]), True),  # a payload marker with no payload
    (bytes([0x41, POST, 0x30, 0x06, 0x61, 0xB2]) + b"ao\x04echo\xff", True),  # routed: /ao
    (bytes([0x50, POST, 0x30, 0x07, 0xFF]), False),  # a NON with no payload after the marker
], ids=["tkl15", "delta15", "short-option", "short-header", "version2", "empty-payload",
        "empty-payload-routed", "empty-payload-non"])
async def test_malformed_datagrams_are_rejected_or_ignored_and_the_proxy_goes_on(
    client: Client, upstream: tuple[RawOrigin, int], data: bytes, rejected: bool
) -> None:
    """RFC 7252 3 and 4.2: a CON with a message format error (a payload marker followed by no
    payload among them) is rejected with an RST of its message ID and otherwise ignored; a
    NON with one, a datagram too short for a message ID or of another version is ignored
    (RFC 7252 3, 4.3). None is forwarded, and the next request works."""
    origin, port = upstream
    before = len(origin.received)
    client.send(data)
    if rejected:
        assert await client.recv_raw() == bytes([0x70, 0]) + data[2:4]
    t = tag()
    client.send(req := request(CON, GET, up(port, f"ok/{t}"), token=b"next"))
    answer, seen = await client.answer(req)
    assert answer.code == code("2.05")
    assert seen == [answer], seen  # nothing else: no answer, no second RST
    assert [m.path for m in origin.received[before:] if m.code] == [["ok", t]]


@pytest.mark.parametrize("token", [b"9" * 9, b"c" * 12, b"x" * 13, b"y" * 20, b"z" * 300])
async def test_long_tokens_come_back_as_sent_or_get_400(
    client: Client, upstream: tuple[RawOrigin, int], token: bytes
) -> None:
    """Tokens of 9 to 12 bytes (TKL 9-12; RFC 8974 extended tokens, read the same way by a
    peer that does not know RFC 8974) come back as sent. Longer ones (TKL 13 and 14 with
    length bytes) get 4.00 with the token echoed, CON and NON, and are not forwarded: RFC
    8974 2.2.2, "If a server supports extended token lengths but receives a request with a
    token of a length it is unwilling or unable to handle, it MUST NOT reject the message,
    as that would imply that extended token lengths are not supported at all. Instead, ...
    if the server will never be able to handle the request (e.g., because the token is too
    large), it SHOULD return a 4.00 (Bad Request) response." (An RST, 2.2.2's answer of a
    server without support, would contradict the answers to 9-12 byte tokens.)"""
    origin, port = upstream
    t = tag()
    before = len(origin.received)
    client.send(req := request(CON, GET, up(port, f"ok/{t}"), token=token))
    if len(token) <= 12:
        assert await client.recv() == Datagram(ACK, code("2.05"), req.mid, token, [], b"ok")
        assert len(origin.requests(f"ok/{t}")) == 1
        return
    answer = await client.recv()
    assert (answer.mtype, answer.mid, answer.token, answer.code) == (
        ACK, req.mid, token, code("4.00")), answer
    client.send(request(NON, GET, up(port, f"ok/{t}/non"), token=token))
    answer = await client.recv()
    assert (answer.mtype, answer.token, answer.code) == (NON, token, code("4.00")), answer
    client.send(after := request(CON, GET, up(port, f"ok/{t}/after"), token=b"after"))
    answer, seen = await client.answer(after)
    assert answer.code == code("2.05") and seen == [answer], seen
    assert [m.path for m in origin.received[before:] if m.code] == [["ok", t, "after"]]


async def test_a_clients_second_con_to_an_upstream_waits_for_the_first(
    client: Client, upstream: tuple[RawOrigin, int]) -> None:
    """RFC 7252 4.7 (NSTART = 1): a client, proxies included, MUST limit its outstanding
    interactions with a server. aiocoap's path sends a client's second CON request to an
    upstream once the first is acknowledged (per upstream socket, so other clients' are not
    held); both answers still come."""
    origin, port = upstream
    t = tag()
    client.send(first := request(CON, POST, up(port, f"say/{t}/a?d=0.4"), token=b"a"))
    await until(lambda: origin.requests(f"say/{t}/a"), timeout=WAIT)  # the first is out
    client.send(second := request(CON, POST, up(port, f"ok/{t}/b"), token=b"b"))
    answers = {}
    while len(answers) < 2:
        msg = await client.recv()
        if msg.code:
            answers[msg.token] = msg
            if msg.mtype == CON:
                client.ack(msg)
    assert answers[b"a"].payload == f"{t}/a".encode() and answers[b"b"].payload == b"ok"
    (a,) = origin.requests(f"say/{t}/a")
    (b,) = origin.requests(f"ok/{t}/b")
    assert b.at - a.at >= 0.4 - 0.05, (a.at, b.at)  # once the answer to the first went out
    assert first.mid != second.mid


async def test_an_ipv6_client_is_served_alike(
    proxy: Running, upstream: tuple[RawOrigin, int]
) -> None:
    """The same message layer for a client on [::1]: a piggybacked answer with its MID and
    token, the same answer to a duplicate, a NON answer, an empty ACK and a separate CON
    answer, to an IPv6 upstream and an IPv4 one."""
    origin, port = upstream
    v6 = [u for u in proxy.listen if u.startswith("coap://[::1]:")]
    if not v6:
        pytest.skip("no [::1] here")
    client = await new_client(int(v6[0].rsplit(":", 1)[1]), "::1")
    t = tag()
    try:
        for host in ("[::1]", "127.0.0.1"):
            target = f"coap://{host}:{port}"
            data = client.send(req := request(CON, POST, f"{target}/ok/{t}/{host}", token=b"6"))
            raw = await client.recv_raw()
            assert Datagram.decode(raw) == Datagram(ACK, code("2.05"), req.mid, b"6", [], b"ok")
            client.send(data)
            assert await client.recv_raw() == raw
            assert len(origin.requests(f"ok/{t}/{host}")) == 1
            client.send(req := request(NON, GET, f"{target}/ok/{t}/n{host}", token=b"6n"))
            answer = await client.recv()
            assert (answer.mtype, answer.token, answer.payload) == (NON, b"6n", b"ok")
            client.send(req := request(CON, GET, f"{target}/say/{t}?d=0.3", token=b"6s"))
            answer, seen = await client.answer(req)
            assert seen[0] == Datagram(ACK, EMPTY, req.mid)
            assert (answer.mtype, answer.payload) == (CON, t.encode())
    finally:
        client.transport.close()


# -- slow and separate answers -----------------------------------------------------------------


async def test_slow_upstream_gives_empty_ack_then_con_answer_repeated_until_acknowledged(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """RFC 7252 5.2.2: an empty ACK first, then the answer as a CON the client acknowledges;
    unacknowledged, it comes again (the same datagram) on --downstream-ack-timeout."""
    origin, port = upstream
    t = tag()
    client.send(req := request(CON, GET, up(port, f"slow/{t}?d=0.5"), token=b"slow1"))
    ack = await client.recv_raw()
    assert ack == Datagram(ACK, EMPTY, req.mid).encode()  # 4 bytes: no token, no options
    first = await client.recv_raw()
    sent_at = time.monotonic()
    answer = Datagram.decode(first)
    assert (answer.mtype, answer.token, answer.code, answer.payload) == (
        CON, b"slow1", code("2.05"), b"slow ok")
    assert answer.mid != req.mid
    again = await client.recv_raw(timeout=2.0)  # not acknowledged: sent again, within 0.2-0.3 s
    assert again == first
    assert time.monotonic() - sent_at < 1.5
    client.ack(answer)
    # Acknowledged: no more of it (a request after it is answered, and nothing else came).
    client.send(after := request(CON, GET, up(port, f"ok/{t}"), token=b"after"))
    while (msg := await client.recv(timeout=2.0)).mid == answer.mid:
        pass  # a repetition already on its way when the ACK arrived
    assert (msg.mtype, msg.mid, msg.token) == (ACK, after.mid, b"after")
    assert len(origin.requests(f"slow/{t}")) == 1


async def test_separate_answer_from_upstream_is_acknowledged_upstream(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    origin, port = upstream
    t = tag()
    client.send(req := request(CON, GET, up(port, f"sep/{t}?d=0.3"), token=b"sep1"))
    answer, _ = await client.answer(req)
    assert (answer.code, answer.payload, answer.token) == (code("2.05"), b"separate ok", b"sep1")
    (forwarded,) = origin.requests(f"sep/{t}")
    assert forwarded.mtype == CON
    # The origin's CON answer was acknowledged with an empty ACK of its MID.
    mid = origin.separate[forwarded.token]
    await asyncio.wait_for(origin.acks[mid], WAIT)
    acks = [m for m in origin.received if m.mtype == ACK and m.mid == mid]
    assert acks and all(a.code == EMPTY and a.token == b"" and not a.options for a in acks)


# -- upstream failures -------------------------------------------------------------------------


async def test_closed_upstream_port_is_504_at_once(client: Client) -> None:
    t0 = time.monotonic()
    client.send(req := request(CON, GET, up(free_udp_port(), "x"), token=b"gone"))
    answer, _ = await client.answer(req)
    elapsed = time.monotonic() - t0
    assert answer.code == code("5.04") and b"unreachable" in answer.payload, answer
    assert elapsed < UPSTREAM_TIMEOUT / 2, elapsed


@pytest.mark.parametrize("mtype", [CON, NON])
async def test_silent_upstream_is_504_after_the_upstream_timeout_and_a_late_answer_dropped(
    client: Client, upstream: tuple[RawOrigin, int], mtype: int
) -> None:
    """The origin is silent for --upstream-timeout: 5.04 (after an empty ACK for a CON). Its
    answer after that reaches nobody."""
    origin, port = upstream
    t = tag()
    t0 = time.monotonic()
    client.send(req := request(mtype, GET, up(port, f"late/{t}?d={UPSTREAM_TIMEOUT + 0.3}"),
                               token=b"hush"))
    answer, seen = await client.answer(req, timeout=UPSTREAM_TIMEOUT + WAIT)
    elapsed = time.monotonic() - t0
    assert answer.code == code("5.04") and b"timeout" in answer.payload, answer
    assert UPSTREAM_TIMEOUT - 0.1 <= elapsed < UPSTREAM_TIMEOUT + 1.5, elapsed
    if mtype == CON:
        assert seen[0] == Datagram(ACK, EMPTY, req.mid)  # acknowledged long before
    assert answer.mtype == mtype
    assert len(origin.requests(f"late/{t}")) == 1
    sent = [m for m in origin.received if m.path == ["late", t]]
    assert sent[0].mtype == mtype
    if mtype == CON:
        # Meanwhile the CON went upstream again on --ack-timeout (RFC 7252 4.2), unchanged:
        # first at about 0.3-0.45 s, within the 1 s.
        assert len(sent) >= 2 and all(m == sent[0] for m in sent), sent
    await until(lambda: f"late/{t}" in origin.late, timeout=WAIT)
    client.send(after := request(CON, GET, up(port, f"ok/{t}"), token=b"after"))
    marker, seen = await client.answer(after)
    assert marker.code == code("2.05")
    assert all(m.mid == answer.mid and m.code == answer.code for m in seen[:-1]), seen


async def test_after_a_504_the_clients_next_con_to_that_upstream_goes_at_once(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """The upstream is alive but silent past --upstream-timeout: the client gets 5.04, and
    the proxy stops sending that request (its answer is no longer expected), so it no longer
    counts against NSTART (RFC 7252 4.7: an interaction is outstanding while its answer "is
    still expected"): the client's next CON to the same upstream is forwarded at once, not
    after the abandoned one's retransmissions (or its late answer)."""
    origin, port = upstream
    t = tag()
    loop = asyncio.get_running_loop()
    client.send(req := request(CON, GET, up(port, f"late/{t}?d=4"), token=b"ab"))
    answer, _ = await client.answer(req, timeout=UPSTREAM_TIMEOUT + WAIT)
    assert answer.code == code("5.04"), answer
    failed_at = loop.time()
    client.send(after := request(CON, GET, up(port, f"ok/{t}"), token=b"next"))
    answer, _ = await client.answer(after, timeout=1.0)
    assert (answer.code, answer.payload) == (code("2.05"), b"ok"), answer
    (forwarded,) = origin.requests(f"ok/{t}")
    assert forwarded.at - failed_at < 0.5, forwarded.at - failed_at
    # and the abandoned request is not sent again (one already on its way aside)
    await asyncio.sleep(UPSTREAM_ACK_TIMEOUT * 4)  # when the next retransmissions were due
    again = [m for m in origin.received if m.path == ["late", t] and m.at > failed_at + 0.05]
    assert not again, again


async def test_separate_answer_sent_twice_upstream_is_acknowledged_twice_and_relayed_once(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """The origin sends its separate CON answer again (its ACK lost): the proxy acknowledges
    that copy too (RFC 7252 4.5: each duplicate CON SHOULD be acknowledged), never resets it,
    and the client gets the answer once (a repetition of the proxy's own CON is the same
    message, same MID)."""
    origin, port = upstream
    t = tag()
    client.send(req := request(CON, GET, up(port, f"sepdup/{t}"), token=b"sd"))
    answer, _ = await client.answer(req)
    assert (answer.code, answer.payload) == (code("2.05"), b"separate once")
    (forwarded,) = origin.requests(f"sepdup/{t}")
    mid = origin.separate[forwarded.token]
    await until(lambda: len([m for m in origin.received if m.mtype == ACK and m.mid == mid])
                >= 2, timeout=2.0)  # the second copy goes 0.15 s after the first
    assert not [m for m in origin.received if m.mtype == RST and m.mid == mid]
    client.send(after := request(CON, GET, up(port, f"ok/{t}"), token=b"after"))
    marker, seen = await client.answer(after)
    assert marker.code == code("2.05")
    assert all(m.mid == answer.mid and m.payload == answer.payload for m in seen[:-1]), seen


async def test_client_reset_ends_the_separate_answers_retransmission(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """RFC 7252 4.2: an RST to the proxy's separate CON answer ends its retransmission."""
    _, port = upstream
    t = tag()
    client.send(req := request(CON, GET, up(port, f"say/{t}?d=0.3"), token=b"rs"))
    ack = await client.recv()
    assert (ack.mtype, ack.code, ack.mid) == (ACK, EMPTY, req.mid)
    answer = await client.recv()
    assert (answer.mtype, answer.token, answer.payload) == (CON, b"rs", t.encode())
    client.send(Datagram(RST, EMPTY, answer.mid))
    # Unanswered, it would come again after 0.2-0.3 s (--downstream-ack-timeout).
    with pytest.raises(TimeoutError):
        while True:
            again = await client.recv(timeout=0.7)
            assert again.mid == answer.mid, again  # at most one already on its way


async def test_upstream_rst_is_502(client: Client, upstream: tuple[RawOrigin, int]) -> None:
    origin, port = upstream
    t = tag()
    t0 = time.monotonic()
    client.send(req := request(CON, GET, up(port, f"rst/{t}"), token=b"rst"))
    answer, _ = await client.answer(req)
    assert answer.code == code("5.02"), answer
    assert time.monotonic() - t0 < UPSTREAM_TIMEOUT / 2
    assert len(origin.requests(f"rst/{t}")) == 1


@pytest.mark.parametrize("number", [65002, 65003])  # elective and critical, both unsafe
async def test_upstream_answer_with_unknown_unsafe_option_is_502(
    client: Client, upstream: tuple[RawOrigin, int], number: int
) -> None:
    _, port = upstream
    client.send(req := request(CON, GET, up(port, f"unsafe/{tag()}?n={number}"), token=b"uo"))
    answer, _ = await client.answer(req)
    assert answer.code == code("5.02") and str(number).encode() in answer.payload, answer
    assert answer.one(number) is None


async def test_non_request_failures_are_answered_non(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """A NON request is never acknowledged: its 5.04 (closed port), its answer to an upstream
    RST and its slow answer come as NON, with its token.

    An RST to a forwarded NON ends in 5.04 after the upstream timeout (aiocoap does not match
    an RST to a NON request); 5.02 at once would say more, and is accepted too."""
    origin, port = upstream
    t = tag()
    # The closed port alone: its ICMP error could fail the others (see the report in
    # test_a_closed_port_does_not_fail_other_upstreams).
    client.send(request(NON, GET, up(free_udp_port(), "x"), token=b"n1"))
    gone = await client.recv()
    assert (gone.mtype, gone.token, gone.code) == (NON, b"n1", code("5.04")), gone
    cases = [(up(port, f"rst/{t}"), b"n2", {code("5.02"), code("5.04")}),
             (up(port, f"say/{t}?d=0.4"), b"n3", {code("2.05")})]
    for target, token, _ in cases:
        client.send(request(NON, GET, target, token=token))
    got = {}
    while len(got) < len(cases):
        msg = await client.recv(timeout=UPSTREAM_TIMEOUT + WAIT)
        assert msg.mtype == NON and msg.code != EMPTY, msg
        got[msg.token] = msg.code
    for _, token, rcodes in cases:
        assert got[token] in rcodes, (token, got)
    (forwarded,) = origin.requests(f"rst/{t}")
    assert forwarded.mtype == NON


async def test_an_answer_from_another_address_is_not_relayed(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """An answer with the right token (and MID) but from another port than the upstream's is
    not the upstream's answer (RFC 7252 5.3.2): the client gets the real one."""
    _, port = upstream
    t = tag()
    for mtype in (CON, NON):
        client.send(req := request(mtype, GET, up(port, f"forged/{t}/{mtype}"), token=b"f"))
        answer, _ = await client.answer(req)
        assert (answer.code, answer.payload) == (code("2.05"), b"real"), answer


@pytest.mark.parametrize(("uri_rest", "path", "query"), [
    ("ok/{t}/a%2Fb/c%20d/%C3%A9", ["ok", "{t}", "a/b", "c d", "é"], []),
    ("ok/{t}/?q=a%26b&r=%3D&s", ["ok", "{t}", ""], ["q=a&b", "r==", "s"]),
    # RFC 3986 5.2.4 (reference resolution, RFC 7252 6.4 step 2): dot segments removed
    ("x/../ok/./{t}/a/%2E%2E/b/./c/..?q=.", ["ok", "{t}", "b", ""], ["q=."]),
    ("../ok/{t}//d/.", ["ok", "{t}", "", "d", ""], []),
])
async def test_proxy_uri_is_decoded_into_uri_path_and_uri_query(
    client: Client, upstream: tuple[RawOrigin, int], uri_rest: str, path: list[str],
    query: list[str]
) -> None:
    """RFC 7252 6.4: dot segments removed, percent-encoding decoded, empty segments kept,
    each query argument one Uri-Query."""
    origin, port = upstream
    t = tag()
    client.send(req := request(CON, GET, up(port, uri_rest.replace("{t}", t)), token=b"pe"))
    answer, _ = await client.answer(req)
    assert answer.code == code("2.05"), answer
    (got,) = [m for m in origin.received if m.code and m.opt(URI_PATH)[1:2] == [t.encode()]]
    assert got.opt(URI_PATH) == [p.replace("{t}", t).encode() for p in path]
    assert got.opt(URI_QUERY) == [q.encode() for q in query]


async def test_ipv6_literal_gets_no_uri_host(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    origin, port = upstream
    if len(origin.transports) < 2:
        pytest.skip("no [::1] here")
    t = tag()
    client.send(req := request(CON, GET, f"coap://[::1]:{port}/ok/{t}", token=b"v6"))
    answer, _ = await client.answer(req)
    assert answer.code == code("2.05"), answer
    (got,) = origin.requests(f"ok/{t}")
    assert not got.opt(URI_HOST) and not got.opt(URI_PORT)


# -- what the proxy answers itself -------------------------------------------------------------


@pytest.mark.parametrize(("target", "options", "rcode", "why"), [
    ("{up}/ok", [(65003, b"u")], "4.02", b"65003"),  # unknown critical unsafe
    ("{up}/ok", [(65002, b"u")], "4.02", b"65002"),  # unknown elective unsafe
    ("coap://192.0.2.1/ok", [], "4.03", b""),  # not allowed
    ("ftp://127.0.0.1/ok", [], "5.05", b""),  # no such scheme
    ("coap://[::1/ok", [], "4.00", b""),  # not a URI
    (None, [], "5.05", b""),  # no Proxy-Uri, no route
])
async def test_requests_the_proxy_refuses_itself_get_their_mid_and_token(
    client: Client, upstream: tuple[RawOrigin, int], target: str | None,
    options: list[tuple[int, bytes]], rcode: str, why: bytes
) -> None:
    origin, port = upstream
    before = len(origin.received)
    uri = None if target is None else target.replace("{up}", f"coap://127.0.0.1:{port}")
    client.send(req := request(CON, GET, uri, token=b"no", options=options))
    answer = await client.recv()
    assert (answer.mtype, answer.mid, answer.token) == (ACK, req.mid, b"no"), answer
    assert answer.code == code(rcode), answer
    assert why in answer.payload
    assert len(origin.received) == before


async def test_a_closed_port_does_not_fail_other_upstreams(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """Requests to a closed port and to a live upstream, interleaved: each closed-port one is
    5.04, and every live one is answered by the live upstream (an ICMP error for one upstream
    is not another's)."""
    origin, port = upstream
    t = tag()
    closed = free_udp_port()
    expected = {}
    for i in range(8):
        client.send(request(NON, GET, up(closed, f"x{i}"), token=b"c%d" % i))
        expected[b"c%d" % i] = code("5.04")
        client.send(request(NON, GET, up(port, f"say/{t}/{i}"), token=b"l%d" % i))
        expected[b"l%d" % i] = code("2.05")
    got = {}
    while len(got) < len(expected):
        msg = await client.recv(timeout=UPSTREAM_TIMEOUT + WAIT)
        got[msg.token] = (msg.code, msg.payload)
    assert {k: v[0] for k, v in got.items()} == expected, got
    assert len(origin.requests(f"say/{t}/0")) == 1



async def non_answers(client: Client, port: int, cases: list[tuple[str, str]]) -> list[int]:
    """The codes the client gets for NON requests whose answers are ``raw`` ones (code and
    bytes after the token, in hex), asked at once."""
    t = tag()
    tokens = {}
    for i, (c, rest) in enumerate(cases):
        client.send(req := request(NON, GET, up(port, f"raw/{t}/{i}?c={c}&rest={rest}"),
                                   token=b"r%d" % i))
        tokens[req.token] = i
    got: dict[int, int] = {}
    while len(got) < len(cases):
        msg = await client.recv(timeout=UPSTREAM_TIMEOUT + WAIT)
        assert msg.mtype == NON and msg.token in tokens, msg
        got[tokens[msg.token]] = msg.code
    return [got[i] for i in range(len(cases))]


async def test_an_answer_whose_code_is_no_response_code_is_not_relayed(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """Codes 6.xx and 7.xx are no response codes over UDP (7.xx are RFC 8323's signals, for
    reliable transports only): such an "answer" is not passed on as one. aiocoap's path
    ignores it (5.04 after the upstream timeout); 5.02 at once would do too."""
    assert set(await non_answers(client, upstream[1], [("c0", ""), ("e1", "ff41")])) <= {
        code("5.02"), code("5.04")}


async def test_a_malformed_answer_is_not_relayed(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """RFC 7252 3: an option cut short or with delta 15 is a format error; the client gets
    5.02 at once (the fast path) or 5.04 after the upstream timeout (aiocoap drops it)."""
    assert set(await non_answers(client, upstream[1], [("45", "d5026"), ("45", "f0")])) <= {
        code("5.02"), code("5.04")}


async def test_an_answer_with_a_payload_marker_and_no_payload_is_not_relayed(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """RFC 7252 3: a payload marker followed by no payload MUST be processed as a message
    format error: the client gets 5.02 at once, to a NON and to a CON request (whose
    piggybacked answer it was: the proxy does not send its request again either)."""
    origin, port = upstream
    assert await non_answers(client, port, [("45", "ff")]) == [code("5.02")]
    t = tag()
    started = time.monotonic()
    client.send(req := request(CON, GET, up(port, f"raw/{t}?c=45&rest=ff"), token=b"rc"))
    answer, _ = await client.answer(req)
    assert answer.code == code("5.02"), answer
    assert time.monotonic() - started < UPSTREAM_TIMEOUT / 2
    await asyncio.sleep(UPSTREAM_ACK_TIMEOUT * 2)  # when a retransmission would have come
    assert len([m for m in origin.received if m.path == ["raw", t]]) == 1


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("content_format", [0, 60, 11542])
async def test_safe_answer_options_pass_byte_exact(
    client: Client, upstream: tuple[RawOrigin, int], content_format: int
) -> None:
    """ETag, Location-Path, Content-Format (0 is an empty value), Max-Age, Size2 and unknown
    safe-to-forward options, elective and critical, reach the client as the origin sent them."""
    _, port = upstream
    client.send(req := request(CON, GET, up(port, f"opts/{tag()}?cf={content_format}"),
                               token=b"op"))
    answer, _ = await client.answer(req)
    assert answer.code == code("2.05") and answer.payload == b"opts body"
    assert answer.options == answer_options(content_format)


KNOWN_UNTOUCHED = [(IF_MATCH, b"\x01\x02\x03"), (IF_MATCH, b""), (ETAG, b"e1"), (ETAG, b"e2"),
                   (IF_NONE_MATCH, b""), (OSCORE, b"\x09\x07\x01\x42"), (CONTENT_FORMAT, b""),
                   (ACCEPT, uint(60)), (SIZE1, uint(1000))]


@pytest.mark.parametrize("untouched", [
    KNOWN_UNTOUCHED, [*KNOWN_UNTOUCHED, (65000, b"\x00\xff"), (65001, b"crit-safe")],
], ids=["known", "and-unknown-safe"])
async def test_request_options_and_payload_pass_byte_exact_and_routing_ones_are_consumed(
    client: Client, upstream: tuple[RawOrigin, int], untouched: list[tuple[int, bytes]]
) -> None:
    """Options the proxy must not touch (If-Match, ETag, If-None-Match, Content-Format,
    Accept, Size1, the OSCORE option; unknown safe-to-forward ones) and a ciphertext-like
    payload arrive as sent; Proxy-Uri becomes Uri-Path and Uri-Query, with no Uri-Host for an
    IP literal; Hop-Limit is added."""
    origin, port = upstream
    t = tag()
    body = bytes(range(256)) + os.urandom(100)
    client.send(req := request(CON, POST, up(port, f"ok/{t}/b?x=1&y"), token=b"opts",
                               options=untouched, payload=body))
    answer, _ = await client.answer(req)
    assert answer.code == code("2.05")
    (got,) = origin.requests(f"ok/{t}/b")
    assert got.code == POST and got.payload == body
    assert [o for o in got.options if o[0] not in (URI_PATH, URI_QUERY, HOP_LIMIT)] == untouched
    assert got.opt(URI_QUERY) == [b"x=1", b"y"]
    assert got.opt(HOP_LIMIT) == [b"\x10"]  # RFC 8768: inserted with 16


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_proxy_scheme_and_uri_host_are_consumed_and_uri_host_kept_for_names(
    client: Client, upstream: tuple[RawOrigin, int], host: str
) -> None:
    """The other forward form (Proxy-Scheme, Uri-Host, Uri-Port, Uri-Path): none of the three
    goes upstream, except Uri-Host when the upstream is named (RFC 7252 6.4)."""
    origin, port = upstream
    if host == "localhost" and len(origin.transports) < 2 and socket.getaddrinfo(
            "localhost", port, type=socket.SOCK_DGRAM)[0][0] == socket.AF_INET6:
        pytest.skip("localhost resolves to ::1 first and [::1] is not available here")
    t = tag()
    options = [(PROXY_SCHEME, b"coap"), (URI_HOST, host.encode()), (URI_PORT, uint(port)),
               (URI_PATH, b"ok"), (URI_PATH, t.encode())]
    client.send(req := Datagram(CON, GET, next(_mids), b"ps", options))
    answer, _ = await client.answer(req)
    assert answer.code == code("2.05"), answer
    (got,) = origin.requests(f"ok/{t}")
    assert got.opt(URI_HOST) == ([] if host == "127.0.0.1" else [b"localhost"])
    assert not got.opt(URI_PORT) and not got.opt(PROXY_SCHEME) and not got.opt(PROXY_URI)
    # And by Proxy-Uri, a name is kept as Uri-Host too.
    client.send(req := request(CON, GET, f"coap://{host}:{port}/ok/{t}/u", token=b"pu"))
    answer, _ = await client.answer(req)
    assert answer.code == code("2.05"), answer
    (got,) = origin.requests(f"ok/{t}/u")
    assert got.opt(URI_HOST) == ([] if host == "127.0.0.1" else [b"localhost"])
    assert not got.opt(URI_PORT) and not got.opt(PROXY_URI)


async def test_mounted_route_maps_location_path_back(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    """/mnt mounts the origin's /inner: a Location-Path under /inner comes back under /mnt
    (the query untouched), one elsewhere unchanged."""
    origin, _ = upstream
    t = tag()
    client.send(req := request(CON, POST, path=f"mnt/create/{t}", token=b"mk"))
    answer, _ = await client.answer(req)
    assert answer.code == code("2.01")
    assert answer.opt(LOCATION_PATH) == [b"mnt", b"create", b"made"]
    assert len(origin.requests(f"inner/create/{t}")) == 1
    client.send(req := request(CON, POST, path=f"mnt/loc?p=elsewhere/{t}", token=b"mk2"))
    answer, _ = await client.answer(req)
    assert answer.options == [(LOCATION_PATH, b"elsewhere"), (LOCATION_PATH, t.encode()),
                              (LOCATION_QUERY, b"q=1")]


@pytest.mark.parametrize(("kind", "rcode", "options", "payload"), [
    ("blocky", "2.05", [(BLOCK2, b"\x0a")], bytes(range(64))),  # block 0 of 2, more
    ("challenge", "4.01", [(ECHO, b"\x0e\x0c\x80")], b""),
    ("observed", "2.05", [(OBSERVE, b"\x07")], b"seen"),
])
async def test_answers_options_for_the_client_are_relayed_as_they_are(
    client: Client, upstream: tuple[RawOrigin, int], kind: str, rcode: str,
    options: list[tuple[int, bytes]], payload: bytes
) -> None:
    """What the origin says to the client passes unchanged: a block the request did not ask
    for (the client fetches the rest), the origin's own RFC 9175 challenge (the client answers
    it), an Observe option the request did not ask for."""
    _, port = upstream
    t = tag()
    for mtype in (CON, NON):
        client.send(req := request(mtype, GET, up(port, f"{kind}/{t}/{mtype}"), token=b"as"))
        answer, _ = await client.answer(req)
        assert (answer.code, answer.options, answer.payload) == (
            code(rcode), options, payload), answer
    if kind == "blocky":  # the rest, asked for (through aiocoap's path: Block2 is not plain)
        client.send(req := request(CON, GET, up(port, f"{kind}/{t}/last"), token=b"b1",
                                   options=[(BLOCK2, b"\x12")]))
        answer, _ = await client.answer(req)
        assert (answer.code, answer.options, answer.payload) == (
            code("2.05"), [(BLOCK2, b"\x12")], bytes(range(64, 100))), answer


async def test_the_origins_echo_challenge_is_answered_by_the_client_through_the_proxy(
    client: Client, upstream: tuple[RawOrigin, int]
) -> None:
    origin, port = upstream
    t = tag()
    client.send(req := request(CON, POST, up(port, f"challenge/{t}"), token=b"e1"))
    answer, _ = await client.answer(req)
    assert answer.code == code("4.01")
    echo = answer.one(ECHO)
    assert echo is not None
    client.send(again := request(CON, POST, up(port, f"challenge/{t}"), token=b"e2",
                                 options=[(ECHO, echo)]))
    answer, _ = await client.answer(again)
    assert (answer.code, answer.payload) == (code("2.04"), b"echoed")
    assert [m.one(ECHO) for m in origin.requests(f"challenge/{t}")] == [None, echo]


# -- RFC 8768 Hop-Limit ------------------------------------------------------------------------


async def test_hop_limit_inserted_decremented_and_exhausted(
    client: Client, upstream: tuple[RawOrigin, int], proxy: Running
) -> None:
    origin, port = upstream
    t = tag()
    for given, forwarded in ((None, b"\x10"), (5, b"\x04"), (2, b"\x01"), (255, b"\xfe")):
        options = [] if given is None else [(HOP_LIMIT, uint(given))]
        client.send(req := request(CON, GET, up(port, f"ok/{t}/{given}"), token=b"hl",
                                   options=options))
        answer, _ = await client.answer(req)
        assert answer.code == code("2.05")
        (got,) = origin.requests(f"ok/{t}/{given}")
        assert got.opt(HOP_LIMIT) == [forwarded], given
    # 0 is no Hop-Limit value (RFC 8768 3): 4.00, whether encoded empty or as a zero byte;
    # the value is one byte (RFC 8768 3: length 1, values above 255 MUST get 4.00), so a
    # longer encoding is refused too, even of a valid number.
    for zero in (b"", b"\x00", b"\x01\x00", b"\x00\x05", b"\x00\x00\x10"):
        client.send(req := request(CON, GET, up(port, f"ok/{t}/zero"), token=b"hl0",
                                   options=[(HOP_LIMIT, zero)]))
        answer, _ = await client.answer(req)
        assert answer.code == code("4.00"), answer
    assert not origin.requests(f"ok/{t}/zero")
    # At 1 the proxy answers itself with its name, and the origin sees nothing.
    client.send(req := request(CON, GET, up(port, f"ok/{t}/last"), token=b"hl1",
                               options=[(HOP_LIMIT, b"\x01")]))
    answer, _ = await client.answer(req)
    assert (answer.code, answer.payload) == (code("5.08"), proxy.hostport.encode())
    assert not origin.requests(f"ok/{t}/last")
    # A 5.08 from further on gets this proxy's name in front (the RFC 8768 trace).
    client.send(req := request(CON, GET, up(port, f"hop508/{t}"), token=b"hl2"))
    answer, _ = await client.answer(req)
    assert (answer.code, answer.payload) == (
        code("5.08"), proxy.hostport.encode() + b" origin-trace")


# -- the 3x rule -------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guarded_proxy(tmp_path_factory: pytest.TempPathFactory,
                        path_args: tuple[str, ...]) -> AsyncIterator[Running]:
    """Forwarding with the 3x rule on (the default factor) and no cache."""
    run = await start_proxy(tmp_path_factory.mktemp("guarded"), *PROXY_ARGS, *path_args,
                            amplification=True)
    try:
        yield run
    finally:
        await _stop(run.proc)


async def test_unverified_client_gets_an_echo_challenge_and_the_held_answer_once(
    guarded_proxy: Running, upstream: tuple[RawOrigin, int]
) -> None:
    """A POST whose 900-byte answer is far more than 3x the request: the client gets 4.01 with
    an Echo value (RFC 9175) within 3x, and the repetition with that Echo the answer the
    origin gave, which executed the POST once; the verified address then gets whole answers."""
    origin, port = upstream
    t = tag()
    client = await new_client(guarded_proxy.port)
    try:
        first_sent = client.send(req := request(CON, POST, up(port, f"big/{t}"), token=b"3x",
                                                payload=b"go"))
        raw = await client.recv_raw()
        challenge = Datagram.decode(raw)
        assert len(raw) <= 3 * len(first_sent), (len(raw), len(first_sent))
        assert (challenge.mtype, challenge.mid, challenge.token, challenge.code) == (
            ACK, req.mid, b"3x", code("4.01")), challenge
        echo = challenge.one(ECHO)
        assert echo
        again = request(CON, POST, up(port, f"big/{t}"), token=b"3x", payload=b"go",
                        options=[(ECHO, echo)])
        client.send(again)
        answer, _ = await client.answer(again)
        assert (answer.code, answer.payload) == (code("2.04"), b"z" * 900)
        assert len(origin.requests(f"big/{t}")) == 1
        assert all(m.one(ECHO) is None for m in origin.requests(f"big/{t}"))  # ours, not sent on
        for method in (POST, GET):
            client.send(later := request(CON, method, up(port, f"big/{t}/{method}"),
                                         token=b"3y", payload=b"go"))
            answer, _ = await client.answer(later)
            assert (answer.code, answer.payload) == (code("2.04"), b"z" * 900)
    finally:
        client.transport.close()
    # A NON request from another (unverified) address: the challenge comes as NON.
    other = await new_client(guarded_proxy.port)
    try:
        sent = other.send(req := request(NON, POST, up(port, f"big/{t}/non"), token=b"3n",
                                         payload=b"go"))
        raw = await other.recv_raw()
        challenge = Datagram.decode(raw)
        assert len(raw) <= 3 * len(sent)
        assert (challenge.mtype, challenge.token, challenge.code) == (NON, b"3n", code("4.01"))
        echo = challenge.one(ECHO)
        assert echo
        other.send(again := request(NON, POST, up(port, f"big/{t}/non"), token=b"3n",
                                    payload=b"go", options=[(ECHO, echo)]))
        answer, _ = await other.answer(again)
        assert (answer.mtype, answer.code, answer.payload) == (NON, code("2.04"), b"z" * 900)
        assert len(origin.requests(f"big/{t}/non")) == 1
    finally:
        other.transport.close()


# -- with the cache, the in-flight bound, and at shutdown --------------------------------------


async def start_limited(tmp: Path, path_args: tuple[str, ...], *args: str) -> Running:
    return await start_proxy(tmp, "--upstream-timeout", str(UPSTREAM_TIMEOUT),
                             "--downstream-ack-timeout", "0.2", "--allow", "127.0.0.1",
                             *args, *path_args)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def caching_proxy(tmp_path_factory: pytest.TempPathFactory,
                        path_args: tuple[str, ...]) -> AsyncIterator[Running]:
    """The response cache on (the default), and at most one exchange in flight."""
    run = await start_limited(tmp_path_factory.mktemp("caching"), path_args,
                              "--max-in-flight", "1")
    try:
        yield run
    finally:
        await _stop(run.proc)


async def test_unsafe_requests_invalidate_what_the_cache_holds_for_their_target(
    caching_proxy: Running, upstream: tuple[RawOrigin, int]
) -> None:
    """RFC 7252 5.9.1: a 2.01/2.02/2.04 answer to an unsafe request (which may take the fast
    path, while a GET is served from the cache) drops the cached answers of that URI."""
    origin, port = upstream
    t = tag()
    client = await new_client(caching_proxy.port)
    try:
        async def ask(method: int, token: bytes) -> Datagram:
            client.send(req := request(CON, method, up(port, f"counted/{t}"), token=token))
            answer, _ = await client.answer(req)
            return answer

        assert (await ask(GET, b"g1")).payload == b"0"
        for i, method in enumerate((POST, PUT, DELETE)):
            assert (await ask(GET, b"h%d" % i)).payload == str(i).encode()  # from the cache
            assert (await ask(method, b"u%d" % i)).code in (code("2.04"), code("2.02"))
            assert (await ask(GET, b"a%d" % i)).payload == str(i + 1).encode()  # fetched anew
        gets = [m for m in origin.requests(f"counted/{t}") if m.code == GET]
        assert len(gets) == 4
    finally:
        client.transport.close()


@pytest.mark.slow
async def test_every_way_an_exchange_ends_frees_its_in_flight_slot(
    caching_proxy: Running, upstream: tuple[RawOrigin, int], echo_origin: Running
) -> None:
    """With --max-in-flight 1, each exchange below ends its own way (answer, separate answer,
    RST, unknown option, closed port, 5.08 relayed, NON, timeout); the next one then still
    finds the slot free, and one sent while another waits gets 5.03 with Max-Age."""
    _, port = upstream
    t = tag()
    client = await new_client(caching_proxy.port)

    async def ask(mtype: int, target: str, token: bytes) -> Datagram:
        client.send(req := request(mtype, POST, target, token=token))
        answer, _ = await client.answer(req, timeout=UPSTREAM_TIMEOUT + WAIT)
        assert answer.code != code("5.03"), (target, answer)
        return answer

    try:
        ends = [(CON, f"ok/{t}"), (CON, f"sep/{t}?d=0.2"), (CON, f"rst/{t}"),
                (CON, f"unsafe/{t}?n=65003"), (CON, None), (CON, f"hop508/{t}"),
                (NON, f"say/{t}"), (NON, f"rst/{t}/non")]
        for i, (mtype, rest) in enumerate(ends):
            await ask(mtype, up(port, rest) if rest else up(free_udp_port(), "gone"),
                      b"e%d" % i)
        # One in flight (the origin answers after 0.5 s): another is refused meanwhile.
        client.send(slow := request(CON, POST, up(port, f"say/{t}/slow?d=0.5"), token=b"s"))
        assert await client.recv() == Datagram(ACK, EMPTY, slow.mid)
        client.send(busy := request(CON, POST, up(port, f"ok/{t}/busy"), token=b"b"))
        refused, _ = await client.answer(busy)
        assert refused.code == code("5.03") and refused.one(MAX_AGE) is not None, refused
        answer, _ = await client.answer(slow)
        assert answer.payload == f"{t}/slow".encode()
        # A timeout last; the next CON to the same upstream and to another still find it.
        assert (await ask(CON, up(port, f"late/{t}?d=5"), b"late")).code == code("5.04")
        assert (await ask(CON, up(port, f"ok/{t}/after"), b"after")).code == code("2.05")
        answer = await ask(CON, f"coap://{echo_origin.hostport}/echo", b"other")
        assert answer.code == code("2.04")
    finally:
        client.transport.close()


async def test_each_request_costs_one_rate_limit_token_however_it_ends(
    tmp_path: Path, upstream: tuple[RawOrigin, int], path_args: tuple[str, ...]
) -> None:
    """--rate-limit 0.01/3 (a burst of 3, nearly no refill) and one exchange in flight: a
    request refused 5.03 while another waits costs its one token like any other, so the
    third is still served and only the fourth gets 4.29 with Max-Age."""
    _, port = upstream
    t = tag()
    proxy = await start_limited(tmp_path, path_args, "--rate-limit", "0.01/3",
                                "--max-in-flight", "1", "--cache-entries", "0")
    client = await new_client(proxy.port)
    try:
        client.send(slow := request(CON, POST, up(port, f"say/{t}?d=0.4"), token=b"s"))
        assert await client.recv() == Datagram(ACK, EMPTY, slow.mid)  # it waits upstream
        client.send(busy := request(CON, POST, up(port, f"ok/{t}/busy"), token=b"b"))
        refused, _ = await client.answer(busy)
        assert refused.code == code("5.03"), refused
        assert (await client.answer(slow))[0].payload == t.encode()
        client.send(third := request(CON, POST, up(port, f"ok/{t}/3"), token=b"3"))
        answer, _ = await client.answer(third)
        assert answer.code == code("2.05"), answer
        client.send(fourth := request(CON, POST, up(port, f"ok/{t}/4"), token=b"4"))
        answer, _ = await client.answer(fourth)
        assert answer.code == code("4.29") and answer.one(MAX_AGE), answer
    finally:
        client.transport.close()
        await _stop(proxy.proc)


async def test_shutdown_finishes_exchanges_in_flight_and_refuses_new_ones(
    tmp_path: Path, upstream: tuple[RawOrigin, int], echo_origin: Running,
    path_args: tuple[str, ...]
) -> None:
    """SIGTERM: a request waiting on its upstream is still answered, a new one gets 5.03
    "proxy shutting down", and the proxy exits 0 once it is done."""
    _, port = upstream
    t = tag()
    proxy = await start_limited(tmp_path, path_args, "--shutdown-grace", "5",
                                "--cache-entries", "0")
    client = await new_client(proxy.port)
    try:
        client.send(slow := request(CON, POST, up(port, f"say/{t}?d=0.6"), token=b"s"))
        assert await client.recv() == Datagram(ACK, EMPTY, slow.mid)  # it waits upstream
        proxy.proc.send_signal(signal.SIGTERM)
        refused = None
        for _ in range(50):  # until the proxy has begun draining (bounded); to another
            # upstream, so that aiocoap's path does not queue them behind the first (NSTART)
            client.send(new := request(CON, POST, f"coap://{echo_origin.hostport}/echo",
                                       token=b"n"))
            answer, _ = await client.answer(new)
            if answer.code == code("5.03"):
                refused = answer
                break
        assert refused is not None and b"shutting down" in refused.payload, refused
        answer, _ = await client.answer(slow)
        assert (answer.code, answer.payload) == (code("2.05"), t.encode())
        assert await asyncio.wait_for(proxy.proc.wait(), 10) == 0
    finally:
        client.transport.close()
        await _stop(proxy.proc)


# -- interop: libcoap's client through the proxy to aiocoap and coap-server origins -----------


@pytest.mark.interop
async def test_libcoap_client_through_the_proxy_con_and_non_forward_and_reverse(
    tmp_path: Path, proxy: Running, echo_origin: Running, coap_server: str
) -> None:
    """coap-client-notls POSTs 0, 40 and 1000 bytes to /echo of the aiocoap origin and of
    coap-server, CON and NON, with -P (Proxy-Uri) and through a reverse route; each answer is
    the payload it sent."""
    libcoap = need_program("coap-client-notls")
    runs = []
    for size in (0, 40, 1000):
        body = os.urandom(size // 2).hex().encode()
        for origin_name, target in (("aiocoap", echo_origin.hostport), ("server", coap_server)):
            forward = ["-P", f"coap://{proxy.hostport}", f"coap://{target}/echo"]
            mount = "ao" if origin_name == "aiocoap" else "cs"
            reverse = [f"coap://{proxy.hostport}/{mount}/echo"]
            for how, where in (("fwd", forward), ("rev", reverse)):
                for mtype in ("CON", "NON"):
                    runs.append((f"{origin_name}-{how}-{mtype}-{size}", body, where, mtype))
    limit = asyncio.Semaphore(4)

    async def one(name: str, body: bytes, where: list[str], mtype: str) -> tuple[str, str]:
        src, out = tmp_path / f"{name}.in", tmp_path / f"{name}.out"
        src.write_bytes(body)
        async with limit:
            _, stdout, stderr = await run_program(
                libcoap, "-m", "post", "-f", str(src), "-o", str(out), "-B", "5", "-v", "6",
                *(["-N"] if mtype == "NON" else []), *where, timeout=20)
        got = out.read_bytes() if out.exists() else b""
        log = (stdout + stderr).decode(errors="replace")
        # -v 6 shows each message: the answer to a CON came in an ACK (or a separate CON),
        # to a NON in a NON; an empty echo has no output file, so this line is its proof.
        answers = [line.split()[1] for line in log.splitlines()
                   if line.startswith("v:1 t:") and " c:2.04 " in line]
        types = {"CON": {"t:ACK", "t:CON"}, "NON": {"t:NON"}}[mtype]
        ok = got == body and len(answers) == 1 and answers[0] in types
        return name, ("ok" if ok else f"got {got[:40]!r}: {log[-300:]}")

    results = dict(await asyncio.gather(*(one(*r) for r in runs)))
    assert results == {name: "ok" for name in results}, results





@pytest.mark.interop
async def test_raw_requests_through_the_proxy_to_libcoaps_server(client: Client) -> None:
    """libcoap's coap-server-notls as the upstream: its root resource to a CON GET (in the
    ACK) and a NON GET (as NON), with the client's token; a PUT to it is refused 4.05 and
    the refusal relayed as it came."""
    server = need_program("coap-server-notls")
    port = free_udp_port()
    async with background(server, "-A", "127.0.0.1", "-p", str(port)):
        await wait_udp_bound("127.0.0.1", port)
        for mtype, token in ((CON, b"lc1"), (NON, b"lc2")):
            client.send(req := request(mtype, GET, f"coap://127.0.0.1:{port}/", token=token))
            answer, _ = await client.answer(req)
            assert (answer.mtype, answer.token, answer.code) == (
                ACK if mtype == CON else NON, token, code("2.05")), answer
            assert answer.mtype == NON or answer.mid == req.mid
            assert b"libcoap" in answer.payload or b"CoAP" in answer.payload, answer
        client.send(req := request(CON, PUT, f"coap://127.0.0.1:{port}/", token=b"lc3",
                                   payload=b"x"))
        answer, _ = await client.answer(req)
        assert (answer.code, answer.token) == (code("4.05"), b"lc3"), answer
