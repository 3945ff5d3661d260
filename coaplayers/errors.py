"""The root of coaplayers' errors, and who has to act on one.

Every error the library raises on purpose derives from :class:`CoaplayersError` (through
its layer's base: ``DtlsError``, ``Layer0Error``, ``OscoreError``, ``Layer1Error``, the
proxy's ``ConfigError``), so ``except CoaplayersError`` catches what coaplayers means to tell
its caller and nothing else. As h11 splits ``LocalProtocolError`` from
``RemoteProtocolError``, most also say whose side is at fault: :class:`LocalError` (our
configuration, usage or state: doing the same again fails the same way) or
:class:`RemoteError` (the peer, or the path to it, refused, broke the protocol or did not
answer). A few are neither by nature (a context that needs a new handshake, say) and derive
from their layer's base only.
"""

from __future__ import annotations

import errno


class CoaplayersError(Exception):
    """Base class of every error coaplayers raises on purpose."""


class LocalError(CoaplayersError):
    """Our own side is at fault: configuration, usage, a local limit or state."""


class RemoteError(CoaplayersError):
    """The peer or the path to it is at fault: it refused, broke the protocol, or is silent."""


__all__ = ["CoaplayersError", "LocalError", "RemoteError"]


ICMP_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                         errno.EHOSTDOWN})
"""The errors a UDP socket reports for an ICMP error from its peer: nothing listens there, or
the peer cannot be reached (a request sent there ran nowhere)."""
