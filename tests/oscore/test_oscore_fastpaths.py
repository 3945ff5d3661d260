"""The per-request shortcuts of the OSCORE code give the same results as aiocoap's general code.

``SecurityContext._split_message`` (no deep copy), ``copy_request`` (shallow copy) and the
memoized origin lookup of ``ClientContexts.for_request`` replace aiocoap calls for speed; each
is checked here against the code it stands in for.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiocoap import Message
from aiocoap import oscore as aiooscore
from aiocoap.message import Direction, UndecidedRemote
from aiocoap.numbers.codes import Code
from aiocoap.proxy.client import ProxyForwarder

from coaplayers.message import copy_request
from coaplayers.oscore import ClientContexts, SecurityContext


def _context(**kw: Any) -> SecurityContext:
    return SecurityContext(
        master_secret=bytes(range(16)), sender_id=b"\x01", recipient_id=b"", **kw
    )


def _reference_split(
    sc: SecurityContext, message: Message, request_id: Any
) -> tuple[Message, bytes]:
    """aiocoap's split plus the Class U options it drops, as the project defines the result."""
    outer, plaintext = aiooscore.CanProtect._split_message(sc, message, request_id)
    if message.code.is_request():
        if message.opt.proxy_scheme is not None and outer.opt.proxy_scheme is None:
            outer.opt.proxy_scheme = message.opt.proxy_scheme
        if message.opt.uri_port is not None and outer.opt.uri_port is None:
            outer.opt.uri_port = message.opt.uri_port
    return outer, plaintext


def _requests() -> list[Message]:
    out = []
    m = Message(code=Code.POST, uri="coap://127.0.0.1:5699/echo?x=1&y=2", payload=b"payload")
    m.opt.content_format = 0
    out.append(m)
    m = Message(code=Code.GET, uri="coaps://server.example/sensors/temperature")
    m.opt.observe = 0
    m.opt.accept = 60
    out.append(m)
    m = Message(code=Code.PUT, uri="coap://[2001:db8::1]:61616/a%2Fb/c", payload=b"")
    m.opt.if_match = [b"\x01\x02"]
    m.opt.hop_limit = 16
    out.append(m)
    # Through a forward proxy: Proxy-Scheme, Uri-Host, Uri-Port outer.
    m = Message(code=Code.POST, uri="coaps://10.0.0.7:5684/echo", payload=b"x" * 40)
    ProxyForwarder("coaps://127.0.0.1:5694", _NoContext()).request(m)
    out.append(m)
    # (A request with Proxy-Uri goes through aiocoap's own split unchanged.)
    return out


class _NoContext:
    """What ProxyForwarder needs of a context here: nothing is sent."""

    def request(self, message: Message) -> Message:
        return message


@pytest.mark.parametrize("index", range(len(_requests())))
def test_request_split_matches_aiocoap(index: int) -> None:
    message = _requests()[index]
    sc = _context()
    outer, plaintext = sc._split_message(message, None)
    ref_outer, ref_plaintext = _reference_split(sc, copy_request(message), None)
    assert plaintext == ref_plaintext
    assert outer.code == ref_outer.code
    assert outer.opt.encode() == ref_outer.opt.encode()
    assert outer.payload == ref_outer.payload == b""


def test_forward_proxy_request_keeps_class_u_options_outer() -> None:
    message = _requests()[3]
    outer, plaintext = _context()._split_message(message, None)
    assert outer.opt.proxy_scheme == "coaps"
    assert outer.opt.uri_host == "10.0.0.7"
    assert outer.opt.uri_port == 5684
    assert outer.code == Code.POST
    assert b"echo" in plaintext and b"10.0.0.7" not in plaintext


@pytest.mark.parametrize("observe", [None, 7])
def test_response_split_matches_aiocoap(observe: int | None) -> None:
    client, server = _context(), SecurityContext(
        master_secret=bytes(range(16)), sender_id=b"", recipient_id=b"\x01"
    )
    request = _requests()[0]
    protected, _ = client.protect(request)
    protected.direction = Direction.INCOMING
    _, request_id = server.unprotect(protected)
    response = Message(code=Code.CONTENT, payload=b"answer", content_format=0)
    if observe is not None:
        response.opt.observe = observe
    outer, plaintext = server._split_message(response, request_id)
    ref_outer, ref_plaintext = _reference_split(server, response, request_id)
    assert plaintext == ref_plaintext
    assert (outer.code, outer.opt.encode()) == (ref_outer.code, ref_outer.opt.encode())
    assert outer.code == Code.CHANGED


def test_copy_request_is_independent_of_the_original() -> None:
    original = _requests()[0]
    before = original.opt.encode()
    copy = copy_request(original)
    assert copy.opt.encode() == before
    assert (copy.code, copy.payload, copy.remote, copy.mtype, copy.token) == (
        original.code, original.payload, original.remote, original.mtype, original.token
    )
    copy.opt.uri_path = ("other",)
    copy.opt.uri_host = "elsewhere.example"
    copy.opt.content_format = 60
    copy.remote = None
    assert original.opt.encode() == before
    assert isinstance(original.remote, UndecidedRemote)


def test_origin_lookup_matches_request_uri_lookup() -> None:
    sc = _context()
    contexts = ClientContexts()
    contexts.set("coaps://10.0.0.7:5684", sc)
    direct = Message(code=Code.POST, uri="coaps://10.0.0.7/echo")  # default port
    proxied = Message(code=Code.POST, uri="coaps://10.0.0.7:5684/echo")
    ProxyForwarder("coaps://127.0.0.1:5694", _NoContext()).request(proxied)
    other_port = Message(code=Code.POST, uri="coaps://10.0.0.7:5685/echo")
    tunnel = Message(code=Code.POST, uri="coaps://10.0.0.7/.well-known/atls")
    session = Message(code=Code.POST, uri="coaps://10.0.0.7/~s1")
    for _ in range(2):  # the second round is answered from the memo
        assert contexts.for_request(direct) is sc
        assert contexts.for_request(proxied) is sc
        assert contexts.for_request(other_port) is None
        assert contexts.for_request(tunnel) is None
        assert contexts.for_request(session) is None
    # A context set later for another origin is found although that origin was memoized.
    sc2 = _context()
    contexts.set("coaps://10.0.0.7:5685", sc2)
    assert contexts.for_request(other_port) is sc2
    contexts.remove("coaps://10.0.0.7:5684")
    assert contexts.for_request(proxied) is None


def test_protect_unprotect_round_trip_through_the_fast_split() -> None:
    client = _context()
    server = SecurityContext(master_secret=bytes(range(16)), sender_id=b"", recipient_id=b"\x01")
    request = _requests()[3]
    protected, _ = client.protect(request)
    protected.direction = Direction.INCOMING
    inner, _ = server.unprotect(protected)
    assert inner.code == Code.POST
    assert inner.opt.uri_path == ("echo",)
    assert inner.payload == b"x" * 40
    assert inner.opt.proxy_scheme is None and inner.opt.uri_host is None


@pytest.mark.parametrize("id_length", range(8))
def test_nonce_matches_aiocoap(id_length: int) -> None:
    sc = _context()
    sc.common_iv = bytes(range(100, 113))
    for piv in (b"\x00", b"\x05", b"\x01\x00", b"\xff\xfe\xfd", b"\x12\x34\x56\x78\x9a"):
        ident = bytes(range(1, 1 + id_length))
        ours = sc._construct_nonce(piv, ident, sc.alg_aead)
        theirs = aiooscore.BaseSecurityContext._construct_nonce(sc, piv, ident, sc.alg_aead)
        assert ours == theirs
        assert len(ours) == sc.alg_aead.iv_bytes


def test_nonce_constants_follow_the_common_iv() -> None:
    """The kept Common IV XOR ID part is computed again when the Common IV changes."""
    sc = _context()
    first = sc._construct_nonce(b"\x07", b"\x01", sc.alg_aead)
    assert sc._construct_nonce(b"\x07", b"\x01", sc.alg_aead) == first
    sc.common_iv = bytes(13)
    again = sc._construct_nonce(b"\x07", b"\x01", sc.alg_aead)
    assert again != first
    assert again == aiooscore.BaseSecurityContext._construct_nonce(
        sc, b"\x07", b"\x01", sc.alg_aead)


@pytest.mark.parametrize("alg", [10, 12, 30, 1, 3, 24])
def test_aad_matches_the_whole_structure_encoded_by_cbor2(alg: int) -> None:
    import cbor2

    sc = _context(aead=alg)
    for kid in (b"", b"\x01", bytes(range(23)), bytes(range(24)), bytes(range(40))):
        for piv in (b"", b"\x00", b"\x01\x02", b"\x01\x02\x03\x04\x05"):
            external = cbor2.dumps([1, [sc.alg_aead.value], kid, piv, b""])
            expected = cbor2.dumps(["Encrypt0", b"", external])
            assert sc._aad(sc.alg_aead, kid, piv) == expected
            assert sc._aad(sc.alg_aead, kid, piv) == expected  # with the kept head


@pytest.mark.parametrize("alg", [10, 12, 30, 1, 3, 24])
def test_every_aead_round_trips_against_aiocoap(alg: int) -> None:
    """Kept AEAD objects (AES-CCM, AES-GCM) and aiocoap's own (others) protect the same
    bytes; a flipped tag is ProtectionInvalid either way."""
    ours, theirs, server = _twins(aead=alg)
    for n in range(3):
        request = Message(code=Code.POST, uri="coap://h/x", payload=b"p%d" % n)
        mine, _ = ours.protect(copy_request(request))
        ref, _ = aiooscore.CanProtect.protect(theirs, copy_request(request))
        assert _same_wire(mine, ref)
        mine.direction = Direction.INCOMING
        inner, _ = server.unprotect(mine)
        assert inner.payload == b"p%d" % n
    forged, _ = ours.protect(Message(code=Code.POST, uri="coap://h/x", payload=b"f"))
    forged.payload = forged.payload[:-1] + bytes((forged.payload[-1] ^ 1,))
    forged.direction = Direction.INCOMING
    with pytest.raises(aiooscore.ProtectionInvalid):
        server.unprotect(forged)


class _FakeWireContext:
    """Answers requests sent with handle_blockwise=False from a script, recording them."""

    def __init__(self, answers: list[Any]) -> None:
        import asyncio

        self.loop = asyncio.get_running_loop()
        self.answers = answers
        self.sent: list[tuple[Message, bool]] = []
        self.pending: list[Any] = []

    def request(self, message: Message, handle_blockwise: bool = True) -> Any:
        self.sent.append((message, handle_blockwise))
        future = self.loop.create_future()
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, BaseException):
            future.set_exception(answer)
        elif answer is not None:
            self.loop.call_soon(future.set_result, answer)
        self.pending.append(future)
        return type("R", (), {"response": future, "observation": None})()


def _answer(payload: bytes, block2: tuple[int, bool, int] | None = None) -> Message:
    from aiocoap.optiontypes import BlockOption

    m = Message(code=Code.CHANGED, payload=payload)
    if block2 is not None:
        m.opt.block2 = BlockOption.BlockwiseTuple(*block2)
    m.remote = UndecidedRemote("coaps", "127.0.0.1:5684")
    return m


def _protected_request(payload: bytes = b"x" * 60) -> Message:
    m = Message(code=Code.POST, payload=payload)
    m.opt.oscore = b"\x09\x05\x01"
    m.remote = UndecidedRemote("coaps", "127.0.0.1:5694")
    return m


async def test_one_block_wire_request_skips_the_blockwise_runner() -> None:
    from coaplayers.oscore.client import _Wire

    ctx = _FakeWireContext([_answer(b"answer")])
    response = await _Wire(ctx).request(_protected_request()).response  # type: ignore[arg-type]
    assert response.payload == b"answer"
    assert [blockwise for _, blockwise in ctx.sent] == [False]


async def test_outer_block2_answer_is_completed_block_by_block() -> None:
    from coaplayers.oscore.client import _Wire

    first, second = b"a" * 16, b"b" * 5
    ctx = _FakeWireContext([_answer(first, (0, True, 0)), _answer(second, (1, False, 0))])
    request = _protected_request()
    response = await _Wire(ctx).request(request).response  # type: ignore[arg-type]
    assert response.payload == first + second
    assert len(ctx.sent) == 2
    follow_up = ctx.sent[1][0]
    assert follow_up.opt.block2.block_number == 1
    assert follow_up.opt.oscore == request.opt.oscore  # (aiocoap sends no payload again)


async def test_big_or_observing_wire_requests_go_to_aiocoap_unchanged() -> None:
    from coaplayers.oscore.client import ONE_BLOCK, _Wire

    ctx = _FakeWireContext([_answer(b"1"), _answer(b"2")])
    wire = _Wire(ctx)  # type: ignore[arg-type]
    wire.request(_protected_request(b"x" * (ONE_BLOCK + 1)))
    observing = _protected_request()
    observing.opt.observe = 0
    wire.request(observing)
    assert [blockwise for _, blockwise in ctx.sent] == [True, True]


async def test_wire_errors_and_cancellation_pass_through() -> None:
    import asyncio

    from aiocoap import error

    from coaplayers.oscore.client import _Wire

    ctx = _FakeWireContext([error.ConRetransmitsExceeded("gone")])
    with pytest.raises(error.ConRetransmitsExceeded):
        await _Wire(ctx).request(_protected_request()).response  # type: ignore[arg-type]
    ctx = _FakeWireContext([])  # never answers
    pending = _Wire(ctx).request(_protected_request())  # type: ignore[arg-type]
    pending.response.cancel()
    await asyncio.sleep(0)
    assert ctx.pending[0].cancelled()


def _twins(**kw: Any) -> tuple[SecurityContext, SecurityContext, SecurityContext]:
    """Two identical client contexts (ours, and one protected by aiocoap's code) + server."""
    args = dict(master_secret=bytes(range(16)), master_salt=b"salt", sender_id=b"\x01",
                recipient_id=b"", **kw)
    server_args = dict(args, sender_id=b"", recipient_id=b"\x01")
    return SecurityContext(**args), SecurityContext(**args), SecurityContext(**server_args)


def _same_wire(a: Message, b: Message) -> bool:
    for m in (a, b):
        m.mtype, m.mid, m.token = aiocoap_con(), 1, b"t"
    return a.encode() == b.encode()


def aiocoap_con() -> Any:
    from aiocoap.numbers.types import Type

    return Type.CON


@pytest.mark.parametrize("seqno", [0, 1, 255, 256, 65535, 65536, 2**32, 2**40 - 10])
@pytest.mark.parametrize("id_context", [None, b"", b"\x37\xcb\xf3\x21\x00\x17\xa2\xd3"])
def test_protect_matches_aiocoap_for_requests_and_responses(
    seqno: int, id_context: bytes | None
) -> None:
    ours, theirs, server = _twins(id_context=id_context, sender_sequence_number=seqno)
    for index, request in enumerate(_requests()):
        for kid_context in (True, False, b"\x99"):
            ours.sender_sequence_number = theirs.sender_sequence_number = seqno + index
            mine, my_ids = ours.protect(copy_request(request), kid_context=kid_context)
            ref, ref_ids = aiooscore.CanProtect.protect(
                theirs, copy_request(request), kid_context=kid_context
            )
            assert _same_wire(mine, ref)
            assert (my_ids.kid, my_ids.partial_iv, my_ids.code_style) == (
                ref_ids.kid, ref_ids.partial_iv, ref_ids.code_style)
    # Responses: the first reuses the request's nonce, later ones (notifications) do not.
    server.sender_sequence_number = seqno
    request, _ = ours.protect(_requests()[1])  # GET with Observe
    request.direction = Direction.INCOMING
    server.id_context = id_context
    _, ids_a = server.unprotect(request)
    twin = SecurityContext(master_secret=bytes(range(16)), master_salt=b"salt", sender_id=b"",
                           recipient_id=b"\x01", id_context=id_context,
                           sender_sequence_number=seqno)
    request.direction = Direction.INCOMING
    import copy

    ids_b = copy.copy(ids_a)
    for n in range(3):
        answer = Message(code=Code.CONTENT, payload=b"n%d" % n, observe=n)
        mine, _ = server.protect(answer, ids_a)
        ref, _ = aiooscore.CanProtect.protect(twin, Message(
            code=Code.CONTENT, payload=b"n%d" % n, observe=n), ids_b)
        assert _same_wire(mine, ref)
        assert (mine.opt.oscore == b"") == (n == 0)  # only the first reuses the nonce


def test_protect_refuses_a_mismatched_request_id() -> None:
    sc = _context()
    with pytest.raises(ValueError):
        sc.protect(Message(code=Code.CONTENT), None)


def _outcome(unprotect: Any, sc: SecurityContext, message: Message, request_id: Any) -> Any:
    """What unprotecting gives: the inner message on the wire and the identifiers, or the
    exception's type and text."""
    import copy

    message = copy.deepcopy(message)
    try:
        inner, ids = unprotect(sc, message, request_id)
    except Exception as exc:  # the comparison is the point: any type, same on both sides
        return (type(exc), str(exc))
    options = [(o.number, o.value) for o in inner.opt.option_list()]
    return (inner.code, options, inner.payload, inner.direction,
            ids.kid, ids.partial_iv, ids.can_reuse_nonce, ids.code_style)


def _incoming(message: Message) -> Message:
    message.mtype, message.mid, message.token = aiocoap_con(), 1, b"t"
    decoded = Message.decode(message.encode())
    decoded.direction = Direction.INCOMING
    return decoded


def _variants(message: Message) -> list[Message]:
    """The message and forms of it an attacker or a broken peer could send."""
    out = [message]
    option, payload = message.opt.oscore, message.payload

    def variant(oscore: bytes | None = option, body: bytes = payload, **opt: Any) -> None:
        m = _incoming(Message(code=message.code, payload=body))
        m.opt.oscore = oscore
        for name, value in opt.items():
            setattr(m.opt, name, value)
        for o in message.opt.option_list():
            if o.number not in (9,) and o.number not in [x.number for x in m.opt.option_list()]:
                m.opt.add_option(o)
        out.append(m)

    variant(body=payload[:-1] + bytes([payload[-1] ^ 1]))  # forged tag
    variant(body=payload[:8])  # too short
    variant(body=b"")
    if option:
        variant(oscore=option[:1])  # Partial IV announced, cut off
        variant(oscore=bytes([option[0] | 0x80]) + option[1:])  # reserved bit
        variant(oscore=bytes([option[0] | 0x20]) + option[1:])  # group flag
        variant(oscore=bytes([option[0] | 0x10]) + option[1:])  # kid context, none there
        variant(oscore=bytes([option[0] | 0x10]) + b"\x05" + option[1:])  # cut-off context
        variant(oscore=option + b"\x77")  # another kid
    variant(oscore=b"")  # no Partial IV
    variant(oscore=b"\x09\x00\x01")  # sequence number 0 again, with our kid
    variant(observe=0)
    variant(oscore=None)
    return out


@pytest.mark.parametrize("id_context", [None, b"\x37\xcb"])
def test_unprotect_matches_aiocoap(id_context: bytes | None) -> None:
    client = SecurityContext(master_secret=bytes(range(16)), sender_id=b"\x01",
                             recipient_id=b"", id_context=id_context)

    def server() -> SecurityContext:
        return SecurityContext(master_secret=bytes(range(16)), sender_id=b"",
                               recipient_id=b"\x01", id_context=id_context)

    ours, theirs = server(), server()  # twins: the replay windows move together
    compared = 0
    for request in _requests() * 2:
        for kid_context in (True, False):
            protected, request_ids = client.protect(copy_request(request), kid_context=kid_context)
            for candidate in _variants(_incoming(protected)):
                mine = _outcome(SecurityContext.unprotect, ours, candidate, None)
                ref = _outcome(aiooscore.CanUnprotect.unprotect, theirs, candidate, None)
                assert mine == ref, candidate.opt.oscore
                compared += 1
            # The answers, plain and as notifications: the first reuses the request's nonce,
            # the second has a Partial IV of its own.
            responder = server()
            _, server_ids = responder.unprotect(_incoming(protected))
            for observe in (None, 5):
                answer = Message(code=Code.CONTENT, payload=b"answer", observe=observe)
                reply, _ = responder.protect(answer, server_ids)
                for candidate in _variants(_incoming(reply)):
                    mine = _outcome(SecurityContext.unprotect, client, candidate, request_ids)
                    ref = _outcome(aiooscore.CanUnprotect.unprotect, client, candidate,
                                   request_ids)
                    assert mine == ref, candidate.opt.oscore
                    compared += 1
    assert compared > 200
    # Both accepted exactly the same requests (each once), and nothing else.
    assert ours.recipient_replay_window.persist() == theirs.recipient_replay_window.persist()


def test_unprotect_with_an_unknown_window_goes_to_aiocoap() -> None:
    """After a restart the window is unknown: aiocoap's code answers with 4.01 + Echo."""
    client = _context()
    restarted = SecurityContext(master_secret=bytes(range(16)), sender_id=b"",
                                recipient_id=b"\x01", replay_window_known=False)
    protected, _ = client.protect(_requests()[0])
    with pytest.raises(aiooscore.ReplayErrorWithEcho):
        restarted.unprotect(_incoming(protected))


@pytest.mark.parametrize("uri", [
    "coap://server.example:5683/a", "coap://server.example/a", "coaps://127.0.0.1:7000/a?q=1",
    "coaps://[::1]/a", "coap://[2001:db8::1]:61616/x/y",
])
async def test_proxy_routing_template_sets_what_the_setters_set(uri: str) -> None:
    """OscoreRequester's kept Uri-Host / Uri-Port / Proxy-Scheme equal what aiocoap's
    ProxyForwarder sets through the option setters, replacing options already there."""
    from coaplayers.layer1.transport import split_hostinfo
    from coaplayers.oscore.mode import OscoreRequester

    requester = OscoreRequester.__new__(OscoreRequester)
    requester._routes = {}
    requester._via = type("V", (), {"proxy_address": UndecidedRemote("coap", "proxy:1")})()
    for _ in range(2):  # the second time from the kept template
        message = Message(code=Code.POST, uri=uri, payload=b"p")
        message.opt.uri_host = "stale.example"  # replaced (or removed) like the setter does
        expected = copy_request(message)
        host, port = split_hostinfo(expected.remote.hostinfo)
        expected.opt.uri_port = port
        expected.opt.uri_host = host
        expected.opt.proxy_scheme = expected.remote.scheme
        ours = copy_request(message)
        requester._route_through_proxy(ours)
        assert ours.opt.encode() == expected.opt.encode()
        assert ours.remote == requester._via.proxy_address
        assert message.opt.uri_host == "stale.example"  # the original is untouched


@pytest.mark.parametrize("length", [6, 7])
@pytest.mark.parametrize("window_known", [True, False])
def test_reserved_partial_iv_lengths_are_decode_errors(length: int, window_known: bool) -> None:
    """RFC 8613 section 6.1 reserves the Partial IV lengths 6 and 7: a request or a response
    that announces one is malformed like any other broken OSCORE option (DecodeError, which
    coap-server answers with 4.02 and a client gets as a ProtectionInvalid), on the fast path
    and on aiocoap's (a replay window not yet known), not a bare ValueError."""
    client = _context()
    server = SecurityContext(master_secret=bytes(range(16)), sender_id=b"",
                             recipient_id=b"\x01", replay_window_known=window_known)
    protected, request_ids = client.protect(_requests()[0])
    forged = _incoming(protected)
    forged.opt.oscore = bytes([0x08 | length]) + bytes(length - 1) + b"\x01" + b"\x01"
    with pytest.raises(aiooscore.DecodeError, match="reserved"):
        server.unprotect(forged)
    responder = SecurityContext(master_secret=bytes(range(16)), sender_id=b"",
                                recipient_id=b"\x01")
    _, server_ids = responder.unprotect(_incoming(protected))
    reply, _ = responder.protect(Message(code=Code.CONTENT, payload=b"a", observe=5), server_ids)
    answer = _incoming(reply)
    answer.opt.oscore = bytes([length]) + bytes(length - 1) + b"\x05"
    with pytest.raises(aiooscore.DecodeError, match="reserved"):
        client.unprotect(answer, request_ids)
