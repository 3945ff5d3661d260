"""Fuzzing the OSCORE mode's inputs: the parameters CBOR, the OSCORE option and COSE payload of
requests (server) and responses (client), and persisted context files.

tests/oscore/test_oscore_keying.py throws short random bytes at the parameters parser; this
adds mutations of real parameter maps and structure-aware CBOR (maps of arbitrary keys and
values, which get past the CBOR decoder into the field checks).

Contracts:

* :meth:`OscoreParameters.from_cbor`: :class:`ParameterError` only.
* The server's OSCORE entry (:class:`OscoreSite` over aiocoap's ``verify_start`` /
  ``unprotect``): never raises; every error answer is one of RFC 8613's unprotected
  answers (4.02 "Failed to decode COSE", 4.01 "Security context not found" / "Replay
  detected", 4.00 "Decryption failed", 4.05), or nothing for a NON; nothing but the one
  genuine request ever reaches a resource.
* The client's ``unprotect`` of a response: aiocoap's ``NotAProtectedMessage`` or
  ``ProtectionInvalid`` (with its ``DecodeError`` / ``ReplayError``) only, and nothing but the
  genuine response is accepted.
* :meth:`ContextFile.load`: :class:`PersistenceError` only.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource as resource
import cbor2
import pytest
from aiocoap import Message
from aiocoap import error as aiocoap_error
from aiocoap import oscore as aiooscore
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe
from hypothesis import example, given
from hypothesis import strategies as st

from coaplayers.oscore import (
    ContextFile,
    ContextStore,
    OscoreParameters,
    OscoreSite,
    ParameterError,
    PersistenceError,
)

from . import peers
from .common import FUZZ, bytes_input, corpus, corpus_files, json_mutated, mutated, only

PARAMS = corpus("oscore_params")
MESSAGES = corpus_files("oscore_messages")
log = logging.getLogger("tests.fuzz.oscore")


# -------------------------------------------------------------------------- parameters

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.binary(max_size=10)
    | st.text(max_size=6) | st.floats(allow_nan=False),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.integers(-3, 10), c, max_size=3),
    max_leaves=6,
)
cbor_maps = st.dictionaries(
    st.integers(-2, 12) | st.sampled_from([3, 4, 6, 7, 8]) | st.text(max_size=2),
    st.sampled_from([b"", b"\x01", b"\x02\x03", 10, -10, -11, 1, 3]) | cbor_values,
    max_size=6,
).map(lambda m: cbor2.dumps(m, canonical=True))


@FUZZ
@given(data=st.one_of(mutated(PARAMS), cbor_maps, st.sampled_from(PARAMS)))
@example(data=bytes.fromhex("a2074101084001"))  # trailing byte
@example(data=bytes.fromhex("a3044001074101084000"[:-2]))
def test_parameters_parser_raises_only_parameter_error(data: bytes) -> None:
    with only(ParameterError) as rejected:
        params = OscoreParameters.from_cbor(data)
    if rejected:
        return
    assert params.to_cbor() == data  # only the deterministic encoding is ever accepted
    assert params.client_id != params.server_id


# ------------------------------------------------------------------ server: requests


class Echo(resource.Resource):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    async def render_post(self, request: Message) -> Message:
        self.seen.append(bytes(request.payload))
        return Message(code=Code.CHANGED, payload=request.payload)

    async def render_get(self, request: Message) -> Message:
        self.seen.append(b"GET")
        return Message(code=Code.CONTENT, payload=b"21.5")


class FakeRemote:
    """Where a request came from, as aiocoap's UDP transport would describe it."""

    scheme = "coap"
    hostinfo = hostinfo_local = "[2001:db8::5]:5683"
    uri_base = uri_base_local = "coap://[2001:db8::5]:5683"
    is_multicast = False
    is_multicast_locally = False
    maximum_block_size_exp = 6
    maximum_payload_size = 1024
    authenticated_claims = ()
    blockwise_key = "fuzz"

    def __hash__(self) -> int:
        return 5

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeRemote)


def render(loop: asyncio.AbstractEventLoop, site: Any, request: Message) -> list[Message]:
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
    return responses


UNPROTECTED_ERRORS = {
    (Code.BAD_OPTION, b"Failed to decode COSE"),
    (Code.UNAUTHORIZED, b"Security context not found"),
    (Code.UNAUTHORIZED, b"Replay detected"),
    (Code.BAD_REQUEST, b"Decryption failed"),
    (Code.METHOD_NOT_ALLOWED, b""),
}


@pytest.fixture
def loop() -> Any:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_server_answers_mutated_protected_requests_as_rfc8613_says(loop: Any) -> None:
    requests = [d for n, d in MESSAGES.items() if n.startswith("request")]
    echo = Echo()
    site = resource.Site()
    site.add_resource(["echo"], echo)
    site.add_resource(["sensors", "temperature"], echo)
    _client, server = peers.oscore_pair()
    store = ContextStore()
    store.add(server)
    oscore_site = OscoreSite(site, store, require_oscore=True)

    @FUZZ
    @given(data=mutated(requests, max_ops=3))
    def feed(data: bytes) -> None:
        try:
            request = Message.decode(data)
        except (aiocoap_error.UnparsableMessage, UnicodeDecodeError):
            # aiocoap's own CoAP parser, before anything of ours runs (its UDP transport lets
            # the UnicodeDecodeError of a non-UTF-8 string option escape: an aiocoap issue)
            return
        if not request.code.is_request():
            return  # aiocoap routes only requests to a site
        seen = len(echo.seen)
        with only():
            responses = render(loop, oscore_site, request)
        assert len(responses) <= 1
        if not responses:
            assert request.mtype != aiocoap.CON  # errors are silent for NON requests only
            assert len(echo.seen) == seen
            return
        (response,) = responses
        if response.opt.oscore is not None:
            # a protected answer means the request authenticated; replay protection holds
            assert len(echo.seen) == seen + 1
        else:
            assert len(echo.seen) == seen  # no unauthenticated request reached a resource
            assert (response.code, bytes(response.payload)) in UNPROTECTED_ERRORS | {
                (Code.UNAUTHORIZED, b"OSCORE required")
            }, (response.code, response.payload)

    feed()
    # Each genuine request was executed at most once, whatever the mutations replayed.
    genuine = [p for p in echo.seen if p in (b"hello", b"GET")]
    assert len(genuine) <= 2


def _genuine_answer() -> tuple[Any, Any, Message]:
    """A client context, its request's identifiers, and the server's protected 2.04 to it."""
    from aiocoap.message import Direction

    client, server = peers.oscore_pair()
    request, request_id = peers.protected_request(client)
    _, server_request_id = server.unprotect(Message.decode(peers.wire(request)))
    answer = Message(code=Code.CHANGED, payload=b"genuine")
    answer.direction = Direction.OUTGOING
    protected, _ = server.protect(answer, server_request_id)
    return client, request_id, protected


def test_client_accepts_only_the_genuine_response() -> None:
    client, request_id, protected = _genuine_answer()
    genuine = peers.wire(protected)
    bases = [genuine, MESSAGES["response_changed.bin"]]

    @FUZZ
    @given(data=mutated(bases, max_ops=3))
    @example(data=genuine)
    def feed(data: bytes) -> None:
        try:
            response = Message.decode(data)
        except (aiocoap_error.UnparsableMessage, UnicodeDecodeError):
            return
        if not response.code.is_response():
            return  # aiocoap matches only responses to a pending request
        with only(aiooscore.NotAProtectedMessage, aiooscore.ProtectionInvalid) as rejected:
            plain, _ = client.unprotect(response, request_id)
        if not rejected:
            # AEAD: whatever is accepted is what the server protected (the corpus response
            # answers the same Partial IV under the same fixed keys)
            assert plain.code == Code.CHANGED and plain.payload in (b"genuine", b"hello")

    feed()


def test_a_group_flagged_answer_is_refused_as_a_decode_error() -> None:
    """The group flag on a message for a pairwise context: aiocoap's own DecodeError ("Group
    messages can not be decoded with this non-group context"), not an AttributeError (the
    case hypothesis once found in the test above)."""
    client, request_id, protected = _genuine_answer()
    flagged = Message.decode(peers.wire(protected))
    option = bytearray(flagged.opt.oscore or b"\x00")
    option[0] |= aiooscore.COMPRESSION_BIT_GROUP
    flagged.opt.oscore = bytes(option)
    with pytest.raises(aiooscore.DecodeError, match="non-group context"):
        client.unprotect(flagged, request_id)


# ---------------------------------------------------------------------- context files


@pytest.fixture
def context_dir(tmp_path: Path) -> Path:
    return tmp_path


CONTEXT_FILES = corpus("oscore_context")


def load(path: Path, data: bytes) -> Any:
    path.write_bytes(data)
    path.chmod(0o600)
    return ContextFile(path).load()


def test_context_file_corpus_loads(context_dir: Path) -> None:
    context = load(context_dir / "c.json", CONTEXT_FILES[0])
    assert context.sender_id == peers.PARAMS.client_id


@FUZZ
@given(data=st.one_of(json_mutated(CONTEXT_FILES), bytes_input(CONTEXT_FILES, max_size=400)))
@example(data=CONTEXT_FILES[0].replace(b'"aead": 10', b'"aead": [10]'))
@example(data=CONTEXT_FILES[0].replace(b'"hkdf": -10', b'"hkdf": {}'))
@example(data=CONTEXT_FILES[0].replace(b'"aead": 10', b'"aead": 3'))  # key length mismatch
@example(data=CONTEXT_FILES[0].replace(b'"recipient_id": ""', b'"recipient_id": "01"'))
@example(data=CONTEXT_FILES[0].replace(b'"peer": "fuzz-server"', b'"peer": [1]'))
@example(data=CONTEXT_FILES[0].replace(b'"next_sequence_number": 66',
                                       b'"next_sequence_number": 1099511627776'))
@example(data=b"\xff\xfe not utf-8")
@example(data=b"[" * 100_000)
def test_context_file_load_raises_only_persistence_error(context_dir: Path, data: bytes) -> None:
    with only(PersistenceError):
        load(context_dir / "fuzzed.json", data)


@st.composite
def inner_requests(draw: st.DrawFn) -> Message:
    """Requests with arbitrary inner options (raw bytes, any number) and payload: what a peer
    holding the keys can make the server decrypt and parse."""
    from aiocoap.optiontypes import OpaqueOption

    message = Message(code=Code(draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 31]))),
                      payload=draw(st.binary(max_size=40)))
    for _ in range(draw(st.integers(0, 4))):
        number = draw(st.sampled_from([4, 8, 11, 12, 14, 15, 17, 20, 23, 27, 28, 60, 258, 2049])
                      | st.integers(1, 3000))
        if number in (3, 6, 7, 9, 35, 39):  # outer-only (Class U) or the OSCORE option itself
            continue
        message.opt.add_option(OpaqueOption(number, draw(st.binary(max_size=12))))
    return message


def non_utf8_path() -> Message:
    from aiocoap.optiontypes import OpaqueOption

    message = Message(code=Code.GET)
    message.opt.add_option(OpaqueOption(11, b"\x80"))  # Uri-Path, not UTF-8
    return message


def test_server_survives_any_inner_request_from_a_key_holder(loop: Any) -> None:
    """The plaintext under the AEAD is parsed by aiocoap too: a peer with valid keys may put
    anything there (non-UTF-8 Uri-Path, unknown critical options, odd codes)."""
    from aiocoap.message import Direction

    echo = Echo()
    site = resource.Site()
    site.add_resource(["echo"], echo)
    client, server = peers.oscore_pair()
    store = ContextStore()
    store.add(server)
    oscore_site = OscoreSite(site, store)

    @FUZZ
    @given(request=inner_requests())
    @example(request=Message(code=Code.POST, uri_path=["echo"], payload=b"x"))
    @example(request=non_utf8_path())  # found by this test: escaped OscoreSite before the fix
    def feed(request: Message) -> None:
        request.direction = Direction.OUTGOING
        protected, _ = client.protect(request)
        received = Message.decode(peers.wire(protected))
        with only():
            responses = render(loop, oscore_site, received)
        (response,) = responses
        assert response.opt.oscore is not None or (
            (response.code, bytes(response.payload)) in UNPROTECTED_ERRORS
        ), (response.code, response.payload)

    feed()
