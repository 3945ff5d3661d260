"""The one place where coaplayers calls OpenSSL below pyOpenSSL's public API.

pyOpenSSL wraps the SSL object but not everything DTLS with memory BIOs and PSK needs; the
functions here reach OpenSSL through the cffi binding pyOpenSSL itself uses (``SSL._lib``,
``SSL._ffi``) and the raw pointers behind its objects (``Context._context``,
``Connection._ssl``, ``Session._session``, ``Connection._reverse_mapping``). Every other
module uses pyOpenSSL's public API; ``tests/test_seams.py`` greps the tree for the private
names.

Checked against pyOpenSSL 26.4.0 with cryptography 50.0.2 (OpenSSL 4.0 in its wheel),
``CHECKED_AGAINST``; pinned in pyproject.toml. Each function says which upstream addition
would retire it. No exceptions: nothing else in the tree reaches below pyOpenSSL.
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL

CHECKED_AGAINST = {"pyOpenSSL": "26.4.0", "cryptography": "50.0.2"}
"""Distribution -> the version these calls were checked against (tests/test_seams.py)."""

_lib: Any = SSL._lib  # type: ignore[attr-defined]
_ffi: Any = SSL._ffi  # type: ignore[attr-defined]

NAME_MISMATCH = (_lib.X509_V_ERR_HOSTNAME_MISMATCH, 64)  # 64: X509_V_ERR_IP_ADDRESS_MISMATCH
"""Verify results that mean "chain fine, wrong name" (:func:`require_peer_name`)."""

NoOverlappingProtocols = SSL._NoOverlappingProtocols  # type: ignore[attr-defined]
"""The type of ``SSL.NO_OVERLAPPING_PROTOCOLS``, which an ALPN select callback returns to go
on without ALPN. pyOpenSSL exports the value but not its type, which a typed callback needs.
Upstream: export the type (or type the callback's return as ``bytes | object``)."""


def set_sigalgs_and_groups(ctx: SSL.Context, sigalgs: str, groups: str) -> str | None:
    """Restrict the signature algorithms and ECDHE groups offered; the refused list, if any.
    Upstream: ``Context.set_sigalgs_list`` / ``set_groups_list`` in pyOpenSSL."""
    if _lib.SSL_CTX_set1_sigalgs_list(ctx._context, sigalgs.encode()) != 1:  # type: ignore[attr-defined]
        return sigalgs
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) != 1:  # type: ignore[attr-defined]
        return groups
    return None


def verify_result(conn: SSL.Connection) -> int:
    """``SSL_get_verify_result``. Upstream: ``Connection.get_verify_result`` in pyOpenSSL."""
    return int(_lib.SSL_get_verify_result(conn._ssl))  # type: ignore[attr-defined]


def session_reused(conn: SSL.Connection) -> bool:
    """Whether the handshake resumed a session. Upstream: ``Connection.session_reused``."""
    return bool(_lib.SSL_session_reused(conn._ssl))  # type: ignore[attr-defined]


def scrub_master_key(session: SSL.Session, fresh: bytes) -> None:
    """Overwrite a session's master secret (``fresh``: 48 random bytes), so that a session
    ended by a fatal alert can never be resumed once its SSL object is gone. Upstream: a
    ``Session.invalidate`` (``SSL_SESSION_set1_master_key`` or ``SSL_CTX_remove_session``)."""
    _lib.SSL_SESSION_set1_master_key(session._session, fresh, len(fresh))  # type: ignore[attr-defined]


@_ffi.callback("int(SSL *, void *)")
def _refuse(_ssl: object, _arg: object) -> int:
    return 0


def refuse_full_handshake(conn: SSL.Connection) -> None:
    """Make ``conn`` (accept state) fail before any key exchange unless it resumes: OpenSSL
    calls the certificate callback only for a full handshake. Upstream: ``set_cert_cb``."""
    _lib.SSL_set_cert_cb(conn._ssl, _refuse, _ffi.NULL)  # type: ignore[attr-defined]


def require_peer_name(conn: SSL.Connection, name: str) -> bool:
    """Have OpenSSL check the server's DNS name or IP address (RFC 6125) as part of the
    chain; False if OpenSSL refused the name. Upstream: ``X509VerifyParam`` on a
    ``Connection`` (pyOpenSSL has it for stores only)."""
    param = _lib.SSL_get0_param(conn._ssl)  # type: ignore[attr-defined]
    bare = name.strip("[]")
    try:
        packed = ipaddress.ip_address(bare).packed
    except ValueError:
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, bare.encode(), len(bare.encode()))
    else:
        ok = _lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    return bool(ok == 1)


# ------------------------------------------------------------------------------- PSK
#
# Upstream for both: pyOpenSSL's ``Context.set_psk_server_callback`` /
# ``set_psk_client_callback`` (proposed upstream, not in 26.4). The callbacks find their
# session through the SSL pointer; a session is held weakly, so that a context outlives them.

PskLookup = Callable[[bytes], "bytes | None"]
"""Server side: identity -> key, or None for an unknown identity."""
PskOffer = Callable[[bytes | None], "tuple[bytes, bytes] | None"]
"""Client side: the server's identity hint (None: none) -> (identity, key), or None."""

_PSK_ATTRIBUTE = "_coaplayers_psk"


def _bound(ssl: object) -> Any:
    conn = SSL.Connection._reverse_mapping.get(ssl)  # type: ignore[attr-defined]
    ref = getattr(conn, _PSK_ATTRIBUTE, None)
    return ref() if ref is not None else None


@_ffi.callback("unsigned int(SSL *, const char *, unsigned char *, unsigned int)")
def _psk_server_callback(ssl: object, identity: object, psk: object, max_len: int) -> int:
    """OpenSSL asks for the key of the identity in the ClientKeyExchange (0: unknown)."""
    try:
        lookup = _bound(ssl)
        if lookup is None or identity == _ffi.NULL:
            return 0
        key = lookup(bytes(_ffi.string(identity)))
        if key is None or len(key) > max_len:
            return 0
        _ffi.memmove(psk, key, len(key))
        return len(key)
    except Exception:  # an exception must not cross into OpenSSL: refuse the identity
        return 0


@_ffi.callback(
    "unsigned int(SSL *, const char *, char *, unsigned int, unsigned char *, unsigned int)")
def _psk_client_callback(ssl: object, hint: object, identity: object, max_identity: int,
                         psk: object, max_len: int) -> int:
    """OpenSSL asks for the identity (NUL-terminated) and key to send (0: abort)."""
    try:
        offer = _bound(ssl)
        if offer is None:
            return 0
        chosen = offer(None if hint == _ffi.NULL else bytes(_ffi.string(hint)))
        if chosen is None:
            return 0
        name, key = chosen
        if len(name) + 1 > max_identity or len(key) > max_len or not key:
            return 0
        _ffi.memmove(identity, name + b"\0", len(name) + 1)
        _ffi.memmove(psk, key, len(key))
        return len(key)
    except Exception:  # as above: abort the handshake instead
        return 0


def use_psk_server(ctx: SSL.Context) -> None:
    """Let ``ctx``'s connections look keys up through :func:`bind_psk`."""
    _lib.SSL_CTX_set_psk_server_callback(ctx._context, _psk_server_callback)  # type: ignore[attr-defined]


def use_psk_client(ctx: SSL.Context) -> None:
    """Let ``ctx``'s connections offer an identity and key through :func:`bind_psk`."""
    _lib.SSL_CTX_set_psk_client_callback(ctx._context, _psk_client_callback)  # type: ignore[attr-defined]


def bind_psk(conn: SSL.Connection, callback: PskLookup | PskOffer) -> None:
    """What ``conn``'s PSK callback calls: a bound method, held weakly (its object, the
    session, owns ``conn``)."""
    setattr(conn, _PSK_ATTRIBUTE, weakref.WeakMethod(callback))  # type: ignore[arg-type]


def session_to_der(session: SSL.Session) -> bytes:
    """``i2d_SSL_SESSION``: a client's resumption state as bytes (it holds the master secret),
    so that it outlives the process. Upstream: ``Session`` serialisation in pyOpenSSL."""
    size = _lib.i2d_SSL_SESSION(session._session, _ffi.NULL)  # type: ignore[attr-defined]
    if size <= 0:
        raise ValueError("OpenSSL could not encode the session")
    buf = _ffi.new("unsigned char[]", size)
    _lib.i2d_SSL_SESSION(session._session, _ffi.new("unsigned char **", buf))  # type: ignore[attr-defined]
    return bytes(_ffi.buffer(buf, size))


def session_from_der(data: bytes, context: SSL.Context) -> SSL.Session | None:
    """``d2i_SSL_SESSION``: resumption state from :func:`session_to_der` (None if OpenSSL
    does not take it), for connections of ``context``. pyOpenSSL's ``set_session`` takes only
    a session of the connection's own context (OpenSSL itself takes any, as a client); a
    session read from a file belongs to the context it is read for. Upstream: ``Session``
    serialisation in pyOpenSSL."""
    buf = _ffi.new("unsigned char[]", data)
    ptr = _lib.d2i_SSL_SESSION(_ffi.NULL, _ffi.new("unsigned char **", buf), len(data))
    if ptr == _ffi.NULL:
        return None
    session = SSL.Session.__new__(SSL.Session)
    session._session = _ffi.gc(ptr, _lib.SSL_SESSION_free)  # type: ignore[attr-defined]
    session._context = context  # type: ignore[attr-defined]
    return session
