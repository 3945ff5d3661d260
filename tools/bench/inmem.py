"""Layer 0 handshakes in memory: a client engine against the server's :class:`Layer0ServerCore`.

The driver below makes the same outer exchanges a :class:`~coaplayers.layer0.Layer0Client`
makes (POST the first flight to the entry resource, POST later flights to the session's
Location-Path, pull queued server datagrams with empty POSTs), without CoAP or sockets, so the
server's own work can be timed alone and its memory measured without a network in the way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coaplayers.dtls import (
    CertificateCredentials,
    ConnectionClosed,
    GnuTlsSession,
    HandshakeComplete,
    OpenSslListener,
    OpenSslSession,
    PskClientCredentials,
    PskStore,
    RawPublicKeyContext,
    RawPublicKeyCredentials,
    TicketStore,
    TinyDtlsSession,
    build_context,
    parse_key_text,
)
from coaplayers.layer0.core import Layer0ServerCore, ServerLimits
from coaplayers.layer0.profile import CHANGED, CREATED, DTLS_CIPHERS, handshake_tag
from coaplayers.layer0.server import layer0_config, make_listener
from coaplayers.programs import keys


@dataclass
class Exchange:
    """One outer request and its answer, as the client saw them."""

    up: bytes
    down: bytes
    code: Any
    tag: int = 0
    """Bytes of handshake tag before ``up`` in the outer payload (docs/PROTOCOL.md 3.3)."""


@dataclass
class HandshakeResult:
    exchanges: list[Exchange] = field(default_factory=list)
    server_seconds: float = 0.0
    """CPU time of this thread inside the Layer0ServerCore calls (other processes do not count)."""
    resumed: bool = False
    sid: str = ""


class Peers:
    """Both sides' Layer 0 credentials, from a coap-keys credential set (made if not given)."""

    def __init__(self, creds: Path | None = None) -> None:
        if creds is None:
            import tempfile

            creds = Path(tempfile.mkdtemp(prefix="coap-bench-keys-")) / "creds"
            keys.create(creds, device="bench-device")
        self.server_cert = CertificateCredentials.from_files(
            creds / "server-e2e.pem", creds / "server-e2e.key", creds / "e2e-ca.pem",
            require_peer=True,
        )
        self.client_cert = CertificateCredentials.from_files(
            creds / "client-e2e.pem", creds / "client-e2e.key", creds / "e2e-ca.pem"
        )
        self.client_ssl = build_context(self.client_cert, server=False, ciphers=DTLS_CIPHERS)
        # Resumption goes through explicit session objects (TicketStore): the client-side
        # cache would only keep every client's session alive, inflating server-side figures.
        from OpenSSL import SSL

        self.client_ssl.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        e2e = json.loads((creds / "psk.json").read_text())["e2e"]
        self.psk_identity = e2e["identity"].encode()
        self.psk_key = parse_key_text(e2e["key"])
        self.psk_store = PskStore({self.psk_identity: self.psk_key})
        self.config = layer0_config()
        # Raw public keys (RFC 7250, the GnuTLS backend): coap-keys's P-256 pairs, pinned both
        # ways as server.toml and client.toml pin them.
        self.server_rpk = RawPublicKeyCredentials.from_files(creds / "server-rpk.key",
                                                             creds / "client-rpk.pub")
        self.client_rpk = RawPublicKeyCredentials.from_files(creds / "client-rpk.key",
                                                             creds / "server-rpk.pub")
        self._client_rpk_context: Any = None

    def core(self, kind: str, max_sessions: int = 256, *,
             release_buffers: bool = False, core_class: type[Layer0ServerCore] = Layer0ServerCore
             ) -> Layer0ServerCore:
        limits = ServerLimits(max_sessions=max(1, max_sessions), max_half_open=64)
        if kind == "psk":
            listener: Any = make_listener(self.psk_store, self.config)
        elif kind == "rpk":
            listener = make_listener(self.server_rpk, self.config)
        elif release_buffers:
            listener = _ReleaseBuffersListener(self.server_cert, self.config,
                                               ciphers=DTLS_CIPHERS)
        else:
            listener = make_listener(self.server_cert, self.config)
        return core_class(listener, limits)

    def client(self, kind: str, resume: Any = None) -> Any:
        if kind == "psk":
            return TinyDtlsSession.client(
                PskClientCredentials(self.psk_identity, self.psk_key), self.config
            )
        if kind == "rpk":
            if self._client_rpk_context is None:
                self._client_rpk_context = RawPublicKeyContext(self.client_rpk, server=False)
            return GnuTlsSession.client(self._client_rpk_context, self.config)
        return OpenSslSession.client(self.client_ssl, self.client_cert, self.config,
                                     resume=resume)


class _ReleaseBuffersListener(OpenSslListener):
    """Sets SSL_MODE_RELEASE_BUFFERS again: build_context already does, so this is the product
    (kept so that the ``cert-release-buffers`` memory kind still runs)."""

    def _new_listener(self) -> Any:
        if not getattr(self, "_mode_set", False):
            from OpenSSL import SSL

            self.context.set_mode(SSL.MODE_RELEASE_BUFFERS)
            self._mode_set = True
        return super()._new_listener()


def handshake(
    core: Layer0ServerCore, client: Any, peer_key: Any, now: float = 0.0
) -> HandshakeResult:
    """Run one handshake to completion; raises if it fails or stalls."""
    result = HandshakeResult()
    client.connect(now)
    queue = list(client.datagrams_to_send())
    sid: str | None = None
    tag = b""
    done = False
    for _ in range(64):
        datagram = queue.pop(0) if queue else b""
        t0 = time.thread_time()
        if sid is None:
            answer = core.entry(peer_key, datagram, now)
        else:  # the handshake tag starts every request to a half-open session
            answer, _ = core.datagram(sid, tag + datagram, now)
        result.server_seconds += time.thread_time() - t0
        result.exchanges.append(Exchange(datagram, answer.payload, answer.code,
                                         len(tag) if sid is not None else 0))
        if answer.code == CREATED and answer.location:
            sid = answer.location[-1]
            tag = handshake_tag(answer.payload) or b""
        elif answer.code != CHANGED:
            raise RuntimeError(f"handshake refused: {answer.code} {answer.payload[:60]!r}")
        if answer.payload:
            client.receive_datagram(answer.payload, now)
        while (event := client.next_event()) is not None:
            if isinstance(event, HandshakeComplete):
                done = True
                result.resumed = event.resumed
            elif isinstance(event, ConnectionClosed):
                raise RuntimeError(f"handshake failed: {event.error}")
        queue.extend(client.datagrams_to_send())
        if done and not queue:
            result.sid = sid or ""
            return result
        if not queue and not answer.payload:
            raise RuntimeError("handshake stalled (nothing to send, nothing received)")
    raise RuntimeError("handshake did not finish in 64 exchanges")


__all__ = ["Exchange", "HandshakeResult", "Peers", "TicketStore", "handshake"]
