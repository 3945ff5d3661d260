"""Fuzzing what the Layer 1 transport hands to aiocoap: the decrypted plaintext of a record,
i.e. any bytes a peer holding the hop's keys can send.

Contract: the transport never raises on it; a CoAP message is dispatched or the plaintext is
dropped with a warning.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from coaplayers.layer1.transport import Layer1Limits, MessageInterfaceLayer1

from .common import FUZZ, bytes_input, corpus, only

COAP = corpus("oscore_messages")  # real CoAP messages (the outer ones of OSCORE requests)


class Manager:
    def __init__(self) -> None:
        self.dispatched: list[Any] = []

    def dispatch_message(self, message: Any) -> None:
        self.dispatched.append(message)

    def dispatch_error(self, *_: Any) -> None:
        pass


class Remote:
    hostinfo = "[2001:db8::1]:5684"


class Peer:
    def __init__(self) -> None:
        self.remote = Remote()
        self.sent_cons: dict[int, Any] = {}
        self.last_received = 0.0


def deliver_all(data_items: list[bytes]) -> list[Any]:
    async def run() -> list[Any]:
        manager = Manager()
        transport = MessageInterfaceLayer1(
            manager, psk_store=None, certificate=None, client_credentials=None,  # type: ignore[arg-type]
            limits=Layer1Limits(),
        )
        for data in data_items:
            with only():
                transport._deliver(Peer(), data)  # type: ignore[arg-type]
        return manager.dispatched

    return asyncio.run(run())


def aiocoap_decodes_strings(data: bytes) -> bool:
    """False for the input of the known bug below (kept out so this test stays meaningful)."""
    from aiocoap import Message

    try:
        Message.decode(data)
    except UnicodeDecodeError:
        return False
    except Exception:
        return True
    return True


def test_layer1_plaintext_never_raises() -> None:
    collected: list[bytes] = []

    @FUZZ
    @given(data=bytes_input(COAP, max_size=200).filter(aiocoap_decodes_strings))
    def gather(data: bytes) -> None:
        collected.append(data)

    gather()
    dispatched = deliver_all(collected)  # one transport, every input; none may raise
    assert dispatched and all(m.code is not None for m in dispatched)


@given(data=st.just(bytes.fromhex("4101123407b1ff")))  # CON GET, token 07, Uri-Path "\xff"
@example(data=bytes.fromhex("4101123407b1ff"))
def test_layer1_plaintext_with_non_utf8_uri_path(data: bytes) -> None:
    deliver_all([data])
