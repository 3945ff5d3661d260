"""CoAP <-> HTTP mapping, both directions, without sockets (sans-I/O).

Two programs cross the protocol boundary and share these tables so that what one writes the
other reads back unchanged:

* coap-proxy, a CoAP-to-HTTP cross-proxy (RFC 7252 section 10.1, RFC 8075 tables read in
  reverse): :func:`coap_to_http_request` and :func:`http_to_coap_response`;
* coap-server's HTTP listener (ATLS's HTTP binding, RFC 8075 section 7 for the status codes,
  RFC 8613 section 11 for OSCORE): :func:`http_to_coap_request` and
  :func:`coap_to_http_response`.

The Layer 0 outer exchanges and OSCORE messages cross both ways bit for bit: their bodies are
never read, the codes they use (2.01, 2.04, 4.01, 4.03, 4.04, ...) have an HTTP twin each, and
Location, ETag and the OSCORE option have header fields that carry them exactly. Where RFC 8075
maps lossily (4.01 to 403), this mapping keeps the CoAP code instead, since both ends of a
Layer 0 session must tell "record refused" (4.01) from "handshake failed" (4.03); docs/PROXY.md
lists every choice.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from aiocoap import Message
from aiocoap.numbers import OptionNumber
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.optiontypes import OpaqueOption

from .errors import RemoteError

Opt = OptionNumber

ATLS_MEDIA_TYPE = "application/atls"
"""ATLS's media type (draft-friel-tls-atls section 5.3) for Layer 0 records over HTTP; it is the
HTTP name of the profile's CoAP Content-Format 65000."""
OSCORE_MEDIA_TYPE = "application/oscore"
ATLS_CONTENT_FORMAT = 65000  # = coaplayers.layer0.profile.CONTENT_FORMAT (no import cycle)

# Media types this project names itself, besides aiocoap's registry.
_EXTRA_TYPES = {ATLS_MEDIA_TYPE: ATLS_CONTENT_FORMAT,
                "application/vnd.coaplayers.atls-records": ATLS_CONTENT_FORMAT}

COAP_TO_HTTP_METHOD: dict[Code, str] = {
    Code.GET: "GET", Code.POST: "POST", Code.PUT: "PUT", Code.DELETE: "DELETE",
    Code.PATCH: "PATCH", Code.iPATCH: "PATCH",
}
HTTP_TO_COAP_METHOD: dict[str, Code] = {
    "GET": Code.GET, "POST": Code.POST, "PUT": Code.PUT, "DELETE": Code.DELETE,
    "PATCH": Code.PATCH,
}

# CoAP response code -> HTTP status (RFC 8075 section 7; 4.01 kept as 401, see module doc).
COAP_TO_HTTP_STATUS: dict[Code, int] = {
    Code.CREATED: 201, Code.DELETED: 200, Code.VALID: 304, Code.CHANGED: 200, Code.CONTENT: 200,
    Code.BAD_REQUEST: 400, Code.UNAUTHORIZED: 401, Code.BAD_OPTION: 400, Code.FORBIDDEN: 403,
    Code.NOT_FOUND: 404, Code.METHOD_NOT_ALLOWED: 405, Code.NOT_ACCEPTABLE: 406,
    Code.REQUEST_ENTITY_INCOMPLETE: 400, Code.CONFLICT: 409, Code.PRECONDITION_FAILED: 412,
    Code.REQUEST_ENTITY_TOO_LARGE: 413, Code.UNSUPPORTED_CONTENT_FORMAT: 415,
    Code.UNPROCESSABLE_ENTITY: 422, Code.TOO_MANY_REQUESTS: 429,
    Code.INTERNAL_SERVER_ERROR: 500, Code.NOT_IMPLEMENTED: 501, Code.BAD_GATEWAY: 502,
    Code.SERVICE_UNAVAILABLE: 503, Code.GATEWAY_TIMEOUT: 504,
    Code.PROXYING_NOT_SUPPORTED: 502, Code.HOP_LIMIT_REACHED: 508,
}

# HTTP status -> CoAP code, where the method does not decide (RFC 7252 section 10.1.2).
HTTP_TO_COAP_STATUS: dict[int, Code] = {
    201: Code.CREATED, 304: Code.VALID,
    400: Code.BAD_REQUEST, 401: Code.UNAUTHORIZED, 403: Code.FORBIDDEN, 404: Code.NOT_FOUND,
    405: Code.METHOD_NOT_ALLOWED, 406: Code.NOT_ACCEPTABLE, 409: Code.CONFLICT,
    412: Code.PRECONDITION_FAILED, 413: Code.REQUEST_ENTITY_TOO_LARGE,
    415: Code.UNSUPPORTED_CONTENT_FORMAT, 422: Code.UNPROCESSABLE_ENTITY,
    429: Code.TOO_MANY_REQUESTS, 500: Code.INTERNAL_SERVER_ERROR, 501: Code.NOT_IMPLEMENTED,
    502: Code.BAD_GATEWAY, 503: Code.SERVICE_UNAVAILABLE, 504: Code.GATEWAY_TIMEOUT,
    508: Code.HOP_LIMIT_REACHED,
}

# 2xx without a body-bearing meaning of its own: the code follows the method (10.1.2).
_SUCCESS_BY_METHOD: dict[Code, Code] = {
    Code.GET: Code.CONTENT, Code.POST: Code.CHANGED, Code.PUT: Code.CHANGED,
    Code.DELETE: Code.DELETED, Code.PATCH: Code.CHANGED, Code.iPATCH: Code.CHANGED,
}

# Options the cross-proxy maps or consumes; any other critical option gets 4.02 (RFC 7252
# 5.4.1: an option the proxy cannot carry to HTTP must not be dropped silently).
MAPPED_REQUEST_OPTIONS = frozenset({
    Opt.IF_MATCH, Opt.URI_HOST, Opt.ETAG, Opt.IF_NONE_MATCH, Opt.OBSERVE, Opt.URI_PORT,
    Opt.URI_PATH, Opt.CONTENT_FORMAT, Opt.MAX_AGE, Opt.URI_QUERY, Opt.HOP_LIMIT, Opt.ACCEPT,
    Opt.BLOCK2, Opt.BLOCK1, Opt.SIZE2, Opt.PROXY_URI, Opt.PROXY_SCHEME, Opt.SIZE1,
    Opt.NO_RESPONSE, Opt.OSCORE,
})

_HEX_ETAG = re.compile(r'^"([0-9a-f]{2,16})"$')
_MAX_AGE = re.compile(r"(?:^|,)\s*(s-maxage|max-age)\s*=\s*\"?(\d+)\"?", re.IGNORECASE)
MAX_AGE_LIMIT = 2**32 - 1


class MappingError(RemoteError):
    """A message that has no counterpart on the other side; ``code`` is the CoAP answer and
    ``status`` the HTTP one."""

    def __init__(self, code: Code, status: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.status = status
        self.text = text


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """An HTTP request as the cross-proxy sends it (header names lower case)."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


# ----------------------------------------------------------------------- media types


def media_type(content_format: int) -> str:
    """The HTTP media type of a Content-Format; :class:`MappingError` (4.15 / 415) if none."""
    if content_format == ATLS_CONTENT_FORMAT:
        return ATLS_MEDIA_TYPE
    try:
        cf = ContentFormat(content_format)
    except ValueError:
        cf = None
    if cf is None or not cf.is_known():
        raise MappingError(Code.UNSUPPORTED_CONTENT_FORMAT, 415,
                           f"Content-Format {content_format} has no media type")
    text = cf.media_type
    if cf.encoding != "identity":
        text = f"{text}; coding={cf.encoding}"
    return str(text)


def content_format(header: str) -> int | None:
    """The Content-Format of an HTTP Content-Type / Accept value, None if it has none."""
    value = header.strip()
    if not value:
        return None
    base = value.split(";", 1)[0].strip().lower()
    if base in _EXTRA_TYPES:
        return _EXTRA_TYPES[base]
    for candidate in (value, base, f"{base}; charset=utf-8"):
        try:
            cf = ContentFormat.by_media_type(candidate)
        except (KeyError, ValueError):
            continue
        if cf is not None and cf.is_known():
            return int(cf)
    return None


# ----------------------------------------------------------------------- entity tags


def http_etag(coap_etag: bytes) -> str:
    """A CoAP ETag as an HTTP strong entity tag: its bytes in hex, quoted."""
    return '"' + coap_etag.hex() + '"'


@dataclass
class EtagMap:
    """HTTP entity tags as CoAP ETags (at most 8 bytes) and back again, bounded.

    A tag this project wrote (:func:`http_etag`) comes back as its bytes; any other is
    shortened to 8 bytes of its SHA-256 and remembered, so that a CoAP client validating with
    it (ETag in a GET, If-Match) sends the origin's own tag upstream.
    """

    limit: int = 4096
    _seen: OrderedDict[bytes, str] = field(default_factory=OrderedDict)

    def to_coap(self, tag: str) -> bytes | None:
        tag = tag.strip()
        if not tag or tag.startswith("W/"):
            return None  # weak tags do not validate representations byte for byte
        match = _HEX_ETAG.match(tag)
        if match and len(match.group(1)) % 2 == 0:
            return bytes.fromhex(match.group(1))
        short = hashlib.sha256(tag.encode("latin-1", "replace")).digest()[:8]
        self._seen[short] = tag
        self._seen.move_to_end(short)
        while len(self._seen) > self.limit:
            self._seen.popitem(last=False)
        return short

    def to_http(self, etag: bytes) -> str:
        return self._seen.get(etag) or http_etag(etag)


def coap_etags(header: str) -> list[bytes]:
    """CoAP ETags from an If-Match / If-None-Match list this project wrote (others: none)."""
    out = []
    for part in header.split(","):
        match = _HEX_ETAG.match(part.strip())
        if match and len(match.group(1)) % 2 == 0:
            out.append(bytes.fromhex(match.group(1)))
    return out


# ----------------------------------------------------------------------- OSCORE header


def oscore_header(value: bytes) -> str:
    """RFC 8613 section 11.1: the OSCORE option value, base64url without padding."""
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode("ascii")


def oscore_option(header: str) -> bytes:
    text = header.strip()
    if len(text) > 344 or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("OSCORE header is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("OSCORE header is not base64url") from exc


# ----------------------------------------------------------------------- freshness


def max_age_from(headers: Iterable[tuple[str, str]], now: float | None = None) -> int | None:
    """Max-Age for an HTTP answer: Cache-Control max-age, else Expires; 0 when it must not be
    reused (no-store, no-cache, private); None when HTTP says nothing."""
    cache_control = ",".join(v for k, v in headers if k == "cache-control")
    lowered = cache_control.lower()
    if any(word in lowered for word in ("no-store", "no-cache", "private")):
        return 0
    match = _MAX_AGE.search(cache_control)
    if match:
        return min(int(match.group(2)), MAX_AGE_LIMIT)
    for k, v in headers:
        if k == "expires":
            try:
                when = email.utils.parsedate_to_datetime(v).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                return 0  # RFC 9111 5.3: an invalid Expires means already expired
            now = time.time() if now is None else now
            return max(0, min(int(when - now), MAX_AGE_LIMIT))
    return None


# ----------------------------------------------------------------------- proxy: CoAP -> HTTP


def target_url(scheme: str, hostinfo: str, path: Sequence[str], query: Sequence[str]) -> str:
    """The HTTP URL of a routing decision (each segment and query part percent-encoded)."""
    url = f"{scheme}://{hostinfo}/" + "/".join(quote(s, safe="!$&'()*+,;=:@") for s in path)
    if query:
        url += "?" + "&".join(quote(q, safe="!$'()*+,;=:@/?") for q in query)
    return url


def coap_to_http_request(request: Message, url: str, etags: EtagMap) -> HttpRequest:
    """The HTTP request a cross-proxy sends for a (reassembled) CoAP request.

    Raises :class:`MappingError` for what HTTP cannot express: a method without an HTTP
    counterpart (4.05), a Content-Format without a media type (4.15), an unknown critical
    option (4.02).
    """
    method = COAP_TO_HTTP_METHOD.get(request.code)
    if method is None:
        raise MappingError(Code.METHOD_NOT_ALLOWED, 405,
                           f"{request.code} has no HTTP counterpart")
    critical = sorted({int(o.number) for o in request.opt.option_list()
                       if o.number not in MAPPED_REQUEST_OPTIONS and o.number.is_critical()})
    if critical:
        raise MappingError(Code.BAD_OPTION, 400, "option " + ",".join(map(str, critical))
                           + " cannot be carried to HTTP")
    opt = request.opt
    headers: list[tuple[str, str]] = []
    oscore = opt.get_option(Opt.OSCORE)
    if oscore:
        headers.append(("oscore", oscore_header(oscore[0].value)))
    # A body without Content-Format goes without Content-Type (RFC 9110 8.3 lets the
    # recipient treat it as unknown), so that "none" crosses as "none": a Layer 0 session
    # resource's records carry no Content-Format and must not gain one.
    if oscore:
        headers.append(("content-type", OSCORE_MEDIA_TYPE))
    elif opt.content_format is not None:
        headers.append(("content-type", media_type(int(opt.content_format))))
    if opt.accept is not None:
        try:
            headers.append(("accept", media_type(int(opt.accept))))
        except MappingError as exc:
            raise MappingError(Code.NOT_ACCEPTABLE, 406, exc.text) from None
    if opt.if_match:
        headers.append(("if-match", ", ".join(
            etags.to_http(bytes(t)) if t else "*" for t in opt.if_match)))
    if opt.if_none_match:
        headers.append(("if-none-match", "*"))
    elif opt.etags:
        headers.append(("if-none-match", ", ".join(etags.to_http(bytes(t)) for t in opt.etags)))
    return HttpRequest(method, url, tuple(headers), bytes(request.payload))


def http_to_coap_response(
    method: Code, status: int, headers: Sequence[tuple[str, str]], body: bytes,
    *, etags: EtagMap, upstream: str, now: float | None = None,
) -> Message:
    """The CoAP answer for an HTTP response (header names lower case); ``upstream`` is the
    origin (scheme://host:port) whose Location values become Location-Path."""
    code = _coap_code(method, status)
    out = Message(code=code, payload=body)
    get = _getter(headers)
    oscore = get("oscore")
    if not _add_oscore(out, oscore):
        return Message(code=Code.BAD_GATEWAY, payload=b"upstream sent a bad OSCORE header")
    ctype = get("content-type")
    if ctype is not None and body and oscore is None:
        cf = content_format(ctype)
        if cf is not None:
            out.opt.content_format = cf
    etag = get("etag")
    if etag is not None and code in (Code.CONTENT, Code.VALID, Code.CHANGED, Code.CREATED):
        coap_etag = etags.to_coap(etag)
        if coap_etag is not None:
            out.opt.etag = coap_etag
    if code in (Code.CONTENT, Code.VALID):
        age = max_age_from(headers, now)
        out.opt.max_age = 0 if age is None else age
    elif code == Code.SERVICE_UNAVAILABLE:
        retry = get("retry-after")
        if retry is not None and retry.strip().isdigit():
            out.opt.max_age = min(int(retry.strip()), MAX_AGE_LIMIT)
    location = get("location")
    if location is not None and code == Code.CREATED:
        _set_location(out, location, upstream)
    return out


def _add_oscore(message: Message, header: str | None) -> bool:
    """The OSCORE option from an ``OSCORE`` header field, if there is one; False if it is
    not base64url."""
    if header is None:
        return True
    try:
        message.opt.add_option(OpaqueOption(Opt.OSCORE, oscore_option(header)))
    except ValueError:
        return False
    return True


def _coap_code(method: Code, status: int) -> Code:
    if status in (200, 203, 204, 205):
        return _SUCCESS_BY_METHOD.get(method, Code.CONTENT)
    if status == 202:  # accepted, not done: the method's success says as much as CoAP can
        return _SUCCESS_BY_METHOD.get(method, Code.CHANGED)
    mapped = HTTP_TO_COAP_STATUS.get(status)
    if mapped is not None:
        return mapped
    if 200 <= status < 300:
        return _SUCCESS_BY_METHOD.get(method, Code.CONTENT)
    if 300 <= status < 400:
        return Code.BAD_GATEWAY  # redirects are not followed: the proxy cannot vouch for them
    if 400 <= status < 500:
        return Code.BAD_REQUEST
    return Code.INTERNAL_SERVER_ERROR if status < 600 else Code.BAD_GATEWAY


def _set_location(out: Message, location: str, upstream: str) -> None:
    try:
        parts = urlsplit(location.strip())
    except ValueError:
        return
    if parts.scheme or parts.netloc:
        if f"{parts.scheme}://{parts.netloc}".lower() != upstream.lower():
            return  # another origin: CoAP's Location-* cannot name it
    path = parts.path
    if not path.startswith("/"):
        return  # relative references are not resolved (no origin sends them here)
    segments = [unquote(s) for s in path.split("/")[1:]]
    if segments and segments != [""]:
        out.opt.location_path = segments
    if parts.query:
        out.opt.location_query = [unquote(q) for q in parts.query.split("&")]


def _getter(headers: Sequence[tuple[str, str]]):  # type: ignore[no-untyped-def]
    def get(name: str) -> str | None:
        for k, v in headers:
            if k == name:
                return v
        return None
    return get


# ----------------------------------------------------------------------- server: HTTP -> CoAP


def http_to_coap_request(
    method: str, path: str, query: str, headers: Sequence[tuple[str, str]], body: bytes,
) -> Message:
    """The CoAP request a server renders for an HTTP one (RFC 8075 sections 5-6); header
    names lower case. :class:`MappingError` carries the HTTP answer for what does not map."""
    code = HTTP_TO_COAP_METHOD.get(method.upper())
    if code is None:
        raise MappingError(Code.METHOD_NOT_ALLOWED, 501, f"method {method} is not mapped")
    msg = Message(code=code, payload=body)
    segments = [unquote(s) for s in path.split("/")[1:]] if path not in ("", "/") else []
    if any(len(s.encode()) > 255 for s in segments):
        raise MappingError(Code.BAD_REQUEST, 414, "a path segment is longer than 255 bytes")
    msg.opt.uri_path = segments
    if query:
        msg.opt.uri_query = [unquote(q.replace("+", " ")) for q in query.split("&")]
    get = _getter(headers)
    oscore = get("oscore")
    if not _add_oscore(msg, oscore):
        raise MappingError(Code.BAD_REQUEST, 400, "bad OSCORE header field")
    ctype = get("content-type")
    if ctype is not None and body and oscore is None:
        cf = content_format(ctype)
        if cf is None:
            raise MappingError(Code.UNSUPPORTED_CONTENT_FORMAT, 415,
                               f"media type {ctype.split(';')[0].strip()} has no Content-Format")
        msg.opt.content_format = cf
    accept = get("accept")
    if accept is not None and "," not in accept and "*" not in accept:
        cf = content_format(accept)
        if cf is not None:
            msg.opt.accept = cf
    if_match = get("if-match")
    if if_match is not None:
        msg.opt.if_match = [b""] if if_match.strip() == "*" else coap_etags(if_match)
    if_none = get("if-none-match")
    if if_none is not None:
        if if_none.strip() == "*":
            msg.opt.if_none_match = True
        else:
            msg.opt.etags = coap_etags(if_none)[:8]
    return msg


def coap_to_http_response(response: Message) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of the HTTP answer for a CoAP response (RFC 8075 section 7)."""
    status = COAP_TO_HTTP_STATUS.get(response.code)
    if status is None:
        status = 500 if response.code.is_server_error() else (
            400 if response.code.is_client_error() else 200)
    body = bytes(response.payload)
    opt = response.opt
    headers: list[tuple[bytes, bytes]] = []
    oscore = opt.get_option(Opt.OSCORE)
    if oscore:
        headers.append((b"oscore", oscore_header(oscore[0].value).encode()))
        headers.append((b"content-type", OSCORE_MEDIA_TYPE.encode()))
    elif opt.content_format is not None and body:
        try:
            headers.append((b"content-type", media_type(int(opt.content_format)).encode()))
        except MappingError:
            headers.append((b"content-type", b"application/octet-stream"))
    if opt.etag is not None:
        headers.append((b"etag", http_etag(bytes(opt.etag)).encode()))
    if response.code == Code.SERVICE_UNAVAILABLE and opt.max_age is not None:
        headers.append((b"retry-after", str(opt.max_age).encode()))
    elif response.code in (Code.CONTENT, Code.VALID):
        age = 60 if opt.max_age is None else opt.max_age
        headers.append((b"cache-control", f"max-age={age}".encode()))
    if opt.location_path or opt.location_query:
        location = "/" + "/".join(quote(s, safe="") for s in opt.location_path)
        if opt.location_query:
            location += "?" + "&".join(quote(q, safe="=") for q in opt.location_query)
        headers.append((b"location", location.encode()))
    if status == 304:
        body = b""
    headers.append((b"content-length", str(len(body)).encode()))
    return status, headers, body
