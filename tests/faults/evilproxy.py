"""A malicious forward proxy for the attack tests: a real UDP man in the middle that parses every
CoAP message (``aiocoap.Message.decode``), lets a test hook alter, drop, hold, replay or
redirect it, and re-encodes what it sends.

It behaves like a forward proxy at the message layer: a client names it as its proxy, it strips
the proxy options (Proxy-Scheme, Uri-Host, Uri-Port) and routes each request to the origin its
Uri-Port names (a test may route it elsewhere), keeping the message ID and token, so CoAP's own
acknowledgements, retransmissions and deduplication stay end to end. Like a NAT it gives every
client its own upstream socket, so the server sees one source address per client and answers
find their way back.

Hooks (``up`` for requests, ``down`` for answers) see each decoded message and return ``None``
(forward as is), ``[]`` (drop) or a list of :class:`Send` (any number of messages, to any
address). :meth:`EvilProxy.inject` sends a message of the proxy's own (a replay) upstream from a
client's socket and returns the server's answer, which is not forwarded to the client.

The project's FaultRelay models an unreliable network (random loss, duplication, reordering);
this is the deliberate attacker of docs/SECURITY.md, section 1 ("malicious middle box").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiocoap
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

Address = tuple[str, int]


@dataclass
class Send:
    """One datagram the proxy sends: a message (encoded here) or raw bytes; ``to`` = None is
    the default destination (the routed upstream for requests, the client for answers)."""

    data: aiocoap.Message | bytes
    to: Address | None = None
    back: bool = False
    """From the up hook: answer the client from the proxy itself (to = the client)."""


@dataclass
class Seen:
    """A message as it crossed the proxy (after proxy options were stripped, before hooks)."""

    direction: str  # "up" (request side) or "down" (answer side)
    message: aiocoap.Message
    client: Address


Hook = Callable[[aiocoap.Message, Address], "list[Send] | None"]


@dataclass(eq=False)
class _Client:
    address: Address
    sock: socket.socket


@dataclass(eq=False)
class EvilProxy:
    """The malicious proxy; ``async with EvilProxy(default=server) as evil``."""

    default: Address
    """Where requests without Uri-Port go (and the usual origin)."""
    up: Hook | None = None
    down: Hook | None = None
    routes: dict[int, Address] = field(default_factory=dict)
    """Uri-Port -> address; a request naming another port goes to 127.0.0.1:<port>."""
    separate: Callable[[aiocoap.Message], bool] | None = None
    """Requests this accepts are acknowledged by the proxy at once (empty ACK) and their
    answers reach the client as separate NON responses, as a proxy may do (RFC 7252 5.2.2).
    A client then has several such requests to one proxy in flight (aiocoap keeps NSTART = 1
    per peer only until the ACK), so the proxy can reorder them and their answers."""
    seen: list[Seen] = field(default_factory=list)
    address: Address = ("127.0.0.1", 0)
    _sock: socket.socket | None = None
    _clients: dict[Address, _Client] = field(default_factory=dict)
    _injected: dict[bytes, asyncio.Future[aiocoap.Message]] = field(default_factory=dict)
    _separate_tokens: set[tuple[Address, bytes]] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)

    async def __aenter__(self) -> EvilProxy:
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        self._sock = sock
        self.address = sock.getsockname()[:2]
        self._loop.add_reader(sock, self._read_listen)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self._clients.values():
            self._loop.remove_reader(c.sock)
            c.sock.close()
        self._clients.clear()
        if self._sock is not None:
            self._loop.remove_reader(self._sock)
            self._sock.close()
            self._sock = None
        for fut in self._injected.values():
            fut.cancel()

    @property
    def uri(self) -> str:
        return f"coap://{self.address[0]}:{self.address[1]}"

    # ------------------------------------------------------------------ what tests use

    def requests(self, client: Address | None = None) -> list[aiocoap.Message]:
        return [s.message for s in self.seen
                if s.direction == "up" and (client is None or s.client == client)]

    def answers(self) -> list[aiocoap.Message]:
        return [s.message for s in self.seen if s.direction == "down"]

    def clients(self) -> list[Address]:
        return list(self._clients)

    async def inject(
        self, message: aiocoap.Message, *, client: Address | None = None,
        to: Address | None = None, timeout: float = 5.0,
    ) -> aiocoap.Message | None:
        """Send ``message`` as a new confirmable exchange (fresh message ID and token) from
        ``client``'s upstream socket (default: a fresh socket) to ``to`` (default: the
        default upstream); the answer, or None if none came within ``timeout``."""
        msg = copy_message(message)
        # A message ID this client has not used: the server would take a reused one for a
        # retransmission and repeat its earlier answer, which is not what is being tested.
        used = {s.message.mid for s in self.seen if s.direction == "up" and s.client == client}
        mid = int.from_bytes(os.urandom(2), "big")
        while mid in used:
            mid = (mid + 1) & 0xFFFF
        msg.mtype, msg.mid, msg.token = Type.CON, mid, os.urandom(8)
        fut: asyncio.Future[aiocoap.Message] = self._loop.create_future()
        self._injected[msg.token] = fut
        if client is not None:
            sock = self._client(client).sock
            fresh = None
        else:
            fresh = sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self._loop.add_reader(sock, self._read_fresh, sock)
        try:
            sock.sendto(encode(msg), to or self.default)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            self._injected.pop(msg.token, None)
            if fresh is not None:
                self._loop.remove_reader(fresh)
                fresh.close()

    # ------------------------------------------------------------------ forwarding

    def _client(self, address: Address) -> _Client:
        c = self._clients.get(address)
        if c is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            c = self._clients[address] = _Client(address, sock)
            self._loop.add_reader(sock, self._read_upstream, c)
        return c

    def _read_listen(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, addr = self._sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            self._guard(self._from_client, addr[:2], data)

    def _read_upstream(self, c: _Client) -> None:
        while True:
            try:
                data, src = c.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP unreachable from an earlier send
                continue
            self._guard(self._from_upstream, c, data, src[:2])

    def _read_fresh(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            data, src = sock.recvfrom(65535)
            self._answer_injected(aiocoap.Message.decode(data), sock, src)

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a hook's bug must fail the test, not vanish in a callback
            self.errors.append(exc)

    def _from_client(self, addr: Address, data: bytes) -> None:
        c = self._client(addr)
        try:
            msg = aiocoap.Message.decode(data)
        except Exception:
            c.sock.sendto(data, self.default)
            return
        port = msg.opt.uri_port
        msg.opt.proxy_scheme = None
        msg.opt.uri_host = None
        msg.opt.uri_port = None
        to = self.routes.get(port, ("127.0.0.1", port)) if port else self.default
        if (self.separate is not None and msg.mtype is Type.CON and msg.code.is_request()
                and self.separate(msg)):
            assert self._sock is not None
            ack = aiocoap.Message(code=Code.EMPTY)
            ack.mtype, ack.mid = Type.ACK, msg.mid
            self._sock.sendto(encode(ack), addr)
            self._separate_tokens.add((addr, msg.token))
        self.seen.append(Seen("up", copy_message(msg), addr))
        out = self.up(msg, addr) if self.up is not None else None
        for send in [Send(msg)] if out is None else out:
            if send.back:
                assert self._sock is not None
                self._sock.sendto(_bytes(send.data), addr)
            else:
                c.sock.sendto(_bytes(send.data), send.to or to)

    def _from_upstream(self, c: _Client, data: bytes, src: Address) -> None:
        assert self._sock is not None
        try:
            msg = aiocoap.Message.decode(data)
        except Exception:
            self._sock.sendto(data, c.address)
            return
        if self._answer_injected(msg, c.sock, src):
            return
        if (c.address, msg.token) in self._separate_tokens and msg.code.is_response():
            self._separate_tokens.discard((c.address, msg.token))
            msg.mtype, msg.mid = Type.NON, int.from_bytes(os.urandom(2), "big")
        self.seen.append(Seen("down", copy_message(msg), c.address))
        out = self.down(msg, c.address) if self.down is not None else None
        for send in [Send(msg)] if out is None else out:
            self._sock.sendto(_bytes(send.data), send.to or c.address)

    def _answer_injected(self, msg: aiocoap.Message, sock: socket.socket, src: Address) -> bool:
        fut = self._injected.get(msg.token)
        if fut is None:
            return False
        if msg.mtype is Type.CON:
            # A separate answer (the server sent an empty ACK first because it took longer
            # than EMPTY_ACK_DELAY, as on a loaded machine): acknowledge it, as a client would,
            # and take it as the answer.
            ack = aiocoap.Message(code=Code.EMPTY)
            ack.mtype, ack.mid = Type.ACK, msg.mid
            sock.sendto(encode(ack), src[:2])
        if msg.code.is_response() and not fut.done():
            fut.set_result(msg)
        return True


def encode(msg: aiocoap.Message) -> bytes:
    """The message's bytes (a decoded message is marked incoming; aiocoap encodes outgoing)."""
    msg.direction = Direction.OUTGOING
    return msg.encode()


def _bytes(data: aiocoap.Message | bytes) -> bytes:
    return data if isinstance(data, bytes) else encode(data)


def copy_message(msg: aiocoap.Message) -> aiocoap.Message:
    """An independent copy that keeps type, message ID and token (re-decoded from its bytes)."""
    return aiocoap.Message.decode(encode(msg))
