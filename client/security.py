"""coap-client's credentials, built from the configuration (loads the DTLS engines)."""

from __future__ import annotations

import urllib.parse
from typing import Any

from coaplayers import dtls, layer1
from coaplayers.layer0_modes import Layer0ClientOptions
from coaplayers.programs import config as cfg

from .main import RunState
from .options import LAYER0_KINDS, ClientConfig, Layer1Settings

_LAYER0_FIELDS = {"e2e_rpk_key": "rpk_key", "e2e_rpk_server_key": "rpk_server_keys",
               "e2e_psk_identity": "psk_identity", "e2e_psk": "psk", "e2e_ca": "ca",
               "e2e_cert": "cert", "e2e_key": "key"}


def layer1_credentials(hop: Layer1Settings) -> layer1.ClientCredentials:
    creds = (
        layer1.ClientCredentials.from_file(hop.credentials)
        if hop.credentials else layer1.ClientCredentials()
    )
    rpk = cfg.raw_public_key_from(hop.rpk_key, hop.rpk_server_keys, key_flag="--rpk-key",
                                  trust_flag="--rpk-server-key", peer="server")
    if rpk is not None and (hop.identity is not None or hop.cert or hop.ca):
        raise dtls.ConfigurationError(
            "--rpk-key names the Layer 1 credentials already; -u/-k or --cert/--ca would be"
            " ignored: give one kind (or several, per URI, in --credentials)"
        )
    if rpk is not None:
        creds.add_raw_public_key("coaps://*", rpk)
    elif hop.identity is not None and hop.psk_key is not None:
        creds.add_psk("coaps://*", hop.identity.encode(), dtls.parse_key_text(hop.psk_key))
    elif hop.cert or hop.ca:
        if hop.cert:
            cc = cfg.certificate_from(hop.cert, hop.cert_key, hop.ca)
        else:
            assert hop.ca is not None  # the condition above
            cc = dtls.CertificateCredentials.trust_only(hop.ca)
        assert cc is not None
        creds.add_certificate("coaps://*", cc)
    return creds


def _given(config: ClientConfig) -> list[str]:
    e2e = config.layer0
    return [k for k, dests in LAYER0_KINDS.items()
            if any(getattr(e2e, _LAYER0_FIELDS[d]) for d in dests)]


def choose_e2e_kind(config: ClientConfig) -> str | None:
    """The one credential kind the handshake uses (see --help)."""
    e2e = config.layer0
    given = _given(config)
    if e2e.auth is not None:
        if e2e.auth not in given:
            flags = "/".join("--" + d.replace("_", "-") for d in LAYER0_KINDS[e2e.auth])
            raise dtls.ConfigurationError(f"--e2e-auth {e2e.auth} needs {flags}")
        return e2e.auth
    preferred = [k for k in e2e.kinds_on_command_line if k in given]
    return (preferred or given)[0] if preferred or given else None


def e2e_options(config: ClientConfig, state: RunState) -> Layer0ClientOptions | None:
    """The end-to-end mode and the one credential kind its handshakes use.

    Every kind given is built (and so checked) even if another one is used: a mistake in a
    configuration is reported where it is, not when that kind is first picked.
    """
    e2e = config.layer0
    if e2e.mode is None:
        if _given(config) or e2e.auth:
            raise dtls.ConfigurationError(
                "end-to-end credentials given without --layer0 dtls|oscore")
        return None
    kind = choose_e2e_kind(config)
    rpk = cfg.raw_public_key_from(
        e2e.rpk_key, e2e.rpk_server_keys, trust_flag="--e2e-rpk-server-key", peer="server",
    )
    state.e2e_kind = kind
    state.e2e_rpk_fingerprint = rpk.fingerprint if rpk is not None else None
    psk = None
    if e2e.psk_identity or e2e.psk:
        if not (e2e.psk_identity and e2e.psk):
            raise dtls.ConfigurationError("--e2e-psk-identity and --e2e-psk go together")
        psk = dtls.PskClientCredentials(e2e.psk_identity.encode(), dtls.parse_key_text(e2e.psk))
    cert = None
    # The end server must prove it is the host the URI names, not just any holder of a
    # certificate from the same CA: otherwise a proxy could redirect us to another server.
    server_name = urllib.parse.urlsplit(config.uri).hostname
    if e2e.cert or e2e.key:
        cert = cfg.certificate_from(e2e.cert, e2e.key, e2e.ca, what="e2e-",
                                    server_name=server_name)
    elif e2e.ca:
        cert = dtls.CertificateCredentials.trust_only(e2e.ca, server_name=server_name)
    if kind is None:
        raise dtls.ConfigurationError(
            "--layer0 needs --e2e-psk-identity/--e2e-psk, --e2e-ca (with --e2e-cert/--e2e-key)"
            " or --e2e-rpk-key/--e2e-rpk-server-key"
        )
    return Layer0ClientOptions(
        mode=e2e.mode,
        psk=psk if kind == "psk" else None,
        certificate=cert if kind == "cert" else None,
        raw_public_key=rpk if kind == "rpk" else None,
    )


def check_layers_apart(creds: Any, e2e: Layer0ClientOptions | None) -> None:
    if e2e is None or e2e.raw_public_key is None or creds is None:
        return
    for hop in creds.raw_public_keys():
        cfg.check_layers_apart(hop, e2e.raw_public_key,
                               hop_flags=("--rpk-key", "--rpk-server-key"),
                               e2e_flags=("--e2e-rpk-key", "--e2e-rpk-server-key"))
