"""CoAP message helpers the layers share (aiocoap has no shallow copy of a message)."""

from __future__ import annotations

from aiocoap import Message


def copy_request(message: Message) -> Message:
    """A copy of ``message`` whose options can be changed without touching the original.

    Like aiocoap's ``Message.copy()`` but shallow: the option list is new, the option
    objects are shared. aiocoap never changes an option object in place (its setters
    replace options), so this is enough, and it avoids ``copy.deepcopy`` of every option
    (about 35 us of CPU per request in coap-bench).
    """
    new = Message(code=message.code, payload=message.payload,
                  transport_tuning=message.transport_tuning)
    new.mtype = message.mtype
    new.mid = message.mid
    new.token = message.token
    new.remote = message.remote
    new.direction = message.direction
    options = new.opt
    for option in message.opt.option_list():
        options.add_option(option)
    return new


__all__ = ["copy_request"]
