"""What a client keeps between runs: the owner-only folder and the credentials' hash.

Kept state holds keys (OSCORE contexts, DTLS master secrets), so it lives in a folder only
its owner can reach, and each server's entry is named by a hash of the server's origin and of
the client's credentials and trust anchors: other credentials never pick up state made with
different ones, and a file name tells nothing about either.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from .errors import LocalError


class StateFolderError(LocalError):
    """The folder for kept state is missing, not a folder, or reachable by others."""


def state_root() -> Path:
    """``$XDG_STATE_HOME/coaplayers`` (``~/.local/state/coaplayers``)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".local", "state")
    return Path(base) / "coaplayers"


def owner_only_folder(folder: Path, what: str, *, tighten: bool = False) -> Path:
    """``folder``, created 0700 if missing; refused unless it is ours and owner-only.

    ``tighten`` is for the default folder only: one of ours that group or others can reach
    (made by hand, or by ``mkdir -p`` of a folder below it under the usual umask) is made
    owner-only instead of refused, since nobody chose that mode. A folder the user named
    keeps its mode and is refused.
    """
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(folder)
        if (tighten and stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
                and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)):
            os.chmod(folder, 0o700)
            info = os.stat(folder)
    except OSError as e:
        raise StateFolderError(f"cannot use {folder} for {what}: {e.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StateFolderError(f"{folder} is not a folder")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or info.st_uid != os.getuid():
        raise StateFolderError(
            f"{folder} is not owner-only (mode {stat.S_IMODE(info.st_mode):o}); {what} holds"
            " keys: chmod 700 it, or choose another folder")
    return folder


def credentials_tag(credentials: Any) -> bytes:
    """What identifies a client's end-to-end credentials and trust, hashed (never stored
    in clear): its own identity and key, and whom it trusts as the server."""
    from cryptography.hazmat.primitives import serialization

    from . import dtls

    h = hashlib.sha256()
    if isinstance(credentials, dtls.PskClientCredentials):
        h.update(b"psk\0" + credentials.identity + b"\0" + credentials.key)
    elif isinstance(credentials, dtls.RawPublicKeyCredentials):
        h.update(b"rpk\0" + credentials.public_key_der)
        for key in sorted(credentials.trusted_keys):
            h.update(b"\0" + key)
    elif isinstance(credentials, dtls.CertificateCredentials):
        h.update(b"cert\0")
        for cert in credentials.certificate_chain:
            h.update(cert.public_bytes(serialization.Encoding.DER))
        h.update(b"\0trusted")
        for cert in credentials.trusted:
            h.update(cert.public_bytes(serialization.Encoding.DER))
        h.update(b"\0" + (credentials.server_name or "").encode())
    else:
        raise TypeError(f"nothing is kept for {type(credentials).__name__}")
    return h.digest()


def entry_name(origin: str, credentials: Any) -> str:
    """The file name stem of one server's kept state under ``credentials``."""
    return hashlib.sha256(origin.encode() + b"\0" + credentials_tag(credentials)
                          ).hexdigest()[:32]
