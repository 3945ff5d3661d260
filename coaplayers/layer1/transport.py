"""Layer 1: hop-by-hop DTLS (``coaps://``) as an aiocoap message transport.

This is the asyncio shell around :mod:`coaplayers.dtls`. It plugs into aiocoap where its UDP
transports do (``interfaces.MessageInterface`` below the message manager, which keeps doing
CoAP retransmission and deduplication), and plays both roles in one context: it serves
``coaps://`` listeners and opens client sessions for requests to ``coaps://`` URIs, so a proxy
needs nothing else.

Sessions are keyed by (socket, peer address). A server may send requests to a client over the
client's existing session (devices behind NAT are reached that way). Timers exist only while
something is due: a handshake retransmission, or one idle check per idle period.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiocoap import Message, error, interfaces
from aiocoap.numbers import COAPS_PORT, constants
from aiocoap.util import hostportjoin

from .. import dtls
from ..dtls import records
from ..errors import RemoteError
from ..message import split_hostinfo
from ..workers import WORKER_ENV
from .credentials import ClientCredentials

if TYPE_CHECKING:
    from ..dtls.dual import SessionListener

log = logging.getLogger("coaplayers.layer1")


@dataclass(frozen=True, slots=True)
class Layer1Limits:
    """Every resource bound of the transport, explicit and configurable."""

    max_sessions: int = 1000
    """Established sessions; beyond this the least recently used one is closed."""
    max_half_open: int = 100
    """Handshakes in progress (after a valid cookie); a new one beyond this evicts the least
    recently active one of the source host holding the most, so cookie-echoing floods cannot
    lock legitimate clients out."""
    handshake_timeout: float = 30.0
    idle_timeout: float = 600.0
    """A session with no traffic for this long is closed with close_notify."""
    max_datagram_size: int = 1500
    """Received datagrams larger than this are dropped; sent ones are packed to ``mtu``."""
    mtu: int = 1152
    max_queued_per_session: int = 64
    """Messages waiting for a handshake to finish, per session."""
    initial_retransmit: float = 1.0

    def dtls_config(self) -> dtls.DtlsConfig:
        return dtls.DtlsConfig(
            mtu=self.mtu,
            initial_retransmit=self.initial_retransmit,
            handshake_timeout=self.handshake_timeout,
        )


_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL})
# ICMP errors for datagrams already sent, reported later by the kernel (IP_RECVERR).
_REFUSED = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
# Linux values (Python 3.11 names only some of them); aiocoap's udp6 transport uses the same.
_IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
_IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
_MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)


def _receive_icmp_errors(sock: socket.socket) -> None:
    """Ask Linux to report ICMP errors (port or host unreachable) on this unconnected socket,
    so that a handshake towards a closed port fails at once instead of by timeout."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
        sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)


def _errqueue_addresses(sock: socket.socket | None, limit: int = 64) -> list[tuple[Any, ...]]:
    """The destinations of datagrams whose ICMP errors wait in the socket's error queue."""
    found: list[tuple[Any, ...]] = []
    if sock is None:
        return found
    for _ in range(limit):
        try:
            _, _, _, address = sock.recvmsg(1, 512, _MSG_ERRQUEUE)
        except OSError:  # empty (EAGAIN) or not supported
            break
        if address and address[:2] not in found:
            found.append(address[:2])
    return found


class Layer1Error(error.NetworkError, RemoteError):
    """A Layer 1 failure surfaced to aiocoap requests; the message names the likely cause.

    A :class:`aiocoap.error.NetworkError`, so aiocoap passes it to the request unchanged;
    ``cause`` is the engine's typed error (:class:`~coaplayers.dtls.AuthenticationFailed`,
    :class:`~coaplayers.dtls.HandshakeTimeout`, ...).
    """

    def __init__(self, cause: dtls.DtlsError, remote: str) -> None:
        self.cause = cause
        self.remote_hostinfo = remote
        super().__init__(f"coaps://{remote}: {cause}")

    def __str__(self) -> str:
        return str(self.args[0])


class Layer1Remote(interfaces.EndpointAddress):
    """A peer reached over one of our sockets; stable across re-handshakes."""

    scheme = "coaps"
    is_multicast = False
    #: True for the remote a client request made (it stands for that host over any of our
    #: sessions, so a request context may keep it); False for a peer that opened a session
    #: to us.
    reusable = False
    is_multicast_locally = False
    next_attempt = 0.0  # (see MessageInterfaceLayer1.ready)
    maximum_block_size_exp = constants.MAX_REGULAR_BLOCK_SIZE_EXP

    def __init__(self, endpoint: _Endpoint, address: tuple[Any, ...], hostname: str | None):
        self._endpoint = endpoint
        self.address = address
        self._hostname = hostname
        self.peer: _Peer | None = None

    def __repr__(self) -> str:
        return f"<Layer1Remote {self.hostinfo} via {self._endpoint.local_hostinfo}>"

    @property
    def hostinfo(self) -> str:
        host = self._hostname or self.address[0]
        port = self.address[1]
        return hostportjoin(host, None if port == COAPS_PORT else port)

    @property
    def hostinfo_local(self) -> str:
        return self._endpoint.local_hostinfo

    @property
    def uri_base(self) -> str:
        return "coaps://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coaps://" + self.hostinfo_local

    @property
    def blockwise_key(self) -> tuple[Any, ...]:
        return (id(self._endpoint), self.address)

    @property
    def peer_identity(self) -> bytes | str | None:
        """Who authenticated at Layer 1, if anyone yet: the PSK identity (bytes), the
        certificate's name, or a raw public key's fingerprint (32 hex digits, as Layer 0
        names it: :func:`~coaplayers.dtls.spki_fingerprint`)."""
        return self.peer.identity if self.peer is not None else None

    @property
    def authenticated_claims(self) -> list[Any]:
        ident = self.peer_identity
        return [] if ident is None else [Layer1Claim(ident)]


@dataclass(frozen=True, slots=True)
class Layer1Claim:
    """What a resource finds in ``request.remote.authenticated_claims`` for Layer 1."""

    identity: bytes | str
    layer: int = 1


def layer1_identity(request: Message) -> bytes | str | None:
    """The Layer 1 peer identity a request arrived with (None for plain CoAP)."""
    remote = request.remote
    return getattr(remote, "peer_identity", None)


class _Peer:
    """One DTLS session on one socket to one address, plus what waits for it."""

    def __init__(self, transport: MessageInterfaceLayer1, remote: Layer1Remote) -> None:
        self.transport = transport
        self.remote = remote
        self.session: dtls.DtlsSession | None = None
        self.is_client = False
        self.identity: bytes | str | None = None
        self.queue: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.last_activity = time.monotonic()
        self.last_received = time.monotonic()  # last CoAP message out of the session
        self.hello_random: bytes | None = None  # server: the ClientHello random of the session
        self.opened_with: object | None = None  # client: the credentials its session checked
        # Server: a new handshake from the address of this established session, which it
        # replaces only once it completes (RFC 6347 4.2.8); set on that standby peer too.
        self.replacement: _Peer | None = None
        self.replaces: _Peer | None = None
        # Unanswered CON messages we sent as a client: mid -> [first send, bytes, resends].
        self.sent_cons: OrderedDict[int, list[Any]] = OrderedDict()


class _HalfOpenTable:
    """Peers whose handshake is in progress, by source host, least recently active first.

    When the table is full, the victim is the least recently active handshake of the host that
    holds the most: an attacker who echoes our cookies from a few hosts (any number of ports)
    then only displaces its own handshakes, never the one of a legitimate client elsewhere.
    Everything is O(1) except :meth:`victim`, O(hosts in the table) <= ``max_half_open``.
    """

    def __init__(self) -> None:
        self._by_host: dict[str, OrderedDict[_Peer, None]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, peer: _Peer) -> None:
        bucket = self._by_host.setdefault(peer.remote.address[0], OrderedDict())
        if peer not in bucket:
            bucket[peer] = None
            self._count += 1

    def touch(self, peer: _Peer) -> None:
        bucket = self._by_host.get(peer.remote.address[0])
        if bucket is not None and peer in bucket:
            bucket.move_to_end(peer)

    def discard(self, peer: _Peer) -> None:
        host = peer.remote.address[0]
        bucket = self._by_host.get(host)
        if bucket is None or peer not in bucket:
            return
        del bucket[peer]
        self._count -= 1
        if not bucket:
            del self._by_host[host]

    def victim(self) -> _Peer:
        fullest = max(self._by_host.values(), key=len)
        return next(iter(fullest))


class _Endpoint:
    """One UDP socket; a listener if it has DTLS listeners, else client-only.

    The socket is read here, up to ``READ_BATCH`` datagrams per wakeup of the event loop
    (asyncio's datagram transport reads one per wakeup: with many sessions on one socket,
    each queued datagram would cost another round of the loop). A datagram the kernel cannot
    take at once is lost, as on the wire (DTLS and CoAP retransmit); asyncio would queue it.
    """

    READ_BATCH = 32

    def __init__(self, transport: MessageInterfaceLayer1, kinds: dtls.KindListener | None,
                 sock: socket.socket) -> None:
        self.owner = transport
        self.kinds = kinds  # hands each ClientHello to the backend of its kind
        self.listeners: list[SessionListener] = kinds.listeners if kinds is not None else []
        self.raw_socket = sock  # (its error queue names where ICMP errors came from)
        self.family = sock.family
        host, port = sock.getsockname()[:2]
        self.sockname = (host, port)
        self.local_hostinfo = hostportjoin(host, port)
        self.closed = False
        self._sending_to: tuple[Any, ...] | None = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        recvfrom = self.raw_socket.recvfrom
        size = self.owner.limits.max_datagram_size + 1  # (a longer one is cut, then dropped)
        for _ in range(self.READ_BATCH):
            if self.closed:
                return
            try:
                data, addr = recvfrom(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier datagram (IP_RECVERR)
                self.error_received(exc)
                continue
            self.datagram_received(data, addr)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.owner._datagram_received(self, data, addr[:2])

    def error_received(self, exc: Exception) -> None:
        # A failed sendto() is reported with _sending_to naming where it went; handled on the
        # next loop pass, not re-entrantly.
        dest = self._sending_to
        if dest is not None and isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
            self._loop.call_soon(self.owner._unreachable, self, dest, exc)
            return
        if isinstance(exc, OSError) and exc.errno in _REFUSED:
            # An ICMP error for an earlier datagram (IP_RECVERR): the error queue names
            # the address it was sent to.
            for addr in _errqueue_addresses(self.raw_socket):
                self._loop.call_soon(self.owner._unreachable, self, addr, exc)
            return
        log.debug("socket error on %s: %s", self.local_hostinfo, exc)

    def sendto(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.closed:
            return
        try:
            self.raw_socket.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            pass  # the socket's buffer is full: lost, as on the wire
        except OSError as exc:
            self._sending_to = addr
            try:
                self.error_received(exc)
            finally:
                self._sending_to = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self.raw_socket.fileno())
            self.raw_socket.close()


class MessageInterfaceLayer1(interfaces.MessageInterface):
    """aiocoap message interface for ``coaps://`` on the coaplayers DTLS engine."""

    def __init__(
        self,
        mman: interfaces.MessageManager,
        *,
        psk_store: dtls.PskStore | None,
        certificate: dtls.CertificateCredentials | None,
        client_credentials: ClientCredentials | None,
        limits: Layer1Limits,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        raw_public_key: dtls.RawPublicKeyCredentials | None = None,
    ) -> None:
        self._mman: interfaces.MessageManager | None = mman
        self.limits = limits
        self.psk_store = psk_store
        self.certificate = certificate
        self.raw_public_key = raw_public_key
        self.client_credentials = client_credentials or ClientCredentials()
        self._on_event = on_event
        # coap-proxy's fast path (``proxy/transport.py``): ``plaintext_hook(data, remote)`` sees
        # every CoAP message a session delivers before aiocoap does (True: taken), and
        # ``error_hook(remote, exc)`` every session failure aiocoap's requests get.
        self.plaintext_hook: Callable[[bytes, Layer1Remote], bool] | None = None
        self.error_hook: Callable[[Layer1Remote, dtls.DtlsError], None] | None = None
        self._endpoints: list[_Endpoint] = []
        self._client_endpoints: dict[int, _Endpoint] = {}
        self._peers: OrderedDict[tuple[int, tuple[Any, ...]], _Peer] = OrderedDict()
        self._remotes: dict[tuple[int, tuple[Any, ...]], Layer1Remote] = {}
        # Per-request parsing that gives the same answer every time, remembered (bounded):
        # hostinfo -> (host, port) and IP literal -> normalized address text.
        self._literals: dict[str, str | None] = {}
        self._handshaking = _HalfOpenTable()
        self._openssl_contexts: dict[int, Any] = {}
        self._rpk_contexts: dict[int, dtls.RawPublicKeyContext] = {}
        self._tickets = dtls.TicketStore()
        # (id(credentials), host) -> (credentials, a copy that checks that host's name): a
        # certificate entry without a server name checks the host of the URI it opens.
        self._named: dict[tuple[int, str], tuple[Any, dtls.CertificateCredentials]] = {}
        self._loop = asyncio.get_running_loop()
        self.stats: dict[str, int] = {
            "handshakes_ok": 0,
            "handshakes_failed": 0,
            "sessions_evicted": 0,
            "datagrams_dropped": 0,
            "half_open_evicted": 0,
        }

    # ------------------------------------------------------------ construction

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Serve coaps on ``host``:``port`` (port 0: ephemeral); returns the bound address.

        Every credential kind held is served on the socket; each ClientHello picks one
        (:class:`~coaplayers.dtls.KindListener`).
        """
        if self.psk_store is None and self.certificate is None and self.raw_public_key is None:
            raise dtls.ConfigurationError(
                "a coaps listener needs server credentials: PSKs (--psk/--psk-file), a"
                " certificate (--cert/--key) or a raw public key (--rpk-key/--rpk-trust)"
            )
        dtls.check_identities(self.psk_store, self.raw_public_key)
        config = self.limits.dtls_config()
        # PSK on OpenSSL, not tinydtls: tinydtls' listener keeps every session in one
        # context, whose peer table a client's close_notify corrupts (docs/SECURITY.md).
        kinds = dtls.KindListener(
            psk=dtls.OpenSslPskListener(self.psk_store, config, without_cookie=0)
            if self.psk_store is not None else None,
            certificate=dtls.OpenSslListener(self.certificate, config)
            if self.certificate is not None else None,
            rpk=dtls.GnuTlsListener(self.raw_public_key, config)
            if self.raw_public_key is not None else None,
        )
        endpoint = await self._bind(host, port, kinds)
        return endpoint.sockname

    async def _bind(self, host: str, port: int, kinds: dtls.KindListener | None) -> _Endpoint:
        family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                # "::" serves IPv4 too, as users expect from a wildcard address.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if os.environ.get(WORKER_ENV):
                # One of several workers on this port (coaplayers.workers): the kernel spreads
                # clients over them by address, so each DTLS session stays with one.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host or "::", port))
        except OSError as exc:
            sock.close()
            where = hostportjoin(host, port)
            raise OSError(exc.errno, f"cannot bind coaps to {where}: {exc.strerror}") from exc
        sock.setblocking(False)
        _receive_icmp_errors(sock)
        endpoint = _Endpoint(self, kinds, sock)
        self._endpoints.append(endpoint)
        return endpoint

    async def _client_endpoint(self, family: int) -> _Endpoint:
        endpoint = self._client_endpoints.get(family)
        if endpoint is None:
            endpoint = await self._bind("::" if family == socket.AF_INET6 else "0.0.0.0", 0, None)
            self._client_endpoints[family] = endpoint
        return endpoint

    # ------------------------------------------------------ MessageInterface API

    def send(self, message: Message) -> None:
        remote = message.remote
        if not isinstance(remote, Layer1Remote):
            raise ValueError("not a coaps remote")
        self.send_encoded(remote, message.encode())

    def send_encoded(self, remote: Layer1Remote, data: bytes) -> None:
        """Send an encoded CoAP message over ``remote``'s session, as :meth:`send` does (a
        client session is opened, or watched for a server that lost it)."""
        peer = self._peers.get((id(remote._endpoint), remote.address))
        if peer is None:
            peer = self._new_peer(remote)
        if data[0] & 0x30 == 0 and peer.is_client and self._watch_con(
                peer, data[2] << 8 | data[3], data):
            return  # the message already waits for the new session
        self._send_plaintext(peer, data)

    def ready(self, remote: Layer1Remote, retry_after: float = 1.0) -> bool:
        """Whether ``remote``'s client session is established; if there is none, a handshake
        is started (at most one per ``retry_after`` seconds: a server that is down is not
        sent one per call). coap-proxy's fast path sends only over established sessions: its
        requests would otherwise queue behind a handshake, beyond ``max_queued_per_session``
        when many come at once."""
        peer = remote.peer
        if peer is not None:
            session = peer.session
            if session is not None and not session.is_closed:
                return session.is_established
        now = time.monotonic()
        if now < remote.next_attempt:
            return False
        remote.next_attempt = now + retry_after
        if peer is None:
            peer = self._new_peer(remote)
        self._start_client(peer)
        return False

    @property
    def message_manager(self) -> interfaces.MessageManager | None:
        """aiocoap's message manager above this transport (None once shut down)."""
        return self._mman

    def _watch_con(self, peer: _Peer, mid: int, data: bytes) -> bool:
        """Notice a server that lost our session: it silently drops what we send.

        Our own server says so at once with an unauthenticated alert (see
        :meth:`_datagram_received`); for other servers the second retransmission of a
        request that nothing has answered since its first transmission is the sign.
        """
        now = time.monotonic()
        entry = peer.sent_cons.get(mid)
        if entry is None:
            peer.sent_cons[mid] = [now, data, 0]
            while len(peer.sent_cons) > 256:
                peer.sent_cons.popitem(last=False)
            return False
        entry[2] += 1
        session = peer.session
        if (
            entry[2] >= 2
            and session is not None
            and session.is_established
            and peer.last_received < entry[0]
        ):
            log.info("no answer from %s on an established session; new handshake",
                     peer.remote.hostinfo)
            self._rehandshake(peer)
            return True
        return False

    def _rehandshake(self, peer: _Peer) -> None:
        """Replace the client session; unanswered requests go out again on the new one."""
        self._drop_session(peer, None, notify=False, forget=False)
        peer.queue = [entry[1] for entry in peer.sent_cons.values()] + peer.queue
        del peer.queue[self.limits.max_queued_per_session :]
        self._start_client(peer)

    async def determine_remote(self, message: Message) -> Layer1Remote | None:
        if message.requested_scheme != "coaps":
            return None
        hostinfo = message.unresolved_remote
        if hostinfo is not None:
            host, port = split_hostinfo(hostinfo)
        elif message.opt.uri_host:
            host, port = message.opt.uri_host, message.opt.uri_port
        else:
            raise ValueError("no host to send the coaps request to")
        port = port or COAPS_PORT
        if self._mman is None:
            raise error.LibraryShutdown()
        address = await self._resolve(host, port)
        endpoint = await self._client_endpoint(
            socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        )
        key = (id(endpoint), address)
        own = self._peers.get(key)
        if (own is None or own.session is None) and _hostname(host) is None:
            # An existing session to that address on another socket (a server calling back
            # a client over the client's own session) is used first. The scan runs only
            # when we hold no client session to the address, not on every request; and only
            # for an address given as such: the peer of such a session authenticated as a
            # client, never for a name, so a host name always gets a session of our own
            # that checks it (DNS could point the name at that peer).
            for (_, addr), peer in self._peers.items():
                if addr == address and peer.session is not None and not peer.session.is_closed:
                    return peer.remote
        if message.opt.proxy_scheme or message.opt.proxy_uri:
            # Through a proxy the credentials are the proxy's (the hop), not the target's.
            hop_uri = f"coaps://{hostportjoin(host, port if port != COAPS_PORT else None)}/"
            creds = self.client_credentials.for_uri(hop_uri)
        else:
            creds = self.client_credentials.for_request(message)
        creds = self._for_host(creds, host)
        if own is not None and own.is_client:
            self._check_shared_session(own, creds, host)
        remote = self._remotes.get(key)
        if remote is None:
            remote = Layer1Remote(endpoint, address, _hostname(host))
            remote.reusable = True
            self._remotes[key] = remote
        remote._credentials = creds  # type: ignore[attr-defined]
        return remote

    def _for_host(self, creds: Any, host: str) -> Any:
        """Certificate credentials that check ``host`` when they name no server themselves
        (the first hop's host: the proxy's for a proxied request)."""
        if not isinstance(creds, dtls.CertificateCredentials) or creds.server_name:
            return creds
        key = (id(creds), host)
        hit = self._named.get(key)
        if hit is not None:
            return hit[1]
        if len(self._named) >= 1024:
            # Contexts and resumption state are kept per credentials object (by id): all go
            # together, so that no id is ever reused for other credentials.
            self._named.clear()
            self._openssl_contexts.clear()
            self._tickets = dtls.TicketStore()
        named = dataclasses.replace(creds, server_name=host)
        self._named[key] = (creds, named)
        return named

    def _check_shared_session(self, peer: _Peer, creds: Any, host: str) -> None:
        """Another name for the address of an open client session uses that session only if
        the certificate it authenticated is for that name too (DNS could point any name at
        any address: the name check must not be skipped by reusing a session)."""
        session = peer.session
        if (session is None or session.is_closed or peer.opened_with is creds
                or not isinstance(creds, dtls.CertificateCredentials)):
            return
        leaf = getattr(session, "peer_certificate", None)
        if session.is_established and leaf is not None and dtls.certificate_matches(
                leaf, creds.server_name or host):
            return
        opened = getattr(peer.opened_with, "server_name", None)
        raise Layer1Error(
            dtls.AuthenticationFailed(
                f"the DTLS session to {hostportjoin(*peer.remote.address[:2])} was"
                f" authenticated for {opened or 'other credentials'!r}, and its certificate"
                f" is not known to be for {creds.server_name or host!r}"
            ),
            peer.remote.hostinfo,
        )

    async def recognize_remote(self, remote: Any) -> bool:
        return isinstance(remote, Layer1Remote) and remote._endpoint in self._endpoints

    async def shutdown(self) -> None:
        for peer in list(self._peers.values()):
            if peer.session is not None and peer.session.is_established:
                peer.session.close()
                self._flush(peer)
            self._drop_session(peer, None, notify=False)
        self._mman = None
        for endpoint in self._endpoints:
            endpoint.close()
        self._endpoints.clear()

    # ------------------------------------------------------------- internals

    async def _resolve(self, host: str, port: int) -> tuple[str, int]:
        literal = self._literals.get(host, "")  # "": not looked at yet (no address is empty)
        if literal == "":
            try:
                literal = str(ipaddress.ip_address(host))
            except ValueError:
                literal = None
            if len(self._literals) >= 1024:
                self._literals.clear()
            self._literals[host] = literal
        if literal is not None:
            return (literal, port)
        try:
            infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise error.ResolutionError(f"cannot resolve {host}: {exc.strerror}") from exc
        if not infos:
            raise error.ResolutionError(f"cannot resolve {host}")
        address = infos[0][4]
        return (str(address[0]), int(address[1]))

    def _new_peer(self, remote: Layer1Remote) -> _Peer:
        key = (id(remote._endpoint), remote.address)
        peer = _Peer(self, remote)
        remote.peer = peer
        self._peers[key] = peer
        self._remotes[key] = remote
        self._enforce_session_limit()
        return peer

    def _unreachable(self, endpoint: _Endpoint, address: tuple[Any, ...], exc: OSError) -> None:
        """The network stack refused a datagram of a handshake: fail it now, not by timeout."""
        peer = self._peers.get((id(endpoint), address))
        if peer is None or peer.session is None or peer.session.is_established:
            return  # established: a route may come back; aiocoap's retransmission decides
        self.stats["handshakes_failed"] += 1
        refused = exc.errno == errno.ECONNREFUSED
        why = "nothing listens on that port" if refused else "no route to that host from here"
        err = dtls.NetworkUnreachable(
            f"cannot send to {hostportjoin(*address[:2])}: {exc.strerror} ({why})",
            refused=refused,
        )
        self._emit_event("handshake_failed", peer, error=str(err))
        self._drop_session(peer, err, notify=True)

    def _send_plaintext(self, peer: _Peer, data: bytes) -> None:
        peer.last_activity = time.monotonic()
        session = peer.session
        if session is not None and session.is_established:
            try:
                session.send(data)
            except dtls.DtlsError as exc:
                self._dispatch_error(peer, exc)
                return
            self._flush(peer)
            return
        if len(peer.queue) >= self.limits.max_queued_per_session:
            self.stats["datagrams_dropped"] += 1
            return
        peer.queue.append(data)
        if session is None or session.is_closed:
            self._start_client(peer)

    def _start_client(self, peer: _Peer) -> None:
        remote = peer.remote
        creds = getattr(remote, "_credentials", None)
        if creds is None:
            self._dispatch_error(
                peer,
                dtls.SessionClosed(
                    "the client's DTLS session is gone and we hold no credentials to open one"
                ),
            )
            self._forget(peer)
            return
        self._make_room_for_handshake()
        config = self.limits.dtls_config()
        if isinstance(creds, dtls.PskClientCredentials):
            session: dtls.DtlsSession = dtls.TinyDtlsSession.client(creds, config)
        elif isinstance(creds, dtls.RawPublicKeyCredentials):
            rpk = self._rpk_contexts.get(id(creds))
            if rpk is None:  # GnuTLS credentials hold our key: built once per credential
                rpk = dtls.RawPublicKeyContext(creds, server=False)
                self._rpk_contexts[id(creds)] = rpk
            session = dtls.GnuTlsSession.client(rpk, config)
        else:
            ctx = self._openssl_contexts.get(id(creds))
            if ctx is None:
                ctx = dtls.build_context(creds, server=False)
                self._openssl_contexts[id(creds)] = ctx
            session = dtls.OpenSslSession.client(
                ctx, creds, config, resume=self._tickets.get((id(creds), remote.address))
            )
        peer.session = session
        peer.is_client = True
        peer.opened_with = creds
        peer.sent_cons.clear()
        self._handshaking.add(peer)
        session.connect(time.monotonic())
        self._process(peer)

    def _datagram_received(self, endpoint: _Endpoint, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) > self.limits.max_datagram_size:
            self.stats["datagrams_dropped"] += 1
            return
        now = time.monotonic()
        key = (id(endpoint), addr)
        peer = self._peers.get(key)
        hello_random = records.client_hello_random(data)
        is_hello = hello_random is not None
        standby = peer.replacement if peer is not None else None
        if standby is not None and self._to_standby(standby, data, hello_random):
            return
        if peer is not None and peer.session is not None and not peer.session.is_closed:
            if not (is_hello and endpoint.listeners and not peer.is_client and
                    (peer.session.is_established or hello_random != peer.hello_random)):
                self._peers.move_to_end(key)
                self._handshaking.touch(peer)
                peer.last_activity = now
                if (
                    peer.is_client
                    and peer.session.is_established
                    and _is_plaintext_alert(data)
                ):
                    # Unauthenticated, so never fed to the engine (a forger could end the
                    # session); only a hint that the server lost our session.
                    if any(e[0] > peer.last_received for e in peer.sent_cons.values()):
                        self._rehandshake(peer)
                    return
                session = peer.session
                plains = session.receive_application_data(data, now)
                if plains is None:  # not one application-data record: the general path
                    session.receive_datagram(data, now)
                    self._process(peer)
                    return
                for plain in plains:
                    self._deliver(peer, plain)
                if session.has_pending:  # e.g. an engine's alert, or the session ended
                    self._process(peer)
                return
            # An established client says ClientHello again, or a handshaking one starts over
            # with a new random: it lost its state (restart, or the same port reused). Let the
            # listener run a fresh, cookie-checked handshake; a repeat of the ClientHello that
            # created the session went to the session above.
        if not endpoint.listeners or not is_hello:
            self.stats["datagrams_dropped"] += 1
            if endpoint.listeners and data[:1] == b"\x17" and len(data) > records.HEADER_LEN:
                # Application data for a session we do not have (we restarted, or evicted
                # it): a 15-byte plaintext alert tells the client to handshake again now
                # instead of after its retransmissions. Smaller than what triggers it.
                endpoint.sendto(_LOST_SESSION_ALERT, addr)
            return
        assert endpoint.kinds is not None  # endpoints with listeners have their dispatcher
        try:
            replies, accepted = endpoint.kinds.accept(addr, data, now)
        except Exception:  # a listener must never take the socket down
            log.exception("DTLS listener failed on a datagram from %s", addr[0])
            return
        for reply in replies:
            endpoint.sendto(reply, addr)
        if accepted is None:
            return
        remote = self._remotes.get(key)
        if remote is None:
            remote = Layer1Remote(endpoint, addr, None)
        if peer is not None and peer.session is not None and peer.session.is_established:
            self._stand_by(peer, accepted, hello_random)
            return
        if peer is not None:
            self._drop_session(peer, None, notify=False)
        # Only a ClientHello with a valid cookie gets here, or (certificates) one resuming a
        # session this listener issued, whose small answer needs no cookie: the stateless
        # HelloVerifyRequests of a flood cost nothing. A full table loses its least recently
        # active handshake rather than refusing this one, which may be a legitimate client's.
        self._make_room_for_handshake()
        peer = self._new_peer(remote)
        peer.session = accepted
        peer.is_client = False
        peer.hello_random = hello_random
        self._handshaking.add(peer)
        self._process(peer)

    def _stand_by(self, peer: _Peer, session: dtls.DtlsSession, hello_random: bytes | None
                  ) -> None:
        """Run a new handshake from an established session's address beside that session.

        Whoever saw a handshake and can send from the client's address can make the listener
        start one (a session ID offered for resumption, or a cookie, which binds to the
        address only, both travel in the clear): the established session must stay until
        the new handshake completes, which takes the client itself (RFC 6347 4.2.8). Until
        then application data goes to the established session, handshake records to the
        new one; one standby at a time, the newest.
        """
        old = peer.replacement
        if old is not None:
            self._drop_session(old, None, notify=False)
        self._make_room_for_handshake()
        standby = _Peer(self, peer.remote)
        standby.session = session
        standby.hello_random = hello_random
        standby.replaces = peer
        peer.replacement = standby
        self._handshaking.add(standby)
        self._process(standby)

    def _to_standby(self, standby: _Peer, data: bytes, hello_random: bytes | None) -> bool:
        """Feed ``data`` to a standby handshake if it is for that one (see :meth:`_stand_by`);
        False: the established session or the listener takes it."""
        session = standby.session
        if session is None or session.is_closed:
            return False
        if hello_random is not None:
            if hello_random != standby.hello_random:
                return False  # yet another handshake: the listener's
        elif data[0] == records.CONTENT_APPLICATION_DATA or (
            data[0] == records.CONTENT_ALERT and records.epoch(data) != 0
        ):
            return False  # the established session's records (its alerts are protected)
        standby.last_activity = time.monotonic()
        self._handshaking.touch(standby)
        session.receive_datagram(data, time.monotonic())
        self._process(standby)
        return True

    def _take_over(self, standby: _Peer) -> None:
        """A standby handshake completed: its session replaces the established one."""
        old = standby.replaces
        standby.replaces = None
        if old is None or old.replacement is not standby:
            return
        old.replacement = None
        key = (id(standby.remote._endpoint), standby.remote.address)
        if self._peers.get(key) is old:
            self._peers[key] = standby
            self._peers.move_to_end(key)
            standby.remote.peer = standby
        self._drop_session(old, None, notify=False)

    def _process(self, peer: _Peer) -> None:
        """Move a session's output to the socket and its events to aiocoap."""
        session = peer.session
        if session is None:
            return
        self._flush(peer)
        while (event := session.next_event()) is not None:
            if isinstance(event, dtls.HandshakeComplete):
                self._handshaking.discard(peer)
                if peer.replaces is not None:
                    self._take_over(peer)
                peer.identity = event.peer_identity
                self.stats["handshakes_ok"] += 1
                self._emit_event("handshake", peer, cipher=event.cipher_suite,
                                 resumed=event.resumed)
                if peer.is_client and isinstance(session, dtls.OpenSslSession):
                    state = session.resumption_state
                    creds = getattr(peer.remote, "_credentials", None)
                    if state is not None and creds is not None:
                        self._tickets.put((id(creds), peer.remote.address), state)
                queued, peer.queue = peer.queue, []
                for data in queued:
                    session.send(data)
                self._flush(peer)
                self._arm_idle(peer)
            elif isinstance(event, dtls.ApplicationData):
                self._deliver(peer, event.data)
            elif isinstance(event, dtls.ConnectionClosed):
                err = event.error
                if peer.identity is None:  # closed before the handshake completed
                    err = err or dtls.AuthenticationFailed(
                        "the peer ended the DTLS handshake without saying why"
                    )
                    self.stats["handshakes_failed"] += 1
                    self._emit_event("handshake_failed", peer, error=str(err))
                elif err is None and peer.queue:
                    err = dtls.SessionClosed("the peer closed the DTLS session")
                # A failed standby handshake concerns nobody's requests: the session it
                # would have replaced goes on.
                self._drop_session(peer, err, notify=err is not None and peer.replaces is None)
                return
        self._arm_timer(peer)

    def _flush(self, peer: _Peer) -> None:
        if peer.session is None:
            return
        for datagram in peer.session.datagrams_to_send():
            peer.remote._endpoint.sendto(datagram, peer.remote.address)

    def _deliver(self, peer: _Peer, data: bytes) -> None:
        if self._mman is None:
            return
        hook = self.plaintext_hook
        if hook is not None and hook(data, peer.remote):
            peer.last_received = time.monotonic()
            if peer.is_client and len(data) >= 4 and (data[1] >= 0x40 or data[0] & 0x20):
                peer.sent_cons.pop(data[2] << 8 | data[3], None)  # (a response, ACK or RST)
            return
        try:
            message = Message.decode(data, remote=peer.remote)
        except (error.UnparsableMessage, UnicodeDecodeError):  # aiocoap: non-UTF-8 text option
            log.warning("unparsable CoAP message inside DTLS from %s", peer.remote.hostinfo)
            return
        peer.last_received = time.monotonic()
        if message.code.is_response() or message.mtype in (2, 3):
            peer.sent_cons.pop(message.mid, None)
        self._mman.dispatch_message(message)

    def _dispatch_error(self, peer: _Peer, exc: dtls.DtlsError) -> None:
        if self.error_hook is not None:
            self.error_hook(peer.remote, exc)
        if self._mman is not None:
            self._mman.dispatch_error(Layer1Error(exc, peer.remote.hostinfo), peer.remote)

    def _drop_session(
        self, peer: _Peer, exc: dtls.DtlsError | None, *, notify: bool, forget: bool = True
    ) -> None:
        """End the peer's session; with ``forget`` the peer leaves the table too."""
        session = peer.session
        peer.session = None
        self._handshaking.discard(peer)
        if session is not None and not session.is_closed:
            session.abort(exc)
        for handle in (peer.timer, peer.idle_timer):
            if handle is not None:
                handle.cancel()
        peer.timer = peer.idle_timer = None
        peer.identity = None
        peer.sent_cons.clear()
        if notify and exc is not None:
            self._dispatch_error(peer, exc)
        if forget:
            self._forget(peer)

    def _forget(self, peer: _Peer) -> None:
        peer.queue.clear()
        self._handshaking.discard(peer)
        owner, peer.replaces = peer.replaces, None
        if owner is not None:  # a standby: the remote stays its established session's
            if owner.replacement is peer:
                owner.replacement = None
            return
        standby, peer.replacement = peer.replacement, None
        if standby is not None:
            self._drop_session(standby, None, notify=False)
        key = (id(peer.remote._endpoint), peer.remote.address)
        if self._peers.get(key) is not peer:
            return  # replaced (a standby took over): the remote is the new session's
        del self._peers[key]
        if not peer.is_client:
            self._remotes.pop(key, None)
        peer.remote.peer = None

    def _arm_timer(self, peer: _Peer) -> None:
        if peer.timer is not None:
            peer.timer.cancel()
            peer.timer = None
        session = peer.session
        if session is None:
            return
        when = session.get_timer()
        if when is None:
            return
        delay = max(0.0, when - time.monotonic())
        peer.timer = self._loop.call_later(delay, self._on_timer, peer)

    def _on_timer(self, peer: _Peer) -> None:
        peer.timer = None
        if peer.session is None:
            return
        peer.session.handle_timer(time.monotonic())
        self._process(peer)

    def _arm_idle(self, peer: _Peer) -> None:
        if peer.idle_timer is not None:
            peer.idle_timer.cancel()
        due = peer.last_activity + self.limits.idle_timeout
        peer.idle_timer = self._loop.call_later(
            max(0.0, due - time.monotonic()), self._on_idle, peer
        )

    def _on_idle(self, peer: _Peer) -> None:
        peer.idle_timer = None
        session = peer.session
        if session is None or not session.is_established:
            return
        if time.monotonic() - peer.last_activity < self.limits.idle_timeout:
            self._arm_idle(peer)  # there was traffic: check again one period after it
            return
        session.close()
        self._flush(peer)
        self._drop_session(peer, None, notify=False)

    def _make_room_for_handshake(self) -> None:
        """Below ``max_half_open`` handshakes, evicting (see :class:`_HalfOpenTable`)."""
        while len(self._handshaking) >= self.limits.max_half_open:
            oldest = self._handshaking.victim()
            self._handshaking.discard(oldest)
            session = oldest.session
            if session is None or session.is_established or session.is_closed:
                continue  # not half-open any more (defensive: every such path removes it)
            self.stats["half_open_evicted"] += 1
            log.info("half-open limit %d: evicting the handshake with %s",
                     self.limits.max_half_open, oldest.remote.hostinfo)
            self._drop_session(
                oldest,
                dtls.DtlsError("handshake evicted: too many handshakes in progress"),
                notify=oldest.is_client,
            )

    def _enforce_session_limit(self) -> None:
        while len(self._peers) > self.limits.max_sessions:
            _, oldest = next(iter(self._peers.items()))
            self.stats["sessions_evicted"] += 1
            if oldest.session is not None and oldest.session.is_established:
                oldest.session.close()
                self._flush(oldest)
            self._drop_session(oldest, None, notify=False)

    def _emit_event(self, kind: str, peer: _Peer, **fields: Any) -> None:
        ident = peer.identity
        fields.update(
            peer=peer.remote.hostinfo,
            identity=ident.decode(errors="replace") if isinstance(ident, bytes) else ident,
            role="client" if peer.is_client else "server",
        )
        log.info("layer1 %s %s", kind, fields)
        if self._on_event is not None:
            with contextlib.suppress(Exception):
                self._on_event(kind, fields)

    # --------------------------------------------------------------- queries

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        return [e.sockname for e in self._endpoints if e.listeners]

    @property
    def half_open_count(self) -> int:
        """Handshakes in progress (after the cookie exchange); at most ``max_half_open``."""
        return len(self._handshaking)

    @property
    def session_count(self) -> int:
        return sum(1 for p in self._peers.values() if p.session is not None)


# Fatal unexpected_message alert in epoch 0 (RFC 6347 record, RFC 5246 alert).
_LOST_SESSION_ALERT = bytes.fromhex("15fefd" "0000" "000000000000" "0002" "020a")


def _is_plaintext_alert(datagram: bytes) -> bool:
    return (
        len(datagram) >= records.HEADER_LEN
        and datagram[0] == records.CONTENT_ALERT
        and records.epoch(datagram) == 0
    )


def _hostname(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None
