"""Shared pieces of the OSCORE tests: ports, real peer processes, a small resource tree."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
from aiocoap import resource

from coaplayers import pki
from coaplayers.dtls import CertificateCredentials
from coaplayers.oscore import ContextStore, OscoreSite, SecurityContext, peer_of

from ..conftest import free_udp_port

VENV_BIN = Path(sys.executable).parent
SECRET = bytes(range(1, 17))
SALT = bytes.fromhex("9e7ca92223786340")


def certificate_pair(ca_name: str) -> dict[str, CertificateCredentials]:
    """Layer 0 certificates of a server ``origin.test`` and a client ``device-1`` under one
    new CA (the client checks the server's name)."""
    ca = pki.make_ca(ca_name)
    srv = pki.issue(ca, "origin.test", names=["origin.test"])
    cli = pki.issue(ca, "device-1")
    return {
        "server": CertificateCredentials([srv.certificate], srv.private_key, [ca.certificate]),
        "client": CertificateCredentials([cli.certificate], cli.private_key, [ca.certificate],
                                         server_name="origin.test"),
    }


def static_pair(
    client_id: bytes = b"\x01", server_id: bytes = b"", peer: str = "client-1", **kw: object
) -> tuple[SecurityContext, SecurityContext]:
    """A client and a server context sharing static keys (no handshake needed)."""
    common = {"master_secret": SECRET, "master_salt": SALT}
    client = SecurityContext(sender_id=client_id, recipient_id=server_id, **common, **kw)
    server = SecurityContext(sender_id=server_id, recipient_id=client_id, peer=peer, **common)
    return client, server


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable while the peer is still starting


async def udp_exchange(
    port: int, datagram: bytes, timeout: float, host: str = "127.0.0.1"
) -> bytes | None:
    """Send one datagram from a fresh socket; the first answer, or None on timeout."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Collector, remote_addr=(host, port))
    try:
        transport.sendto(datagram)
        try:
            return await asyncio.wait_for(proto.queue.get(), timeout)
        except TimeoutError:
            return None
    finally:
        transport.close()


async def coap_ping(port: int, timeout: float = 10.0) -> None:
    """Wait until a CoAP endpoint on 127.0.0.1:port answers an empty CON (ping) with RST.

    Each attempt is bounded (0.2 s); the whole wait is bounded by ``timeout``.
    """

    async def attempts() -> None:
        mid = 0x1234
        while True:
            mid += 1
            answer = await udp_exchange(port, struct.pack("!BBH", 0x40, 0x00, mid), 0.2)
            if answer is not None and answer[:1] == b"\x70" and answer[2:4] == struct.pack(
                "!H", mid
            ):
                return

    await asyncio.wait_for(attempts(), timeout)


@contextlib.asynccontextmanager
async def aiocoap_proxy(observe_fix: bool = False) -> AsyncIterator[int]:
    """Run ``aiocoap-proxy --forward`` from the venv on a free loopback port; yield the port.

    With ``observe_fix``, the same program is started through aiocoap_proxy_observefix.py,
    which works around aiocoap 0.4.17's broken pooled observations (see there).
    """
    port = free_udp_port()
    env = dict(os.environ, AIOCOAP_SERVER_TRANSPORT="udp6", AIOCOAP_CLIENT_TRANSPORT="udp6")
    if observe_fix:
        program = [sys.executable, str(Path(__file__).with_name("aiocoap_proxy_observefix.py"))]
    else:
        program = [str(VENV_BIN / "aiocoap-proxy")]
    proc = subprocess.Popen(
        [*program, "--forward", "--bind", f"127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        try:
            await coap_ping(port)
        except TimeoutError:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise RuntimeError(f"aiocoap-proxy did not come up: {err.decode()[-2000:]}") from None
        yield port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()


class Hello(resource.Resource):
    """GET: says hello to the authenticated OSCORE peer (or 'anonymous' if plain)."""

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=f"hello {peer_of(request) or 'anonymous'}".encode())


class Echo(resource.Resource):
    """POST: answers with the request payload (block-wise in both directions)."""

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED, payload=request.payload)


class Counter(resource.ObservableResource):
    """GET/Observe: the current value; :meth:`bump` sends a notification."""

    def __init__(self) -> None:
        super().__init__()
        self.value = 0
        self.observers = 0

    def update_observation_count(self, newcount: int) -> None:
        self.observers = newcount

    def bump(self) -> None:
        self.value += 1
        self.updated_state()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=f"count {self.value}".encode())


def build_site() -> tuple[resource.Site, Counter]:
    site = resource.Site()
    counter = Counter()
    site.add_resource(["hello"], Hello())
    site.add_resource(["echo"], Echo())
    site.add_resource(["obs"], counter)
    return site, counter


@contextlib.asynccontextmanager
async def oscore_server(
    store: ContextStore, **site_options: object
) -> AsyncIterator[tuple[int, Counter]]:
    """A real aiocoap server on a free loopback UDP port serving :func:`build_site` via
    :class:`OscoreSite`; yields (port, counter resource)."""
    site, counter = build_site()
    wrapped = OscoreSite(site, store, **site_options)  # type: ignore[arg-type]
    for _ in range(5):
        port = free_udp_port()
        try:
            ctx = await aiocoap.Context.create_server_context(
                wrapped, bind=("127.0.0.1", port), transports=["udp6"]
            )
            break
        except OSError:
            continue
    else:
        raise RuntimeError("no free port for the server")
    try:
        yield port, counter
    finally:
        await ctx.shutdown()
