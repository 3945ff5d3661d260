"""Fixtures of the Layer 0 tests: an in-process origin server that can restart on its port, the
two independent forward proxies as subprocesses, and credentials for both Layer 0 modes.

Every wait is bounded; readiness is a CoAP ping answered (not a sleep).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.constants import TransportTuning
from cryptography.hazmat.primitives.asymmetric import ec

from coaplayers import pki
from coaplayers.dtls import (
    CertificateCredentials,
    PskClientCredentials,
    PskStore,
    RawPublicKeyCredentials,
    spki_fingerprint,
)
from coaplayers.dtls.credentials import spki_der
from coaplayers.layer0 import Layer0Client, Layer0Site, Policy, ServerLimits
from coaplayers.layer0.server import answer_inline

from ..conftest import free_udp_port
from .apps import make_site

PSK_IDENTITY = b"device-psk-1"
PSK_KEY = b"l0-secret-key-16"  # tinydtls fails the handshake with keys of ~20+ bytes


class FastTuning(TransportTuning):
    """Outer CoAP timers for tests on loopback: the first retransmission after 0.5-0.75 s."""

    ACK_TIMEOUT = 0.5
    MAX_RETRANSMIT = 6


class LossTuning(TransportTuning):
    """For the long runs through lossy relays on loopback (round trips well under 10 ms): the
    first retransmission after 0.1-0.15 s, eleven of them. With coap-proxy's upstream
    ``--ack-timeout`` and ``--downstream-ack-timeout`` at the same value, 50 requests at 20 %
    loss per hop take a fraction of the 140 s they take on aiocoap's default timers."""

    ACK_TIMEOUT = 0.1
    MAX_RETRANSMIT = 11


async def coap_ping(
    host: str, port: int, timeout: float = 10.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Send CoAP pings (empty CON) until an RST comes back: the endpoint is serving.

    With ``process`` (the endpoint's), its exit ends the wait at once (``RuntimeError``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        mid = 0x4C00
        while loop.time() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"exited ({process.returncode}) before answering a ping")
            mid += 1
            s.sendto(bytes([0x40, 0x00]) + mid.to_bytes(2, "big"), (host, port))
            try:
                data = await asyncio.wait_for(loop.sock_recv(s, 64), 0.2)
            except (TimeoutError, ConnectionRefusedError):
                continue
            if data[:1] and data[0] >> 4 == 0x7:  # RST, version 1
                return
    raise TimeoutError(f"no CoAP endpoint answered on {host}:{port} within {timeout} s")


class Credentials:
    """Layer 0 credentials of one mode: the server's and the client's (their own objects)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.server: PskStore | CertificateCredentials | RawPublicKeyCredentials
        self.client: PskClientCredentials | CertificateCredentials | RawPublicKeyCredentials
        if mode == "psk":
            self.server = PskStore({PSK_IDENTITY: PSK_KEY})
            self.client = PskClientCredentials(PSK_IDENTITY, PSK_KEY)
            self.identity = PSK_IDENTITY.decode()
        elif mode == "rpk":
            server_key = ec.generate_private_key(ec.SECP256R1())
            client_key = ec.generate_private_key(ec.SECP256R1())
            self.server = RawPublicKeyCredentials(server_key, [client_key.public_key()])
            self.client = RawPublicKeyCredentials(client_key, [server_key.public_key()])
            self.identity = spki_fingerprint(spki_der(client_key.public_key()))
        else:
            ca = pki.make_ca("layer0 test CA")
            srv = pki.issue(ca, "origin.test", names=["origin.test"])
            cli = pki.issue(ca, "device-cert-1")
            self.server = CertificateCredentials(
                [srv.certificate], srv.private_key, [ca.certificate]
            )
            self.client = CertificateCredentials(
                [cli.certificate], cli.private_key, [ca.certificate], server_name="origin.test"
            )
            self.identity = "device-cert-1"


class Origin:
    """The application server: an aiocoap server context serving a Layer0Site, restartable."""

    def __init__(
        self,
        creds: Credentials,
        *,
        policy: Policy | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        self.creds = creds
        self.port = free_udp_port()
        self.policy = policy or Policy.build(protected=["/text", "/echo", "/counter", "/whoami"])
        self.limits = limits or ServerLimits(poll_hold=5.0)
        self.context: aiocoap.Context | None = None
        self.layer0: Layer0Site | None = None
        self.resources: dict = {}
        self.starts = 0

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def start(self) -> None:
        site, self.resources = make_site()
        self.layer0 = Layer0Site(site, self.creds.server, policy=self.policy, limits=self.limits)
        self.context = await aiocoap.Context.create_server_context(
            self.layer0, bind=("127.0.0.1", self.port)
        )
        answer_inline(self.context, self.layer0)  # as coap-server serves it
        self.starts += 1

    async def stop(self) -> None:
        if self.layer0 is not None:
            self.layer0.close()
        if self.context is not None:
            await self.context.shutdown()
            self.context = None

    async def restart(self) -> None:
        """A restart loses every Layer 0 session, as a process restart would."""
        await self.stop()
        await self.start()


class ProxyProcess:
    """aiocoap's or libcoap's forward proxy as a subprocess on a fixed port (restartable)."""

    def __init__(self, kind: str, log_dir: Path, ack_timeout: float = 0.5) -> None:
        self.kind = kind
        self.ack_timeout = ack_timeout
        self.port = free_udp_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def uri(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str] | None:
        if self.kind == "aiocoap":
            # UDP only. By default aiocoap-proxy also listens on TCP on the same port number
            # (and sets up TLS and DTLS), which free_udp_port() did not check: a loopback TCP
            # connection of anyone on this machine that used that number as its local port
            # (even one in TIME_WAIT, for a minute) makes that bind fail, and aiocoap-proxy
            # exits before it binds UDP (libcoap's proxy logs the TCP failure and serves UDP).
            return dict(os.environ, AIOCOAP_SERVER_TRANSPORT="udp6",
                        AIOCOAP_CLIENT_TRANSPORT="udp6")
        return None

    def argv(self) -> list[str]:
        if self.kind == "aiocoap":
            exe = shutil.which("aiocoap-proxy", path=os.path.dirname(sys.executable))
            assert exe is not None, "aiocoap-proxy missing from the venv"
            return [exe, "--forward", "--bind", f"127.0.0.1:{self.port}"]
        if self.kind == "coaplayers":
            exe = shutil.which("coap-proxy", path=os.path.dirname(sys.executable))
            assert exe is not None, "coap-proxy missing from the venv"
            # Retransmissions as fast as the client's (FastTuning), upstream and for separate
            # responses downstream: a lossy hop then costs the same on either side.
            return [exe, "--listen", f"coap://127.0.0.1:{self.port}", "--allow", "127.0.0.1",
                    "--ack-timeout", str(self.ack_timeout),
                    "--downstream-ack-timeout", str(self.ack_timeout), "--upstream-timeout", "60"]
        exe = shutil.which("coap-server-notls")
        if exe is None:
            pytest.skip("libcoap3-bin (coap-server-notls) is not installed")
        # Nothing before the comma: connect to the origin directly; the name is ours.
        return [exe, "-A", "127.0.0.1", "-p", str(self.port), "-P", ",layer0-test-proxy"]

    async def start(self) -> None:
        self.starts += 1
        path = self.log_dir / f"{self.kind}-proxy-{self.starts}.log"
        log = open(path, "wb")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env())
        log.close()
        try:
            await coap_ping("127.0.0.1", self.port, timeout=15.0, process=self.proc)
        except RuntimeError as exc:
            tail = path.read_bytes()[-2000:].decode(errors="replace")
            raise RuntimeError(f"{self.kind} proxy on port {self.port}: {exc}:\n{tail}") from None

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 5)
            except TimeoutError:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        self.proc = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()


@pytest.fixture(params=["aiocoap", "libcoap"])
def proxy_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def client_context() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context()
    yield ctx
    await ctx.shutdown()


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator:
    started: list[ProxyProcess] = []

    async def start(kind: str, **kw: float) -> ProxyProcess:
        proxy = ProxyProcess(kind, tmp_path, **kw)
        started.append(proxy)
        await proxy.start()
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def start_origin() -> AsyncIterator:
    started: list[Origin] = []

    async def start(mode: str = "psk", **kwargs: object) -> Origin:
        origin = Origin(Credentials(mode), **kwargs)  # type: ignore[arg-type]
        started.append(origin)
        await origin.start()
        return origin

    yield start
    for origin in started:
        await origin.stop()


def channel(
    ctx: aiocoap.Context,
    origin_uri: str,
    creds: Credentials,
    proxy: str | None = None,
    **kw: object,
) -> Layer0Client:
    from coaplayers.layer0 import Layer0Config

    kw.setdefault("transport_tuning", FastTuning())
    config = Layer0Config(**kw)  # type: ignore[arg-type]
    return Layer0Client(ctx, origin_uri, creds.client, proxy=proxy, config=config)
