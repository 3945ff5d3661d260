"""Both engine backends behind one factory, so that each behaviour is tested on both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from coaplayers import pki
from coaplayers.dtls import (
    CertificateCredentials,
    DtlsConfig,
    DtlsSession,
    Listener,
    OpenSslListener,
    OpenSslSession,
    PskClientCredentials,
    PskStore,
    TinyDtlsListener,
    TinyDtlsSession,
    build_context,
)

from .harness import Network

PSK_IDENTITY = b"device-7"
PSK_KEY = b"0123456789abcdef"
SERVER_NAME = "server.example"
CLIENT_CN = "device-7"


@dataclass
class Pki:
    ca: pki.Issued
    other_ca: pki.Issued
    server: pki.Issued
    client: pki.Issued

    def server_credentials(self, **kw: Any) -> CertificateCredentials:
        return CertificateCredentials(
            [self.server.certificate], self.server.private_key, [self.ca.certificate], **kw
        )

    def client_credentials(self, **kw: Any) -> CertificateCredentials:
        kw.setdefault("server_name", SERVER_NAME)
        kw.setdefault("trusted", [self.ca.certificate])
        return CertificateCredentials([self.client.certificate], self.client.private_key, **kw)


@pytest.fixture(scope="session")
def certs() -> Pki:
    ca = pki.make_ca("coaplayers test CA")
    return Pki(
        ca=ca,
        other_ca=pki.make_ca("some other CA"),
        server=pki.issue(ca, SERVER_NAME, names=[SERVER_NAME, "127.0.0.1"]),
        client=pki.issue(ca, CLIENT_CN),
    )


@dataclass
class Backend:
    """How to build a client and a listener of one backend, and what a handshake reports."""

    name: str
    new_client: Callable[..., DtlsSession]
    new_listener: Callable[..., Listener]
    identity_seen_by_client: bytes | str
    identity_seen_by_server: bytes | str
    cipher_suite: str

    def network(self, config: DtlsConfig | None = None, **kw: Any) -> Network:
        config = config or DtlsConfig()
        return Network(self.new_client(config), self.new_listener(config), **kw)


def tinydtls_backend() -> Backend:
    def new_client(config: DtlsConfig, key: bytes = PSK_KEY, identity: bytes = PSK_IDENTITY):
        return TinyDtlsSession.client(PskClientCredentials(identity, key), config)

    def new_listener(config: DtlsConfig):
        return TinyDtlsListener(PskStore({PSK_IDENTITY: PSK_KEY, b"other": b"other key"}), config)

    return Backend(
        "tinydtls", new_client, new_listener, PSK_IDENTITY, PSK_IDENTITY,
        "TLS_PSK_WITH_AES_128_CCM_8",
    )


def openssl_backend(certs: Pki) -> Backend:
    client_creds = certs.client_credentials()
    client_ctx = build_context(client_creds, server=False)

    def new_client(config: DtlsConfig, resume=None):  # type: ignore[no-untyped-def]
        return OpenSslSession.client(client_ctx, client_creds, config, resume=resume)

    def new_listener(config: DtlsConfig):
        return OpenSslListener(certs.server_credentials(), config)

    return Backend(
        "openssl", new_client, new_listener, SERVER_NAME, CLIENT_CN, "ECDHE-ECDSA-AES128-CCM8"
    )


@pytest.fixture(scope="session")
def openssl(certs: Pki) -> Backend:
    return openssl_backend(certs)


@pytest.fixture(scope="session")
def tinydtls() -> Backend:
    return tinydtls_backend()


@pytest.fixture(params=["tinydtls", "openssl"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue(request.param)
