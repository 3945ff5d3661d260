"""Keeping a security context across restarts without ever reusing a nonce.

RFC 8613 Appendix B.1.1: writing the sender sequence number to disk for every message is
too slow, so the file holds a high-water mark ``K`` numbers *ahead* of the last one used.
Every number handed out is below the stored mark (it is written, fsync'ed and renamed into
place before the number is used), so after a crash the context continues from the stored
mark and at worst skips up to ``K`` numbers; it never repeats one.

The replay window is not stored (that would be a write per received request). A restored
context starts with an unknown window and answers requests with 4.01 + Echo until the
client proves freshness (Appendix B.1.2); aiocoap's client side, and therefore
:class:`~coaplayers.oscore.client.OscoreClientTransport`, answers that Echo by itself.

The file holds derived keys, so it is created owner-only (0600) and a file readable by
group or others is refused on load. Writes are atomic: a temporary file in the same
directory, fsync, ``os.replace``, fsync of the directory. Use one file per context and one
process per file; two processes sharing a file would share sequence numbers.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from .context import SecurityContext
from .errors import KeyingError, ParameterError, PersistenceError

#: Default distance K between the last used sequence number and the stored mark.
DEFAULT_AHEAD = 64

_FORMAT = "coaplayers-oscore-context-1"


class ContextFile:
    """One persisted security context: derived keys, IDs, algorithms and the high-water mark.

    Create one for a new context with :meth:`save` (which also attaches it, so the context
    keeps the mark current), or restore with ``ContextFile(path).load()`` after a restart.

    :param path: the file; its directory must exist and be writable (for the atomic rename).
    :param ahead: K, how many sequence numbers each write reserves.
    """

    def __init__(self, path: str | os.PathLike[str], ahead: int = DEFAULT_AHEAD) -> None:
        if ahead < 1:
            raise ValueError("ahead must be at least 1")
        self.path = Path(path)
        self.ahead = ahead
        #: Every sequence number below this value may have been used.
        self.stored_mark: int | None = None
        self._record: dict[str, object] | None = None
        self.writes = 0

    # -- creating and restoring --------------------------------------------------------

    @classmethod
    def save(
        cls, path: str | os.PathLike[str], context: SecurityContext, ahead: int = DEFAULT_AHEAD
    ) -> ContextFile:
        """Write ``context`` to ``path`` and attach the file to it for sequence numbers."""
        store = cls(path, ahead)
        store._record = {
            "format": _FORMAT,
            "sender_id": context.sender_id.hex(),
            "recipient_id": context.recipient_id.hex(),
            "id_context": None if context.id_context is None else context.id_context.hex(),
            "aead": context.aead_value,
            "hkdf": context.hkdf_value,
            "sender_key": context.sender_key.hex(),
            "recipient_key": context.recipient_key.hex(),
            "common_iv": context.common_iv.hex(),
            "peer": context.peer,
        }
        context.store = store
        store.attach(context)
        return store

    def load(self, **options: Any) -> SecurityContext:
        """Restore the context; it continues at the stored mark with an unknown replay window.

        ``options`` go to the context (``rekey_threshold``, ``on_rekey_needed``...); a
        client may pass ``replay_window_known=True`` (see :mod:`.kept` for why that is safe
        on the client side only).
        """
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            raise PersistenceError(f"no context file at {self.path}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PersistenceError(f"{self.path} is accessible to group or others; refusing")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise PersistenceError(f"{self.path} is owned by another user; refusing")
        try:
            record = json.loads(self.path.read_text("utf-8"))
            if not isinstance(record, dict) or record.get("format") != _FORMAT:
                raise PersistenceError(f"{self.path}: unknown format")
            mark = record["next_sequence_number"]
            if type(mark) is not int or mark < 0:
                raise PersistenceError(f"{self.path}: bad sequence number")
            id_context = record["id_context"]
            fields = {
                "sender_id": bytes.fromhex(record["sender_id"]),
                "recipient_id": bytes.fromhex(record["recipient_id"]),
                "id_context": None if id_context is None else bytes.fromhex(id_context),
                "aead": record["aead"],
                "hkdf": record["hkdf"],
                "sender_key": bytes.fromhex(record["sender_key"]),
                "recipient_key": bytes.fromhex(record["recipient_key"]),
                "common_iv": bytes.fromhex(record["common_iv"]),
            }
            peer = record["peer"]
        except PersistenceError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise PersistenceError(f"{self.path}: corrupt context file ({e})") from None
        if type(fields["aead"]) is not int or type(fields["hkdf"]) is not int:
            raise PersistenceError(f"{self.path}: corrupt context file (algorithm not an integer)")
        if peer is not None and not isinstance(peer, str):
            raise PersistenceError(f"{self.path}: corrupt context file (peer is not a name)")
        self._record = {k: v for k, v in record.items() if k != "next_sequence_number"}
        self.stored_mark = mark
        options.setdefault("peer", peer)
        options.setdefault("replay_window_known", False)
        try:
            return SecurityContext.from_derived_keys(
                **fields,
                sender_sequence_number=mark,
                store=self,
                **options,
            )
        except (KeyingError, ParameterError) as e:
            # IDs, key lengths or algorithms that do not fit together: the file is corrupt.
            self._record, self.stored_mark = None, None
            raise PersistenceError(f"{self.path}: inconsistent context file ({e})") from None

    # -- called by SecurityContext -----------------------------------------------------

    def attach(self, context: SecurityContext) -> None:
        """Make sure the next number the context will use is already covered on disk."""
        if self._record is None:
            raise PersistenceError("ContextFile.attach before save() or load()")
        self.reserve(context.sender_sequence_number)

    def reserve(self, number: int) -> None:
        """Called before ``number`` is used: store a mark above it if the current one is not."""
        if self.stored_mark is not None and number < self.stored_mark:
            return
        self._write(number + self.ahead)

    def _write(self, mark: int) -> None:
        assert self._record is not None
        data = dict(self._record, next_sequence_number=mark)
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            # mkstemp already creates 0600; chmod again in case of an unusual umask/platform.
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(data, sort_keys=True).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.stored_mark = mark
        self.writes += 1
