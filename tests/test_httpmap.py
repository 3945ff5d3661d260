"""The CoAP <-> HTTP mapping without sockets: what the cross-proxy and the HTTP listener write
must read back unchanged on the other side."""

from __future__ import annotations

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import OpaqueOption

from coaplayers import httpmap
from coaplayers.asgi import HttpRemote


def _round_trip(response: Message, method: Code = Code.POST) -> Message:
    """A CoAP answer through coap-server's HTTP listener and back through the cross-proxy."""
    status, headers, body = httpmap.coap_to_http_response(response)
    text = [(k.decode(), v.decode()) for k, v in headers]
    return httpmap.http_to_coap_response(method, status, text, body, etags=httpmap.EtagMap(),
                                         upstream="http://origin:8080")


def test_layer0_outer_answers_cross_unchanged() -> None:
    created = Message(code=Code.CREATED, payload=b"\x16\xfe\xfd records", location_path=["~abcde"],
                      content_format=65000)
    back = _round_trip(created)
    assert back.code == Code.CREATED and back.payload == created.payload
    assert tuple(back.opt.location_path) == ("~abcde",) and back.opt.content_format == 65000
    for code in (Code.CHANGED, Code.DELETED, Code.UNAUTHORIZED, Code.FORBIDDEN, Code.NOT_FOUND,
                 Code.BAD_REQUEST, Code.SERVICE_UNAVAILABLE):
        method = Code.DELETE if code == Code.DELETED else Code.POST
        back = _round_trip(Message(code=code, payload=b"\x17\xfe\xfd"), method)
        assert back.code == code and back.payload == b"\x17\xfe\xfd"
        assert back.opt.content_format is None  # none in, none out


def test_oscore_crosses_as_rfc8613_section_11_says() -> None:
    value = bytes.fromhex("0914")
    request = Message(code=Code.POST, payload=b"ciphertext")
    request.opt.add_option(OpaqueOption(9, value))
    sent = httpmap.coap_to_http_request(request, "http://origin/", httpmap.EtagMap())
    assert ("oscore", "CRQ") in sent.headers
    assert ("content-type", "application/oscore") in sent.headers
    got = httpmap.http_to_coap_request("POST", "/", "", list(sent.headers), sent.body)
    assert got.opt.get_option(9)[0].value == value and got.opt.content_format is None
    answer = Message(code=Code.CHANGED, payload=b"sealed")
    answer.opt.add_option(OpaqueOption(9, b""))
    back = _round_trip(answer)
    assert back.code == Code.CHANGED and back.opt.get_option(9)[0].value == b""


def test_requests_from_one_http_client_share_its_address() -> None:
    # A cross-proxy's pool sends a handshake's flights over any of its connections.
    assert HttpRemote("192.0.2.1", 40001).hostinfo == HttpRemote("192.0.2.1", 40002).hostinfo
    assert HttpRemote("2001:db8::1", 1).hostinfo == "[2001:db8::1]"


def test_freshness_and_tags() -> None:
    assert httpmap.max_age_from([("cache-control", "public, max-age=30")]) == 30
    assert httpmap.max_age_from([("cache-control", "no-store")]) == 0
    assert httpmap.max_age_from([("expires", "garbage")]) == 0
    assert httpmap.max_age_from([]) is None
    tags = httpmap.EtagMap(limit=2)
    short = tags.to_coap('"a-long-origin-tag"')
    assert short is not None and len(short) == 8 and tags.to_http(short) == '"a-long-origin-tag"'
    assert tags.to_coap('"0a0b"') == b"\x0a\x0b" and tags.to_coap('W/"x"') is None
    for n in range(5):
        tags.to_coap(f'"tag-{n}"')
    assert len(tags._seen) == 2  # bounded


def test_bad_oscore_header_fields_are_refused_both_ways() -> None:
    import pytest

    with pytest.raises(httpmap.MappingError) as refused:
        httpmap.http_to_coap_request("POST", "/", "", [("oscore", "not base64!")], b"x")
    assert refused.value.status == 400
    back = httpmap.http_to_coap_response(Code.POST, 200, [("oscore", "%%")], b"x",
                                         etags=httpmap.EtagMap(), upstream="http://o")
    assert back.code == Code.BAD_GATEWAY


async def test_the_asgi_app_bounds_bodies_and_maps_what_it_cannot_serve() -> None:
    import aiocoap.resource as resource

    from coaplayers.asgi import CoapAsgiApp, HttpBindingLimits

    class Echo(resource.Resource):
        async def render_post(self, request: Message) -> Message:
            return Message(code=Code.CHANGED, payload=request.payload, content_format=0)

    site = resource.Site()
    site.add_resource(["echo"], Echo())
    app = CoapAsgiApp(site, HttpBindingLimits(max_body=16))

    async def call(method: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
                   ) -> tuple[int, dict[bytes, bytes], bytes]:
        sent: list[dict] = []
        chunks = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return chunks.pop(0)

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "query_string": b"",
                 "headers": headers, "client": ("192.0.2.7", 40000), "scheme": "http"}
        await app(scope, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]

    text = [(b"content-type", b"text/plain")]
    assert await call("POST", "/echo", b"ping", text) == (
        200, {b"content-type": b"text/plain; charset=utf-8", b"content-length": b"4"}, b"ping")
    status, _, body = await call("POST", "/echo", b"x" * 17, text)
    assert status == 413 and b"16 bytes" in body
    assert (await call("OPTIONS", "/echo", b"", []))[0] == 501
    assert (await call("POST", "/echo", b"x", [(b"content-type", b"image/x-odd")]))[0] == 415
    assert (await call("GET", "/nothing", b"", []))[0] == 404


def test_the_documented_oscore_example_over_http() -> None:
    """docs/PROTOCOL.md section 12: OSCORE-KEYING.md 9.5's request and answer on the HTTP hop."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "PROTOCOL.md").read_text()
    request = Message.decode(bytes.fromhex(
        "4102000101393139322e302e322e3142163324" "0900a1b2d411636f6170"
        "ffc45eb91709fdea15fe3097cb04268c"))
    sent = httpmap.coap_to_http_request(request, "http://192.0.2.1:8080/", httpmap.EtagMap())
    assert sent.headers == (("oscore", "CQChsg"), ("content-type", "application/oscore"))
    assert f"Content-Length: {len(sent.body)}\n\n{sent.body.hex()}\n" in doc
    answer = Message.decode(bytes.fromhex("614400010190ff4c2233cc580f49881ff8e78b"))
    status, headers, body = httpmap.coap_to_http_response(answer)
    assert status == 200
    assert headers == [(b"oscore", b""), (b"content-type", b"application/oscore"),
                       (b"content-length", b"12")]
    assert f"content-length: 12\n\n{body.hex()}\n" in doc
    back = httpmap.http_to_coap_response(
        Code.POST, status, [(k.decode(), v.decode()) for k, v in headers], body,
        etags=httpmap.EtagMap(), upstream="http://192.0.2.1:8080")
    assert back.code == Code.CHANGED and back.payload == answer.payload
    assert back.opt.get_option(9)[0].value == b""
