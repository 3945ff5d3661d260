"""Fuzzing Layer 0: the inner message codec, the sans-I/O Layer 0 server core, and the Layer 0
resource (:class:`Layer0Site`) driven through aiocoap's pipe without sockets.

Contracts:

* :func:`inner.decode` rejects with :class:`InnerMessageError` only; what it accepts encodes
  back to the same message; :func:`inner.peek_token` never raises.
* :class:`Layer0ServerCore` never raises on received payloads or session names; every answer is one
  of the outer codes docs/PROTOCOL.md defines for its resource, and limits hold.
* The tunnel resource answers every outer request (any code, path, Content-Format, payload)
  with a defined code, and every decrypted inner message (any bytes a peer holding the session
  keys can send) with exactly the inner answer the profile defines: a response with the same
  token for a request, 4.00 with the token for a malformed message whose token is readable,
  nothing otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiocoap
import aiocoap.resource as resource
import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe
from hypothesis import example, given
from hypothesis import strategies as st

from coaplayers.dtls import ApplicationData, DtlsSession
from coaplayers.layer0 import inner
from coaplayers.layer0.core import Answer, Layer0ServerCore, ServerLimits
from coaplayers.layer0.errors import InnerMessageError
from coaplayers.layer0.profile import (
    BAD_REQUEST,
    CHANGED,
    CONTENT_FORMAT,
    CREATED,
    DELETED,
    FORBIDDEN,
    MAX_DATAGRAM,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    REQUEST_ENTITY_TOO_LARGE,
    SERVICE_UNAVAILABLE,
    UNAUTHORIZED,
    UNSUPPORTED_CONTENT_FORMAT,
    WELL_KNOWN_PATH,
    is_layer0_path,
)
from coaplayers.layer0.server import Layer0Site

from . import peers
from .common import FUZZ, bytes_input, corpus, only

INNER = corpus("layer0_inner")
DTLS = corpus("dtls")
log = logging.getLogger("tests.fuzz.layer0")

ENTRY_CODES = {CREATED, CHANGED, BAD_REQUEST, FORBIDDEN, REQUEST_ENTITY_TOO_LARGE,
               SERVICE_UNAVAILABLE}
SESSION_CODES = {CHANGED, DELETED, BAD_REQUEST, UNAUTHORIZED, FORBIDDEN, NOT_FOUND,
                 REQUEST_ENTITY_TOO_LARGE}
OUTER_CODES = ENTRY_CODES | SESSION_CODES | {METHOD_NOT_ALLOWED, UNSUPPORTED_CONTENT_FORMAT}


# ------------------------------------------------------------------------ inner codec


def same_message(a: Message, b: Message) -> bool:
    return (a.code == b.code and bytes(a.payload) == bytes(b.payload)
            and options(a) == options(b))


def options(m: Message) -> list[tuple[int, bytes]]:
    return [(int(o.number), o.encode()) for o in m.opt.option_list()]


@FUZZ
@given(data=bytes_input(INNER, max_size=200))
@example(data=b"\x00\x01\xff")  # payload marker, empty payload
@example(data=b"\x09" + b"\x00" * 12)  # token length 9
@example(data=b"\x00\x01\x0d")  # option delta 13 without its extension byte
@example(data=b"\x00\x01\x31\x00")  # Uri-Host (outer only) inside
def test_inner_decode_rejects_only_with_inner_message_error(data: bytes) -> None:
    with only():
        token = inner.peek_token(data)
    with only(InnerMessageError) as rejected:
        decoded = inner.decode(data)
    if rejected:
        return
    assert token == decoded.token == data[1 : 1 + data[0]]
    again = inner.decode(inner.encode(decoded.token, decoded.message))
    assert again.token == decoded.token and same_message(again.message, decoded.message)
    assert not any(int(o.number) in (3, 7, 35, 39) for o in decoded.message.opt.option_list())


# --------------------------------------------------------------------- tunnel core


def new_core(backend: str, **limits: Any) -> Layer0ServerCore:
    _, new_listener = peers.BACKENDS[backend]
    return Layer0ServerCore(new_listener(peers.L0_CONFIG), ServerLimits(**limits))


def check_answer(answer: Answer, allowed: set[Code]) -> None:
    assert answer.code in allowed, answer.code
    assert isinstance(answer.payload, bytes) and len(answer.payload) <= MAX_DATAGRAM
    if answer.code == CREATED:
        assert answer.location is not None and is_layer0_path(answer.location)
        assert answer.location != WELL_KNOWN_PATH
    if answer.carries_records and answer.code in (CREATED, CHANGED):
        records_ok(answer.payload)


def records_ok(payload: bytes) -> None:
    from coaplayers.dtls import records

    assert b"".join(records.split_records(payload)) == payload


@pytest.mark.parametrize("backend", sorted(peers.BACKENDS))
def test_tunnel_core_entry_and_unknown_sessions(backend: str) -> None:
    core = new_core(backend, max_half_open=2)
    new_client, _ = peers.BACKENDS[backend]

    # Real ClientHellos with this core's cookie, so that mutations reach session creation.
    cookie_hellos = []
    for i in range(2):
        hello, _, again = peers.cookie_exchange(new_client(peers.L0_CONFIG), core.listener,
                                                ("coap", f"peer{i}"))
        cookie_hellos += [hello, again]
    bases = cookie_hellos + DTLS

    @FUZZ
    @given(payload=bytes_input(bases, max_size=1100), peer=st.sampled_from(["peer0", "peer1"]),
           sid=st.text(max_size=12), now=st.floats(0, 100))
    @example(payload=b"\x16" * 1025, peer="peer0", sid="", now=0.0)
    def feed(payload: bytes, peer: str, sid: str, now: float) -> None:
        with only():
            check_answer(core.entry(("coap", peer), payload, now), ENTRY_CODES)
            if sid not in core.sessions:
                answer, plain = core.datagram(sid, payload, now)
                # (size first, so that a live name answers no differently)
                too_large = len(payload) > MAX_DATAGRAM
                assert answer.code == (REQUEST_ENTITY_TOO_LARGE if too_large else NOT_FOUND)
                assert plain == []
                assert core.datagram(sid, b"", now)[0] == Answer(NOT_FOUND, b"unknown session")
        assert core.half_open_count <= 2

    feed()
    core.close_all()
    assert core.half_open_count == 0 and not core.sessions


@pytest.mark.parametrize("backend", sorted(peers.BACKENDS))
def test_tunnel_core_established_session_survives_arbitrary_payloads(backend: str) -> None:
    new_client, _ = peers.BACKENDS[backend]
    core = new_core(backend)
    client = new_client(peers.L0_CONFIG)
    sid = peers.tunnel_handshake(core, client)
    client.send(inner.encode(b"\x01", Message(code=Code.GET, uri_path=["x"])))
    (genuine,) = client.datagrams_to_send()

    @FUZZ
    @given(payload=bytes_input([genuine, *DTLS], max_size=1100), delete=st.booleans())
    @example(payload=genuine, delete=False)  # a replay
    @example(payload=b"", delete=True)  # a bare DELETE must not end the session
    def feed(payload: bytes, delete: bool) -> None:
        if sid not in core.sessions:
            return  # a mutation ended it with a typed answer (checked below when it happened)
        with only():
            answer, plaintexts = core.datagram(sid, payload, 1.0, delete=delete)
        check_answer(answer, SESSION_CODES)
        assert all(isinstance(p, bytes) for p in plaintexts)
        if answer.code in (DELETED, FORBIDDEN):
            assert sid not in core.sessions  # the session ends only with a defined answer
        elif payload != genuine or delete:
            assert plaintexts == []  # nobody without the keys gets anything decrypted

    feed()
    if sid in core.sessions:
        # it still works for the real client
        client.send(b"\x01\x05\x01")
        answer, plaintexts = core.datagram(sid, client.datagrams_to_send()[0], 2.0)
        assert answer.code == CHANGED and plaintexts == [b"\x01\x05\x01"]


# ---------------------------------------------------------------- tunnel resource


class Echo(resource.Resource):
    async def render_post(self, request: Message) -> Message:
        return Message(code=Code.CHANGED, payload=request.payload)

    async def render_get(self, request: Message) -> Message:
        return Message(code=Code.CONTENT, payload=b"hello")


class FakeRemote:
    scheme = "coap"
    hostinfo = "[2001:db8::9]:5683"


def make_site(backend: str) -> Layer0Site:
    site = resource.Site()
    site.add_resource(["echo"], Echo())
    site.add_resource(["hello"], Echo())
    if backend == "openssl":
        creds: Any = peers.certs().server
    else:
        from coaplayers.dtls import PskStore

        creds = PskStore({peers.PSK_IDENTITY: peers.PSK_KEY})
    return Layer0Site(site, creds, limits=ServerLimits(inner_timeout=5.0, poll_hold=0.1))


def render(loop: asyncio.AbstractEventLoop, site: Layer0Site, request: Message) -> Message:
    request.remote = FakeRemote()
    pipe = Pipe(request, log)
    responses: list[Message] = []

    def on_event(event: Pipe.Event) -> bool:
        assert event.exception is None, event.exception
        if event.message is not None:
            responses.append(event.message)
        return not event.is_last

    pipe.on_event(on_event)
    loop.run_until_complete(asyncio.wait_for(site.render_to_pipe(pipe), 10))
    assert len(responses) == 1
    return responses[0]


@pytest.fixture
def loop() -> Any:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


path_segments = st.lists(
    st.sampled_from([".well-known", "atls", "x", "", "AAAAAAAA", "hello"]) | st.text(max_size=8),
    max_size=4,
)


@pytest.mark.parametrize("backend", sorted(peers.BACKENDS))
def test_tunnel_resource_answers_any_outer_request(backend: str, loop: Any) -> None:
    site = make_site(backend)
    new_client, _ = peers.BACKENDS[backend]
    client = new_client(peers.L0_CONFIG)
    sid = peers.tunnel_handshake(site.core, client)
    client.send(b"\x01\x01\x01")
    (genuine,) = client.datagrams_to_send()

    @FUZZ
    @given(
        code=st.integers(1, 31),
        path=st.one_of(path_segments, st.just([*WELL_KNOWN_PATH]), st.just([sid]),
                       st.just([sid, "x"]), st.just(["~" + sid]), st.just([*WELL_KNOWN_PATH, sid])),
        payload=bytes_input([genuine, *DTLS], max_size=1100),
        cf=st.none() | st.sampled_from([0, 42, CONTENT_FORMAT, 65001]),
    )
    def feed(code: int, path: list[str], payload: bytes, cf: int | None) -> None:
        request = Message(code=Code(code), uri_path=path, payload=payload)
        if cf is not None:
            request.opt.content_format = cf
        response = render(loop, site, request)
        tunnel = is_layer0_path(path)
        if tunnel:
            assert response.code in OUTER_CODES, (path, response.code)
        else:
            assert response.code == Code.UNAUTHORIZED  # needs Layer 0 (default policy)

    try:
        feed()
    finally:
        site.close()


inner_plaintexts = st.one_of(
    bytes_input(INNER, max_size=400).filter(bool),  # an empty send sends nothing
    st.builds(lambda token, code, tail: bytes([len(token)]) + token + bytes([code]) + tail,
              st.binary(max_size=8), st.integers(0, 255), st.binary(max_size=40)),
)


@pytest.mark.parametrize("backend", sorted(peers.BACKENDS))
def test_tunnel_resource_answers_any_inner_message_as_the_profile_says(
    backend: str, loop: Any
) -> None:
    """What a peer holding the session keys sends is decrypted and decoded; the inner answer is
    the one docs/PROTOCOL.md defines, and the session survives every one of them."""
    site = make_site(backend)
    new_client, _ = peers.BACKENDS[backend]
    client: DtlsSession = new_client(peers.L0_CONFIG)
    sid = peers.tunnel_handshake(site.core, client)

    def exchange(plaintext: bytes) -> list[bytes]:
        client.send(plaintext)
        (record,) = client.datagrams_to_send()
        request = Message(code=Code.POST, uri_path=[sid], payload=record,
                          content_format=CONTENT_FORMAT)
        response = render(loop, site, request)
        assert response.code == CHANGED, response
        if response.payload:
            client.receive_datagram(bytes(response.payload), 0.5)
        return [e.data for e in iter(client.next_event, None) if isinstance(e, ApplicationData)]

    expect: Callable[[bytes], tuple[bytes | None, Code | None]]

    def expect(plaintext: bytes) -> tuple[bytes | None, Code | None]:
        """(token of the inner answer or None for no answer, fixed code if the profile fixes it)"""
        try:
            decoded = inner.decode(plaintext)
        except InnerMessageError:
            token = inner.peek_token(plaintext)
            return token, (None if token is None else Code.BAD_REQUEST)
        if decoded.message.code == Code.PING:  # the session's liveness check: PONG
            return decoded.token, Code.PONG
        return (decoded.token, None) if decoded.message.code.is_request() else (None, None)

    @FUZZ
    @given(plaintext=inner_plaintexts)
    @example(plaintext=INNER[0])
    @example(plaintext=b"\x01\x07\x02\xb4echo")
    @example(plaintext=b"\x09" + b"\x00" * 12)
    @example(plaintext=b"\x00\x01\x31\x00")
    @example(plaintext=b"\x01\x01\xe2\xb5hello")  # PING (7.02) with a token: PONG
    def feed(plaintext: bytes) -> None:
        with only():
            answers = exchange(plaintext)
        token, fixed = expect(plaintext)
        if token is None:
            assert answers == []
            return
        (answer,) = answers
        decoded = inner.decode(answer)  # the server's own answer always decodes
        assert decoded.token == token
        assert not decoded.message.code.is_request()
        if fixed is not None:
            assert decoded.message.code == fixed

    try:
        feed()
        # the session still serves a normal request afterwards
        (answer,) = exchange(inner.encode(b"\x42", Message(code=Code.GET, uri_path=["hello"])))
        decoded = inner.decode(answer)
        assert decoded.token == b"\x42" and decoded.message.code == Code.CONTENT
        assert decoded.message.payload == b"hello"
    finally:
        site.close()


def test_aiocoap_message_import_is_the_real_one() -> None:
    assert Message is aiocoap.Message
