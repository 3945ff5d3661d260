"""Print the byte-exact examples of docs/PROTOCOL.md: ``python -m coaplayers.layer0.examples``.

Inner messages are deterministic. The Layer 0 exchange is a real PSK handshake, one request and
one pull that fetches a notification, driven in memory through
:class:`~coaplayers.layer0.core.Layer0ServerCore` (no sockets); its DTLS bytes differ on every run
(randoms, keys), the framing around them does not.
"""

from __future__ import annotations

from aiocoap import Message
from aiocoap.message import UndecidedRemote
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from ..dtls import ApplicationData, PskClientCredentials, PskStore, TinyDtlsSession
from . import inner
from .core import Answer, Layer0ServerCore
from .profile import CONTENT_FORMAT, WELL_KNOWN_PATH, handshake_tag, pull_message
from .server import layer0_config, make_listener


def _hex(data: bytes) -> str:
    return " ".join(data[i : i + 32].hex() for i in range(0, len(data), 32))


def _outer_request(mid: int, path: tuple[str, ...], payload: bytes) -> bytes:
    m = Message(code=Code.POST)
    m.mtype, m.mid, m.token = Type.CON, mid, b"\x7a" + bytes([mid & 0xFF])
    m.remote = UndecidedRemote("coap", "origin.example")
    m.opt.uri_path = path
    if payload and path == WELL_KNOWN_PATH:  # the session resource's payloads are records
        m.opt.content_format = CONTENT_FORMAT
    m.payload = payload
    return m.encode()


def _outer_response(mid: int, answer: Answer, *, entry: bool = False) -> bytes:
    m = Message(code=answer.code)
    m.mtype, m.mid, m.token = Type.ACK, mid, b"\x7a" + bytes([mid & 0xFF])
    if answer.location:
        m.opt.location_path = answer.location
    if entry and answer.carries_records:
        m.opt.content_format = CONTENT_FORMAT
    m.payload = answer.payload
    return m.encode()


def inner_examples() -> list[tuple[str, bytes]]:
    return [
        (
            "GET /temperature, token 01",
            inner.encode(b"\1", Message(code=Code.GET, uri_path=["temperature"])),
        ),
        (
            "2.05 Content, text/plain, payload '22.5 C', token 01",
            inner.encode(
                b"\1", Message(code=Code.CONTENT, content_format=0, payload=b"22.5 C")
            ),
        ),
        (
            "GET /counter with Observe: 0, token 02",
            inner.encode(b"\2", Message(code=Code.GET, uri_path=["counter"], observe=0)),
        ),
        (
            "4.03 Forbidden (policy), token 03",
            inner.encode(b"\3", Message(code=Code.FORBIDDEN)),
        ),
        ("pull acknowledging nothing yet (0.00, empty token)", pull_message(-1)),
        ("pull acknowledging records up to sequence number 5 (0.00, token 05)", pull_message(5)),
        ("7.02 Ping, token 04", inner.encode(b"\4", Message(code=Code.PING))),
        ("7.03 Pong, token 04", inner.encode(b"\4", Message(code=Code.PONG))),
    ]


def tunnel_example() -> list[tuple[str, bytes]]:
    creds = PskClientCredentials(b"device-1", b"0123456789abcdef")
    core = Layer0ServerCore(
        make_listener(PskStore({creds.identity: creds.key})), random=lambda n: b"\x01" * n
    )
    client = TinyDtlsSession.client(creds, layer0_config())
    client.connect(0.0)
    out: list[tuple[str, bytes]] = []
    path: tuple[str, ...] = WELL_KNOWN_PATH
    tag = b""
    mid = 0x1000
    queue = client.datagrams_to_send()
    while not client.is_established:
        datagram = queue.pop(0) if queue else b""
        if path != WELL_KNOWN_PATH:
            datagram = tag + datagram  # the handshake tag starts it (docs/PROTOCOL.md 3.3)
        title = f"request {mid:#06x} POST /{'/'.join(path)}" + (" (tag first)" if tag else "")
        out.append((title, _outer_request(mid, path, datagram)))
        if path == WELL_KNOWN_PATH:
            answer = core.entry(("coap", "192.0.2.1:5683"), datagram, 0.0)
        else:
            answer = core.datagram(path[-1], datagram, 0.0)[0]
        entry = path == WELL_KNOWN_PATH
        out.append(
            (f"response {mid:#06x} {answer.code}", _outer_response(mid, answer, entry=entry))
        )
        if answer.location:
            path = answer.location
            tag = handshake_tag(answer.payload) or b""
        if answer.payload:
            client.receive_datagram(answer.payload, 0.0)
        queue += client.datagrams_to_send()
        mid += 1
    while client.next_event():
        pass
    token = b"\1"
    client.send(inner.encode(token, Message(code=Code.GET, uri_path=["temperature"])))
    datagram = b"".join(client.datagrams_to_send())
    out.append(
        (f"request {mid:#06x} protected GET /temperature", _outer_request(mid, path, datagram))
    )
    answer, plaintexts = core.datagram(path[-1], datagram, 0.0)
    assert inner.decode(plaintexts[0]).message.opt.uri_path == ("temperature",)
    record = core.seal(
        path[-1],
        inner.encode(token, Message(code=Code.CONTENT, content_format=0, payload=b"22.5 C")),
    )
    answer = Answer(Code.CHANGED, record)
    out.append((f"response {mid:#06x} protected 2.05 inside", _outer_response(mid, answer)))
    client.receive_datagram(record, 0.0)
    event = client.next_event()
    assert isinstance(event, ApplicationData)
    # a notification of an observation (token 02) is queued; the client pulls it
    mid += 1
    core.enqueue(path[-1], core.seal(path[-1], inner.encode(
        b"\2", Message(code=Code.CONTENT, observe=7, content_format=0, payload=b"42"))))
    client.send(pull_message(-1))
    datagram = b"".join(client.datagrams_to_send())
    out.append((f"request {mid:#06x} pull, acknowledging nothing yet",
                _outer_request(mid, path, datagram)))
    answer, plaintexts = core.datagram(path[-1], datagram, 0.0)
    assert answer.payload and not plaintexts
    out.append((f"response {mid:#06x} 2.04 with the queued notification (kept until acknowledged)",
                _outer_response(mid, answer)))
    return out


def main() -> None:
    print("## Inner messages\n")
    for title, data in inner_examples():
        print(f"{title}:\n    {_hex(data)}\n")
    print("## A PSK Layer 0 session: handshake, one protected request, one pull\n")
    for title, data in tunnel_example():
        print(f"{title} ({len(data)} bytes):\n    {_hex(data)}\n")


if __name__ == "__main__":
    main()
