"""The one place where coaplayers reaches past aiocoap's public API.

Checked against aiocoap 0.4.17 (the pinned range in pyproject.toml) and, for the request
interface choice, against its development branch (commit f867dc4, which splits
``fill_or_recognize_remote`` into ``recognize_remote`` and ``determine_remote`` and drops
``MessageInterfaceUDP6.create_*_transport_endpoint``). Every other module uses aiocoap's
public names only; ``tests/test_seams.py`` greps the tree for private ones.

Each workaround below says why it is here and which upstream change would retire it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, SupportsIndex

from aiocoap import Message

Refusal = Callable[[Message], "Exception | None"]
"""Says why a request must not go out through a plain interface (None: it may)."""

_GUARDS = "_coaplayers_guards"


def guard_request_interfaces(context: Any, refusal: Refusal, *, spare: type) -> None:
    """Fail closed: every request interface of ``context`` that is not a ``spare`` (the
    OSCORE transports) refuses a request for which ``refusal`` returns an error: the error
    goes to the requester and nothing is sent. Interfaces added to ``context`` later are
    guarded as they are added.

    Why here: aiocoap picks the interface for a request by asking each in turn
    (``fill_or_recognize_remote`` in 0.4.17, two passes in its development branch); an
    interface that is not asked, or asked after a plain transport claimed the URI, would
    let a request meant for OSCORE leave in the clear without an error. The guard sits where
    every request ends, whatever the choice: the chosen interface's ``request(pipe)``.
    Retire when aiocoap lets a request carry a "must be protected" requirement that its
    plain transports honour (upstream: a security policy on the request, checked by
    ``Context.request``).
    """
    interfaces = context.request_interfaces
    for ri in interfaces:
        _guard(ri, refusal, spare)
    if not isinstance(interfaces, _GuardedList):
        context.request_interfaces = _GuardedList(interfaces)
    context.request_interfaces.guards.append((refusal, spare))


def _guard(ri: Any, refusal: Refusal, spare: type) -> None:
    if isinstance(ri, spare):
        return
    guards: list[Refusal] | None = ri.__dict__.get(_GUARDS)
    if guards is None:
        guards = []
        unguarded = ri.request

        def request(pipe: Any, _guards: list[Refusal] = guards) -> None:
            message = pipe.request
            for refuse in _guards:
                error = refuse(message)
                if error is not None:
                    pipe.add_exception(error)
                    return
            unguarded(pipe)

        # An instance attribute: the interface keeps its type (coaplayers.layer1's
        # ServerContext recognises aiocoap's TokenManager by type) and its other methods.
        ri.request = request
        ri.__dict__[_GUARDS] = guards
    if refusal not in guards:
        guards.append(refusal)


class _GuardedList(list[Any]):
    """``Context.request_interfaces`` that guards interfaces appended after the guard was
    installed (aiocoap appends a transport's token manager as it starts)."""

    def __init__(self, items: Iterable[Any]) -> None:
        super().__init__(items)
        self.guards: list[tuple[Refusal, type]] = []

    def _guarded(self, ri: Any) -> Any:
        for refusal, spare in self.guards:
            _guard(ri, refusal, spare)
        return ri

    def append(self, ri: Any) -> None:
        super().append(self._guarded(ri))

    def insert(self, index: SupportsIndex, ri: Any) -> None:
        super().insert(index, self._guarded(ri))

    def extend(self, items: Iterable[Any]) -> None:
        super().extend(self._guarded(ri) for ri in items)
