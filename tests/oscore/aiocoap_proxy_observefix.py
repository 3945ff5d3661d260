"""``aiocoap-proxy`` with one bug of aiocoap 0.4.17 fixed in-process, for the Observe test.

aiocoap 0.4.17's pooled observations (``ProxyWithPooledObservations``) pass messages they
received on to the other side without marking them outgoing: the upstream registration
(a copy of the client's request), the cached first response and every relayed
notification. ``Message.encode`` asserts on each, so the proxy answers every Observe
request with 5.00, plain CoAP and OSCORE alike (test_oscore_proxy.py shows this with the
unmodified program). This launcher marks those three copies outgoing and then runs the
unmodified aiocoap-proxy CLI (``aiocoap.cli.proxy.sync_main``) with the given arguments.
Nothing in site-packages is changed and nothing about OSCORE is touched; the messages
relayed are byte-for-byte what the stock code meant to send.
"""

import sys

from aiocoap import message, protocol
from aiocoap.cli.proxy import sync_main
from aiocoap.proxy import server

OUTGOING = message.Direction.OUTGOING
_get_observation_for = server.ProxyWithPooledObservations._get_observation_for
_render = server.ProxyWithPooledObservations.render
_trigger = protocol.ServerObservation.trigger


def _outgoing(msg):  # type: ignore[no-untyped-def]
    if msg is not None and msg.direction is not OUTGOING:
        msg = msg.copy()
        msg.direction = OUTGOING
    return msg


def get_observation_for(self, request):  # type: ignore[no-untyped-def]
    return _get_observation_for(self, _outgoing(request))


async def render(self, request):  # type: ignore[no-untyped-def]
    return _outgoing(await _render(self, request))


def trigger(self, response=None, *, is_last=False):  # type: ignore[no-untyped-def]
    return _trigger(self, _outgoing(response), is_last=is_last)


server.ProxyWithPooledObservations._get_observation_for = get_observation_for
server.ProxyWithPooledObservations.render = render
protocol.ServerObservation.trigger = trigger

if __name__ == "__main__":
    sys.argv[0] = "aiocoap-proxy"
    sys.exit(sync_main())
