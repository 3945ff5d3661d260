"""coap-client: reach a device or server over CoAP, with Layer 1 and end-to-end protection.

Flags follow libcoap's coap-client where libcoap has a flag for the same thing.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import urllib.parse
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code

from coaplayers import config as cfg
from coaplayers import dtls, layer1
from coaplayers.e2e import E2EClientOptions, PlainRequester, layer1_details, open_requester
from coaplayers.loglimit import LogLimits, install_log_limits

from . import output

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CLIENT_ERROR = 4  # 4.xx response
EXIT_SERVER_ERROR = 5  # 5.xx response
EXIT_TIMEOUT = 6  # no answer within -B, or the network gave up
EXIT_SECURITY = 7  # a handshake or authentication failed at either layer
EXIT_OTHER = 1

EPILOG = f"""\
examples:
  coap-client coap://[::1]/hello
  coap-client -u dev1 -k secret coaps://gateway.example/sensors/temperature -s 10
  coap-client -m post -e 'on' -t text/plain coaps://gateway.example/echo -u dev1 -k 0x736563
  coap-client -P coaps://proxy.example -u dev1 -k secret --e2e dtls \\
              --e2e-psk-identity dev1 --e2e-psk e2e-secret coap://app.example/hello
  coap-client -P coap://proxy.example --e2e oscore --e2e-ca ca.pem \\
              coap://app.example/firmware -o fw.bin
  coap-client --e2e dtls --e2e-rpk-key client-rpk.key --e2e-rpk-server-key server-rpk.pub \\
              coap://app.example/hello
  coap-client --rpk-key client-hop-rpk.key --rpk-server-key server-hop-rpk.pub \\
              coaps://gateway.example/hello

output: the payload on stdout (text as is, JSON pretty-printed, CBOR in diagnostic
notation; binary only to a file (-o) or a pipe, never to a terminal). -v adds the response
code, options and, per layer, the peer, mode and cipher suite on stderr. Block-wise downloads
show a progress bar on stderr when stderr is a terminal.

--config FILE.toml takes the long flag names as keys, and for short flags these names:
method text file content-format accept output observe timeout proxy verbose identity
psk-key (-k); "key" is --key. A flag on the command line wins over the file. End-to-end
credentials from the file are used only when --e2e (flag or file) picks a mode.

Layer 1 credentials: -u/-k (PSK), --cert/--key/--ca (certificates) or --rpk-key with
--rpk-server-key (raw public keys, RFC 7250) for every coaps:// first hop, or --credentials
FILE.json per URI pattern ("dtls", "dtls-cert", and "dtls-rpk": {{"key": "client.key",
"peer-keys": ["server.pub"]}}; file names relative to FILE.json). Layer 1 and end-to-end keys
are kept apart: the same raw public key at both layers is refused.

end-to-end credentials: a handshake uses one kind. --e2e-auth psk|cert|rpk names it; without
it, a kind given on the command line wins over the file's, and among several the order is
rpk (raw public keys, RFC 7250), psk, cert (--e2e oscore: rpk, cert; the PSK backend has no
exporter to key OSCORE from).

exit status: {EXIT_OK} for 2.xx; {EXIT_CLIENT_ERROR} for 4.xx; {EXIT_SERVER_ERROR} for 5.xx; \
{EXIT_TIMEOUT} no answer (timeout, or the port or host unreachable);
{EXIT_SECURITY} security failure (handshake, key, certificate); \
{EXIT_USAGE} usage or configuration error; {EXIT_OTHER} other errors (e.g. unknown host).
Every failure prints one line on stderr naming what failed and the likely cause.
"""

METHODS = {
    "get": Code.GET, "post": Code.POST, "put": Code.PUT, "delete": Code.DELETE,
    "fetch": Code.FETCH, "patch": Code.PATCH, "ipatch": Code.iPATCH,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coap-client",
        description="CoAP client with hop-by-hop (Layer 1) and end-to-end (Layer 0 DTLS or "
        "OSCORE) security.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("uri", nargs="?", help="coap:// or coaps:// URI of the resource")
    p.add_argument("--config", metavar="FILE.toml", help="configuration file (flags win)")
    p.add_argument("-m", dest="method", choices=sorted(METHODS),
                   help="request method (default get)")
    p.add_argument("-e", dest="text", metavar="TEXT", help="payload text")
    p.add_argument("-f", dest="file", metavar="FILE", help="payload from FILE ('-' for stdin)")
    p.add_argument("-t", dest="content_format", metavar="TYPE",
                   help="Content-Format: a number or a name such as text/plain")
    p.add_argument("-A", dest="accept", metavar="TYPE", help="Accept: a number or a name")
    p.add_argument("-o", dest="output", metavar="FILE", help="write the payload to FILE")
    p.add_argument("-s", dest="observe", type=float, metavar="SECONDS",
                   help="observe for that long, printing each notification")
    p.add_argument("-B", dest="timeout", type=float, metavar="SECONDS",
                   help="give up after that long (default 90)")
    p.add_argument("-P", dest="proxy", metavar="PROXY_URI", help="send through that proxy")
    p.add_argument("-v", dest="verbose", action="count", default=0, help="more detail")
    l1 = p.add_argument_group("Layer 1 (first hop, coaps://)")
    l1.add_argument("-u", dest="identity", metavar="IDENTITY", help="PSK identity")
    l1.add_argument("-k", dest="psk_key", metavar="KEY", help="PSK (text, or hex with 0x)")
    l1.add_argument("--credentials", metavar="FILE", help="aiocoap credentials JSON")
    l1.add_argument("--ca", metavar="PEM", help="CA that authenticates the first hop's server")
    l1.add_argument("--cert", metavar="PEM", help="client certificate")
    l1.add_argument("--key", "--key-file", "--cert-key", dest="cert_key", metavar="PEM",
                    help="client private key (libcoap: -j)")
    l1.add_argument("--rpk-key", metavar="PEM",
                    help="raw public key mode (RFC 7250): our ECDSA P-256 private key")
    l1.add_argument("--rpk-server-key", action="append", default=[], metavar="PEM",
                    help="public key(s) the first hop's server may present (pinned; repeatable)")
    e2e = p.add_argument_group("Layer 0 (end to end, through proxies)")
    e2e.add_argument("--e2e", choices=["dtls", "oscore"], help="end-to-end protection mode")
    e2e.add_argument("--e2e-psk-identity", metavar="ID", help="end-to-end PSK identity")
    e2e.add_argument("--e2e-psk", metavar="KEY", help="end-to-end PSK (text, or hex with 0x)")
    e2e.add_argument("--e2e-ca", metavar="PEM", help="CA that authenticates the end server")
    e2e.add_argument("--e2e-cert", metavar="PEM", help="end-to-end client certificate")
    e2e.add_argument("--e2e-key", metavar="PEM", help="end-to-end client private key")
    e2e.add_argument("--e2e-rpk-key", metavar="PEM",
                     help="raw public key mode (RFC 7250): our ECDSA P-256 private key")
    e2e.add_argument("--e2e-rpk-server-key", action="append", default=[], metavar="PEM",
                     help="the end server's public key (PEM PUBLIC KEY; repeatable, e.g. for a"
                     " key rollover)")
    e2e.add_argument("--e2e-auth", choices=sorted(E2E_KINDS),
                     help="which end-to-end credentials to use when several are configured")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        args._config_dir = str(Path(args.config).parent)
        e2e_on_command_line = {d: getattr(args, d) for d in _E2E_CREDENTIALS}
        args._e2e_kinds_on_command_line = _kinds_given(args)
        config = cfg.load_toml(args.config)
        # In the file, "key" is the long flag --key (the certificate's key), as on the
        # command line; the PSK (-k) has no long flag and is spelled "psk-key" there.
        cfg.merge_config(parser, args, config)
        if args.e2e is None:
            # A file holding end-to-end credentials (as coap-keys writes them) must not force
            # a mode: they wait for --e2e, and only flags given without it are a mistake.
            for dest, value in e2e_on_command_line.items():
                setattr(args, dest, value)
    if not args.uri:
        parser.error("a URI is required")
    if not args.uri.lower().startswith(("coap://", "coaps://")):
        parser.error(f"the URI must start with coap:// or coaps:// (got {args.uri!r})")
    if args.text is not None and args.file is not None:
        parser.error("-e and -f cannot be combined")
    if (args.identity is None) != (args.psk_key is None):
        parser.error("-u and -k go together")
    return args


E2E_KINDS = {
    "rpk": ("e2e_rpk_key", "e2e_rpk_server_key"),
    "psk": ("e2e_psk_identity", "e2e_psk"),
    "cert": ("e2e_ca", "e2e_cert", "e2e_key"),
}
"""The end-to-end credential kinds and their options, in the order of preference."""
_E2E_CREDENTIALS = (*(d for dests in E2E_KINDS.values() for d in dests), "e2e_auth")


def _kinds_given(args: argparse.Namespace) -> list[str]:
    return [k for k, dests in E2E_KINDS.items() if any(getattr(args, d) for d in dests)]


def choose_e2e_kind(args: argparse.Namespace) -> str | None:
    """The one credential kind the handshake uses (see the epilog)."""
    given = _kinds_given(args)
    if args.e2e_auth is not None:
        if args.e2e_auth not in given:
            flags = "/".join("--" + d.replace("_", "-") for d in E2E_KINDS[args.e2e_auth])
            raise dtls.ConfigurationError(f"--e2e-auth {args.e2e_auth} needs {flags}")
        return str(args.e2e_auth)
    usable = [k for k in given if not (args.e2e == "oscore" and k == "psk")]
    preferred = [k for k in getattr(args, "_e2e_kinds_on_command_line", []) if k in usable]
    return (preferred or usable or [None])[0]


def layer1_credentials(args: argparse.Namespace) -> layer1.ClientCredentials:
    creds = (
        layer1.ClientCredentials.from_file(args.credentials)
        if args.credentials else layer1.ClientCredentials()
    )
    rpk = cfg.raw_public_key_from(args.rpk_key, args.rpk_server_key, key_flag="--rpk-key",
                                  trust_flag="--rpk-server-key", peer="server")
    if rpk is not None and (args.identity is not None or args.cert or args.ca):
        raise dtls.ConfigurationError(
            "--rpk-key names the Layer 1 credentials already; -u/-k or --cert/--ca would be"
            " ignored: give one kind (or several, per URI, in --credentials)"
        )
    if rpk is not None:
        creds.add_raw_public_key("coaps://*", rpk)
    elif args.identity is not None:
        creds.add_psk("coaps://*", args.identity.encode(), dtls.parse_key_text(args.psk_key))
    elif args.cert or args.ca:
        if args.cert:
            cc = cfg.certificate_from(args.cert, args.cert_key, args.ca)
        else:
            cc = dtls.CertificateCredentials.trust_only(args.ca)
        assert cc is not None
        creds.add_certificate("coaps://*", cc)
    return creds


def e2e_options(args: argparse.Namespace) -> E2EClientOptions | None:
    """The end-to-end mode and the one credential kind its handshakes use.

    Every kind given is built (and so checked) even if another one is used: a mistake in a
    configuration is reported where it is, not when that kind is first picked.
    """
    if args.e2e is None:
        if any(getattr(args, d) for d in _E2E_CREDENTIALS):
            raise dtls.ConfigurationError("end-to-end credentials given without --e2e dtls|oscore")
        return None
    if args.e2e == "oscore" and args.e2e_auth == "psk":
        raise dtls.ConfigurationError(
            "--e2e oscore keys OSCORE from a certificate or raw-public-key handshake:"
            " --e2e-auth psk cannot key it"
        )
    kind = choose_e2e_kind(args)
    rpk = cfg.raw_public_key_from(
        args.e2e_rpk_key, args.e2e_rpk_server_key, trust_flag="--e2e-rpk-server-key",
        peer="server",
    )
    args._e2e_kind = kind  # for the failure messages of classify()
    args._e2e_rpk_fingerprint = rpk.fingerprint if rpk is not None else None
    psk = None
    if args.e2e_psk_identity or args.e2e_psk:
        if not (args.e2e_psk_identity and args.e2e_psk):
            raise dtls.ConfigurationError("--e2e-psk-identity and --e2e-psk go together")
        psk = dtls.PskClientCredentials(
            args.e2e_psk_identity.encode(), dtls.parse_key_text(args.e2e_psk)
        )
    cert = None
    # The end server must prove it is the host the URI names, not just any holder of a
    # certificate from the same CA: otherwise a proxy could redirect us to another server.
    server_name = urllib.parse.urlsplit(args.uri).hostname
    if args.e2e_cert or args.e2e_key:
        cert = cfg.certificate_from(
            args.e2e_cert, args.e2e_key, args.e2e_ca, what="e2e-", server_name=server_name
        )
    elif args.e2e_ca:
        cert = dtls.CertificateCredentials.trust_only(args.e2e_ca, server_name=server_name)
    if kind is None and args.e2e == "oscore":
        raise dtls.ConfigurationError(
            "--e2e oscore keys OSCORE from a certificate or raw-public-key handshake: give"
            " --e2e-ca (with --e2e-cert/--e2e-key) or --e2e-rpk-key/--e2e-rpk-server-key"
        )
    if kind is None:
        raise dtls.ConfigurationError(
            "--e2e needs --e2e-psk-identity/--e2e-psk, --e2e-ca (with --e2e-cert/--e2e-key)"
            " or --e2e-rpk-key/--e2e-rpk-server-key"
        )
    return E2EClientOptions(
        mode=args.e2e,
        psk=psk if kind == "psk" else None,
        certificate=cert if kind == "cert" else None,
        raw_public_key=rpk if kind == "rpk" else None,
    )


def build_request(args: argparse.Namespace) -> aiocoap.Message:
    method = METHODS[args.method or "get"]
    payload = b""
    if args.text is not None:
        payload = args.text.encode()
    elif args.file is not None:
        payload = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    msg = aiocoap.Message(code=method, uri=args.uri, payload=payload)
    if args.content_format is not None:
        msg.opt.content_format = output.content_format(args.content_format)
    if args.accept is not None:
        msg.opt.accept = output.content_format(args.accept)
    if args.observe is not None:
        msg.opt.observe = 0
    return msg


async def run(args: argparse.Namespace) -> int:
    creds = layer1_credentials(args)
    args._layer1_credentials = creds  # for the raw-public-key wording of Layer 1 failures
    e2e = e2e_options(args)
    if e2e is not None and e2e.raw_public_key is not None:
        for hop in creds.raw_public_keys():
            cfg.check_layers_apart(hop, e2e.raw_public_key,
                                   hop_flags=("--rpk-key", "--rpk-server-key"),
                                   e2e_flags=("--e2e-rpk-key", "--e2e-rpk-server-key"))
    timeout = args.timeout if args.timeout is not None else 90.0
    limits = layer1.Layer1Limits(handshake_timeout=min(30.0, max(1.0, timeout * 0.8)))
    ctx = await layer1.create_context(
        client_credentials=creds, limits=limits, loggername="coap-client"
    )
    out = output.Printer(args.output, verbose=args.verbose)
    requester: Any = None
    try:
        requester = await open_requester(ctx, proxy=args.proxy, e2e=e2e, target=args.uri)
        request = build_request(args)
        if args.observe is not None:
            return await _observe(requester, request, args.observe, timeout, out, ctx)
        if (out.progress_wanted() and isinstance(requester, PlainRequester)
                and request.code in (Code.GET, Code.FETCH)):
            response = await asyncio.wait_for(
                output.blockwise_with_progress(_sender(ctx, args.proxy), request, out.progress),
                timeout,
            )
        else:
            response = await asyncio.wait_for(requester.request(request).response, timeout)
        out.response(response, describe(requester, response, ctx))
        return exit_code(response)
    finally:
        out.close()
        await _close(requester)
        await ctx.shutdown()


async def _close(requester: Any) -> None:
    """End the Layer 0 session or OSCORE keying channel (frees the DTLS engine's state)."""
    close = getattr(requester, "close", None)
    if close is None:
        return
    try:
        await asyncio.wait_for(close(), 2.0)
    except Exception:  # best effort: the peer may be gone, the outcome is already decided
        pass


def _sender(ctx: Any, proxy: str | None) -> Any:
    """``request(message, handle_blockwise=...)`` of the context, or of the proxy forwarder."""
    if proxy:
        from aiocoap.proxy.client import ProxyForwarder

        return ProxyForwarder(proxy, ctx.context).request
    return ctx.context.request


def describe(requester: Any, response: aiocoap.Message, ctx: Any) -> dict[str, Any]:
    """Per-layer details for -v; the first hop's Layer 1 session also in end-to-end modes."""
    layers: dict[str, Any] = dict(requester.describe(response))
    if "layer 1" not in layers:
        layers["layer 1"] = _first_hop(ctx)
    return layers


def _first_hop(ctx: Any) -> dict[str, Any] | None:
    # The end-to-end requesters answer with the inner response, whose remote is the Layer 0
    # session; the first hop's DTLS session is the one our Layer 1 transport holds as client.
    for remote in list(getattr(ctx.layer1, "_remotes", {}).values()):
        peer = getattr(remote, "peer", None)
        if peer is not None and getattr(peer, "is_client", False) and peer.session is not None:
            details = layer1_details(SimpleNamespace(remote=remote))
            if details is not None:
                return {"hop": remote.hostinfo, **details}
    return {"mode": "none (plain CoAP on the first hop)"}


async def _observe(requester: Any, request: aiocoap.Message, seconds: float, timeout: float,
                   out: output.Printer, ctx: Any) -> int:
    pr = requester.request(request)
    first = await asyncio.wait_for(pr.response, timeout)
    out.response(first, describe(requester, first, ctx))
    if not first.code.is_successful() or pr.observation is None:
        return exit_code(first)
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    try:
        async for note in _bounded(pr.observation, end):
            out.response(note, None)
    finally:
        pr.observation.cancel()
    return EXIT_OK


async def _bounded(observation: Any, end: float):  # type: ignore[no-untyped-def]
    it = observation.__aiter__()
    loop = asyncio.get_running_loop()
    while True:
        remaining = end - loop.time()
        if remaining <= 0:
            return
        try:
            yield await asyncio.wait_for(it.__anext__(), remaining)
        except (TimeoutError, StopAsyncIteration):
            return


def exit_code(response: aiocoap.Message) -> int:
    if response.code.is_successful():
        return EXIT_OK
    if response.code.class_ == 4:
        return EXIT_CLIENT_ERROR
    if response.code.class_ == 5:
        return EXIT_SERVER_ERROR
    return EXIT_OTHER


NO_ANSWER = "is the server (or proxy) running and reachable, and is the port right?"


def classify(exc: BaseException, args: argparse.Namespace | None = None) -> tuple[int, str]:
    """Exit status and one line naming what failed and the likely cause."""
    from coaplayers.layer0 import errors as l0

    e2e_psk = args is not None and args.e2e == "dtls" and bool(args.e2e_psk)
    rpk = args is not None and getattr(args, "_e2e_kind", None) == "rpk"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, dtls.ConfigurationError):
            return EXIT_USAGE, str(cause)
        if isinstance(cause, aiocoap.error.MalformedUrlError | aiocoap.error.IncompleteUrlError):
            return EXIT_USAGE, f"not a usable URI: {cause}"
        if isinstance(cause, layer1.Layer1Error):
            if (isinstance(cause.cause, dtls.HandshakeTimeout)
                    and str(cause.cause).startswith("no DTLS answer")):
                return EXIT_TIMEOUT, f"Layer 1: {cause}"
            if isinstance(cause.cause, dtls.HandshakeTimeout | dtls.AuthenticationFailed |
                          dtls.PeerAlert):
                return EXIT_SECURITY, f"Layer 1 security failure: {_layer1_hint(cause, args)}"
            return EXIT_OTHER, f"Layer 1: {cause}"
        outer = re.match(r"unexpected outer answer ([45])\.(\d\d)", str(cause))
        if isinstance(cause, l0.HandshakeFailed) and outer:
            # A CoAP error on the way (typically a proxy's 5.04 or 5.02): not a key problem.
            code = (EXIT_TIMEOUT if outer.groups() == ("5", "04") else
                    EXIT_CLIENT_ERROR if outer[1] == "4" else EXIT_SERVER_ERROR)
            kinds = {"rpk": "raw-public-key", "cert": "certificate", "psk": "PSK"}
            kind = kinds.get(getattr(args, "_e2e_kind", None) or "", "")
            maybe_kind = (
                f", or the server takes no {kind} credentials end to end (it cannot read our"
                " ClientHello)" if outer.groups() == ("4", "00") and kind else ""
            )
            return code, (
                f"end-to-end handshake: {cause}; the path (a proxy, or no Layer 0 server at"
                " that URI) answered instead of the server: check the target URI's scheme,"
                f" host and port{maybe_kind}"
            )
        if isinstance(cause, l0.HandshakeFailed) and not isinstance(
            cause.__cause__, dtls.DtlsError
        ):
            hint = (
                "; with a PSK this is how a wrong --e2e-psk looks (the server silently drops"
                " what it cannot decrypt)" if e2e_psk and "key" not in str(cause) else ""
            )
            return EXIT_SECURITY, f"end-to-end security failure: {cause}{hint}"
        if isinstance(cause, l0.NoAnswer):  # not one CoAP answer to the handshake
            return EXIT_TIMEOUT, f"{cause}: {NO_ANSWER}"
        if isinstance(cause, l0.RecordRejected | l0.ResponseRejected):
            return EXIT_SECURITY, f"end-to-end security failure: {cause}"
        if getattr(cause, "security_failure", False):
            return EXIT_SECURITY, str(cause)
        if isinstance(cause, dtls.AuthenticationFailed) and rpk:
            return EXIT_SECURITY, f"end-to-end security failure: {_rpk_hint(cause, args)}"
        if isinstance(cause, dtls.DtlsError):
            return EXIT_SECURITY, f"end-to-end security failure: {cause}"
        if isinstance(cause, TimeoutError | aiocoap.error.ConRetransmitsExceeded):
            return EXIT_TIMEOUT, f"no answer in time: {NO_ANSWER}"
        if isinstance(cause, aiocoap.error.ResolutionError):
            return EXIT_OTHER, f"cannot resolve the host: {cause}"
        if type(cause) is aiocoap.error.NetworkError:
            # On loopback and LANs an ICMP "port unreachable" ends the exchange at once.
            return EXIT_TIMEOUT, f"no answer: the network reported the peer unreachable; " \
                f"{NO_ANSWER}"
        cause = cause.__cause__ or cause.__context__
    return EXIT_OTHER, f"{type(exc).__name__}: {exc}"


def _layer1_hint(cause: layer1.Layer1Error, args: Any) -> str:
    """A Layer 1 failure; a rejected raw public key is named by fingerprint, with the flags
    that trust it."""
    text = str(cause)
    creds = getattr(args, "_layer1_credentials", None)
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


def _rpk_hint(cause: BaseException, args: Any) -> str:
    """An authentication failure of a raw-public-key handshake, with the fingerprint and the
    flags involved."""
    text = str(cause)
    alert = re.search(r"the server rejected our raw public key \((\w+)\)", text)
    if alert:
        return (f"the server rejected our raw public key ({alert[1]}): is our public key"
                f" (fingerprint {args._e2e_rpk_fingerprint}, --e2e-rpk-key) among the keys the"
                " server trusts (coap-server --e2e-rpk-trust)?")
    if "is not one we trust" in text:
        return f"{text}: is --e2e-rpk-server-key the end server's public key?"
    if "presented no raw public key" in text:
        return (f"{text}: the end server does not take raw public keys (coap-server"
                " --e2e-rpk-key); use another --e2e-auth")
    return text


def _warn_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Warnings (such as a key file readable by others) as one line on stderr."""
    print(f"coap-client: warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _warn_line
    try:
        args = parse_args(argv)
    except dtls.ConfigurationError as exc:
        print(f"coap-client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    install_log_limits(LogLimits(tracebacks=args.verbose > 1))
    try:
        code = asyncio.run(_main_task(args))
    except KeyboardInterrupt:
        code = 130
    except BaseException as exc:
        code, line = classify(exc, args)
        print(f"coap-client: {line}", file=sys.stderr)
        if args.verbose > 1:
            import traceback

            traceback.print_exception(exc)
    if argv is None:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Leave without the interpreter's final garbage collection.

    A Layer 0 PSK handshake abandoned by -B leaves a tinydtls session behind whose collection
    crashes DTLSSocket (exit 139 instead of the documented status). The context is shut down
    and the output flushed by now, so there is nothing left to clean up.
    """
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _main_task(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await run(args)
    except asyncio.CancelledError:
        return 130


if __name__ == "__main__":
    sys.exit(main())
