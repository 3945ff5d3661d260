"""How many handshakes a server answers without the cookie exchange, shared by its listeners.

A DTLS cookie (RFC 6347 section 4.2.1) proves the client's address before the server keeps
state or sends its certificate flight, at the price of one round trip. Where something else
bounds what an unverified address gets back (Layer 0: the outer 3x rule of coap-server and
coap-proxy, docs/SECURITY.md), what the cookie still protects is the half-open state. So a
listener may answer a ClientHello without a cookie at once while few such handshakes are in
progress, and asks for the cookie beyond that (as under a flood from forged addresses, which
then holds at most ``limit`` slots). One budget serves every kind of an endpoint (PSK,
certificates, raw public keys), so a flood through one kind cannot hold more than the limit.
"""

from __future__ import annotations

import weakref

from .session import DtlsSession, State


class CookieBudget:
    """Handshakes answered without a cookie that may be in progress at once (0: none)."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("the limit of handshakes without a cookie must be at least 0")
        self.limit = limit
        self._at_once: weakref.WeakSet[DtlsSession] = weakref.WeakSet()

    @property
    def in_progress(self) -> int:
        """Handshakes started without a cookie that have not ended yet."""
        for done in [s for s in self._at_once if s.state is not State.HANDSHAKING]:
            self._at_once.discard(done)
        return len(self._at_once)

    def has_room(self) -> bool:
        return self.in_progress < self.limit

    def add(self, session: DtlsSession) -> None:
        if session.state is State.HANDSHAKING:
            self._at_once.add(session)


def budget(without_cookie: int | CookieBudget) -> CookieBudget:
    """A listener's budget: its own for a number, a shared one as given."""
    return without_cookie if isinstance(without_cookie, CookieBudget) else CookieBudget(
        without_cookie)
