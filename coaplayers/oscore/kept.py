"""Client side: OSCORE contexts kept between runs, one file per server and credentials.

Why: keying the OSCORE mode costs a Layer 0 handshake and a keying exchange, several round
trips on a link where each one costs seconds; a client that keeps its context sends its next
run's first request protected at once (one round trip), as RFC 8613 Appendix B.1 allows.

Nonces are never reused, crash included: each file is a :class:`ContextFile`, which stores a
sequence number high-water mark *ahead* of use and writes it (fsync, atomic rename) before a
number at or above the stored mark goes out (Appendix B.1.1); a run that restores the file
starts at that mark, so a run killed at any moment skips numbers and never repeats one. Only
one process may use a file at a time (they would share sequence numbers): each run takes an
exclusive ``flock`` on the file's lock, and a run that cannot get it keys a context of its
own and keeps nothing.

The client's replay window for the server's messages starts empty after a restore. That is
safe where the server's is not: every message a server sends is bound to one of the client's
requests (its Partial IV is in the AAD or the nonce), and those are never reused, so a message
replayed from an earlier run fails to verify.

When the server has lost its side (restart without state, eviction), it answers the first
request with an unprotected 4.01 "Security context not found" and the requester re-keys by
itself (``prior=`` check, docs/OSCORE-KEYING.md section 6); a server that restored its context
asks for freshness with 4.01 + Echo, answered by itself too. The new context replaces the
file.

A file names no secret in its name: it is a hash of the origin and of what identifies the
credentials (so other credentials, or another trust anchor, never pick up a context keyed
under different ones). The folder is owner-only, the files 0600; a folder that group or
others can reach is refused. The folder holds at most ``max_servers`` contexts (the ones
written longest ago go first).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Any

from ..clientstate import StateFolderError, entry_name, owner_only_folder, state_root
from .context import SecurityContext
from .errors import PersistenceError
from .persistence import DEFAULT_AHEAD, ContextFile

log = logging.getLogger("coaplayers.oscore.kept")

DEFAULT_MAX_SERVERS = 64
"""Contexts a client keeps by default (one per server and credentials)."""


def default_folder() -> Path:
    """``$XDG_STATE_HOME/coaplayers/oscore`` (``~/.local/state/coaplayers/oscore``)."""
    return state_root() / "oscore"


class KeptContexts:
    """The folder of kept contexts. :meth:`slot` gives one server's, locked for this run."""

    def __init__(self, folder: str | os.PathLike[str], *,
                 max_servers: int = DEFAULT_MAX_SERVERS, ahead: int = DEFAULT_AHEAD) -> None:
        if max_servers < 1:
            raise ValueError("max_servers must be at least 1")
        self.folder = Path(folder)
        self.max_servers = max_servers
        self.ahead = ahead
        try:
            owner_only_folder(self.folder, "kept OSCORE contexts")
        except StateFolderError as e:
            raise PersistenceError(str(e)) from None

    def slot(self, origin: str, credentials: Any) -> KeptSlot | None:
        """The slot of ``origin`` under ``credentials``, locked; None while another run
        holds it (this run then keys a context of its own and keeps nothing)."""
        name = entry_name(origin, credentials)
        fd = os.open(self.folder / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.info("the kept OSCORE context of %s is in use by another run", origin)
            return None
        return KeptSlot(self, self.folder / f"{name}.json", fd)

    def _evict(self, keep: Path) -> None:
        files = sorted(self.folder.glob("*.json"), key=_mtime, reverse=True)
        for old in [f for f in files if f != keep][self.max_servers - 1:]:
            with contextlib.suppress(OSError):
                old.unlink()
            with contextlib.suppress(OSError):
                old.with_suffix(".lock").unlink()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class KeptSlot:
    """One server's kept context for one run (holds the lock until :meth:`release`)."""

    def __init__(self, folder: KeptContexts, path: Path, lock_fd: int) -> None:
        self._folder = folder
        self.path = path
        self._fd: int | None = lock_fd

    def load(self, **options: Any) -> SecurityContext | None:
        """The kept context, continuing at its stored mark; None if there is none or it
        cannot be used (it is then replaced after the next keying)."""
        if not self.path.exists():
            return None
        try:
            context = ContextFile(self.path, self._folder.ahead).load(
                replay_window_known=True, **options)
        except PersistenceError as e:
            log.warning("kept OSCORE context not used: %s", e)
            return None
        log.info("OSCORE context kept from an earlier run (sequence number %d)",
                 context.sender_sequence_number)
        return context

    def save(self, context: SecurityContext) -> None:
        """Keep ``context`` (replacing the slot's) and bound the folder."""
        if isinstance(context.peer, bytes):
            # A PSK handshake names the server by the identity bytes; on the client the
            # name is only shown, so the file keeps it as text.
            context.peer = context.peer.decode(errors="replace")
            context.authenticated_claims = [context.peer]
        ContextFile.save(self.path, context, self._folder.ahead)
        self._folder._evict(self.path)

    def forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
