"""End-to-end protection for programs: Layer 0 DTLS and the OSCORE mode, wired together.

The programs call :func:`wrap_site` (server) to put an application resource tree behind the
Layer 0 (and OSCORE, whose keys come from a Layer 0 handshake).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import aiocoap
from aiocoap import interfaces
from aiocoap.numbers.codes import Code

from . import dtls
from .replica import REPLICA_PATH

if TYPE_CHECKING:
    from .layer1 import LayeredContext


@dataclass(frozen=True)
class Layer0ServerOptions:
    """Layer 0 credentials of a server; separate objects from its Layer 1 credentials."""

    psk_store: dtls.PskStore | None = None
    certificate: dtls.CertificateCredentials | None = None
    required: bool = False
    """Application resources answer only inside Layer 0 or OSCORE (others get 4.01)."""
    raw_public_key: dtls.RawPublicKeyCredentials | None = None
    """RFC 7250 raw public keys (GnuTLS): our key and the pinned client keys."""
    oscore_state: Path | None = None
    """Folder that keeps the OSCORE mode's contexts across restarts (see ContextStore)."""
    replica: int | None = None
    """This server's number in a replica set: in every session name and client ID it hands
    out, so that a proxy finds the replica from outer options (coaplayers.replica)."""
    worker: tuple[int, int] | None = None
    """(index, count) of this process among coap-server's workers (coaplayers.steering)."""

    @property
    def credentials(
        self,
    ) -> list[dtls.PskStore | dtls.CertificateCredentials | dtls.RawPublicKeyCredentials]:
        """Every kind configured; the server accepts them side by side (one endpoint)."""
        return [c for c in (self.psk_store, self.certificate, self.raw_public_key)
                if c is not None]

    @property
    def enabled(self) -> bool:
        return bool(self.credentials)


class RequireEndToEnd(interfaces.Resource):
    """Answers 4.01 unless a request arrived inside Layer 0 or under OSCORE.

    It sits innermost, in front of the application resources, so it sees Layer 0 requests
    (their remote is the Layer 0 session) and OSCORE requests (already unprotected) alike.
    """

    def __init__(self, site: Any) -> None:
        self.site = site

    def get_resources_as_linkheader(self) -> Any:
        return self.site.get_resources_as_linkheader()

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def render(self, request: Any) -> Any:
        raise RuntimeError("used through render_to_pipe only")

    async def render_to_pipe(self, pipe: Any) -> None:
        from .identity import peer_info

        # The replica number is public (every routing key carries it): proxies probe it plainly.
        if peer_info(pipe.request).mode == "plain" and (
                tuple(pipe.request.opt.uri_path) != REPLICA_PATH):
            pipe.add_response(
                aiocoap.Message(
                    code=aiocoap.UNAUTHORIZED,
                    payload=b"end-to-end protection (Layer 0 or OSCORE) required",
                ),
                is_last=True,
            )
            return
        await self.site.render_to_pipe(pipe)


def wrap_site(site: Any, options: Layer0ServerOptions, *, eager: bool = False) -> Any:
    """The site as served: behind Layer 0 and OSCORE when credentials are given.

    Layering, outermost first: Layer 0 (``/.well-known/atls``), OSCORE (requests
    with the OSCORE option), then the application resources, which gain the inner keying
    resource of the OSCORE mode (``/.well-known/atls-oscore``, Layer 0 only) and, with
    ``required``, a 4.01 for anything that arrived unprotected. ``eager`` is
    :class:`~coaplayers.layer0.server.Layer0Site`'s (coap-server's own resources allow it).
    """
    if not options.enabled:
        if options.required:
            raise dtls.ConfigurationError(
                "--e2e-required needs end-to-end credentials (--e2e-psk, --e2e-cert/--e2e-key"
                " or --e2e-rpk-key/--e2e-rpk-trust)"
            )
        return site
    from .layer0.policy import Policy
    from .layer0.server import Layer0Site
    from .oscore import ContextStore, OscoreSite
    from .oscore.errors import PersistenceError
    from .oscore.mode import KEYING_ALPN, KEYING_PATH, KeyingResource

    try:
        store = ContextStore(state_dir=options.oscore_state, replica=options.replica,
                             worker=options.worker)
    except PersistenceError as e:
        raise dtls.ConfigurationError(f"--oscore-state: {e}") from e
    # OSCORE keys from the handshake's exporter: every Layer 0 server listener has one (PSK
    # and certificates on OpenSSL, raw public keys on GnuTLS).
    site.add_resource(list(KEYING_PATH), KeyingResource(store))
    inner: Any = RequireEndToEnd(site) if options.required else site
    inner = OscoreSite(inner, store)
    credentials = options.credentials
    # Whether anything needs protection is RequireEndToEnd's call (it accepts OSCORE too), so
    # Layer 0's own policy protects nothing by itself.
    policy = Policy.build(protected=())
    layer0 = Layer0Site(
        inner, credentials if len(credentials) > 1 else credentials[0], policy=policy,
        eager=eager, replica=options.replica, worker=options.worker,
    )
    # A handshake that agrees on KEYING_ALPN keys OSCORE with its last flight.
    layer0.fold(KEYING_ALPN, aiocoap.Message(code=Code.POST, uri_path=KEYING_PATH))
    return layer0


@dataclass(frozen=True)
class Layer0ClientOptions:
    """A client's end-to-end mode and credentials (separate from its Layer 1 credentials)."""

    mode: str  # "dtls" or "oscore"
    psk: dtls.PskClientCredentials | None = None
    certificate: dtls.CertificateCredentials | None = None
    raw_public_key: dtls.RawPublicKeyCredentials | None = None

    def chosen(self) -> ClientCredentials | None:
        """The one kind a handshake uses: raw public keys, then PSK, then certificates (in
        the OSCORE mode a PSK handshake runs on OpenSSL, for its exporter). ``coap-client``
        fills in only the kind it picked."""
        order = (self.raw_public_key, self.psk, self.certificate)
        return next((c for c in order if c is not None), None)


# The one kind a client's handshake uses (a string: the dtls backends load lazily).
ClientCredentials: TypeAlias = (
    "dtls.PskClientCredentials | dtls.CertificateCredentials | dtls.RawPublicKeyCredentials"
)


class Requester(Protocol):
    """What a program uses of a requester, whichever the mode (plain, Layer 0 DTLS, OSCORE)."""

    def request(self, message: aiocoap.Message) -> Any: ...  # aiocoap's request (untyped)
    def describe(self, response: aiocoap.Message) -> dict[str, Any]: ...


class PlainRequester:
    """Requests as aiocoap sends them (Layer 1 on coaps:// hops), optionally via a proxy."""

    def __init__(self, context: LayeredContext, proxy: str | None) -> None:
        from aiocoap.proxy.client import ProxyForwarder

        self._context = context
        self._via = ProxyForwarder(proxy, context.context) if proxy else context.context

    def request(self, message: aiocoap.Message) -> Any:
        return self._via.request(message)

    def describe(self, response: aiocoap.Message) -> dict[str, Any]:
        return {"layer 1": layer1_details(response)}


def layer1_details(response: aiocoap.Message) -> dict[str, Any] | None:
    """What the first hop's DTLS session says about itself, for ``coap-client -v``.

    The hop is named by its address (the proxy's, through a proxy).
    """
    remote = getattr(response, "remote", None)
    peer = getattr(remote, "peer", None)
    if peer is None or getattr(peer, "session", None) is None:
        hop = getattr(remote, "hostinfo", None) if remote is not None else None
        return {"hop": hop, "mode": "none (plain CoAP on the first hop)"}
    kind = _kind(peer.session)
    return {
        "hop": getattr(remote, "hostinfo", None),
        _identity_label(kind): _text(peer.identity),
        "mode": kind,
        "cipher": peer.session.cipher_suite,
    }


def _identity_label(kind: str) -> str:
    """A PSK session names no peer: its identity is the client's own, shared with the peer."""
    return "psk identity" if kind == "psk" else "peer"


class DtlsRequester:
    """Requests inside a Layer 0 DTLS session to the target's origin."""

    def __init__(self, context: LayeredContext, target: str, proxy: str | None,
                 credentials: ClientCredentials, state: Path | None = None) -> None:
        from .layer0 import Layer0Client

        kept: dict[str, Any] = {}
        if state is not None and isinstance(credentials, dtls.CertificateCredentials):
            # Resumption state kept between runs (coaplayers.layer0.resumption): the next
            # run resumes instead of a full handshake.
            from .layer0.profile import DTLS_CIPHERS
            from .layer0.resumption import ResumptionCache

            ssl_context = dtls.build_context(credentials, server=False, ciphers=DTLS_CIPHERS)
            kept = {"ssl_context": ssl_context,
                    "tickets": ResumptionCache(state / "layer0", credentials, ssl_context)}
        self.channel = Layer0Client(context.context, _origin(target), credentials, proxy=proxy,
                                     **kept)

    def request(self, message: aiocoap.Message) -> Any:
        return self.channel.request(message)

    def describe(self, response: aiocoap.Message) -> dict[str, Any]:
        hs = self.channel.last_handshake
        kind = self.channel.kind
        return {
            "layer 0": {
                "mode": "dtls " + kind,
                _identity_label(kind): _text(hs.peer_identity) if hs else None,
                "cipher": hs.cipher_suite if hs else None,
                "resumed": hs.resumed if hs else None,
                "false start": self.channel.false_start,
            },
        }

    async def close(self) -> None:
        await self.channel.close()


class OscoreModeRequester:
    """OSCORE requests keyed by a Layer 0 handshake (PSK, certificate or raw public key)."""

    def __init__(self, context: LayeredContext, target: str, proxy: str | None,
                 credentials: dtls.CertificateCredentials | dtls.RawPublicKeyCredentials
                 | dtls.PskClientCredentials, state: Path | None = None) -> None:
        self.kind = ("raw-public-key" if isinstance(credentials, dtls.RawPublicKeyCredentials)
                     else "PSK" if isinstance(credentials, dtls.PskClientCredentials)
                     else "certificate")
        from .layer0 import Layer0Client
        from .oscore.client import origin_of
        from .oscore.mode import OscoreRequester

        origin = _origin(target)
        # A context kept from an earlier run (coaplayers.oscore.kept) makes the first request
        # a single round trip.
        slot = None
        if state is not None:
            from .oscore.kept import KeptContexts

            slot = KeptContexts(state / "oscore").slot(origin_of(origin), credentials)
        # Every keying is a full handshake on a new Layer 0 client (docs/OSCORE-KEYING.md 1).
        # No shared TicketStore: each Layer 0 client has its own SSL context, and OpenSSL refuses a
        # session from another context, so a second keying (re-keying) would raise.
        self.requester = OscoreRequester(
            context.context, origin,
            lambda: Layer0Client(context.context, origin, credentials, proxy=proxy,
                                  exporter=True),
            proxy=proxy, kept=slot,
        )

    def request(self, message: aiocoap.Message) -> Any:
        return self.requester.request(message)

    def describe(self, response: aiocoap.Message) -> dict[str, Any]:
        hs = self.requester.last_handshake
        params = self.requester.parameters
        if self.requester.restored:
            sc = self.requester.security_context
            return {"layer 0": {
                "mode": f"oscore (keyed by a DTLS {self.kind} handshake)",
                _identity_label("psk" if self.kind == "PSK" else self.kind):
                    sc.peer if sc is not None else None,
                "sender id": sc.sender_id.hex() if sc is not None else None,
                "context": "kept from an earlier run",
            }}
        return {
            "layer 0": {
                "mode": f"oscore (keyed by a DTLS {self.kind} handshake)",
                _identity_label("psk" if self.kind == "PSK" else self.kind):
                    _text(hs.peer_identity) if hs else None,
                "handshake cipher": hs.cipher_suite if hs else None,
                "sender id": params.client_id.hex() if params else None,
            },
        }

    async def close(self) -> None:
        await self.requester.close()


def _origin(uri: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}"


def _kind(session: dtls.DtlsSession | None) -> str:
    if isinstance(session, dtls.TinyDtlsSession | dtls.OpenSslPskClientSession):
        return "psk"
    if isinstance(session, dtls.GnuTlsSession):
        return "rpk"
    return "certificate"


def _text(value: object) -> object:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


async def open_requester(
    context: LayeredContext, *, proxy: str | None, e2e: Layer0ClientOptions | None, target: str,
    state: Path | None = None,
) -> Requester:
    """The requester for the chosen mode.

    ``state``: an owner-only folder (:func:`coaplayers.clientstate.owner_only_folder`) where
    the OSCORE mode keeps its context (``oscore/``) and Layer 0 its resumption state
    (``layer0/``) between runs; None keeps nothing."""
    if e2e is None:
        return PlainRequester(context, proxy)
    creds = e2e.chosen()
    if e2e.mode == "dtls":
        if creds is None:
            raise dtls.ConfigurationError("the end-to-end DTLS mode needs credentials")
        return DtlsRequester(context, target, proxy, creds, state=state)
    if e2e.mode == "oscore":
        if creds is None:
            raise dtls.ConfigurationError("the OSCORE mode needs end-to-end credentials")
        return OscoreModeRequester(context, target, proxy, creds, state=state)
    raise dtls.ConfigurationError(f"unknown end-to-end mode {e2e.mode!r}")
