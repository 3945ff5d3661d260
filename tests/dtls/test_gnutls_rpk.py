"""The GnuTLS backend: raw public keys (RFC 7250) with pinning, in memory, hand-driven time.

The engine-level tests written for the other backends run here too, against GnuTLS (this
module's ``backend`` fixture overrides conftest's), followed by what is specific to raw
public keys: pinning on both sides, the exporter, the cookie, replay and the handshake size.
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import os
import resource
from pathlib import Path

import pytest
from cffi import FFI
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coaplayers.dtls import (
    AlertReceived,
    AuthenticationFailed,
    ConfigurationError,
    ConnectionClosed,
    DtlsConfig,
    DtlsError,
    State,
    records,
)
from coaplayers.dtls.credentials import RawPublicKeyCredentials, spki_der
from coaplayers.dtls.gnutls import (
    CIPHER_SUITE,
    GnuTlsListener,
    GnuTlsSession,
    RawPublicKeyContext,
)
from coaplayers.dtls.gnutls import _ffi as gnutls_ffi

from ..conftest import fingerprint
from .conftest import Backend
from .harness import CLIENT, SERVER, Network
from .test_cookie import (  # noqa: F401  - collected here again, with the GnuTLS backend
    test_cookieless_client_hellos_keep_no_state,
)
from .test_failures import (  # noqa: F401
    test_client_vanishing_after_the_cookie_frees_the_server_session,
    test_silent_peer_times_out_at_the_configured_time,
)
from .test_handshake import (  # noqa: F401
    test_abort_reports_the_given_error_and_frees_the_session,
    test_clean_handshake_events_and_data,
    test_close_notify_reaches_the_other_side,
    test_every_datagram_fits_the_mtu,
    test_handshake_complete_is_reported_once_under_duplication,
    test_handshake_converges_on_a_bad_network,
    test_lost_final_flight_is_repeated_when_the_peer_retransmits,
    test_oversized_send_raises_and_keeps_the_session,
    test_retransmission_backs_off_exponentially,
)
from .test_malformed import (  # noqa: F401
    test_forged_plaintext_alert_ends_a_handshake_only_in_progress,
    test_garbage_during_the_handshake_does_not_break_it,
    test_garbage_never_disturbs_established_sessions,
    test_garbage_to_the_listener_never_raises_or_keeps_state,
)

HANDSHAKE_BUDGET = 1300  # the product target for a Layer 0 handshake, cookie exchange included


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


CLIENT_KEY = new_key()
SERVER_KEY = new_key()
STRANGER_KEY = new_key()


def client_credentials(**kw) -> RawPublicKeyCredentials:  # type: ignore[no-untyped-def]
    kw.setdefault("trusted", [SERVER_KEY.public_key()])
    return RawPublicKeyCredentials(kw.pop("key", CLIENT_KEY), **kw)


def server_credentials(**kw) -> RawPublicKeyCredentials:  # type: ignore[no-untyped-def]
    kw.setdefault("trusted", [spki_der(CLIENT_KEY.public_key())])  # DER works as well
    return RawPublicKeyCredentials(kw.pop("key", SERVER_KEY), **kw)


@pytest.fixture(scope="module")
def backend() -> Backend:
    client_creds = client_credentials()

    def new_client(config: DtlsConfig) -> GnuTlsSession:
        return GnuTlsSession.client(client_creds, config)

    def new_listener(config: DtlsConfig) -> GnuTlsListener:
        return GnuTlsListener(server_credentials(), config)

    return Backend(
        "gnutls", new_client, new_listener, fingerprint(SERVER_KEY), fingerprint(CLIENT_KEY),
        CIPHER_SUITE,
    )


def network(client: RawPublicKeyCredentials | None = None,
            server: RawPublicKeyCredentials | None = None, **kw) -> Network:  # type: ignore[no-untyped-def]
    config = kw.pop("config", DtlsConfig())
    return Network(
        GnuTlsSession.client(client or client_credentials(), config),
        GnuTlsListener(server or server_credentials(), config),
        **kw,
    )


def closed_error(net: Network, side: str) -> DtlsError:
    event = net.closed_event(side)
    assert event is not None, f"{side} is still {getattr(net, side).state}"
    assert event.error is not None
    return event.error


def flights(net: Network) -> list[tuple[str, int]]:
    """(sender, bytes) per flight: consecutive datagrams of one sender."""
    out: list[tuple[str, int]] = []
    for sent in net.sent:
        if out and out[-1][0] == sent.sender:
            out[-1] = (sent.sender, out[-1][1] + len(sent.data))
        else:
            out.append((sent.sender, len(sent.data)))
    return out


# ---------------------------------------------------------------------- handshake and data


def test_mutual_handshake_names_both_keys_and_carries_data_both_ways() -> None:
    net = network()
    net.handshake()
    assert net.both_established()
    assert net.now == 0.0 and net.timer_wakeups == {CLIENT: 0, SERVER: 0}
    client_done = net.handshake_complete(CLIENT)
    server_done = net.handshake_complete(SERVER)
    assert client_done.peer_identity == fingerprint(SERVER_KEY)
    assert server_done.peer_identity == fingerprint(CLIENT_KEY)
    assert len(client_done.peer_identity) == 32 and client_done.peer_identity != (
        server_done.peer_identity
    )
    assert client_done.cipher_suite == server_done.cipher_suite == CIPHER_SUITE
    assert net.client.peer_public_key == spki_der(SERVER_KEY.public_key())  # type: ignore[attr-defined]
    for i in range(3):
        net.client_send(b"up %d" % i)
        net.server_send(b"down %d" % i)
    net.settle()
    assert net.received(SERVER) == [b"up 0", b"up 1", b"up 2"]
    assert net.received(CLIENT) == [b"down 0", b"down 1", b"down 2"]


def test_handshake_fits_the_budget_with_and_without_the_cookie_exchange() -> None:
    net = network()
    net.handshake()
    per_flight = flights(net)
    senders = [who for who, _ in per_flight]
    assert senders == [CLIENT, SERVER, CLIENT, SERVER, CLIENT, SERVER]
    total = net.bytes_sent()
    assert total == sum(n for _, n in per_flight)
    assert total < HANDSHAKE_BUDGET, per_flight
    assert per_flight[1][1] < 64  # the HelloVerifyRequest
    without_cookie = total - per_flight[0][1] - per_flight[1][1]
    assert without_cookie < 1050, per_flight
    # the server's flight carries its key, not a certificate (a P-256 SPKI is 91 bytes)
    assert per_flight[3][1] < 480


def keep_gnutls_on(side: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions of ``side`` ("client" or "server") keep GnuTLS's record layer after the
    handshake, so that the engine's own (the other side's) is checked against GnuTLS's."""
    hand_over = GnuTlsSession._hand_over

    def selective(self: GnuTlsSession) -> None:
        if self.is_client != (side == "client"):
            hand_over(self)

    monkeypatch.setattr(GnuTlsSession, "_hand_over", selective)


def test_exporter_is_equal_on_both_sides_and_is_rfc5705(monkeypatch: pytest.MonkeyPatch) -> None:
    keep_gnutls_on("client", monkeypatch)  # the client's exporter is GnuTLS's, the server's ours
    net = network()
    net.handshake()
    assert net.client._records is None and net.server._records is not None  # type: ignore[union-attr]
    for label, length, context in [(b"EXPORTER-test", 32, None), (b"atls-oscore", 48, b""),
                                   (b"atls-oscore", 16, b"ctx")]:
        ours = net.client.export_keying_material(label, length, context)
        theirs = net.server.export_keying_material(label, length, context)  # type: ignore[union-attr]
        assert ours == theirs and len(ours) == length
    client = net.client
    assert client.export_keying_material(b"a", 16) != client.export_keying_material(b"b", 16)
    # an independent computation from the master secret (RFC 5705 over the TLS 1.2 PRF)
    master, randoms = master_secret_and_randoms(net.client)
    assert prf(master, b"atls-oscore", randoms, 32) == net.client.export_keying_material(
        b"atls-oscore", 32
    )
    assert prf(master, b"atls-oscore", randoms + b"\0\3ctx", 16) == (
        net.client.export_keying_material(b"atls-oscore", 16, b"ctx")
    )
    # different sessions, different keys
    other = network()
    other.handshake()
    assert other.client.export_keying_material(b"x", 32) != net.client.export_keying_material(
        b"x", 32
    )


def master_secret_and_randoms(session: object) -> tuple[bytes, bytes]:
    ffi = FFI()
    ffi.cdef("""
        typedef struct { unsigned char *data; unsigned int size; } gnutls_datum_t;
        void gnutls_session_get_master_secret(void *session, gnutls_datum_t *secret);
        void gnutls_session_get_random(void *session, gnutls_datum_t *c, gnutls_datum_t *s);
    """)
    lib = ffi.dlopen("libgnutls.so.30")
    s = ffi.cast("void *", int(gnutls_ffi.cast("uintptr_t", session._s)))  # type: ignore[attr-defined]
    secret, cr, sr = (ffi.new("gnutls_datum_t *") for _ in range(3))
    lib.gnutls_session_get_master_secret(s, secret)
    lib.gnutls_session_get_random(s, cr, sr)
    master = bytes(ffi.buffer(secret.data, secret.size))
    return master, bytes(ffi.buffer(cr.data, cr.size)) + bytes(ffi.buffer(sr.data, sr.size))


def prf(secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    seed = label + seed
    out, a = b"", seed
    while len(out) < length:
        a = hmac.new(secret, a, hashlib.sha256).digest()
        out += hmac.new(secret, a + seed, hashlib.sha256).digest()
    return out[:length]


def test_exporter_before_the_handshake_raises() -> None:
    net = network()
    with pytest.raises(DtlsError):
        net.client.export_keying_material(b"x", 16)


# -------------------------------------------------------------------------------- pinning


def test_untrusted_client_key_is_refused_by_the_server() -> None:
    net = network(client=client_credentials(key=STRANGER_KEY))
    net.handshake()
    server_error = closed_error(net, SERVER)
    assert isinstance(server_error, AuthenticationFailed)
    assert fingerprint(STRANGER_KEY) in str(server_error) and "client" in str(server_error)
    # the client hears a fatal alert at once, rather than timing out
    client_error = closed_error(net, CLIENT)
    assert isinstance(client_error, AuthenticationFailed), client_error
    assert net.now == 0.0
    assert net.client.state is State.CLOSED and net.server.state is State.CLOSED  # type: ignore[union-attr]
    assert net.server.get_timer() is None and net.client.get_timer() is None  # type: ignore[union-attr]


def test_untrusted_server_key_is_refused_by_the_client() -> None:
    net = network(server=server_credentials(key=STRANGER_KEY))
    net.handshake()
    client_error = closed_error(net, CLIENT)
    assert isinstance(client_error, AuthenticationFailed)
    assert fingerprint(STRANGER_KEY) in str(client_error) and "server" in str(client_error)
    # refused before the client sent its own key, signature or Finished
    client_flights = [s for s in net.sent if s.sender == CLIENT]
    assert all(
        records.content_type(r) in (records.CONTENT_HANDSHAKE, records.CONTENT_ALERT)
        for s in client_flights for r in records.split_records(s.data)
    )
    assert records.content_type(records.split_records(client_flights[-1].data)[-1]) == (
        records.CONTENT_ALERT
    )
    server_error = closed_error(net, SERVER)
    assert isinstance(server_error, AuthenticationFailed), server_error
    assert net.now == 0.0


def test_server_without_client_pinning_accepts_any_client_when_not_required() -> None:
    net = network(client=client_credentials(key=STRANGER_KEY),
                  server=server_credentials(trusted=[], require_peer=False))
    net.handshake()
    assert net.both_established()
    assert net.handshake_complete(SERVER).peer_identity is None
    # ... and it did not even ask for a key: no CertificateRequest, no client Certificate
    assert net.bytes_sent() < 1000


def test_credentials_refuse_keys_other_than_p256() -> None:
    with pytest.raises(ConfigurationError, match="P-256"):
        RawPublicKeyCredentials(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ConfigurationError):
        RawPublicKeyCredentials(CLIENT_KEY, [b"not a key"])
    assert "PRIVATE" not in repr(client_credentials()) and fingerprint(CLIENT_KEY) in repr(
        client_credentials()
    )


def test_credentials_from_files(tmp_path: Path) -> None:
    key_file = tmp_path / "client.key"
    key_file.write_bytes(CLIENT_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    os.chmod(key_file, 0o600)
    pub = tmp_path / "servers.pub"
    pub.write_bytes(b"".join(
        k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ) for k in (STRANGER_KEY, SERVER_KEY)
    ))
    creds = RawPublicKeyCredentials.from_files(key_file, pub)
    assert creds.trusted_keys == {spki_der(SERVER_KEY.public_key()),
                                  spki_der(STRANGER_KEY.public_key())}
    assert creds.fingerprint == fingerprint(CLIENT_KEY)
    net = network(client=creds)
    net.handshake()
    assert net.both_established()
    with pytest.raises(ConfigurationError, match="PUBLIC KEY"):
        RawPublicKeyCredentials.from_files(key_file, key_file)


# ---------------------------------------------------------------------- cookie, loss, replay


def first_client_hello() -> bytes:
    client = GnuTlsSession.client(client_credentials())
    client.connect(0.0)
    (hello,) = client.datagrams_to_send()
    client.abort()
    return hello


def test_no_cookie_and_a_wrong_cookie_get_a_hello_verify_request_and_no_state() -> None:
    listener = GnuTlsListener(server_credentials())
    client = GnuTlsSession.client(client_credentials())
    client.connect(0.0)
    (hello,) = client.datagrams_to_send()
    replies, session = listener.accept("peer", hello, 0.0)
    assert session is None
    (hvr,) = replies
    assert records.handshake_type(records.split_records(hvr)[0]) == (
        records.HANDSHAKE_HELLO_VERIFY_REQUEST
    )
    client.receive_datagram(hvr, 0.0)
    (with_cookie,) = client.datagrams_to_send()
    # the same ClientHello with one cookie byte changed
    at = records.HEADER_LEN + 12 + 2 + 32
    cookie_at = at + 1 + with_cookie[at] + 1
    assert with_cookie[cookie_at - 1] > 0  # it has a cookie
    forged = bytearray(with_cookie)
    forged[cookie_at] ^= 1
    replies, session = listener.accept("peer", bytes(forged), 0.0)
    assert session is None and len(replies) == 1
    # the right cookie from another peer address opens nothing either
    replies, session = listener.accept("elsewhere", with_cookie, 0.0)
    assert session is None and len(replies) == 1
    # a different listener (another secret) does not accept it
    replies, session = GnuTlsListener(server_credentials()).accept("peer", with_cookie, 0.0)
    assert session is None
    # not a ClientHello at all: no answer
    assert listener.accept("peer", b"\x17\xfe\xfd" + bytes(10) + b"\0\0", 0.0) == ([], None)
    # the genuine one from the genuine peer does
    replies, session = listener.accept("peer", with_cookie, 0.0)
    assert replies == [] and session is not None
    assert session.state is State.HANDSHAKING
    assert session.datagrams_to_send()  # its flight
    session.abort()
    client.abort()


def test_retransmission_when_one_server_flight_is_lost() -> None:
    dropped: list[bytes] = []

    def drop(sender: str, data: bytes) -> bool:
        # lose the server's first real flight (ServerHello .. ServerHelloDone), once
        first = records.split_records(data)[0]
        if sender == SERVER and not dropped and records.handshake_type(first) == (
            records.HANDSHAKE_SERVER_HELLO
        ):
            dropped.append(data)
            return True
        return False

    net = network(drop=drop)
    net.handshake()
    assert dropped and net.both_established()
    assert net.now == 1.0  # one initial retransmission timeout
    # exactly one repeat of that flight: GnuTLS's own answer to the repeated ClientHello
    # was dropped, only the engine's timer repeated it
    server_hellos = [s for s in net.sent if s.sender == SERVER
                     and records.handshake_type(records.split_records(s.data)[0])
                     == records.HANDSHAKE_SERVER_HELLO]
    assert len(server_hellos) == 2
    assert len([s for s in net.sent if s.sender == CLIENT]) == 4  # CH, CH+cookie (twice), flight 5
    net.client_send(b"after loss")
    net.settle()
    assert net.received(SERVER) == [b"after loss"]


def test_retransmission_when_the_clients_key_flight_is_lost() -> None:
    lost = []

    def drop(sender: str, data: bytes) -> bool:
        if sender == CLIENT and not lost and any(
            records.epoch(r) == 1 for r in records.split_records(data)
        ):
            lost.append(data)
            return True
        return False

    net = network(drop=drop)
    net.handshake()
    assert lost and net.both_established()
    assert net.now == 1.0
    assert net.client.export_keying_material(b"k", 16) == net.server.export_keying_material(  # type: ignore[union-attr]
        b"k", 16
    )


def test_replayed_record_is_dropped() -> None:
    net = network()
    net.handshake()
    net.client_send(b"pay once")
    (record_datagram,) = [d for _, d in net.in_flight]
    net.settle()
    assert net.received(SERVER) == [b"pay once"]
    net.inject(CLIENT, record_datagram)
    net.settle()
    assert net.received(SERVER) == [b"pay once"]  # not twice
    # an altered record is dropped as well, and the session goes on
    altered = bytearray(record_datagram)
    altered[-1] ^= 0x40
    net.inject(CLIENT, bytes(altered))
    net.settle()
    assert net.received(SERVER) == [b"pay once"]
    assert net.server is not None and net.server.is_established
    net.client_send(b"next")
    net.settle()
    assert net.received(SERVER) == [b"pay once", b"next"]


def test_early_application_data_waits_for_the_handshake() -> None:
    """The server's first record overtakes its Finished: the client reads it once done."""
    captured: list[bytes] = []

    def capture(sender: str, data: bytes) -> bool:
        if sender == SERVER and not captured and any(
            records.epoch(r) == 1 for r in records.split_records(data)
        ):
            captured.append(data)  # the server's ChangeCipherSpec + Finished, held back
            return True
        return False

    net = network(drop=capture)
    net.start()
    net.run(until=lambda: bool(captured))
    assert net.server is not None and net.server.is_established
    assert net.client.state is State.HANDSHAKING
    net.server_send(b"early")
    net.settle()  # the data arrives first; time does not move
    assert net.received(CLIENT) == [] and net.client.state is State.HANDSHAKING
    net.inject(SERVER, captured[0])
    net.settle()
    assert net.client.is_established
    assert net.received(CLIENT) == [b"early"]


# ------------------------------------------------------------------------------- resources


def test_thousands_of_sessions_leak_nothing() -> None:
    listener = GnuTlsListener(server_credentials())
    from coaplayers.dtls.gnutls import RawPublicKeyContext

    context = RawPublicKeyContext(client_credentials(), server=False)

    def round_trips(n: int) -> None:
        for i in range(n):
            net = Network(GnuTlsSession.client(context), listener, peer_key=("::1", i))
            net.handshake()
            assert net.both_established()
            net.client_send(b"x")
            net.settle()
            if i % 2:
                net.client.close()
            else:
                net.client.abort()
                net.server.abort()  # type: ignore[union-attr]
            net._collect()
            net.settle()
            assert net.client.is_closed and net.server.is_closed  # type: ignore[union-attr]
            assert net.client._s is None and net.server._s is None  # type: ignore[union-attr]

    round_trips(200)  # warm up
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    round_trips(1500)
    gc.collect()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 8 * 1024, f"max RSS grew {grown_kib} KiB over 1,500 sessions"


@pytest.mark.parametrize("kept", ["client", "server"])
def test_engine_record_layer_and_gnutls_records_interoperate(
    kept: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the handshake one side protects records with GnuTLS, the other with the engine's
    own record layer (which frees GnuTLS): data, replays and close_notify both ways."""
    keep_gnutls_on(kept, monkeypatch)
    net = network()
    net.handshake()
    handed = net.server if kept == "client" else net.client
    assert handed._records is not None and handed._s is None  # type: ignore[union-attr]
    for i in range(20):
        net.client_send(b"up %d" % i)
        net.server_send(b"down %d" % i)
    net.settle()
    assert net.received(SERVER) == [b"up %d" % i for i in range(20)]
    assert net.received(CLIENT) == [b"down %d" % i for i in range(20)]
    net.client.close()
    net._collect()
    net.settle()
    assert AlertReceived(1, 0) in net.events_of(SERVER, AlertReceived)  # close_notify
    assert net.closed_event(SERVER) == ConnectionClosed(None)


# ---------------------------------------------------------------------- ALPN (RFC 7301)


@pytest.mark.parametrize(("offer", "agrees", "agreed"), [
    (b"atls-oscore", {b"other", b"atls-oscore"}, b"atls-oscore"),
    (b"atls-oscore", {b"other"}, None),  # no overlap: the handshake goes on without ALPN
    (None, {b"atls-oscore"}, None),
    (b"atls-oscore", set(), None),  # a listener that agrees to nothing ignores the offer
])
def test_alpn_offer_and_choice_are_recorded_on_both_sessions(
    offer: bytes | None, agrees: set[bytes], agreed: bytes | None
) -> None:
    listener = GnuTlsListener(server_credentials())
    listener.alpn = frozenset(agrees)
    net = Network(GnuTlsSession.client(client_credentials(), alpn=offer), listener)
    net.handshake()
    assert net.both_established()
    assert net.server is not None
    assert net.client.alpn == net.server.alpn == agreed  # type: ignore[attr-defined]


@pytest.mark.parametrize("protocols", [[b""], [b"x" * 33], [b"p%d" % i for i in range(9)]])
def test_alpn_protocols_beyond_gnutls_limits_are_refused(protocols: list[bytes]) -> None:
    creds = client_credentials()
    with pytest.raises(ConfigurationError, match="ALPN"):
        GnuTlsSession(RawPublicKeyContext(creds, server=False), is_client=True, config=None,
                      alpn=protocols)
    listener = GnuTlsListener(server_credentials())
    with pytest.raises(ConfigurationError, match="ALPN"):  # when set, not at each handshake
        listener.alpn = frozenset(protocols)
    assert listener.alpn == frozenset()
