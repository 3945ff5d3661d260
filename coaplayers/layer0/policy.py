"""Who may use which path (sans-I/O): the server's Layer 0 authorization, decided on paths only.

Two questions, kept apart because they are asked at different layers:

* :meth:`Policy.requires_layer0`: a plain (outer) request to this path gets 4.01, so a resource
  cannot be reached around the tunnel by mistake;
* :meth:`Policy.allows`: an inner request from this Layer 0 identity to this path gets 4.03 when
  not granted. Identities are the Layer 0 ones only (PSK identity or certificate common name); a
  Layer 1 identity never appears here, so the two authorization domains stay separate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .profile import is_tunnel_path

Path = tuple[str, ...]


def _prefix(p: str | Sequence[str]) -> Path:
    if isinstance(p, str):
        return tuple(s for s in p.strip("/").split("/") if s)
    return tuple(p)


def _under(path: Sequence[str], prefix: Path) -> bool:
    return tuple(path[: len(prefix)]) == prefix


@dataclass(frozen=True)
class Policy:
    """``protected``: path prefixes that only Layer 0 may reach (``"/"`` = everything, the default).

    ``grants``: identity -> path prefixes it may use inside the tunnel; ``None`` lets every
    authenticated identity use every path. Prefixes are written ``"/a/b"`` or ``("a", "b")`` and
    match whole path segments (``/a`` covers ``/a/x`` but not ``/ab``).
    """

    protected: tuple[Path, ...] = ((),)
    grants: Mapping[str, tuple[Path, ...]] | None = None

    @classmethod
    def build(
        cls,
        protected: Iterable[str | Sequence[str]] = ("/",),
        grants: Mapping[str | bytes, Iterable[str | Sequence[str]]] | None = None,
    ) -> Policy:
        g = None
        if grants is not None:
            g = {identity_text(k): tuple(_prefix(p) for p in v) for k, v in grants.items()}
        return cls(tuple(_prefix(p) for p in protected), g)

    def requires_layer0(self, path: Sequence[str]) -> bool:
        if is_tunnel_path(path):
            return False
        return any(_under(path, p) for p in self.protected)

    def allows(self, identity: str | None, path: Sequence[str]) -> bool:
        if is_tunnel_path(path):
            return False  # no tunnel inside the tunnel
        if self.grants is None:
            return True
        if identity is None:
            return False
        return any(_under(path, p) for p in self.grants.get(identity, ()))


def identity_text(identity: bytes | str | None) -> str | None:
    """The text form policies and resources use: PSK identities as UTF-8 (escaped if not)."""
    if identity is None or isinstance(identity, str):
        return identity
    return identity.decode("utf-8", "backslashreplace")
