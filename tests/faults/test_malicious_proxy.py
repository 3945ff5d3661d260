"""Part 7 of issue 8: a malicious proxy that alters, drops, replays, reorders or redirects Layer 0
(PSK and certificate) and OSCORE traffic never makes the client accept a wrong answer, nor the
server execute a wrong request or one request twice.

Topology: client --> EvilProxy (tests/faults/evilproxy.py, a real UDP forward proxy that parses
and re-encodes every CoAP message) --> application server. The server requires end-to-end
protection (``Layer0ServerOptions(required=True)``): a server that also serves plain CoAP executes
whatever anybody sends it in plain, which is no property of the layers.

POST /count executes (count += 1) and answers ``nonce count``. For every case, the checks of
:func:`verify` hold: each answer the client accepts carries the nonce of its own request and the
count its execution produced; the server's ``executed`` list holds each nonce at most once and
only nonces a client sent; a refused request ends in a typed error of the client within a
bounded time (the library's own timers; the ``wait_for`` bound only catches hangs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import pytest
from aiocoap import GET, POST, Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning

from coaplayers import layer1
from coaplayers.layer0 import (
    HandshakeFailed,
    Layer0Client,
    Layer0Config,
    Layer0Error,
    OuterError,
    RecordRejected,
    ResponseRejected,
    SessionLost,
)
from coaplayers.layer0.profile import is_layer0_path
from coaplayers.oscore import (
    AlreadyProcessed,
    OscoreError,
    RehandshakeRequired,
    UnprotectedErrorResponse,
)

from .conftest import App, Keys, make_keys, oscore_requester
from .evilproxy import Address, EvilProxy, Send, copy_message

BOUND = 20.0  # catches hangs only: every refusal below comes from the library's own timers
MODES = ["psk", "cert", "oscore"]
L0_MODES = ["psk", "cert"]
CLIENT_ERRORS = (Layer0Error, aiocoap.error.Error)  # OscoreError is an aiocoap Error


class ShortTuning(TransportTuning):
    """Outer CoAP timers: on loopback without loss an exchange that got no answer within
    ~1 s (three tries) was dropped on purpose, so give up then."""

    ACK_TIMEOUT = 0.1
    MAX_RETRANSMIT = 2


# ------------------------------------------------------------------------ the servers


class StrictApp(App):
    """The application server of conftest, requiring end-to-end protection."""

    def __init__(self, creds: Keys) -> None:
        super().__init__(creds, required=True)


@pytest.fixture(scope="module")
def other_creds(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """A second, unrelated credential set (other PSKs, other end-to-end CA)."""
    return make_keys(tmp_path_factory.mktemp("keys-b") / "set")


@contextlib.asynccontextmanager
async def running(server: StrictApp) -> Any:
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def app(creds: Keys) -> Any:
    async with running(StrictApp(creds)) as server:
        yield server


@pytest.fixture
async def app_b(other_creds: Keys) -> Any:
    async with running(StrictApp(other_creds)) as server:
        yield server


@pytest.fixture
async def evil(app: StrictApp) -> Any:
    async with EvilProxy(default=app.address) as proxy:
        yield proxy
        assert not proxy.errors, proxy.errors


# ------------------------------------------------------------------------ the clients


@dataclass
class Outcome:
    nonce: bytes
    answer: Message | None = None
    error: BaseException | None = None


@dataclass
class Peer:
    """One client in one end-to-end mode, talking through the evil proxy."""

    mode: str
    ctx: layer1.LayeredContext
    creds: Keys
    app: App
    evil: EvilProxy
    exchange_timeout: float = 3.0
    sent: list[bytes] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    address: Address | None = None

    def __post_init__(self) -> None:
        origin = self.app.uri
        self.ch: Layer0Client | None = None
        self.osc: Any = None
        if self.mode == "oscore":
            self.osc = oscore_requester(self.ctx, origin, self.creds, self.evil.uri)
        else:
            cred = (self.creds.e2e_psk_client() if self.mode == "psk"
                    else self.creds.e2e_client_cert())
            config = Layer0Config(
                transport_tuning=ShortTuning(), exchange_timeout=self.exchange_timeout,
                handshake_timeout=10.0,
            )
            self.ch = Layer0Client(self.ctx.context, origin, cred, proxy=self.evil.uri,
                                    config=config)

    def request(self, code: Code, path: str, payload: bytes = b"",
                query: str | None = None) -> Any:
        if self.osc is not None:
            uri = f"{self.app.uri}/{path}" + (f"?{query}" if query else "")
            msg = Message(code=code, uri=uri, payload=payload, transport_tuning=ShortTuning())
            return self.osc.request(msg)
        assert self.ch is not None
        msg = Message(code=code, uri_path=[path], payload=payload)
        if query:
            msg.opt.uri_query = [query]
        return self.ch.request(msg)

    def post_request(self, tag: str) -> tuple[bytes, Any]:
        nonce = f"{self.mode}-{tag}-{os.urandom(3).hex()}".encode()
        self.sent.append(nonce)
        return nonce, self.request(POST, "count", nonce)

    async def settle(self, nonce: bytes, pending: Any) -> Outcome:
        """Await one POST's answer; check what the client accepted (see module doc)."""
        out = Outcome(nonce)
        try:
            out.answer = await asyncio.wait_for(pending.response, BOUND)
        except CLIENT_ERRORS as exc:
            out.error = exc
        self.outcomes.append(out)
        if out.answer is not None:
            check_answer(self.app, nonce, out.answer)
        return out

    async def post(self, tag: str) -> Outcome:
        return await self.settle(*self.post_request(tag))

    async def get(self, n: str) -> Message:
        answer = await asyncio.wait_for(self.request(GET, "nonce", query=n).response, BOUND)
        assert (answer.code, answer.payload) == (Code.CONTENT, b"nonce " + n.encode()), answer
        return answer

    async def warm_up(self) -> None:
        """One honest exchange: session (or context) established, client address known."""
        before = len(self.evil.seen)
        out = await self.post("warm-up")
        assert out.answer is not None, out.error
        self.address = self.evil.seen[before].client

    @property
    def setups(self) -> int:
        """Layer 0 handshakes (or OSCORE keyings) this client ran."""
        return self.osc.keyings if self.osc is not None else self.ch.handshakes  # type: ignore

    async def close(self) -> None:
        if self.osc is not None:
            await self.osc.close()
        elif self.ch is not None:
            self.ch.forget_session()

    # what the proxy sees of this client's protected traffic

    def is_protected_request(self, msg: Message) -> bool:
        if not msg.code.is_request():
            return False
        if self.mode == "oscore":
            return msg.opt.oscore is not None
        return (msg.code == POST and len(msg.opt.uri_path) == 1
                and is_layer0_path(msg.opt.uri_path) and msg.payload[:1] == b"\x17")

    def is_protected_answer(self, msg: Message) -> bool:
        if not msg.code.is_response():
            return False
        if self.mode == "oscore":
            return msg.opt.oscore is not None
        return msg.code == Code.CHANGED and msg.payload[:1] == b"\x17"


def check_answer(app: App, nonce: bytes, answer: Message) -> None:
    """An accepted answer is the answer to this very request, from this execution."""
    assert answer.code == Code.CHANGED, answer
    answered, _, count = bytes(answer.payload).partition(b" ")
    assert answered == nonce, f"answer {answer.payload!r} accepted for request {nonce!r}"
    assert nonce in app.executed
    assert int(count) == app.executed.index(nonce) + 1, "an answer with another count"


def verify(apps: list[App], peers: list[Peer]) -> None:
    """The suite's invariants, after a case."""
    sent = {n for p in peers for n in p.sent}
    for a in apps:
        assert len(set(a.executed)) == len(a.executed), f"executed twice: {a.executed}"
        assert set(a.executed) <= sent, "executed a request no client sent"
        assert a.count == len(a.executed)
    for p in peers:
        for out in p.outcomes:
            assert (out.answer is None) != (out.error is None)
            executed = sum(out.nonce in a.executed for a in apps)
            if out.answer is not None:
                assert executed == 1


@pytest.fixture
async def make_peer(creds: Keys, app: StrictApp, evil: EvilProxy, client_contexts) -> Any:
    made: list[Peer] = []

    async def make(mode: str, *, warm: bool = True, **kw: Any) -> Peer:
        (ctx,) = await client_contexts(1)
        peer = Peer(mode, ctx, kw.pop("creds", creds), kw.pop("app", app), evil, **kw)
        made.append(peer)
        if warm:
            await peer.warm_up()
        return peer

    yield make
    for peer in made:
        await peer.close()


# ---------------------------------------------------------------------------- hooks


Action = Callable[[Message], "list[Send] | Message | None"]


class Tamper:
    """A hook: apply ``action`` to the first ``times`` messages ``match`` accepts, and the same
    to their CoAP retransmissions (same client and message ID); forward the rest."""

    def __init__(self, match: Callable[[Message], bool], action: Action, times: int = 1) -> None:
        self.match, self.action, self.left = match, action, times
        self.keys: set[tuple[Address, int]] = set()
        self.hits = 0

    def __call__(self, msg: Message, client: Address) -> list[Send] | None:
        key = (client, msg.mid)
        if key not in self.keys:
            if self.left <= 0 or not self.match(msg):
                return None
            self.left -= 1
            self.keys.add(key)
        self.hits += 1
        out = self.action(msg)
        if out is None:
            return []
        return [Send(out)] if isinstance(out, Message) else out


def flip(position: Callable[[int], int], mask: int = 0x01) -> Action:
    def act(msg: Message) -> Message:
        payload = bytearray(msg.payload)
        payload[position(len(payload))] ^= mask
        msg.payload = bytes(payload)
        return msg
    return act


def flip_option(position: int, mask: int = 0x01) -> Action:
    def act(msg: Message) -> Message:
        value = bytearray(msg.opt.oscore)
        value[position % len(value)] ^= mask
        msg.opt.oscore = bytes(value)
        return msg
    return act


def edit(fn: Callable[[Message], object]) -> Action:
    def act(msg: Message) -> Message:
        fn(msg)
        return msg
    return act


def drop(msg: Message) -> None:
    return None


# DTLS 1.2 record: type(1) version(2) epoch(2) sequence(6) length(2) | explicit nonce(8)
# ciphertext | tag (8 for CCM_8, 16 for GCM).
L0_FLIPS: dict[str, Callable[[int], int]] = {
    "header-type": lambda n: 0,
    "header-version": lambda n: 2,
    "header-epoch": lambda n: 4,
    "header-sequence": lambda n: 10,
    "header-length": lambda n: 12,
    "explicit-nonce": lambda n: 15,
    "ciphertext": lambda n: 21 + (n - 29) // 2,
    "tag": lambda n: n - 1,
}
# OSCORE: ciphertext | tag(8, AES-CCM-16-64-128) in the payload; option = flags | PIV | kid.
OSCORE_PAYLOAD_FLIPS: dict[str, Callable[[int], int]] = {
    "ciphertext": lambda n: (n - 8) // 2,
    "tag": lambda n: n - 1,
}
OSCORE_OPTION_FLIPS = {  # (position, mask)
    "flags-piv-length": (0, 0x01),
    "flags-kid-flag": (0, 0x08),
    "flags-kid-context-flag": (0, 0x10),
    "flags-reserved": (0, 0x80),
    "piv": (1, 0x01),
    "kid": (-1, 0x01),
}


async def attack_one_post(peer: Peer, hook: Tamper, direction: str = "up") -> Outcome:
    """Arm ``hook`` on one direction, send one POST, disarm; the hook must have acted."""
    setattr(peer.evil, direction, hook)
    try:
        out = await peer.post("attacked")
    finally:
        setattr(peer.evil, direction, None)
    assert hook.hits >= 1, "the attack never happened"
    return out


async def still_works(peer: Peer, *, same_session: bool = True) -> None:
    """After the attack the client goes on (on the same session/context unless told)."""
    setups = peer.setups
    out = await peer.post("after")
    assert out.answer is not None, out.error
    if same_session:
        assert peer.setups == setups, "the attack cost a new handshake"


def executed_times(app: App, nonce: bytes) -> int:
    return app.executed.count(nonce)


# ======================================================================= ALTER: requests


@pytest.mark.parametrize("where", sorted(L0_FLIPS))
@pytest.mark.parametrize("mode", L0_MODES)
async def test_layer0_request_byte_flip_is_refused(
    mode: str, where: str, make_peer: Any, app: StrictApp
) -> None:
    peer = await make_peer(mode)
    out = await attack_one_post(peer, Tamper(peer.is_protected_request, flip(L0_FLIPS[where])))
    # Every flip (23 -> 22 too: a handshake record on an established session without the
    # handshake tag) gets the unknown-session 4.04; the client's inner Ping finds the session
    # alive, so it reports the refusal and keeps the session.
    assert isinstance(out.error, RecordRejected), out
    assert executed_times(app, out.nonce) == 0
    await still_works(peer)
    verify([app], [peer])


@pytest.mark.parametrize(
    "where", sorted(OSCORE_PAYLOAD_FLIPS) + ["option-" + k for k in sorted(OSCORE_OPTION_FLIPS)]
)
async def test_oscore_request_byte_flip_is_refused(
    where: str, make_peer: Any, app: StrictApp
) -> None:
    """The server refuses the altered request (unprotected 4.00/4.01/4.02); a refusal that means
    "context gone" makes the client re-key and send again: then it runs once, unaltered."""
    peer = await make_peer("oscore")
    if where.startswith("option-"):
        action = flip_option(*OSCORE_OPTION_FLIPS[where.removeprefix("option-")])
    else:
        action = flip(OSCORE_PAYLOAD_FLIPS[where])
    out = await attack_one_post(peer, Tamper(peer.is_protected_request, action))
    if out.error is not None:
        assert isinstance(out.error, UnprotectedErrorResponse | RehandshakeRequired), out
        assert executed_times(app, out.nonce) == 0
    else:
        assert peer.setups == 2, "accepted without the re-keyed resend"
        assert executed_times(app, out.nonce) == 1
    await still_works(peer, same_session=False)
    verify([app], [peer])


OUTER_EDITS_L0: dict[str, Callable[[Message], object]] = {
    "content-format-0": lambda m: setattr(m.opt, "content_format", 0),
    "content-format-removed": lambda m: setattr(m.opt, "content_format", None),
    "session-name-other": lambda m: setattr(m.opt, "uri_path", ("~AAAAA",)),
    "session-name-removed": lambda m: setattr(m.opt, "uri_path", ()),
    "session-name-to-entry": lambda m: setattr(m.opt, "uri_path", (".well-known", "atls")),
    "path-to-resource": lambda m: setattr(m.opt, "uri_path", ("count",)),
    "code-get": lambda m: setattr(m, "code", Code.GET),
    "code-put": lambda m: setattr(m, "code", Code.PUT),
    "code-delete": lambda m: setattr(m, "code", Code.DELETE),
    "code-fetch": lambda m: setattr(m, "code", Code.FETCH),
    "truncate-1": lambda m: setattr(m, "payload", m.payload[:-1]),
    "truncate-to-header": lambda m: setattr(m, "payload", m.payload[:13]),
    "truncate-half": lambda m: setattr(m, "payload", m.payload[: len(m.payload) // 2]),
    "append-byte": lambda m: setattr(m, "payload", m.payload + b"\x00"),
    "append-garbage-record": lambda m: setattr(
        m, "payload", m.payload + m.payload[:3] + b"\x00\x01" + bytes(6) + b"\x00\x10"
        + bytes(16)),
}
# What the client may see for each: the record never reached a DTLS session that accepted it.
L0_EDIT_ERRORS = (RecordRejected, SessionLost, OuterError)
# Edits that leave the authentic record intact and acceptable: no Content-Format is allowed
# (docs/PROTOCOL.md, section 2), and a garbage record after ours is dropped by DTLS alone.
L0_HARMLESS_EDITS = {"content-format-removed", "append-garbage-record"}


@pytest.mark.parametrize("what", sorted(OUTER_EDITS_L0))
@pytest.mark.parametrize("mode", L0_MODES)
async def test_layer0_outer_request_edits_are_refused(
    mode: str, what: str, make_peer: Any, app: StrictApp
) -> None:
    peer = await make_peer(mode)
    out = await attack_one_post(peer, Tamper(peer.is_protected_request,
                                             edit(OUTER_EDITS_L0[what])))
    if what in L0_HARMLESS_EDITS:
        assert out.answer is not None, out  # the authentic request, run once (verify)
    else:
        assert isinstance(out.error, L0_EDIT_ERRORS), out
        assert executed_times(app, out.nonce) == 0
    # A wrong session name makes the client believe the session is gone (4.04): it
    # handshakes again. Everything else leaves the session as it was.
    await still_works(peer, same_session=not what.startswith("session-name"))
    verify([app], [peer])


async def test_layer0_appended_copy_of_the_record_runs_once(
    make_peer: Any, app: StrictApp
) -> None:
    """The record twice in one datagram: the second copy is a replay inside the datagram."""
    peer = await make_peer("psk")
    hook = Tamper(peer.is_protected_request,
                  edit(lambda m: setattr(m, "payload", m.payload + m.payload)))
    out = await attack_one_post(peer, hook)
    assert out.answer is not None or isinstance(out.error, RecordRejected), out
    assert executed_times(app, out.nonce) <= 1
    await still_works(peer)
    verify([app], [peer])


OUTER_EDITS_OSCORE: dict[str, Callable[[Message], object]] = {
    "content-format-added": lambda m: setattr(m.opt, "content_format", 0),
    "uri-path-added": lambda m: setattr(m.opt, "uri_path", ("nonce",)),
    "uri-path-to-tunnel": lambda m: setattr(m.opt, "uri_path", (".well-known", "atls")),
    "code-get": lambda m: setattr(m, "code", Code.GET),
    "code-put": lambda m: setattr(m, "code", Code.PUT),
    "code-delete": lambda m: setattr(m, "code", Code.DELETE),
    "code-fetch": lambda m: setattr(m, "code", Code.FETCH),
    "oscore-option-removed": lambda m: setattr(m.opt, "oscore", None),
    "oscore-option-empty": lambda m: setattr(m.opt, "oscore", b""),
    "truncate-1": lambda m: setattr(m, "payload", m.payload[:-1]),
    "truncate-to-4": lambda m: setattr(m, "payload", m.payload[:4]),
    "payload-removed": lambda m: setattr(m, "payload", b""),
    "append-byte": lambda m: setattr(m, "payload", m.payload + b"\x00"),
}


@pytest.mark.parametrize("what", sorted(OUTER_EDITS_OSCORE))
async def test_oscore_outer_request_edits_never_run_a_wrong_request(
    what: str, make_peer: Any, app: StrictApp
) -> None:
    """Outer options and the outer code are not what the server acts on (the inner ones are
    authenticated): an edit is either refused or the authentic request runs, once."""
    peer = await make_peer("oscore")
    out = await attack_one_post(peer, Tamper(peer.is_protected_request,
                                             edit(OUTER_EDITS_OSCORE[what])))
    if out.error is not None:
        assert isinstance(out.error, OscoreError | aiocoap.error.Error), out
        assert executed_times(app, out.nonce) == 0
    else:
        assert executed_times(app, out.nonce) == 1
    await still_works(peer, same_session=False)
    verify([app], [peer])


# ======================================================================= ALTER: answers


L0_ANSWER_EDITS: dict[str, Callable[[Message], object]] = {
    **{f"flip-{k}": (lambda pos: lambda m: flip(pos)(m))(v) for k, v in L0_FLIPS.items()},
    "truncate-1": lambda m: setattr(m, "payload", m.payload[:-1]),
    "append-byte": lambda m: setattr(m, "payload", m.payload + b"\x00"),
    "payload-removed": lambda m: setattr(m, "payload", b""),
    "code-2.05": lambda m: setattr(m, "code", Code.CONTENT),
}


@pytest.mark.parametrize("what", sorted(L0_ANSWER_EDITS))
@pytest.mark.parametrize("mode", L0_MODES)
async def test_layer0_altered_answer_is_rejected(
    mode: str, what: str, make_peer: Any, app: StrictApp
) -> None:
    peer = await make_peer(mode)
    hook = Tamper(peer.is_protected_answer, edit(L0_ANSWER_EDITS[what]))
    out = await attack_one_post(peer, hook, "down")
    assert isinstance(out.error, ResponseRejected | OuterError), out
    assert executed_times(app, out.nonce) == 1  # it ran; its answer never reached the client
    await still_works(peer)
    verify([app], [peer])


OSCORE_ANSWER_EDITS: dict[str, Callable[[Message], object]] = {
    "flip-ciphertext": lambda m: flip(OSCORE_PAYLOAD_FLIPS["ciphertext"])(m),
    "flip-tag": lambda m: flip(OSCORE_PAYLOAD_FLIPS["tag"])(m),
    "option-piv-added": lambda m: setattr(m.opt, "oscore", b"\x01\x07"),
    "option-kid-added": lambda m: setattr(m.opt, "oscore", b"\x08\x00"),
    "option-flags-reserved": lambda m: setattr(m.opt, "oscore", b"\x80"),
    "truncate-1": lambda m: setattr(m, "payload", m.payload[:-1]),
    "append-byte": lambda m: setattr(m, "payload", m.payload + b"\x00"),
    "payload-removed": lambda m: setattr(m, "payload", b""),
    "code-2.05": lambda m: setattr(m, "code", Code.CONTENT),
}


@pytest.mark.parametrize("what", sorted(OSCORE_ANSWER_EDITS))
async def test_oscore_altered_answer_is_rejected(
    what: str, make_peer: Any, app: StrictApp
) -> None:
    peer = await make_peer("oscore")
    hook = Tamper(peer.is_protected_answer, edit(OSCORE_ANSWER_EDITS[what]))
    out = await attack_one_post(peer, hook, "down")
    if what == "code-2.05":  # the outer code is not what the client reads (RFC 8613 4.2)
        assert out.answer is not None or out.error is not None
    else:
        assert isinstance(out.error, aiocoap.error.Error), out
    assert executed_times(app, out.nonce) == 1
    await still_works(peer)
    verify([app], [peer])


def forged(code: Code, payload: bytes) -> Action:
    """Replace the server's answer by an unprotected one, keeping message ID and token."""
    def act(msg: Message) -> Message:
        fake = copy_message(msg)
        fake.code, fake.payload = code, payload
        fake.opt = Message().opt
        return fake
    return act


FORGED = {
    "oscore": [
        (Code.UNAUTHORIZED, b"Security context not found"),
        (Code.BAD_REQUEST, b"Decryption failed"),
        (Code.UNAUTHORIZED, b"Replay detected"),
    ],
    "psk": [(Code.NOT_FOUND, b"unknown session"), (Code.UNAUTHORIZED, b"rejected"),
            (Code.FORBIDDEN, b"")],
}


@pytest.mark.parametrize(
    "mode,code,payload",
    [(m, c, p) for m in ("psk", "oscore") for c, p in FORGED[m]],
    ids=lambda v: v if isinstance(v, str) else (str(v) if not isinstance(v, bytes) else None),
)
async def test_forged_error_answer_after_execution_never_runs_it_twice(
    mode: str, code: Code, payload: bytes, make_peer: Any, app: StrictApp
) -> None:
    """The proxy lets the POST run, then answers the client with an unauthenticated error of
    the server's own kind. The client must not take that as "not executed" and send it again:
    the server would run the POST twice. (Until the fix of this suite, OscoreRequester did
    just that after "Security context not found" / "Decryption failed".)"""
    peer = await make_peer(mode)
    out = await attack_one_post(peer, Tamper(peer.is_protected_answer, forged(code, payload)),
                                "down")
    assert executed_times(app, out.nonce) == 1
    assert out.error is not None, out
    if mode == "oscore" and payload != b"Replay detected":
        # Checked with the server in a new Layer 0 session: it had processed the request.
        assert isinstance(out.error, AlreadyProcessed), out
        await still_works(peer)  # the context was alive all along and stays in use
    else:
        await still_works(peer, same_session=False)
    verify([app], [peer])


async def test_oscore_forged_refusal_of_a_request_held_back_resends_it_once(
    make_peer: Any, app: StrictApp
) -> None:
    """The proxy keeps the request and answers "Security context not found" itself. The
    server confirms (new Layer 0 session) that it never processed that Partial IV and ends
    the old context; the client sends the request again under the new one; when the proxy
    then releases the copy it kept, the server refuses it (context gone): run once."""
    peer = await make_peer("oscore")
    kept: list[Message] = []

    def keep_and_refuse(msg: Message) -> list[Send]:
        kept.append(copy_message(msg))
        fake = forged(Code.UNAUTHORIZED, b"Security context not found")(msg)
        assert isinstance(fake, Message)
        fake.mtype = aiocoap.ACK
        fake.code = Code.UNAUTHORIZED
        return [Send(fake, back=True)]

    out = await attack_one_post(peer, Tamper(peer.is_protected_request, keep_and_refuse))
    assert out.answer is not None, out
    assert peer.setups == 2 and executed_times(app, out.nonce) == 1
    late = await peer.evil.inject(kept[0], client=peer.address)
    assert late is not None and late.code == Code.UNAUTHORIZED, late
    assert late.payload.startswith(b"Security context not found")
    assert executed_times(app, out.nonce) == 1
    verify([app], [peer])


# ============================================================================= DROP


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("mode", MODES)
async def test_dropped_post_ends_in_a_timeout_error_and_runs_at_most_once(
    mode: str, direction: str, make_peer: Any, app: StrictApp
) -> None:
    """Every copy of one request (or of its answer, CoAP retransmissions included) is dropped:
    the client gives up with a typed error after its own timers; the server ran the POST
    once when the request got through (its retransmissions are deduplicated), else never."""
    peer = await make_peer(mode)
    match = peer.is_protected_request if direction == "up" else peer.is_protected_answer
    hook = Tamper(match, drop)
    out = await attack_one_post(peer, hook, direction)
    if mode == "oscore":
        assert isinstance(out.error, aiocoap.error.ConRetransmitsExceeded), out
    else:
        assert isinstance(out.error, OuterError), out
    assert hook.hits >= 2, "the client never retransmitted"
    assert executed_times(app, out.nonce) == (0 if direction == "up" else 1)
    await still_works(peer)
    verify([app], [peer])


@pytest.mark.parametrize("mode", L0_MODES)
async def test_layer0_get_whose_answer_was_dropped_is_resent_and_answered_right(
    mode: str, make_peer: Any, app: StrictApp
) -> None:
    """An idempotent request is sent again in a new record after its exchange failed."""
    peer = await make_peer(mode)
    hook = Tamper(peer.is_protected_answer, drop)
    peer.evil.down = hook
    try:
        await peer.get("dropped-once")
    finally:
        peer.evil.down = None
    assert hook.hits >= 2 and app.gets == 2
    verify([app], [peer])


# =========================================================================== REPLAY


def last(messages: list[Message], match: Callable[[Message], bool]) -> Message:
    found = [m for m in messages if match(m)]
    assert found, "nothing recorded"
    return found[-1]


@pytest.mark.parametrize("source", ["same-client", "fresh-socket"])
@pytest.mark.parametrize("mode", MODES)
async def test_replayed_request_is_refused_and_not_run_again(
    mode: str, source: str, make_peer: Any, app: StrictApp
) -> None:
    """A recorded protected request, sent again by the proxy as a new CoAP exchange (fresh
    message ID and token, so CoAP deduplication does not hide it): refused (Layer 0: as an
    unknown session name is, 4.04; OSCORE: 4.01), not executed."""
    peer = await make_peer(mode)
    first = await peer.post("original")
    assert first.answer is not None
    recorded = last(peer.evil.requests(peer.address), peer.is_protected_request)
    answer = await peer.evil.inject(
        recorded, client=peer.address if source == "same-client" else None
    )
    assert answer is not None, "no answer to the replay"
    if mode == "oscore":
        assert answer.code == Code.UNAUTHORIZED, answer
        assert answer.opt.oscore is None and answer.payload.startswith(b"Replay detected")
    else:
        assert (answer.code, answer.payload) == (Code.NOT_FOUND, b"unknown session"), answer
    assert executed_times(app, first.nonce) == 1
    await still_works(peer)
    verify([app], [peer])


def replace_with(recorded: Message) -> Action:
    """Send ``recorded`` in place of the message at hand (keeping its type, ID and token)."""
    def act(msg: Message) -> Message:
        fake = copy_message(recorded)
        fake.mtype, fake.mid, fake.token = msg.mtype, msg.mid, msg.token
        return fake
    return act


@pytest.mark.parametrize("mode", MODES)
async def test_earlier_request_replayed_in_place_of_a_later_one_is_refused(
    mode: str, make_peer: Any, app: StrictApp
) -> None:
    peer = await make_peer(mode)
    first = await peer.post("first")
    recorded = last(peer.evil.requests(peer.address), peer.is_protected_request)
    out = await attack_one_post(peer, Tamper(peer.is_protected_request, replace_with(recorded)))
    if mode == "oscore":
        assert isinstance(out.error, UnprotectedErrorResponse), out
        assert out.error.response.payload.startswith(b"Replay detected")
    else:
        assert isinstance(out.error, RecordRejected), out
    assert executed_times(app, first.nonce) == 1 and executed_times(app, out.nonce) == 0
    await still_works(peer)
    verify([app], [peer])


@pytest.mark.parametrize("mode", MODES)
async def test_earlier_answer_replayed_to_a_later_request_is_rejected(
    mode: str, make_peer: Any, app: StrictApp
) -> None:
    peer = await make_peer(mode)
    first = await peer.post("first")
    assert first.answer is not None
    recorded = last(peer.evil.answers(), peer.is_protected_answer)
    out = await attack_one_post(peer, Tamper(peer.is_protected_answer, replace_with(recorded)),
                                "down")
    if mode == "oscore":
        assert isinstance(out.error, aiocoap.error.Error), out
    else:
        assert isinstance(out.error, ResponseRejected), out
    assert executed_times(app, out.nonce) == 1
    await still_works(peer)
    verify([app], [peer])


# ========================================================================== REORDER


class Swap:
    """Hold the first message ``match`` accepts until a second one (of any client) arrives,
    then deliver both: in swapped order, or (``bodies``) each with the other's payload and
    OSCORE option, each to its own client. Copies of the held message are dropped meanwhile."""

    def __init__(self, match: Callable[[Message], bool], *, bodies: bool = False,
                 later_first: Callable[[Message], int] | None = None) -> None:
        self.match, self.bodies, self.later_first = match, bodies, later_first
        self.held: tuple[tuple[Address, int], Message] | None = None
        self.done = False
        self.hits = 0
        self.delivered: list[Message] = []

    def __call__(self, msg: Message, client: Address) -> list[Send] | None:
        if self.done or not self.match(msg):
            return None
        key = (client, msg.mid)
        if self.held is None:
            self.held, self.hits = (key, msg), 1
            return []
        if key == self.held[0]:
            return []
        self.done, self.hits = True, 2
        (held_client, _), held = self.held
        first_to = client if msg.code.is_response() else None
        held_to = held_client if held.code.is_response() else None
        if self.bodies:
            msg.payload, held.payload = held.payload, msg.payload
            msg.opt.oscore, held.opt.oscore = held.opt.oscore, msg.opt.oscore
        sends = [Send(msg, first_to), Send(held, held_to)]
        if self.later_first is not None and self.later_first(held) > self.later_first(msg):
            sends.reverse()  # the client itself sent them out of order: deliver in order
        self.delivered = [copy_message(s.data) for s in sends]  # type: ignore[arg-type]
        return sends


async def concurrent_posts(peers: list[Peer], hook: Swap, direction: str) -> list[Outcome]:
    """One POST per entry of ``peers`` at once (the same peer twice: two on one session);
    the proxy acknowledges them itself so that both are in flight (EvilProxy.separate)."""
    evil = peers[0].evil
    setattr(evil, direction, hook)
    evil.separate = peers[0].is_protected_request
    try:
        pending = [p.post_request(f"concurrent-{i}") for i, p in enumerate(peers)]
        outs = await asyncio.gather(
            *(p.settle(n, r) for p, (n, r) in zip(peers, pending, strict=True))
        )
    finally:
        setattr(evil, direction, None)
        evil.separate = None
    assert hook.hits == 2, "the two messages were not both held and swapped"
    return list(outs)


@pytest.mark.parametrize("mode", MODES)
async def test_swapped_requests_both_run_once_and_each_gets_its_answer(
    mode: str, make_peer: Any, app: StrictApp
) -> None:
    """Two concurrent requests on one session/context, delivered with the later protected one
    (higher DTLS sequence number / OSCORE Partial IV) first: the replay windows accept the
    earlier one after it; each runs once and each answer names its own request."""
    peer = await make_peer(mode)
    swap = Swap(peer.is_protected_request, later_first=sequence_number)
    outs = await concurrent_posts([peer, peer], swap, "up")
    assert all(o.answer is not None for o in outs), outs
    # The server saw the later-protected request first (higher sequence number / PIV).
    later, earlier = (sequence_number(m) for m in swap.delivered)
    assert later > earlier
    verify([app], [peer])


def sequence_number(msg: Message) -> int:
    """The DTLS record sequence number, or the OSCORE Partial IV, of a protected request."""
    if msg.opt.oscore is not None:
        value = bytes(msg.opt.oscore)
        return int.from_bytes(value[1 : 1 + (value[0] & 0x07)], "big")
    return int.from_bytes(msg.payload[5:11], "big")


@pytest.mark.parametrize("mode", MODES)
async def test_answers_delivered_in_swapped_order_are_each_matched(
    mode: str, make_peer: Any, app: StrictApp
) -> None:
    peer = await make_peer(mode)
    outs = await concurrent_posts([peer, peer], Swap(peer.is_protected_answer), "down")
    assert all(o.answer is not None for o in outs), outs
    verify([app], [peer])


@pytest.mark.parametrize("mode", MODES)
async def test_answer_bodies_swapped_between_two_requests_are_never_misattributed(
    mode: str, make_peer: Any, app: StrictApp
) -> None:
    """Each outer exchange gets the other's protected answer. Layer 0 routes records by inner
    token, so each request gets its own answer from the other exchange (a request whose outer
    answer carried another's waits for its own: Layer0Config.misrouted_wait); OSCORE binds
    each answer to its request's Partial IV, so both are rejected. Never is one request's
    answer taken for the other's (settle checks the nonce of every accepted answer)."""
    peer = await make_peer(mode)
    outs = await concurrent_posts([peer, peer], Swap(peer.is_protected_answer, bodies=True),
                                  "down")
    for o in outs:
        assert o.answer is not None or isinstance(o.error, ResponseRejected | aiocoap.error.Error)
        assert executed_times(app, o.nonce) == 1
    if mode == "oscore":
        assert all(o.error is not None for o in outs), outs
    else:
        assert all(o.answer is not None for o in outs), outs
    await still_works(peer)
    verify([app], [peer])


@pytest.mark.parametrize("mode", MODES)
async def test_answers_swapped_between_two_clients_are_rejected(
    mode: str, make_peer: Any, app: StrictApp
) -> None:
    """Two clients post at once; each gets the other's protected answer: both reject it."""
    a, b = await make_peer(mode), await make_peer(mode)
    outs = await concurrent_posts([a, b], Swap(a.is_protected_answer, bodies=True), "down")
    for o in outs:
        assert isinstance(o.error, ResponseRejected | aiocoap.error.Error), outs
        assert executed_times(app, o.nonce) == 1
    await still_works(a)
    await still_works(b)
    verify([app], [a, b])


# ========================================================================= REDIRECT


@pytest.mark.parametrize("mode", L0_MODES)
async def test_layer0_request_redirected_into_another_clients_session_is_refused(
    mode: str, make_peer: Any, app: StrictApp
) -> None:
    a, b = await make_peer(mode), await make_peer(mode)
    assert b.ch is not None and b.ch.session_path is not None
    path_b = b.ch.session_path
    out = await attack_one_post(
        a, Tamper(a.is_protected_request, edit(lambda m: setattr(m.opt, "uri_path", path_b)))
    )
    assert isinstance(out.error, RecordRejected), out
    assert executed_times(app, out.nonce) == 0
    await still_works(b)  # the foreign record did not disturb B's session
    await still_works(a)
    verify([app], [a, b])


async def test_oscore_request_redirected_into_another_clients_context_is_refused(
    make_peer: Any, app: StrictApp
) -> None:
    """A's request with B's kid: the server finds B's context and cannot decrypt (4.00)."""
    a, b = await make_peer("oscore"), await make_peer("oscore")
    kid_a, kid_b = a.osc.parameters.client_id, b.osc.parameters.client_id
    assert kid_a != kid_b and len(kid_a) == len(kid_b)

    def to_b(m: Message) -> None:
        value = bytes(m.opt.oscore)
        assert value.endswith(kid_a)
        m.opt.oscore = value[: -len(kid_a)] + kid_b

    out = await attack_one_post(a, Tamper(a.is_protected_request, edit(to_b)))
    if out.error is not None:
        assert isinstance(out.error, OscoreError), out
        assert executed_times(app, out.nonce) == 0
    await still_works(b)
    await still_works(a, same_session=False)
    verify([app], [a, b])


@pytest.mark.parametrize("mode", MODES)
async def test_redirect_to_another_server_is_never_accepted(
    mode: str, make_peer: Any, app: StrictApp, app_b: StrictApp
) -> None:
    """The proxy sends everything for the origin to server B (other end-to-end credentials:
    other PSK, other CA): B has no session or context for the protected requests, and the
    new handshake the client then runs cannot complete with B. Nothing runs anywhere."""
    peer = await make_peer(mode)
    peer.evil.routes[app.port] = app_b.address
    out = await peer.post("redirected")
    assert out.error is not None, out
    if mode == "oscore":
        # 4.01 "context not found" from B, then the re-keying handshake fails with B.
        assert isinstance(out.error, Layer0Error | OscoreError), out
    else:
        assert isinstance(out.error, SessionLost), out  # B: 4.04; a POST is not resent
        second = await peer.post("redirected-again")  # a new handshake, with B
        assert isinstance(second.error, HandshakeFailed | OuterError), second
    assert app_b.executed == [] and executed_times(app, out.nonce) == 0
    assert app_b.handshakes == 0
    peer.evil.routes.clear()
    await still_works(peer, same_session=False)
    verify([app, app_b], [peer])


@pytest.mark.parametrize("mode", MODES)
async def test_client_keyed_with_server_b_never_reaches_server_a(
    mode: str, make_peer: Any, creds: Keys, other_creds: Keys, app: StrictApp,
    app_b: StrictApp,
) -> None:
    """The reverse: a client of B (B's credentials) whose proxy sends its protected requests
    to A. A has no such session or context: refused, never executed."""
    peer = await make_peer(mode, creds=other_creds, app=app_b)
    peer.evil.routes[app_b.port] = app.address
    out = await peer.post("to-a")
    assert out.error is not None, out
    assert app.executed == [], "a request of B's client ran on A"
    assert executed_times(app_b, out.nonce) == 0
    verify([app, app_b], [peer])
