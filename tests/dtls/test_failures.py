"""Handshakes that must fail: in bounded time, on both sides, with errors naming the cause."""

from __future__ import annotations

import pytest

from coaplayers.dtls import (
    AuthenticationFailed,
    CertificateCredentials,
    ConfigurationError,
    DtlsConfig,
    DtlsError,
    HandshakeTimeout,
    OpenSslListener,
    OpenSslSession,
    State,
    TinyDtlsListener,
    build_context,
)

from .conftest import SERVER_NAME, Backend, Pki, tinydtls_backend
from .harness import CLIENT, SERVER, Network


def closed_error(net: Network, side: str) -> DtlsError:
    event = net.closed_event(side)
    assert event is not None, f"{side} is still {getattr(net, side).state}"
    assert event.error is not None
    return event.error


def assert_no_timers_left(net: Network) -> None:
    for session in [net.client, *net.servers]:
        assert session.state is State.CLOSED
        assert session.get_timer() is None
    if isinstance(net.listener, TinyDtlsListener):
        assert net.listener.session_count == 0


# ----------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("timeout", [5.0, 30.0])
def test_silent_peer_times_out_at_the_configured_time(backend: Backend, timeout: float) -> None:
    net = backend.network(DtlsConfig(handshake_timeout=timeout))
    net.now = 100.0
    net.drop = lambda sender, _: sender == CLIENT  # the server never hears anything
    net.handshake()
    error = closed_error(net, CLIENT)
    assert isinstance(error, HandshakeTimeout)
    assert net.events[CLIENT][-1][0] == 100.0 + timeout  # closed exactly at the deadline
    assert "no DTLS answer" in str(error) and "unreachable" in str(error)
    assert f"{timeout:g} s" in str(error)
    assert net.server is None  # the listener never made a session
    assert net.client.get_timer() is None


def test_client_vanishing_after_the_cookie_frees_the_server_session(backend: Backend) -> None:
    net = backend.network(DtlsConfig(handshake_timeout=20.0))
    hellos = 0

    def drop(sender: str, _data: bytes) -> bool:
        nonlocal hellos
        if sender == CLIENT:
            hellos += 1
            return hellos > 2  # ClientHello and ClientHello with cookie, then nothing
        return False

    net.drop = drop
    net.handshake()
    assert net.server is not None
    server_error = closed_error(net, SERVER)
    assert isinstance(server_error, HandshakeTimeout)
    assert "although the peer answered" in str(server_error)
    created = next(s.time for s in net.sent if s.sender == SERVER and not s.stateless)
    assert net.events[SERVER][-1][0] == created + 20.0
    assert isinstance(closed_error(net, CLIENT), HandshakeTimeout)
    assert_no_timers_left(net)


def test_wrong_psk_times_out_and_names_a_wrong_key() -> None:
    backend = tinydtls_backend()
    config = DtlsConfig(handshake_timeout=12.0)
    net = Network(backend.new_client(config, key=b"not the key"), backend.new_listener(config))
    net.handshake()
    for side in (CLIENT, SERVER):
        error = closed_error(net, side)
        assert isinstance(error, HandshakeTimeout), (side, error)
        assert "wrong key" in str(error), str(error)
    assert net.events[CLIENT][-1][0] == 12.0
    assert net.events[SERVER][-1][0] == 12.0  # the server session was made at time 0
    assert_no_timers_left(net)


def test_unknown_psk_identity_fails_fast_on_both_sides() -> None:
    backend = tinydtls_backend()
    net = Network(
        backend.new_client(DtlsConfig(), identity=b"stranger"), backend.new_listener(DtlsConfig())
    )
    net.handshake()
    client_error = closed_error(net, CLIENT)
    server_error = closed_error(net, SERVER)
    assert isinstance(client_error, AuthenticationFailed)
    assert isinstance(server_error, AuthenticationFailed)
    assert "unknown PSK identity" in str(client_error)
    assert "unknown PSK identity" in str(server_error) and "stranger" in str(server_error)
    assert net.now == 0.0  # an alert, not a timeout
    assert_no_timers_left(net)


def test_psk_key_added_at_runtime_is_used() -> None:
    backend = tinydtls_backend()
    listener = backend.new_listener(DtlsConfig())
    assert isinstance(listener, TinyDtlsListener)
    listener.store.add(b"late-device", b"late key")
    net = Network(backend.new_client(DtlsConfig(), identity=b"late-device", key=b"late key"),
                  listener)
    net.handshake()
    assert net.both_established()
    assert net.handshake_complete(SERVER).peer_identity == b"late-device"


# ---------------------------------------------------------------------------- certificates


def cert_network(
    client_creds: CertificateCredentials, server_creds: CertificateCredentials
) -> Network:
    client = OpenSslSession.client(build_context(client_creds, server=False), client_creds)
    return Network(client, OpenSslListener(server_creds))


def assert_rejected(net: Network, client_says: str, server_says: str) -> None:
    net.handshake()
    client_error = closed_error(net, CLIENT)
    server_error = closed_error(net, SERVER)
    assert isinstance(client_error, AuthenticationFailed), client_error
    assert isinstance(server_error, AuthenticationFailed), server_error
    assert client_says in str(client_error), str(client_error)
    assert server_says in str(server_error), str(server_error)
    assert net.now == 0.0  # alerts, no waiting for a timeout
    assert_no_timers_left(net)


def test_client_does_not_trust_the_servers_ca(certs: Pki) -> None:
    net = cert_network(
        certs.client_credentials(trusted=[certs.other_ca.certificate]), certs.server_credentials()
    )
    assert_rejected(net, "server's certificate is not trusted", "client rejected our certificate")


def test_server_does_not_trust_the_clients_ca(certs: Pki) -> None:
    from coaplayers import pki

    intruder = pki.issue(certs.other_ca, "intruder")
    creds = CertificateCredentials(
        [intruder.certificate], intruder.private_key, [certs.ca.certificate],
        server_name=SERVER_NAME,
    )
    net = cert_network(creds, certs.server_credentials())
    assert_rejected(net, "server rejected our certificate", "client's certificate is not trusted")


def test_client_without_certificate_when_one_is_required(certs: Pki) -> None:
    creds = CertificateCredentials([], None, [certs.ca.certificate], server_name=SERVER_NAME)
    net = cert_network(creds, certs.server_credentials())
    assert_rejected(net, "requires a client certificate", "presented no certificate")


def test_client_without_certificate_when_none_is_required(certs: Pki) -> None:
    creds = CertificateCredentials([], None, [certs.ca.certificate], server_name=SERVER_NAME)
    net = cert_network(creds, certs.server_credentials(require_peer=False))
    net.handshake()
    assert net.both_established()
    assert net.handshake_complete(SERVER).peer_identity is None
    assert net.handshake_complete(CLIENT).peer_identity == SERVER_NAME


def test_server_without_certificate_is_a_configuration_error(certs: Pki) -> None:
    with pytest.raises(ConfigurationError, match="server needs a certificate"):
        OpenSslListener(CertificateCredentials([], None, [certs.ca.certificate]))


@pytest.mark.parametrize("name", ["wrong.example", "192.0.2.1"])
def test_wrong_server_name(certs: Pki, name: str) -> None:
    net = cert_network(certs.client_credentials(server_name=name), certs.server_credentials())
    assert_rejected(
        net, f"not for '{name}' (it names server.example, 127.0.0.1", "the name the client asked"
    )


@pytest.mark.parametrize("name", [SERVER_NAME, "127.0.0.1", "SERVER.example"])
def test_right_server_name_by_dns_or_ip(certs: Pki, name: str) -> None:
    net = cert_network(certs.client_credentials(server_name=name), certs.server_credentials())
    net.handshake()
    assert net.both_established()


@pytest.mark.parametrize("side", [CLIENT, SERVER])
def test_local_policy_refusal_ends_both_sides(certs: Pki, side: str) -> None:
    def refuse(_cert: object) -> bool:
        return False

    client_creds = certs.client_credentials(verify_peer=refuse if side == CLIENT else None)
    server_creds = certs.server_credentials(verify_peer=refuse if side == SERVER else None)
    net = cert_network(client_creds, server_creds)
    net.handshake()
    refuser = closed_error(net, side)
    other = closed_error(net, SERVER if side == CLIENT else CLIENT)
    assert isinstance(refuser, AuthenticationFailed) and "local policy" in str(refuser)
    assert isinstance(other, DtlsError)  # told by an alert, not left established
    assert net.now == 0.0
    assert_no_timers_left(net)
