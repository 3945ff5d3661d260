"""A client's Layer 0 resumption state kept between runs, one file per server.

Why: a full certificate handshake costs a cookie exchange and two flights before the first
request; a resumed one needs no cookie (the server answers a session it issued at once), no
certificate and no public-key operation. Keeping the session across runs makes a one-shot
client's next run resume (docs/PROTOCOL.md 3.1).

What is kept is OpenSSL's session (``i2d_SSL_SESSION``: the session ID, cipher suite and
master secret), as bytes in a 0600 file in an owner-only folder (a folder group or others can
reach is refused). The file name is a hash of the origin and of the client's credentials and
trust anchors, so other credentials never resume a session made with different ones. A
server that no longer knows the session (restart, expiry, eviction) answers with a full
handshake, whose session then replaces the file; a handshake that fails removes it. Several
runs may resume the same session at once: each handshake has its own randoms and keys. At most
``max_servers`` files are kept (those written longest ago go first).

Only the OpenSSL backend (certificates) resumes; PSK handshakes need no public-key operation
and no cookie exchange at low load, and raw public keys run on GnuTLS.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from .. import _openssl
from ..clientstate import entry_name, owner_only_folder, state_root

log = logging.getLogger("coaplayers.layer0.resumption")

DEFAULT_MAX_SERVERS = 64
"""Servers whose session a client keeps by default."""


def default_folder() -> Path:
    """``$XDG_STATE_HOME/coaplayers/layer0`` (``~/.local/state/coaplayers/layer0``)."""
    return state_root() / "layer0"


class ResumptionCache:
    """A :class:`~coaplayers.dtls.TicketStore` on disk, for one client's credentials and
    OpenSSL context (``Layer0Client(..., tickets=cache, ssl_context=context)``)."""

    def __init__(self, folder: str | os.PathLike[str], credentials: Any, context: SSL.Context,
                 *, max_servers: int = DEFAULT_MAX_SERVERS) -> None:
        if max_servers < 1:
            raise ValueError("max_servers must be at least 1")
        self.folder = owner_only_folder(Path(folder), "Layer 0 resumption state")
        self.max_servers = max_servers
        self._credentials = credentials
        self._context = context

    def _path(self, key: Hashable) -> Path:
        return self.folder / f"{entry_name(str(key), self._credentials)}.session"

    def get(self, key: Hashable) -> SSL.Session | None:
        try:
            data = self._path(key).read_bytes()
        except OSError:
            return None
        session = _openssl.session_from_der(data, self._context)
        if session is None:
            log.warning("kept Layer 0 session of %s not usable; a full handshake follows", key)
            self.forget(key)
        return session

    def put(self, key: Hashable, session: SSL.Session) -> None:
        path = self._path(key)
        try:
            data = _openssl.session_to_der(session)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            try:
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        except (OSError, ValueError) as e:
            log.warning("Layer 0 session not kept: %s", e)
            return
        files = sorted(self.folder.glob("*.session"), key=_mtime, reverse=True)
        for old in [f for f in files if f != path][self.max_servers - 1:]:
            with contextlib.suppress(OSError):
                old.unlink()

    def forget(self, key: Hashable) -> None:
        with contextlib.suppress(OSError):
            self._path(key).unlink()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
