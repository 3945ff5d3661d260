"""Typed errors of the OSCORE mode.

They are split by who has to act: a :class:`ParameterError` means the peer sent a keying
message we will not use (the handshake has to be abandoned), a :class:`RehandshakeRequired`
means our own security context cannot go on and Layer 0 should run a new handshake, and
:class:`PersistenceError` means the local state on disk cannot be trusted.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from aiocoap import error as _aiocoap_error

from ..errors import CoaplayersError, LocalError, RemoteError

if TYPE_CHECKING:
    from aiocoap import Message

    from .context import SecurityContext


class OscoreError(CoaplayersError, _aiocoap_error.Error):  # type: ignore[misc]  # untyped base
    """Base class of every error raised by :mod:`coaplayers.oscore`.

    An aiocoap ``Error``, because these errors surface through aiocoap request objects
    (``await ctx.request(m).response``), and aiocoap treats other exceptions from a
    transport as bugs.
    """


class ParameterError(OscoreError, RemoteError, ValueError):
    """The OSCORE parameters sent by the server inside Layer 0 are malformed.

    Raised by the strict parser for any deviation from docs/OSCORE-KEYING.md (bad CBOR,
    trailing bytes, unknown or missing map keys, wrong types, unsupported algorithms,
    identifiers too long for the AEAD nonce, equal Sender and Recipient IDs). The peer that
    broke the protocol is always the server that sent the parameters.
    """


class KeyingError(OscoreError, LocalError, ValueError):
    """The exporter output does not fit the parameters (wrong length, for example)."""


class PersistenceError(OscoreError, LocalError):
    """A persisted context file is missing fields, corrupt, or not owner-only."""


class RehandshakeReason(enum.Enum):
    """Why a security context can no longer be used."""

    #: The server answered an unprotected 4.01 "Security context not found": it lost the
    #: context (restart, eviction) or never had it.
    CONTEXT_NOT_FOUND = "context-not-found"
    #: The server answered an unprotected 4.00 "Decryption failed": both ends have a context
    #: for the Recipient ID but with different keys (e.g. the server restarted and gave the
    #: same ID to another client).
    DECRYPTION_FAILED = "decryption-failed"
    #: The sender sequence number reached the configured re-key threshold.
    SEQUENCE_NUMBERS_LOW = "sequence-numbers-low"
    #: The sender sequence number space is used up; nothing more can be protected.
    SEQUENCE_NUMBERS_EXHAUSTED = "sequence-numbers-exhausted"


class RehandshakeRequired(OscoreError):
    """Layer 0 should run a new handshake and replace the security context.

    Raised from a request made through :class:`coaplayers.oscore.client.OscoreClientTransport`
    (``await context.request(msg).response`` raises it) and passed to its ``on_rehandshake``
    callback. The request it was raised for has *not* been processed by the server (for
    ``CONTEXT_NOT_FOUND`` / ``DECRYPTION_FAILED`` the server said so, for the sequence number
    reasons nothing was sent), so it is safe to send it again under the new context.

    Note that the 4.01/4.00 answers that lead here are unprotected: an on-path attacker can
    forge them and so force handshakes (a denial of service). It can also forge them *after*
    letting the request through; so :class:`~coaplayers.oscore.mode.OscoreRequester` sends a
    request again only when the server confirmed inside the new Layer 0 session that it did
    not process it (``request_piv``; see :class:`AlreadyProcessed`).
    """

    def __init__(
        self,
        reason: RehandshakeReason,
        security_context: SecurityContext | None = None,
        response: Message | None = None,
        request_piv: bytes | None = None,
    ) -> None:
        super().__init__(f"new Layer 0 handshake required: {reason.value}")
        self.reason = reason
        self.security_context = security_context
        self.response = response
        #: Partial IV the refused request was sent with (None: not known or not sent).
        self.request_piv = request_piv


class AlreadyProcessed(OscoreError, RemoteError):
    """The request was refused with an unprotected "context not found" / "decryption
    failed", but the server says, authenticated by a new Layer 0 session, that its context
    is alive and has seen the request's Partial IV: the refusal was forged in transit and
    the request may have been processed. It is not sent again; the context stays in use."""


class SequenceNumbersExhausted(RehandshakeRequired, LocalError):
    """The context's sender sequence numbers are used up (hard limit reached)."""

    def __init__(self, security_context: SecurityContext | None = None) -> None:
        super().__init__(RehandshakeReason.SEQUENCE_NUMBERS_EXHAUSTED, security_context)


class UnprotectedRequestRefused(OscoreError, LocalError):
    """A request whose origin has an OSCORE context reached a plain transport (aiocoap did
    not hand it to the OSCORE transport): it was refused and never sent. A local error: the
    client's request interfaces are set up wrongly (or aiocoap chose differently than the
    version coaplayers was checked against); the peer had no part in it."""

    def __init__(self, message: Message) -> None:
        try:
            where = message.get_request_uri()
        except Exception:  # no usable remote
            where = repr(message.remote)
        super().__init__(
            f"refused to send a request for {where} unprotected: its origin has an OSCORE"
            " context, but the request reached a plain transport"
        )
        self.request = message


class UnprotectedErrorResponse(OscoreError, RemoteError):
    """The server answered an OSCORE request with an unprotected message that is not one of
    the answers mapped to :class:`RehandshakeRequired` (e.g. 4.01 "Replay detected", a
    proxy's 5.04, or 4.02 from a proxy). ``response`` holds the message as received."""

    def __init__(self, response: Message) -> None:
        payload = bytes(response.payload[:64]).decode("utf-8", "replace")
        super().__init__(f"unprotected {response.code} response: {payload!r}")
        self.response = response
