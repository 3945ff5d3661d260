"""The malicious-proxy cases against the first flights of a client that kept its OSCORE
context from an earlier run (coaplayers.oscore.kept): its very first request goes out
protected, with no handshake before it, so a refusal forged for it, a copy held back, a replay
or a flipped byte must still never run a request twice, nor a wrong one, nor hand the client a
wrong answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code

from coaplayers import dtls
from coaplayers.layer0 import Layer0Client, Layer0Config
from coaplayers.oscore import AlreadyProcessed, RehandshakeRequired, UnprotectedErrorResponse
from coaplayers.oscore.client import origin_of
from coaplayers.oscore.kept import KeptContexts
from coaplayers.oscore.mode import OscoreRequester

from .conftest import FastTuning
from .evilproxy import Send, copy_message
from .test_malicious_proxy import (  # noqa: F401 - fixtures used by name
    Peer,
    StrictApp,
    Tamper,
    app,
    attack_one_post,
    evil,
    executed_times,
    flip,
    forged,
    last,
    make_peer,
    still_works,
    verify,
)


def _requester(peer: Peer, kept: KeptContexts) -> OscoreRequester:
    cert = peer.creds.e2e_client_cert()
    ssl_context = dtls.build_context(cert, server=False)
    origin = peer.app.uri
    slot = kept.slot(origin_of(origin), cert)
    assert slot is not None
    return OscoreRequester(
        peer.ctx.context, origin,
        lambda: Layer0Client(peer.ctx.context, origin, cert, proxy=peer.evil.uri,
                              ssl_context=ssl_context,
                              config=Layer0Config(transport_tuning=FastTuning())),
        proxy=peer.evil.uri, kept=slot)


@pytest.fixture
async def kept_peer(make_peer: Any, tmp_path: Path) -> Peer:  # noqa: F811
    """An OSCORE client on its second run: its context restored from the file the first run
    (one honest exchange) left, and nothing sent yet."""
    kept = KeptContexts(tmp_path / "oscore")
    peer = await make_peer("oscore", warm=False)
    await peer.osc.close()
    peer.osc = _requester(peer, kept)
    await peer.warm_up()
    await peer.osc.close()  # the first run ends; its file stays
    peer.osc = _requester(peer, kept)
    assert peer.osc.restored and peer.setups == 0
    return peer


@pytest.mark.parametrize("payload", [b"Security context not found", b"Decryption failed"])
async def test_forged_refusal_of_the_first_request_after_execution_never_runs_it_twice(
    payload: bytes, kept_peer: Peer, app: StrictApp  # noqa: F811
) -> None:
    code = Code.UNAUTHORIZED if payload.startswith(b"Security") else Code.BAD_REQUEST
    out = await attack_one_post(
        kept_peer, Tamper(kept_peer.is_protected_answer, forged(code, payload)), "down")
    assert executed_times(app, out.nonce) == 1
    assert isinstance(out.error, AlreadyProcessed), out  # checked in a new Layer 0 session
    await still_works(kept_peer)  # the kept context was alive and stays in use
    verify([app], [kept_peer])


async def test_forged_refusal_of_the_held_back_first_request_resends_it_once(
    kept_peer: Peer, app: StrictApp  # noqa: F811
) -> None:
    held: list[Message] = []

    def keep_and_refuse(msg: Message) -> list[Send]:
        held.append(copy_message(msg))
        fake = forged(Code.UNAUTHORIZED, b"Security context not found")(msg)
        assert isinstance(fake, Message)
        fake.mtype = msg.mtype.__class__.ACK
        return [Send(fake, back=True)]

    out = await attack_one_post(kept_peer, Tamper(kept_peer.is_protected_request,
                                                  keep_and_refuse))
    assert out.answer is not None, out
    assert kept_peer.setups == 1 and executed_times(app, out.nonce) == 1
    late = await kept_peer.evil.inject(held[0], client=kept_peer.address)
    assert late is not None and late.code == Code.UNAUTHORIZED, late
    assert executed_times(app, out.nonce) == 1
    verify([app], [kept_peer])


async def test_replayed_first_request_is_refused(kept_peer: Peer, app: StrictApp  # noqa: F811
                                               ) -> None:
    first = await kept_peer.post("first-of-run")
    assert first.answer is not None and kept_peer.setups == 0  # one round trip, no keying
    recorded = last(kept_peer.evil.requests(kept_peer.address), kept_peer.is_protected_request)
    answer = await kept_peer.evil.inject(recorded, client=kept_peer.address)
    assert answer is not None and answer.code == Code.UNAUTHORIZED, answer
    assert answer.payload.startswith(b"Replay detected")
    assert executed_times(app, first.nonce) == 1
    verify([app], [kept_peer])


async def test_flipped_byte_in_the_first_request_is_refused(
    kept_peer: Peer, app: StrictApp  # noqa: F811
) -> None:
    """The last ciphertext byte (the tag): "Decryption failed", so the client re-keys (the
    server confirms the request was not processed) and sends it once more."""
    out = await attack_one_post(kept_peer, Tamper(kept_peer.is_protected_request,
                                                  flip(lambda n: n - 1)))
    if out.error is not None:
        assert isinstance(out.error, UnprotectedErrorResponse | RehandshakeRequired), out
        assert executed_times(app, out.nonce) == 0
    else:
        assert kept_peer.setups == 1, "accepted without the re-keyed resend"
        assert executed_times(app, out.nonce) == 1
    await still_works(kept_peer, same_session=False)
    verify([app], [kept_peer])


# ------------------------------------------- a resumed Layer 0 handshake's last flight


@pytest.fixture
async def resuming_peer(make_peer: Any) -> Peer:  # noqa: F811
    """A certificate client whose next request resumes its session: the request travels
    with the resumed handshake's last flight (tag, ChangeCipherSpec, Finished, then the
    request's record) in one outer exchange."""
    peer = await make_peer("cert")
    assert peer.ch is not None
    peer.ch.forget_session()
    return peer


def final_flight_with_request(msg: Message) -> bool:
    """The outer POST that carries the client's ChangeCipherSpec (after the 8-byte tag) and
    an application-data record."""
    payload = bytes(msg.payload)
    return (msg.code == Code.POST and len(payload) > 8 and payload[8] == 0x14
            and b"\x17\xfe\xfd" in payload[8:])


async def test_the_resumed_flight_carries_the_request_and_it_runs_once(
    resuming_peer: Peer, app: StrictApp  # noqa: F811
) -> None:
    seen: list[Message] = []

    def watch(msg: Message) -> None:
        seen.append(copy_message(msg))
        return None

    tamper = Tamper(final_flight_with_request, lambda m: (watch(m), m)[1])
    out = await attack_one_post(resuming_peer, tamper)
    assert out.answer is not None, out
    assert resuming_peer.ch is not None and resuming_peer.ch.last_handshake.resumed
    assert executed_times(app, out.nonce) == 1
    # Replayed later as a new exchange: the records are not taken again.
    late = await resuming_peer.evil.inject(seen[0], client=resuming_peer.address)
    assert late is None or late.code in (Code.CHANGED, Code.NOT_FOUND), late
    assert executed_times(app, out.nonce) == 1
    await still_works(resuming_peer)
    verify([app], [resuming_peer])


@pytest.mark.parametrize("where", ["finished", "request-tag"])
async def test_an_altered_resumed_flight_never_runs_a_wrong_request(
    where: str, resuming_peer: Peer, app: StrictApp  # noqa: F811
) -> None:
    """A byte of the client's Finished (the handshake fails) or of the request record's
    authentication tag (the record is refused) is flipped: the request does not run, or
    runs once unaltered after a new handshake; the client goes on."""
    def position(n: int) -> int:
        return n - 1 if where == "request-tag" else 8 + 14 + 13 + 20  # inside the Finished

    out = await attack_one_post(resuming_peer, Tamper(final_flight_with_request, flip(position)))
    assert executed_times(app, out.nonce) <= 1
    if out.answer is None:
        assert executed_times(app, out.nonce) == 0, out
    await still_works(resuming_peer, same_session=False)
    verify([app], [resuming_peer])
