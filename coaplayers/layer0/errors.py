"""Typed errors of Layer 0. Each says which side refused what, so callers can tell "handshake
again" (:class:`SessionLost`) from "somebody tampered" (:class:`RecordRejected`,
:class:`ResponseRejected`)."""

from __future__ import annotations

from ..errors import CoaplayersError, LocalError, RemoteError


class Layer0Error(CoaplayersError):
    """Base class of every Layer 0 error."""


class InnerMessageError(Layer0Error, RemoteError):
    """Bytes inside a record are not a valid inner message (docs/PROTOCOL.md, "Inner message")."""


class HandshakeFailed(Layer0Error, RemoteError):
    """The end-to-end DTLS handshake failed; ``__cause__`` holds the engine's error if any."""


class SessionLost(Layer0Error, RemoteError):
    """The server does not know the session any more (4.04), e.g. after a restart or eviction.

    Raised for a request that was not resent automatically (non-idempotent methods, unless the
    client allows it): the server never decrypted it, but the caller decides whether to repeat.
    """


class RecordRejected(Layer0Error, RemoteError):
    """The server refused our record (4.01/4.00): it was altered in transit or replayed."""


class ResponseRejected(Layer0Error, RemoteError):
    """The answer did not authenticate or did not belong to the request: altered in transit.

    The response is dropped; nothing unauthenticated is ever handed to the application.
    """


class ServerBusy(Layer0Error, RemoteError):
    """The server, or a proxy on the way, has no room for the handshake now (5.03; the
    message carries the diagnostic it gave, such as a proxy's "proxy starting"); retry later."""


class OuterError(Layer0Error, RemoteError):
    """The outer CoAP exchange failed (timeout, network error, or an unexpected answer)."""


class NoAnswer(OuterError):
    """Not one outer exchange of a handshake got a CoAP answer within the handshake timeout:
    nothing listens there, or everything is lost (not a key problem)."""


class Layer0Closed(Layer0Error, LocalError):
    """The Layer 0 client was closed by the application."""
