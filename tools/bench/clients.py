"""One benchmark client per mode: how each mode's requests are sent, and nothing else.

A client is one independent endpoint (its own aiocoap context and UDP socket, its own Layer 1
session, its own Layer 0 session or OSCORE context): "50 concurrent clients" are 50 of these,
each sending its next request when the previous one was answered.

The coaplayers modes use the same stack as ``coap-client`` (:func:`coaplayers.layer1.create_context`
and :func:`coaplayers.layer0_modes.open_requester`); the baselines use stock aiocoap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiocoap
from aiocoap.numbers.codes import Code

from coaplayers import dtls, layer1
from coaplayers.layer0_modes import Layer0ClientOptions, open_requester

PAYLOAD_SIZE = 40
PAYLOAD = (b"coap-bench 40-byte POST payload 0123456789" * 2)[:PAYLOAD_SIZE]

# Static OSCORE keys of the aiocoap-OSCORE baseline (RFC 8613 C.1.1-like test values).
OSCORE_SECRET = bytes(range(1, 17))
OSCORE_SALT = bytes.fromhex("9e7ca92223786340")
OSCORE_SERVER_ID = b""
OSCORE_CLIENTS = 120
"""Client contexts the baseline server knows: each client needs its own (one replay window
per context), and none is used twice in a run (sequence numbers restart with a new client)."""


@dataclass
class Endpoints:
    """Where everything listens, and the credential set (coap-keys layout)."""

    creds: Path
    server_coap: str  # coap://127.0.0.1:P of coap-server
    server_coaps: str
    proxy_coap: str  # coap://127.0.0.1:P of coap-proxy
    proxy_coaps: str
    aio_proxy: str  # coap://127.0.0.1:P of aiocoap-proxy
    aio_server: str  # coap://127.0.0.1:P of the stock aiocoap server (plain + OSCORE)
    pids: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    hop1: str  # what protects the client-proxy hop
    e2e: str  # end-to-end protection
    baseline: bool = False


MODES: dict[str, Mode] = {m.key: m for m in (
    Mode("plain", "plain CoAP (coaplayers client, coap-proxy, coap-server)", "none", "none"),
    Mode("l1", "Layer 1 on both hops", "DTLS PSK", "none"),
    Mode("l0psk_l1", "Layer 0 DTLS (PSK) + Layer 1", "DTLS PSK", "Layer 0 PSK"),
    Mode("l0cert_l1", "Layer 0 DTLS (certificates) + Layer 1", "DTLS PSK", "Layer 0 cert"),
    Mode("l0rpk_l1", "Layer 0 DTLS (raw public keys) + Layer 1", "DTLS PSK", "Layer 0 RPK"),
    Mode("oscore_l1", "OSCORE mode + Layer 1", "DTLS PSK", "OSCORE"),
    Mode("aio_plain", "baseline: aiocoap client, aiocoap-proxy, aiocoap server", "none",
         "none", baseline=True),
    Mode("aio_oscore", "baseline: aiocoap OSCORE (static context) via aiocoap-proxy", "none",
         "OSCORE static", baseline=True),
    Mode("aio_via_coap_proxy", "aiocoap client, coap-proxy, aiocoap server (proxy only)",
         "none", "none", baseline=True),
)}

# Bytes-only variants: end-to-end protection over plain hops (no Layer 1), to separate the
# end-to-end overhead from the hop overhead.
WIRE_ONLY: dict[str, Mode] = {m.key: m for m in (
    Mode("l0psk", "Layer 0 DTLS (PSK), plain hops", "none", "Layer 0 PSK"),
    Mode("l0cert", "Layer 0 DTLS (certificates), plain hops", "none", "Layer 0 cert"),
    Mode("l0rpk", "Layer 0 DTLS (raw public keys), plain hops", "none", "Layer 0 RPK"),
    Mode("oscore", "OSCORE mode, plain hops", "none", "OSCORE"),
    Mode("oscore_psk", "OSCORE mode keyed by PSK, plain hops", "none", "OSCORE"),
    Mode("oscore_rpk", "OSCORE mode keyed by raw public keys, plain hops", "none", "OSCORE"),
)}


class BenchClient:
    """``await client.post()`` sends one 40-byte POST to /echo and checks the echo."""

    def __init__(self, ctx: Any, requester: Any, target: str, owner: Any = None) -> None:
        self._ctx = ctx
        self._requester = requester
        self.target = target
        self._owner = owner

    async def post(self) -> None:
        msg = aiocoap.Message(code=Code.POST, uri=self.target, payload=PAYLOAD)
        response = await self._requester.request(msg).response
        if response.code != Code.CHANGED or bytes(response.payload) != PAYLOAD:
            raise RuntimeError(
                f"unexpected answer {response.code} {bytes(response.payload)[:40]!r}"
            )

    async def close(self) -> None:
        close = getattr(self._requester, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:  # best effort at the end of a run
                pass
        await self._ctx.shutdown()


def _hostport(uri: str) -> str:
    return urlsplit(uri).netloc


def _e2e_cert(creds: Path) -> dtls.CertificateCredentials:
    return dtls.CertificateCredentials.from_files(
        creds / "client-e2e.pem", creds / "client-e2e.key", creds / "e2e-ca.pem"
    )


def _e2e_rpk(creds: Path) -> dtls.RawPublicKeyCredentials:
    return dtls.RawPublicKeyCredentials.from_files(creds / "client-rpk.key",
                                                   creds / "server-rpk.pub")


def _e2e_psk(creds: Path) -> dtls.PskClientCredentials:
    data = json.loads((creds / "psk.json").read_text())["e2e"]
    return dtls.PskClientCredentials(
        data["identity"].encode(), dtls.parse_key_text(data["key"])
    )


def hop_credentials(creds: Path) -> layer1.ClientCredentials:
    return layer1.ClientCredentials.from_file(creds / "client-hop.json")


async def open_client(
    mode: str, ep: Endpoints, *, proxy: str | None = None, origin: str | None = None,
    state: Path | None = None,
) -> BenchClient:
    """A connected client of ``mode``. ``proxy``/``origin`` override where it goes (relays);
    ``state`` is a folder for what the client keeps between runs, as ``coap-client`` does."""
    if mode in ("aio_plain", "aio_via_coap_proxy"):
        from aiocoap.proxy.client import ProxyForwarder

        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        via = proxy or (ep.aio_proxy if mode == "aio_plain" else ep.proxy_coap)
        target = f"{origin or ep.aio_server}/echo"
        return BenchClient(_Ctx(ctx), ProxyForwarder(via, ctx), target)
    if mode == "aio_oscore":
        from aiocoap.proxy.client import ProxyForwarder

        from coaplayers.oscore import ClientContexts, SecurityContext, attach

        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        target_origin = origin or ep.aio_server
        sc = SecurityContext(
            master_secret=OSCORE_SECRET, master_salt=OSCORE_SALT,
            sender_id=_next_oscore_id(), recipient_id=OSCORE_SERVER_ID,
        )
        contexts = ClientContexts()
        contexts.set(target_origin, sc)
        attach(ctx, contexts)
        return BenchClient(_Ctx(ctx), ProxyForwarder(proxy or ep.aio_proxy, ctx),
                           f"{target_origin}/echo")
    plain_hops = mode in ("plain", "l0psk", "l0cert", "l0rpk", "oscore", "oscore_psk",
                          "oscore_rpk")
    ctx = await layer1.create_context(client_credentials=hop_credentials(ep.creds))
    proxy_uri = proxy or (ep.proxy_coap if plain_hops else ep.proxy_coaps)
    target_origin = origin or (ep.server_coap if plain_hops else ep.server_coaps)
    e2e: Layer0ClientOptions | None
    if mode in ("plain", "l1"):
        e2e = None
    elif mode in ("l0psk_l1", "l0psk"):
        e2e = Layer0ClientOptions("dtls", psk=_e2e_psk(ep.creds))
    elif mode in ("l0cert_l1", "l0cert"):
        e2e = Layer0ClientOptions("dtls", certificate=_e2e_cert(ep.creds))
    elif mode in ("l0rpk_l1", "l0rpk"):
        e2e = Layer0ClientOptions("dtls", raw_public_key=_e2e_rpk(ep.creds))
    elif mode in ("oscore_l1", "oscore"):
        e2e = Layer0ClientOptions("oscore", certificate=_e2e_cert(ep.creds))
    elif mode == "oscore_psk":
        e2e = Layer0ClientOptions("oscore", psk=_e2e_psk(ep.creds))
    elif mode == "oscore_rpk":
        e2e = Layer0ClientOptions("oscore", raw_public_key=_e2e_rpk(ep.creds))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    target = f"{target_origin}/echo"
    requester = await open_requester(ctx, proxy=proxy_uri, e2e=e2e, target=target, state=state)
    return BenchClient(ctx, requester, target)


class _Ctx:
    """Stock aiocoap context with the ``shutdown`` the coaplayers context has."""

    def __init__(self, ctx: aiocoap.Context) -> None:
        self.context = ctx

    async def shutdown(self) -> None:
        await self.context.shutdown()


_oscore_ids = iter(range(1, OSCORE_CLIENTS))  # the last one is the stock-client probe's


def _next_oscore_id() -> bytes:
    try:
        return bytes([next(_oscore_ids)])
    except StopIteration:
        raise RuntimeError(f"more than {OSCORE_CLIENTS - 1} aiocoap OSCORE clients") from None


async def probe_stock_oscore(ep: Endpoints, folder: Path, timeout: float = 6.0) -> str:
    """Try stock aiocoap OSCORE (FilesystemSecurityContext) through aiocoap-proxy; what happens.

    aiocoap 0.4.17 drops Proxy-Scheme and Uri-Port from the outer message, so the forward
    proxy cannot route the request; this is why the baseline client uses coaplayers'
    SecurityContext (same RFC 8613 code, Class U options kept) against a stock server.
    """
    import asyncio

    from aiocoap.proxy.client import ProxyForwarder

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({
        "sender-id_hex": bytes([OSCORE_CLIENTS]).hex(),
        "recipient-id_hex": OSCORE_SERVER_ID.hex(),
        "secret_hex": OSCORE_SECRET.hex(),
        "salt_hex": OSCORE_SALT.hex(),
    }))
    ctx = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
    try:
        ctx.client_credentials.load_from_dict(
            {f"{ep.aio_server}/*": {"oscore": {"contextfile": str(folder)}}}
        )
        msg = aiocoap.Message(code=Code.POST, uri=f"{ep.aio_server}/echo", payload=PAYLOAD)
        try:
            async with asyncio.timeout(timeout):
                response = await ProxyForwarder(ep.aio_proxy, ctx).request(msg).response
        except TimeoutError:
            return f"no answer within {timeout:g} s"
        except Exception as exc:  # the outcome is the finding
            plain = getattr(exc, "plain_message", None)
            if plain is not None:
                return (f"fails: the proxy answered {plain.code} "
                        f"{bytes(plain.payload).decode(errors='replace')!r} unprotected "
                        f"({type(exc).__name__})")
            return f"fails: {type(exc).__name__}: {exc}"[:200]
        from aiocoap.transports.oscore import OSCOREAddress

        if not isinstance(response.remote, OSCOREAddress):
            return f"inconclusive: the answer ({response.code}) was not OSCORE-protected"
        if response.code == Code.CHANGED and bytes(response.payload) == PAYLOAD:
            return "works (2.04 with the echo, OSCORE-protected)"
        return f"fails: {response.code} {bytes(response.payload)[:80]!r}"
    finally:
        await ctx.shutdown()


def write_aiocoap_oscore_settings(folder: Path) -> Path:
    """The stock server's FilesystemSecurityContext folders (mirrors of the client keys)."""
    for n in range(1, OSCORE_CLIENTS + 1):
        sub = folder / f"client{n:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "settings.json").write_text(json.dumps({
            "sender-id_hex": OSCORE_SERVER_ID.hex(),
            "recipient-id_hex": bytes([n]).hex(),
            "secret_hex": OSCORE_SECRET.hex(),
            "salt_hex": OSCORE_SALT.hex(),
        }))
    return folder
