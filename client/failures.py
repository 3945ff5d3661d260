"""coap-client's failures as one line each: what failed, at which hop, and the likely cause."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any

import aiocoap
import aiocoap.error

from coaplayers import dtls

from .main import (
    EXIT_CLIENT_ERROR,
    EXIT_OTHER,
    EXIT_SECURITY,
    EXIT_SERVER_ERROR,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    RunState,
)

if TYPE_CHECKING:
    from .options import ClientConfig

NO_ANSWER = "is the server (or proxy) running and reachable, and is the port right?"


class ObservationSilent(Exception):
    """An observation's notifications stopped and registering again found no answer."""


def no_answer_hint(config: ClientConfig | None) -> str:
    """Which hop to look at when nothing answered."""
    if config is not None and config.proxy:
        return (f"is the proxy {config.proxy} running and reachable, and is its port right? (the"
                " proxy answers for the server, so no answer at all is the first hop)")
    return NO_ANSWER


def gateway_hint(code: object, config: ClientConfig | None) -> str:
    """A proxy's 5.02/5.04 said the hop after it failed: name that hop, not the URI."""
    if config is None or not config.proxy:
        return ""
    if str(code).startswith("5.04"):
        return (f"the proxy {config.proxy} got no answer from the server of {config.uri}: is"
                " that server running and reachable from the proxy, and does it listen on the"
                " URI's scheme and port?")
    if str(code).startswith("5.02"):
        return (f"the proxy {config.proxy} could not use the server of {config.uri} (it"
                " refused the proxy, or answered nonsense): check that server and the proxy's"
                " upstream credentials")
    return ""


def classify(exc: BaseException, config: ClientConfig | None, state: RunState
             ) -> tuple[int, str]:
    """Exit status and one line naming what failed and the likely cause."""
    e2e_psk = config is not None and config.layer0.mode is not None and bool(config.layer0.psk)
    rpk = state.e2e_kind == "rpk"
    layer0 = sys.modules.get("coaplayers.layer0.errors")
    layer1 = sys.modules.get("coaplayers.layer1.transport")
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, dtls.ConfigurationError):
            return EXIT_USAGE, str(cause)
        if isinstance(cause, ObservationSilent):
            return EXIT_TIMEOUT, str(cause)
        if isinstance(cause, aiocoap.error.MalformedUrlError | aiocoap.error.IncompleteUrlError):
            return EXIT_USAGE, f"not a usable URI: {cause}"
        if layer1 is not None and isinstance(cause, layer1.Layer1Error):
            return _layer1(cause, config, state)
        if layer0 is not None:
            found = _layer0(layer0, cause, config, state, e2e_psk)
            if found is not None:
                return found
        if getattr(cause, "security_failure", False):
            return EXIT_SECURITY, str(cause)
        if isinstance(cause, dtls.AuthenticationFailed) and rpk:
            return EXIT_SECURITY, f"end-to-end security failure: {_rpk_hint(cause, state)}"
        if isinstance(cause, dtls.DtlsError):
            return EXIT_SECURITY, f"end-to-end security failure: {cause}"
        if isinstance(cause, TimeoutError | aiocoap.error.ConRetransmitsExceeded):
            return EXIT_TIMEOUT, f"no answer in time: {no_answer_hint(config)}"
        if isinstance(cause, aiocoap.error.ResolutionError):
            return EXIT_OTHER, f"cannot resolve the host: {cause}"
        if type(cause) is aiocoap.error.NetworkError:
            # On loopback and LANs an ICMP "port unreachable" ends the exchange at once.
            return EXIT_TIMEOUT, ("no answer: the network reported the peer unreachable; "
                                  f"{no_answer_hint(config)}")
        cause = cause.__cause__ or cause.__context__
    return EXIT_OTHER, f"{type(exc).__name__}: {exc}"


def _layer1(cause: Any, config: ClientConfig | None, state: RunState) -> tuple[int, str]:
    hop = "the proxy" if config is not None and config.proxy else "the server"
    if isinstance(cause.cause, dtls.NetworkUnreachable):
        if not cause.cause.refused:
            return EXIT_OTHER, f"Layer 1: {cause}; check the address and this host's routes"
        return EXIT_TIMEOUT, (f"Layer 1: {cause}; {hop} is not running there, or the port is"
                              " wrong")
    if (isinstance(cause.cause, dtls.HandshakeTimeout)
            and str(cause.cause).startswith("no DTLS answer")):
        return EXIT_TIMEOUT, f"Layer 1 ({hop}): {cause}"
    if isinstance(cause.cause, dtls.HandshakeTimeout | dtls.AuthenticationFailed |
                  dtls.PeerAlert):
        return EXIT_SECURITY, f"Layer 1 security failure: {_layer1_hint(cause, state)}"
    return EXIT_OTHER, f"Layer 1: {cause}"


def _layer0(l0: Any, cause: BaseException, config: ClientConfig | None, state: RunState,
            e2e_psk: bool
            ) -> tuple[int, str] | None:
    outer = re.match(r"unexpected outer answer ([45])\.(\d\d)", str(cause))
    if isinstance(cause, l0.HandshakeFailed) and outer:
        # A CoAP error on the way (typically a proxy's 5.04 or 5.02): not a key problem.
        code = (EXIT_TIMEOUT if outer.groups() == ("5", "04") else
                EXIT_CLIENT_ERROR if outer[1] == "4" else EXIT_SERVER_ERROR)
        gateway = gateway_hint(f"{outer[1]}.{outer[2]}", config)
        if gateway:
            return code, f"end-to-end handshake: {cause}; {gateway}"
        kinds = {"rpk": "raw-public-key", "cert": "certificate", "psk": "PSK"}
        kind = kinds.get(state.e2e_kind or "", "")
        maybe_kind = (
            f", or the server takes no {kind} credentials end to end (it cannot read our"
            " ClientHello)" if outer.groups() == ("4", "00") and kind else ""
        )
        return code, (
            f"end-to-end handshake: {cause}; the path (a proxy, or no Layer 0 server at"
            " that URI) answered instead of the server: check the target URI's scheme,"
            f" host and port{maybe_kind}"
        )
    if isinstance(cause, l0.HandshakeFailed) and not isinstance(cause.__cause__, dtls.DtlsError):
        hint = (
            "; with a PSK this is how a wrong --e2e-psk looks (the server silently drops"
            " what it cannot decrypt)" if e2e_psk and "key" not in str(cause) else ""
        )
        return EXIT_SECURITY, f"end-to-end security failure: {cause}{hint}"
    if isinstance(cause, l0.NoAnswer):  # not one CoAP answer to the handshake
        return EXIT_TIMEOUT, f"{cause}: {no_answer_hint(config)}"
    if isinstance(cause, l0.RecordRejected | l0.ResponseRejected):
        return EXIT_SECURITY, f"end-to-end security failure: {cause}"
    return None


def _layer1_hint(cause: Any, state: RunState) -> str:
    """A Layer 1 failure; a rejected raw public key is named by fingerprint, with the flags
    that trust it."""
    text = str(cause)
    creds = state.layer1_credentials
    alert = re.search(r"the server rejected our raw public key \((\w+)\).*", text)
    if creds is None or alert is None:
        return text
    try:
        hop = creds.for_uri(f"coaps://{cause.remote_hostinfo}/")
    except dtls.ConfigurationError:
        return text
    if not isinstance(hop, dtls.RawPublicKeyCredentials):
        return text
    return (f"{text[:alert.start()]}the server rejected our raw public key ({alert[1]}): is our"
            f" public key (fingerprint {hop.fingerprint}) among the keys the server trusts at"
            " Layer 1 (coap-server/coap-proxy --rpk-trust)?")


def _rpk_hint(cause: BaseException, state: RunState) -> str:
    """An authentication failure of a raw-public-key handshake, with the fingerprint and the
    flags involved."""
    text = str(cause)
    alert = re.search(r"the server rejected our raw public key \((\w+)\)", text)
    if alert:
        return (f"the server rejected our raw public key ({alert[1]}): is our public key"
                f" (fingerprint {state.e2e_rpk_fingerprint}, --e2e-rpk-key) among the keys the"
                " server trusts (coap-server --e2e-rpk-trust)?")
    if "is not one we trust" in text:
        return f"{text}: is --e2e-rpk-server-key the end server's public key?"
    if "presented no raw public key" in text:
        return (f"{text}: the end server does not take raw public keys (coap-server"
                " --e2e-rpk-key); use another --e2e-auth")
    return text


def exit_code(response: aiocoap.Message) -> int:
    if response.code.is_successful():
        return 0
    if response.code.class_ == 4:
        return EXIT_CLIENT_ERROR
    if response.code.class_ == 5:
        return EXIT_SERVER_ERROR
    return EXIT_OTHER
