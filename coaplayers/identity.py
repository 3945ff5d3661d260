"""Who sent a request, per layer: what resources and logs ask of a request."""

from __future__ import annotations

from dataclasses import dataclass

from aiocoap import Message

from .layer1 import layer1_identity


def _text(identity: object) -> str | None:
    if identity is None:
        return None
    if isinstance(identity, bytes):
        return identity.decode(errors="replace")
    return str(identity)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The authenticated peer of a request at each layer; ``None`` where a layer was absent."""

    layer1: str | None
    layer0: str | None
    mode: str  # "plain", "layer0-dtls" or "oscore"


def peer_info(request: Message) -> PeerInfo:
    from .layer0.server import layer0_peer
    from .oscore.server import oscore_context_of, peer_of

    l0 = layer0_peer(request)
    if l0 is not None:
        # The Layer 1 peer is the last hop that delivered the record (a proxy, or the client).
        outer = _text(getattr(request.remote, "outer_identity", None))
        return PeerInfo(outer, _text(l0.identity), "layer0-dtls")
    if oscore_context_of(request) is not None:
        hop = getattr(request.remote, "underlying_address", None)
        return PeerInfo(_text(getattr(hop, "peer_identity", None)), _text(peer_of(request)),
                        "oscore")
    return PeerInfo(_text(layer1_identity(request)), None, "plain")


def describe_peer(request: Message) -> str:
    info = peer_info(request)
    parts = [f"mode {info.mode}"]
    if info.layer1 is not None:
        parts.append(f"layer 1 peer {info.layer1}")
    if info.layer0 is not None:
        parts.append(f"layer 0 peer {info.layer0}")
    return ", ".join(parts)
