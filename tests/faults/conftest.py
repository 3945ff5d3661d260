"""Fixtures of the fault and attack suite (issue 8): credentials from coap-keys, an in-process
application server with a counting resource, coap-proxy as a real process, and clients for
both end-to-end modes.

Topology of most tests::

    client --[FaultRelay hop 1]--> coap-proxy --[FaultRelay hop 2]--> application server

The application server runs in the test's event loop (so a test can read its counters and
restart it on the same port); coap-proxy is a separate process, started through
``tests.faults.fastproxy`` so that its CoAP timers suit loopback. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource as resource
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning

from coaplayers import dtls, layer1
from coaplayers.layer0 import Layer0Client, Layer0Config, Layer0Site
from coaplayers.layer0_modes import Layer0ServerOptions, wrap_site
from coaplayers.oscore.mode import OscoreRequester
from coaplayers.programs import keys
from tests.conftest import free_udp_port
from tests.proxy.conftest import Running, _stop
from tests.proxy.conftest import start_proxy as start_coap_proxy

ROOT = Path(__file__).resolve().parents[2]
T = 30.0  # bound of any single step
ACK_TIMEOUT = 0.1  # first CoAP retransmission after 0.1-0.15 s (loopback RTT is < 1 ms)
MAX_RETRANSMIT = 10
"""With 20 % loss each way, one try across a hop fails with p = 0.36; CoAP's default of four
retransmissions would lose about one exchange in 170. Ten make it one in 90,000; the
exponential back-off keeps a long tail either way (nine failures in a row wait ~50-77 s)."""


class FastTuning(TransportTuning):
    """Outer CoAP timers of the clients in these tests (see ACK_TIMEOUT)."""

    ACK_TIMEOUT = ACK_TIMEOUT
    MAX_RETRANSMIT = MAX_RETRANSMIT


# ----------------------------------------------------------------------------- credentials


@dataclass
class Keys:
    """The credential set coap-keys writes: one CA and PSK set per layer."""

    folder: Path
    psk: dict[str, tuple[bytes, bytes]]

    def path(self, name: str) -> str:
        return str(self.folder / name)

    # Layer 0 (end to end)
    def e2e_psk_store(self) -> dtls.PskStore:
        ident, key = self.psk["e2e"]
        return dtls.PskStore({ident: key})

    def e2e_psk_client(self) -> dtls.PskClientCredentials:
        return dtls.PskClientCredentials(*self.psk["e2e"])

    def e2e_server_cert(self) -> dtls.CertificateCredentials:
        return dtls.CertificateCredentials.from_files(
            self.path("server-e2e.pem"), self.path("server-e2e.key"), self.path("e2e-ca.pem")
        )

    def e2e_client_cert(self) -> dtls.CertificateCredentials:
        return dtls.CertificateCredentials.from_files(
            self.path("client-e2e.pem"), self.path("client-e2e.key"), self.path("e2e-ca.pem"),
            server_name="app-server",
        )

    # Layer 1 (hop by hop)
    def hop1_client(self) -> layer1.ClientCredentials:
        return layer1.ClientCredentials.from_file(self.path("client-hop.json"))

    def hop1_psk_arg(self) -> str:
        ident, key = self.psk["hop1"]
        return f"{ident.decode()}:0x{key.hex()}"


def make_keys(folder: Path) -> Keys:
    """A fresh credential set from coap-keys in ``folder``."""
    keys.create(folder)
    data = json.loads((folder / "psk.json").read_text())
    psk = {
        name: (entry["identity"].encode(), bytes.fromhex(entry["key"].removeprefix("0x")))
        for name, entry in data.items()
    }
    return Keys(folder, psk)


@pytest.fixture(scope="session")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys") / "set")


# ------------------------------------------------------------------- application server


class Count(resource.Resource):
    """POST /count: the server acts (count += 1) and answers ``nonce count``."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        nonce = bytes(request.payload)
        self.app.count += 1
        self.app.executed.append(nonce)
        return aiocoap.Message(code=Code.CHANGED, payload=nonce + b" %d" % self.app.count)


class Nonce(resource.Resource):
    """GET /nonce?N: answers N (idempotent; every answer names the request it belongs to)."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.app.gets += 1
        query = "&".join(request.opt.uri_query)
        return aiocoap.Message(payload=b"nonce " + query.encode())


class App:
    """The application server: Layer 0 (PSK and certificates) and OSCORE, on a fixed port.

    ``count``/``executed`` are the server's durable state: they survive :meth:`restart`, the
    Layer 0 sessions and OSCORE contexts do not (as with a process restart).
    """

    def __init__(self, creds: Keys, *, coaps: bool = False, required: bool = False) -> None:
        self.creds = creds
        self.required = required  # serve only end-to-end protected requests
        self.port = free_udp_port()
        self.coaps_port = free_udp_port() if coaps else None
        self.count = 0
        self.gets = 0
        self.executed: list[bytes] = []
        self.ctx: layer1.LayeredContext | None = None
        self.layer0: Layer0Site | None = None
        self.handshakes_before = 0  # Layer 0 handshakes of earlier runs

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def uri(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    @property
    def handshakes(self) -> int:
        """Layer 0 handshakes the server completed, over all its runs."""
        now = self.layer0.core.stats.handshakes if self.layer0 is not None else 0
        return self.handshakes_before + now

    async def start(self) -> None:
        site = resource.Site()
        site.add_resource(["count"], Count(self))
        site.add_resource(["nonce"], Nonce(self))
        options = Layer0ServerOptions(
            psk_store=self.creds.e2e_psk_store(), certificate=self.creds.e2e_server_cert(),
            required=self.required,
        )
        wrapped = wrap_site(site, options)
        assert isinstance(wrapped, Layer0Site)
        self.layer0 = wrapped
        listen = [self.uri]
        if self.coaps_port is not None:
            listen.append(f"coaps://127.0.0.1:{self.coaps_port}")
        self.ctx = await layer1.create_context(wrapped, listen=listen, loggername="fault-app")

    async def stop(self) -> None:
        if self.layer0 is not None:
            self.handshakes_before += self.layer0.core.stats.handshakes
            self.layer0.close()
            self.layer0 = None
        if self.ctx is not None:
            await self.ctx.shutdown()
            self.ctx = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()


@pytest.fixture
async def app(creds: Keys) -> AsyncIterator[App]:
    server = App(creds)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# -------------------------------------------------------------------------------- proxy


@dataclass
class Proxy:
    """coap-proxy as a process on a fixed port (restartable)."""

    tmp: Path
    args: list[str]
    scheme: str = "coap"
    port: int = field(default_factory=free_udp_port)
    run: Running | None = None
    starts: int = 0

    @property
    def uri(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def start(self) -> None:
        self.starts += 1
        env = dict(
            os.environ,
            FAULTS_ACK_TIMEOUT=str(ACK_TIMEOUT),
            FAULTS_MAX_RETRANSMIT=str(MAX_RETRANSMIT),
        )
        self.run = await start_coap_proxy(
            self.tmp, "--upstream-timeout", "150", *self.args, listen=self.uri,
            program=(sys.executable, "-m", "tests.faults.fastproxy"), env=env,
        )

    async def stop(self) -> None:
        if self.run is not None:
            await _stop(self.run.proc)
            self.run = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Proxy]]]:
    started: list[Proxy] = []

    async def start(*args: str, scheme: str = "coap") -> Proxy:
        proxy = Proxy(tmp_path, list(args), scheme)
        started.append(proxy)
        await proxy.start()
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            await proxy.stop()


# ------------------------------------------------------------------------------ clients


@pytest.fixture
async def client_ctx(creds: Keys) -> AsyncIterator[layer1.LayeredContext]:
    """A client context for coap:// and coaps:// (Layer 1 PSK towards the proxy)."""
    ctx = await layer1.create_context(client_credentials=creds.hop1_client(), loggername="fc")
    try:
        yield ctx
    finally:
        await ctx.shutdown()


@pytest.fixture
async def client_contexts(
    creds: Keys,
) -> AsyncIterator[Callable[[int], Awaitable[list[layer1.LayeredContext]]]]:
    """``await client_contexts(n)``: n independent clients (devices), each its own context."""
    made: list[layer1.LayeredContext] = []

    async def make(n: int) -> list[layer1.LayeredContext]:
        new = [
            await layer1.create_context(client_credentials=creds.hop1_client(), loggername="fc")
            for _ in range(n)
        ]
        made.extend(new)
        return new

    try:
        yield make
    finally:
        for ctx in made:
            await ctx.shutdown()


def uri(address: tuple[str, int], scheme: str = "coap") -> str:
    return f"{scheme}://{address[0]}:{address[1]}"


def layer0_channel(
    ctx: layer1.LayeredContext, origin: str, credentials: Any, proxy: str | None, **kw: Any
) -> Layer0Client:
    config = Layer0Config(transport_tuning=FastTuning(), **kw)
    return Layer0Client(ctx.context, origin, credentials, proxy=proxy, config=config)


def oscore_requester(
    ctx: layer1.LayeredContext, origin: str, creds: Keys, proxy: str | None
) -> OscoreRequester:
    """The OSCORE mode with this suite's outer timers; every keying is a full handshake on a
    new channel (the server keys nothing on a resumed session), with the one OpenSSL context
    built once."""
    cert = creds.e2e_client_cert()
    ssl_context = dtls.build_context(cert, server=False)
    return OscoreRequester(
        ctx.context, origin,
        lambda: Layer0Client(
            ctx.context, origin, cert, proxy=proxy, ssl_context=ssl_context,
            config=Layer0Config(transport_tuning=FastTuning()),
        ),
        proxy=proxy,
    )


def oscore_message(origin: str, code: Code, path: str, payload: bytes = b"") -> aiocoap.Message:
    return aiocoap.Message(
        code=code, uri=f"{origin}/{path}", payload=payload, transport_tuning=FastTuning()
    )
