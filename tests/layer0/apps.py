"""The application the Layer 0 tests serve: an ordinary aiocoap Site that knows nothing of Layer 0
(except /whoami, which shows how a resource reads the Layer 0 peer)."""

from __future__ import annotations

import asyncio

import aiocoap
import aiocoap.resource as resource
from aiocoap.numbers.codes import Code

from coaplayers.layer0 import layer0_peer

TEXT_MARKER = b"SECRET-TEXT-7f3a"
ECHO_MARKER = b"SECRET-ECHO-91c2"
OBS_MARKER = b"SECRET-OBS-5be0"


class Text(resource.Resource):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.calls += 1
        return aiocoap.Message(payload=b"hello " + TEXT_MARKER, content_format=0)


class Echo(resource.Resource):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        self.calls += 1
        return aiocoap.Message(code=Code.CHANGED, payload=request.payload)


class Counter(resource.ObservableResource):
    """Changes when :meth:`bump` is called; tests drive it, so no timer decides the order."""

    def __init__(self) -> None:
        super().__init__()
        self.value = 0
        self.observers = 0
        self.observers_changed = asyncio.Event()

    def update_observation_count(self, newcount: int) -> None:
        self.observers = newcount
        self.observers_changed.set()

    def bump(self) -> None:
        self.value += 1
        self.updated_state()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=OBS_MARKER + b" %d" % self.value, content_format=0)


class WhoAmI(resource.Resource):
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        peer = layer0_peer(request)
        return aiocoap.Message(payload=(peer.identity if peer else "-").encode())


def make_site() -> tuple[resource.Site, dict[str, resource.Resource]]:
    site = resource.Site()
    res: dict[str, resource.Resource] = {
        "text": Text(),
        "echo": Echo(),
        "counter": Counter(),
        "whoami": WhoAmI(),
    }
    site.add_resource(["text"], res["text"])
    site.add_resource(["echo"], res["echo"])
    site.add_resource(["counter"], res["counter"])
    site.add_resource(["whoami"], res["whoami"])
    site.add_resource(["public", "text"], Text())
    return site, res
