"""Real peers for the fuzz suite and its corpus: DTLS clients and listeners of both backends,
a sans-I/O drive of Layer 0 core, and a pair of OSCORE contexts with fixed keys."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from aiocoap import Message
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code

from coaplayers import pki
from coaplayers.dtls import (
    CertificateCredentials,
    DtlsConfig,
    DtlsSession,
    OpenSslListener,
    OpenSslSession,
    PskClientCredentials,
    PskStore,
    TinyDtlsListener,
    TinyDtlsSession,
    build_context,
)
from coaplayers.layer0.core import Layer0ServerCore
from coaplayers.layer0.profile import CHANGED, CREATED, MAX_DATAGRAM, handshake_tag
from coaplayers.oscore import OscoreParameters, Role, derive_context

PSK_IDENTITY = b"fuzz-device"
PSK_KEY = b"fuzz-psk-key-16b"
SERVER_NAME = "server.fuzz"
L0_CONFIG = DtlsConfig(mtu=MAX_DATAGRAM)


@dataclass(frozen=True)
class Certs:
    server: CertificateCredentials
    client: CertificateCredentials


@cache
def certs() -> Certs:
    ca = pki.make_ca("fuzz CA")
    server = pki.issue(ca, SERVER_NAME, names=[SERVER_NAME])
    client = pki.issue(ca, "fuzz-client")
    return Certs(
        CertificateCredentials([server.certificate], server.private_key, [ca.certificate]),
        CertificateCredentials([client.certificate], client.private_key, [ca.certificate],
                               server_name=SERVER_NAME),
    )


@cache
def _client_context():  # type: ignore[no-untyped-def]
    return build_context(certs().client, server=False)


def psk_client(config: DtlsConfig | None = None) -> TinyDtlsSession:
    return TinyDtlsSession.client(PskClientCredentials(PSK_IDENTITY, PSK_KEY), config)


def psk_listener(config: DtlsConfig | None = None) -> TinyDtlsListener:
    return TinyDtlsListener(PskStore({PSK_IDENTITY: PSK_KEY}), config)


def cert_client(config: DtlsConfig | None = None) -> OpenSslSession:
    return OpenSslSession.client(_client_context(), certs().client, config)


def cert_listener(config: DtlsConfig | None = None) -> OpenSslListener:
    return OpenSslListener(certs().server, config)


BACKENDS = {
    "tinydtls": (psk_client, psk_listener),
    "openssl": (cert_client, cert_listener),
}


def first_flight(client: DtlsSession) -> bytes:
    client.connect(0.0)
    (hello,) = client.datagrams_to_send()
    return hello


def cookie_exchange(client: DtlsSession, listener, peer_key) -> tuple[bytes, bytes, bytes]:  # type: ignore[no-untyped-def]
    """(ClientHello, HelloVerifyRequest, ClientHello with the listener's cookie)."""
    hello = first_flight(client)
    replies, session = listener.accept(peer_key, hello, 0.0)
    assert session is None and len(replies) == 1
    client.receive_datagram(replies[0], 0.0)
    (again,) = client.datagrams_to_send()
    return hello, replies[0], again


def drain(session: DtlsSession) -> list[object]:
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


def tunnel_handshake(core: Layer0ServerCore, client: DtlsSession, peer_key=("coap", "p")) -> str:  # type: ignore[no-untyped-def]
    """Run a Layer 0 handshake through the sans-I/O core, as the client shell would."""
    client.connect(0.0)
    sid: str | None = None
    tag = b""
    for _ in range(40):
        if client.is_established and sid is not None:
            break
        out = client.datagrams_to_send()
        if not out:
            raise AssertionError("handshake stalled")
        for datagram in out:
            if sid is None:
                answer = core.entry(peer_key, datagram, 0.0)
                if answer.code == CREATED:
                    assert answer.location is not None
                    sid = answer.location[-1]
                    tag = handshake_tag(answer.payload) or b""
            else:
                answer, _ = core.datagram(sid, tag + datagram, 0.0)
            assert answer.code in (CREATED, CHANGED), answer
            if answer.payload:
                client.receive_datagram(answer.payload, 0.0)
            while sid is not None and (more := core.datagram(sid, tag, 0.0)[0]).payload:
                client.receive_datagram(more.payload, 0.0)
    assert client.is_established and sid is not None
    drain(client)
    return sid


# ---------------------------------------------------------------------------- OSCORE

EXPORTER = bytes(range(32))
PARAMS = OscoreParameters(client_id=b"\x01", server_id=b"")


def oscore_pair():  # type: ignore[no-untyped-def]
    """A fresh client and server context that share keys (as after a Layer 0 handshake)."""
    return (derive_context(EXPORTER, PARAMS, Role.CLIENT, peer="fuzz-server"),
            derive_context(EXPORTER, PARAMS, Role.SERVER, peer="fuzz-client"))


def protected_request(client_ctx, code: Code = Code.POST, path=("echo",),  # type: ignore[no-untyped-def]
                      payload: bytes = b"hello") -> tuple[Message, object]:
    request = Message(code=code, uri_path=list(path), payload=payload)
    request.direction = Direction.OUTGOING
    protected, request_id = client_ctx.protect(request)
    return protected, request_id


def wire(message: Message, mid: int = 0x1234, token: bytes = b"\x07") -> bytes:
    import aiocoap

    message = message.copy()
    message.mtype = aiocoap.CON
    message.mid = mid
    message.token = token
    return bytes(message.encode())
