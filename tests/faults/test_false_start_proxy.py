"""False Start (RFC 7918) against a malicious proxy: a cold Layer 0 client with certificates
sends its first request with its Finished (docs/PROTOCOL.md 3.3). Whatever the proxy does to
that flight or to its answer (drop, alter or reorder the Finished or the request, alter the
server's Finished), the server never executes a request that did not authenticate nor one
twice, and the client never accepts a wrong answer (the checks of test_malicious_proxy's
``verify``); afterwards the client goes on with a new handshake.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code

from coaplayers.dtls import records
from coaplayers.layer0 import SessionLost
from coaplayers.layer0.profile import HANDSHAKE_TAG_LEN, is_layer0_path

from .evilproxy import EvilProxy
from .test_malicious_proxy import (  # noqa: F401 - fixtures
    Peer,
    StrictApp,
    Tamper,
    app,
    evil,
    make_peer,
    verify,
)

FINISHED, APPLICATION_DATA = 22, 23


def flight_records(msg: Message) -> list[bytes] | None:
    """The records of a tagged request to a session, or None."""
    if (msg.code != Code.POST or len(msg.opt.uri_path) != 1
            or not is_layer0_path(msg.opt.uri_path)):
        return None
    try:
        return records.split_records(bytes(msg.payload)[HANDSHAKE_TAG_LEN:])
    except Exception:
        return None


def is_finished(record: bytes) -> bool:
    return records.epoch(record) == 1 and records.content_type(record) == FINISHED


def is_false_start(msg: Message) -> bool:
    """The last client flight with the first request: Finished and application data."""
    recs = flight_records(msg)
    return recs is not None and any(map(is_finished, recs)) and any(
        records.content_type(r) == APPLICATION_DATA for r in recs)


def is_server_finish(msg: Message) -> bool:
    """The server's answer to it: its Finished (and the response)."""
    if msg.code != Code.CHANGED:
        return False
    try:
        return any(map(is_finished, records.split_records(bytes(msg.payload))))
    except Exception:
        return False


def rewrite(fn: Callable[[list[bytes]], list[bytes]], server: bool = False
            ) -> Callable[[Message], Message]:
    def act(msg: Message) -> Message:
        payload = bytes(msg.payload)
        head = b"" if server else payload[:HANDSHAKE_TAG_LEN]
        recs = records.split_records(payload[len(head):])
        msg.payload = head + b"".join(fn(recs))
        return msg
    return act


def flip_finished(recs: list[bytes]) -> list[bytes]:
    return [r[:-1] + bytes([r[-1] ^ 1]) if is_finished(r) else r for r in recs]


def drop_finished(recs: list[bytes]) -> list[bytes]:
    return [r for r in recs if not is_finished(r)]


def flip_request(recs: list[bytes]) -> list[bytes]:
    return [r[:-1] + bytes([r[-1] ^ 1]) if records.content_type(r) == APPLICATION_DATA else r
            for r in recs]


def request_first(recs: list[bytes]) -> list[bytes]:
    data = [r for r in recs if records.content_type(r) == APPLICATION_DATA]
    return data + [r for r in recs if r not in data]


async def cold_post(peer: Peer, proxy: EvilProxy, hook: Tamper, direction: str = "up"):  # type: ignore[no-untyped-def]
    setattr(proxy, direction, hook)
    try:
        out = await peer.post("false-start")
    finally:
        setattr(proxy, direction, None)
    assert hook.hits >= 1, "the attack never happened"
    return out


async def test_the_first_request_rides_the_finished(make_peer, evil: EvilProxy,  # type: ignore[no-untyped-def] # noqa: F811
                                                  app: StrictApp) -> None:  # noqa: F811
    peer = await make_peer("cert", warm=False)
    out = await peer.post("cold")
    assert out.answer is not None, out.error
    ups = evil.requests()
    carried = [m for m in ups if is_false_start(m)]
    assert len(carried) == 1  # the request went with the client's Finished
    # ClientHello (answered at once, no cookie exchange), then that flight: nothing else.
    assert len({m.mid for m in ups}) == 2, [(m.code, m.opt.uri_path) for m in ups]
    assert peer.ch is not None and peer.ch.handshakes == 1
    verify([app], [peer])


ATTACKS = {
    "client Finished altered": ("up", is_false_start, rewrite(flip_finished)),
    "client Finished dropped": ("up", is_false_start, rewrite(drop_finished)),
    "request altered": ("up", is_false_start, rewrite(flip_request)),
    "server Finished altered": ("down", is_server_finish, rewrite(flip_finished, server=True)),
    "server Finished dropped": ("down", is_server_finish, rewrite(drop_finished, server=True)),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_an_attacked_false_start_never_runs_a_wrong_request_nor_accepts_one(
        make_peer, evil: EvilProxy, app: StrictApp, attack: str) -> None:  # type: ignore[no-untyped-def] # noqa: F811
    direction, match, action = ATTACKS[attack]
    peer = await make_peer("cert", warm=False)
    out = await cold_post(peer, evil, Tamper(match, action), direction)
    assert out.answer is None  # a POST is not resent: the client says why
    assert isinstance(out.error, SessionLost), out.error
    if direction == "up":
        assert out.nonce not in app.executed
    verify([app], [peer])
    after = await peer.post("after")  # a new handshake, whose request runs once
    assert after.answer is not None, after.error
    verify([app], [peer])


async def test_a_request_ahead_of_the_finished_runs_once_after_it(
        make_peer, evil: EvilProxy, app: StrictApp) -> None:  # type: ignore[no-untyped-def] # noqa: F811
    peer = await make_peer("cert", warm=False)
    out = await cold_post(peer, evil, Tamper(is_false_start, rewrite(request_first)))
    assert out.answer is not None, out.error
    assert app.executed.count(out.nonce) == 1
    verify([app], [peer])
