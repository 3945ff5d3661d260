"""The OSCORE mode's keying folded into the Layer 0 handshake (docs/OSCORE-KEYING.md 9.1).

A handshake that agrees on the ALPN protocol ``atls-oscore`` stands for the keying request; the
server answers it with its Finished and ends the session, so a cold OSCORE request costs the
handshake's exchanges and itself, nothing more. Counted here on the wire (distinct CoAP requests
through a real UDP proxy), and attacked there: the folded answer removed, altered or replayed, the
ALPN offer altered, a resumed handshake that asks for it. Real UDP on loopback; the server is
``wrap_site`` (what coap-server serves), in process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource as resource
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning

from coaplayers import dtls
from coaplayers.dtls import (
    CertificateCredentials,
    PskClientCredentials,
    PskStore,
    RawPublicKeyCredentials,
    records,
)
from coaplayers.dtls.openssl import generate_p256_key
from coaplayers.layer0 import Layer0Client, Layer0Config, Layer0Site
from coaplayers.layer0.errors import Layer0Error
from coaplayers.layer0_modes import Layer0ServerOptions, wrap_site
from coaplayers.oscore import OscoreError
from coaplayers.oscore.client import origin_of
from coaplayers.oscore.kept import KeptContexts
from coaplayers.oscore.mode import (
    KEYING_ALPN,
    KEYING_PATH,
    NEEDS_FULL_HANDSHAKE,
    PARAMETERS_CONTENT_FORMAT,
    OscoreRequester,
)
from coaplayers.oscore.params import OscoreParameters
from tests.conftest import free_udp_port
from tests.faults.evilproxy import EvilProxy, Send
from tests.oscore.support import certificate_pair

T = 15.0


class FastTuning(TransportTuning):
    """Short outer CoAP timers: a dropped exchange is repeated within the test's bounds."""

    ACK_TIMEOUT = 0.5
    MAX_RETRANSMIT = 4

PSK = PskClientCredentials(b"device-1", b"fold-test-key-16")
RPK_SERVER, RPK_CLIENT = generate_p256_key(), generate_p256_key()
RPK = RawPublicKeyCredentials(RPK_CLIENT, trusted=[RPK_SERVER.public_key()])


@pytest.fixture(scope="module")
def creds() -> dict[str, CertificateCredentials]:
    return certificate_pair("fold CA")


class Echo(resource.Resource):
    def __init__(self) -> None:
        super().__init__()
        self.executed: list[bytes] = []

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        self.executed.append(request.payload)
        return aiocoap.Message(code=Code.CHANGED, payload=b"echo " + request.payload)


@dataclass
class Origin:
    """The application server (wrap_site, as coap-server) behind a malicious proxy."""

    creds: dict[str, CertificateCredentials]
    port: int
    echo: Echo
    evil: EvilProxy
    layer0: Layer0Site | None = None
    ctx: aiocoap.Context | None = None
    rpk_only: bool = False  # one GnuTLS listener, not one listener per kind

    @property
    def uri(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    @property
    def store(self) -> Any:
        assert self.layer0 is not None
        return self.layer0.site.contexts  # OscoreSite's ContextStore

    async def start(self) -> None:
        site = resource.Site()
        site.add_resource(["echo"], self.echo)
        rpk = RawPublicKeyCredentials(RPK_SERVER, trusted=[RPK_CLIENT.public_key()])
        options = (Layer0ServerOptions(raw_public_key=rpk) if self.rpk_only else
                   Layer0ServerOptions(psk_store=PskStore({PSK.identity: PSK.key}),
                                       certificate=self.creds["server"], raw_public_key=rpk))
        wrapped = wrap_site(site, options)
        assert isinstance(wrapped, Layer0Site)
        self.layer0 = wrapped
        self.ctx = await aiocoap.Context.create_server_context(
            wrapped, bind=("127.0.0.1", self.port))

    async def stop(self) -> None:
        assert self.layer0 is not None and self.ctx is not None
        self.layer0.close()
        await self.ctx.shutdown()
        self.layer0 = self.ctx = None


@pytest.fixture(params=[False], ids=["every kind"])
async def origin(creds: dict[str, CertificateCredentials],
                 request: pytest.FixtureRequest) -> AsyncIterator[Origin]:
    port = free_udp_port()
    async with EvilProxy(default=("127.0.0.1", port)) as evil:
        o = Origin(creds, port, Echo(), evil, rpk_only=request.param)
        await o.start()
        try:
            yield o
        finally:
            if o.layer0 is not None:
                await o.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context()
    yield ctx
    await ctx.shutdown()


def requester(o: Origin, ctx: aiocoap.Context, kind: str = "certificate",
              kept: KeptContexts | None = None) -> OscoreRequester:
    cred: Any = {"certificate": o.creds["client"], "psk": PSK, "rpk": RPK}[kind]
    config = Layer0Config(transport_tuning=FastTuning())
    slot = kept.slot(origin_of(o.uri), cred) if kept is not None else None
    return OscoreRequester(
        ctx, o.uri,
        lambda: Layer0Client(ctx, o.uri, cred, proxy=o.evil.uri, config=config, exporter=True),
        proxy=o.evil.uri, kept=slot)


async def post(r: OscoreRequester, o: Origin, body: bytes) -> aiocoap.Message:
    msg = aiocoap.Message(code=Code.POST, uri=f"{o.uri}/echo", payload=body,
                          transport_tuning=FastTuning())
    return await asyncio.wait_for(r.request(msg).response, T)


def exchanges(o: Origin, since: int = 0) -> list[aiocoap.Message]:
    """The distinct CoAP requests the client sent (a retransmission counted once)."""
    seen: dict[int, aiocoap.Message] = {}
    for s in o.evil.seen[since:]:
        if s.direction == "up" and s.message.code.is_request():
            seen.setdefault(s.message.mid, s.message)
    return list(seen.values())


def is_folded_answer(msg: aiocoap.Message) -> bool:
    """The server's last handshake flight with the folded keying answer: Finished (epoch 1,
    handshake) and an application-data record, in one outer 2.04."""
    if msg.code != Code.CHANGED or not msg.payload:
        return False
    try:
        recs = records.split_records(bytes(msg.payload))
    except dtls.DtlsError:
        return False
    kinds = [records.content_type(r) for r in recs]
    return records.CONTENT_HANDSHAKE in kinds and 23 in kinds


def on_folded_answer(action: Callable[[list[bytes]], list[bytes]]) -> Any:
    def hook(msg: aiocoap.Message, _client: Any) -> list[Send] | None:
        if not is_folded_answer(msg):
            return None
        msg.payload = b"".join(action(records.split_records(bytes(msg.payload))))
        return [Send(msg)]
    return hook


# ------------------------------------------------------------------ round trips on the wire


@pytest.mark.parametrize(("kind", "expected"), [
    # ClientHello -> the server's flight (no cookie exchange while the server is not under
    # handshake load), the client's last flight -> the server's Finished with the OSCORE
    # parameters, the request.
    ("certificate", 3),
    ("psk", 3),
    ("rpk", 3),  # raw public keys (GnuTLS) too: its ALPN offer and choice fold the keying
])
async def test_cold_keying_costs_no_exchange_of_its_own(
    origin: Origin, client: aiocoap.Context, kind: str, expected: int
) -> None:
    r = requester(origin, client, kind)
    answer = await post(r, origin, b"cold")
    assert (answer.code, answer.payload) == (Code.CHANGED, b"echo cold")
    sent = exchanges(origin)
    # Before: a keying request of its own and a DELETE (close_notify) beside the request.
    assert len(sent) == expected, [(m.code, m.opt.uri_path) for m in sent]
    assert not any(m.code == Code.DELETE for m in sent)
    assert sent[-1].opt.oscore is not None  # the last one is the OSCORE request
    # The keying-only session ended at the server with its answer; one context was keyed.
    assert origin.layer0 is not None and not origin.layer0.core.sessions
    assert len(origin.store) == 1 and r.keyings == 1
    assert origin.echo.executed == [b"cold"]
    # The context works on: the next request is one exchange.
    before = len(origin.evil.seen)
    again = await post(r, origin, b"warm")
    assert again.payload == b"echo warm" and len(exchanges(origin, before)) == 1
    await r.close()


async def test_channel_sees_the_folded_parameters_and_both_ends_derive_one_context(
    origin: Origin, client: aiocoap.Context
) -> None:
    channel = Layer0Client(client, origin.uri, origin.creds["client"], proxy=origin.evil.uri)
    channel.alpn = KEYING_ALPN
    await asyncio.wait_for(channel.connect(), T)
    assert channel.agreed_alpn == KEYING_ALPN
    folded = channel.folded
    assert folded is not None and folded.code == Code.CHANGED
    assert folded.opt.content_format == PARAMETERS_CONTENT_FORMAT
    params = OscoreParameters.from_cbor(folded.payload)
    server_side = origin.store.get(params.client_id)
    assert server_side is not None and server_side.peer == "device-1"
    channel.forget_session()
    await channel.close()
    # A channel that offers nothing gets no folded answer and keys nothing.
    plain = Layer0Client(client, origin.uri, origin.creds["client"], proxy=origin.evil.uri)
    await asyncio.wait_for(plain.connect(), T)
    assert plain.agreed_alpn is None and plain.folded is None and len(origin.store) == 1
    assert len(origin.layer0.core.sessions) == 1  # type: ignore[union-attr]
    await plain.close()


# ------------------------------------------------------------------ a malicious proxy


@pytest.mark.parametrize("attack", ["remove", "alter"])
async def test_folded_answer_removed_or_altered_keys_nothing_on_the_client(
    origin: Origin, client: aiocoap.Context, attack: str
) -> None:
    def remove(recs: list[bytes]) -> list[bytes]:
        return [r for r in recs if records.content_type(r) != 23]

    def alter(recs: list[bytes]) -> list[bytes]:
        last = bytearray(recs[-1])
        last[-1] ^= 0x01
        return [*recs[:-1], bytes(last)]

    origin.evil.down = on_folded_answer(remove if attack == "remove" else alter)
    r = requester(origin, client)
    with pytest.raises(OscoreError, match="removed in transit"):
        await post(r, origin, b"attacked")
    origin.evil.down = None
    assert r.security_context is None and origin.echo.executed == []
    orphan = list(origin.store)  # keyed, never used: it ages out
    assert len(orphan) == 1
    # The next request keys afresh (a new handshake, new exporter output: other keys).
    answer = await post(r, origin, b"after")
    assert answer.payload == b"echo after" and r.keyings == 1
    fresh = r.security_context
    assert fresh.sender_key != orphan[0].recipient_key
    assert fresh.common_iv != orphan[0].common_iv
    await r.close()


async def test_dropped_folded_answer_is_repeated_and_keys_once(
    origin: Origin, client: aiocoap.Context
) -> None:
    """The answer to the last flight lost once: CoAP repeats the flight with its message ID,
    and the server's message layer repeats its answer from its deduplication cache (the
    session has ended; it is not processed again): one context, one handshake."""
    dropped: list[int] = []

    def drop_once(msg: aiocoap.Message, _client: Any) -> list[Send] | None:
        if is_folded_answer(msg) and not dropped:
            dropped.append(msg.mid)
            return []
        return None

    origin.evil.down = drop_once
    r = requester(origin, client)
    answer = await post(r, origin, b"lossy")
    origin.evil.down = None
    assert answer.payload == b"echo lossy" and dropped
    assert len(origin.store) == 1 and r.keyings == 1
    assert origin.layer0 is not None and origin.layer0.core.stats.handshakes == 1
    finals = [s.message for s in origin.evil.seen
              if s.direction == "up" and s.message.mid == dropped[0]]
    assert len(finals) == 2  # the flight, and CoAP's repeat of it
    await r.close()


async def test_replayed_keying_flight_keys_nothing_and_runs_nothing(
    origin: Origin, client: aiocoap.Context
) -> None:
    r = requester(origin, client)
    assert (await post(r, origin, b"one")).payload == b"echo one"
    finals = [m for m in exchanges(origin)
              if m.code == Code.POST and m.opt.uri_path != (".well-known", "atls")
              and m.opt.oscore is None]
    assert len(finals) == 1  # the client's last flight, which stood for the keying request
    client_address = origin.evil.seen[0].client
    replay = await origin.evil.inject(finals[0], client=client_address)
    assert replay is not None and replay.code == Code.NOT_FOUND  # the session has ended
    assert len(origin.store) == 1
    assert (await post(r, origin, b"two")).payload == b"echo two"
    assert origin.echo.executed == [b"one", b"two"] and r.keyings == 1
    await r.close()


@pytest.mark.parametrize("kind", ["certificate", "rpk"])
async def test_altered_alpn_offer_fails_the_handshake_and_keys_nothing(
    origin: Origin, client: aiocoap.Context, kind: str
) -> None:
    """The ALPN offer is in the transcript: changing it (here to a protocol the server does not
    fold) makes the Finished messages disagree, so no middle box can turn a keying handshake
    into a plain session or back."""
    edited: list[int] = []

    def edit(msg: aiocoap.Message, _client: Any) -> list[Send] | None:
        payload = bytes(msg.payload)
        if KEYING_ALPN in payload:
            edited.append(msg.mid)
            msg.payload = payload.replace(KEYING_ALPN, b"atls-oscorf")
            return [Send(msg)]
        return None

    origin.evil.up = edit
    r = requester(origin, client, kind)
    with pytest.raises((Layer0Error, OscoreError)):
        await post(r, origin, b"attacked")
    origin.evil.up = None
    assert edited and len(origin.store) == 0 and origin.echo.executed == []
    assert (await post(r, origin, b"after")).payload == b"echo after"
    await r.close()


async def test_a_resumed_handshake_that_asks_for_keying_keys_nothing(
    origin: Origin, client: aiocoap.Context
) -> None:
    """One keying per full handshake (section 1): a resumption that agrees on the protocol gets
    the folded 4.03, and nothing is keyed."""
    cert = origin.creds["client"]
    tickets = dtls.TicketStore()
    shared = dtls.build_context(cert, server=False)
    full = Layer0Client(client, origin.uri, cert, tickets=tickets, ssl_context=shared)
    await asyncio.wait_for(full.connect(), T)
    await full.close()
    resumed = Layer0Client(client, origin.uri, cert, tickets=tickets, ssl_context=shared)
    resumed.alpn = KEYING_ALPN
    assert (await asyncio.wait_for(resumed.connect(), T)).resumed is True
    folded = resumed.folded
    assert folded is not None
    assert (folded.code, folded.payload) == (Code.FORBIDDEN, NEEDS_FULL_HANDSHAKE)
    assert len(origin.store) == 0
    resumed.forget_session()
    await resumed.close()


# ------------------------------------------------------------------ restarts and kept contexts


async def test_server_restart_between_two_runs_rekeys_by_itself(
    origin: Origin, client: aiocoap.Context, tmp_path: Path
) -> None:
    kept = KeptContexts(tmp_path / "oscore")
    first = requester(origin, client, kept=kept)
    assert (await post(first, origin, b"run 1")).payload == b"echo run 1"
    await first.close()
    # Warm: the kept context, one exchange.
    second = requester(origin, client, kept=kept)
    assert second.restored
    before = len(origin.evil.seen)
    assert (await post(second, origin, b"run 2")).payload == b"echo run 2"
    assert len(exchanges(origin, before)) == 1 and second.keyings == 0
    await second.close()
    # The server restarts and loses its contexts: the third run re-keys by itself (its refused
    # request checked with prior=, an explicit keying request), and is answered once.
    await origin.stop()
    await origin.start()
    third = requester(origin, client, kept=kept)
    assert third.restored
    assert (await post(third, origin, b"run 3")).payload == b"echo run 3"
    assert third.keyings == 1
    assert origin.echo.executed == [b"run 1", b"run 2", b"run 3"]
    await third.close()
    fourth = requester(origin, client, kept=kept)  # and the new context is the kept one
    before = len(origin.evil.seen)
    assert (await post(fourth, origin, b"run 4")).payload == b"echo run 4"
    assert len(exchanges(origin, before)) == 1 and fourth.keyings == 0
    await fourth.close()


async def test_explicit_keying_still_served(origin: Origin, client: aiocoap.Context) -> None:
    """A client that does not offer the protocol (an older one, or tinydtls, which has no
    ALPN) keys with the explicit request, as before."""
    channel = Layer0Client(client, origin.uri, origin.creds["client"], proxy=origin.evil.uri)
    msg = aiocoap.Message(code=Code.POST, uri_path=KEYING_PATH)
    answer = await asyncio.wait_for(channel.request(msg).response, T)
    assert answer.code == Code.CHANGED and channel.folded is None
    OscoreParameters.from_cbor(answer.payload)
    assert len(origin.store) == 1
    await channel.close()


@pytest.mark.parametrize("kind", ["certificate", "rpk"])
async def test_a_server_that_does_not_fold_is_asked_explicitly(
    origin: Origin, client: aiocoap.Context, kind: str
) -> None:
    """Against a server that does not agree on the protocol (one without the fold, as before
    it), the client's offer changes nothing: it keys with the explicit request and closes."""
    assert origin.layer0 is not None
    origin.layer0.core.folded.clear()
    for listener in origin.layer0.core.listener.listeners:  # type: ignore[attr-defined]
        listener.alpn = frozenset()
    r = requester(origin, client, kind)
    answer = await post(r, origin, b"old server")
    assert answer.payload == b"echo old server" and r.keyings == 1
    sent = exchanges(origin)
    keying = [m for m in sent if m.opt.oscore is None and m.code == Code.POST
              and m.opt.uri_path not in ((".well-known", "atls"),)]
    # ClientHello (no cookie exchange), last flight, keying request; the request; the DELETE.
    assert len(sent) == 5 and len(keying) == 2, [(m.code, m.opt.uri_path) for m in sent]
    await r.close()
    assert any(m.code == Code.DELETE for m in exchanges(origin))


# ------------------------------------------------------------------ raw public keys (GnuTLS)


@pytest.mark.parametrize("origin", [False, True], ids=["every kind", "rpk only"],
                         indirect=True)
async def test_rpk_keying_folds_on_a_gnutls_listener_alone_or_beside_others(
    origin: Origin, client: aiocoap.Context
) -> None:
    """GnuTLS on both ends: the server's GnuTLS listener (alone, or behind the listener that
    hands each ClientHello to its kind's backend) agrees on the protocol and folds."""
    r = requester(origin, client, "rpk")
    assert (await post(r, origin, b"rpk")).payload == b"echo rpk"
    sent = exchanges(origin)
    assert len(sent) == 3 and r.keyings == 1, [(m.code, m.opt.uri_path) for m in sent]
    assert origin.layer0 is not None and not origin.layer0.core.sessions
    await r.close()


@pytest.mark.parametrize("offer", [True, False], ids=["offers", "does not offer"])
async def test_rpk_channel_agrees_only_when_it_offers(
    origin: Origin, client: aiocoap.Context, offer: bool
) -> None:
    """The agreed protocol is on the GnuTLS session as on OpenSSL's; a client that does not
    offer it gets a plain session and can still key with the explicit request."""
    channel = Layer0Client(client, origin.uri, RPK, proxy=origin.evil.uri)
    if offer:
        channel.alpn = KEYING_ALPN
    await asyncio.wait_for(channel.connect(), T)
    if offer:
        assert channel.agreed_alpn == KEYING_ALPN and channel.folded is not None
        params = OscoreParameters.from_cbor(channel.folded.payload)
        assert origin.store.get(params.client_id) is not None
        channel.forget_session()
    else:
        assert channel.agreed_alpn is None and channel.folded is None
        msg = aiocoap.Message(code=Code.POST, uri_path=KEYING_PATH)
        answer = await asyncio.wait_for(channel.request(msg).response, T)
        assert answer.code == Code.CHANGED
        OscoreParameters.from_cbor(answer.payload)
    assert len(origin.store) == 1
    await channel.close()
