"""A pipe that collects what a renderer answers, for tests that drive renderings by hand."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiocoap import Message
from aiocoap.pipe import Pipe

log = logging.getLogger(__name__)


class Answers(list[Message]):
    """The answers so far; ``last`` is set with the final one."""

    def __init__(self) -> None:
        super().__init__()
        self.last = asyncio.Event()


def collecting_pipe(request: Message) -> tuple[Pipe, Answers]:
    pipe = Pipe(request, log)
    answers = Answers()

    def on_event(event: Any) -> bool:
        answers.append(event.message)
        if event.is_last:
            answers.last.set()
        return not event.is_last

    pipe.on_event(on_event)
    return pipe, answers


async def establish(site: Any, creds: Any,
                    post: Callable[[Any, str, bytes], Awaitable[Message]]) -> tuple[Any, str]:
    """A PSK client engine handshaken with a Layer0Site through ``post(site, path, payload)``
    (which returns the outer answer); the client and its session's resource name."""
    from coaplayers.dtls import TinyDtlsSession
    from coaplayers.layer0.profile import handshake_tag
    from coaplayers.layer0.server import layer0_config

    client = TinyDtlsSession.client(creds, layer0_config())
    client.connect(0.0)
    answer = await post(site, "/.well-known/atls", client.datagrams_to_send()[0])
    if not answer.opt.location_path:  # a HelloVerifyRequest: the cookie exchange
        client.receive_datagram(answer.payload, 0.0)
        answer = await post(site, "/.well-known/atls", client.datagrams_to_send()[0])
    sid = answer.opt.location_path[0]
    tag = handshake_tag(bytes(answer.payload))
    assert tag is not None
    for _ in range(8):
        client.receive_datagram(answer.payload, 0.0)
        if client.is_established:
            break
        answer = await post(site, sid, tag + b"".join(client.datagrams_to_send()))
    assert client.is_established
    while client.next_event() is not None:
        pass
    return client, sid
