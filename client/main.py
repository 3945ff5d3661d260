"""coap-client: reach a device or server over CoAP, with Layer 1 and end-to-end protection.

Flags follow libcoap's coap-client where libcoap has a flag for the same thing.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code

from coaplayers import config as cfg
from coaplayers import dtls, layer1
from coaplayers.e2e import E2EClientOptions, open_requester

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

exit status: {EXIT_OK} for 2.xx; {EXIT_CLIENT_ERROR} for 4.xx; {EXIT_SERVER_ERROR} for 5.xx; \
{EXIT_TIMEOUT} timeout; {EXIT_SECURITY} security failure (handshake, key, certificate); \
{EXIT_USAGE} usage or configuration error; {EXIT_OTHER} other errors.
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
    l1.add_argument("-k", dest="key", metavar="KEY", help="PSK (text, or hex with 0x)")
    l1.add_argument("--credentials", metavar="FILE", help="aiocoap credentials JSON")
    l1.add_argument("--ca", metavar="PEM", help="CA that authenticates the first hop's server")
    l1.add_argument("--cert", metavar="PEM", help="client certificate")
    l1.add_argument("--key-file", "--cert-key", dest="cert_key", metavar="PEM",
                    help="client private key (libcoap: -j); --key is an alias")
    e2e = p.add_argument_group("Layer 0 (end to end, through proxies)")
    e2e.add_argument("--e2e", choices=["dtls", "oscore"], help="end-to-end protection mode")
    e2e.add_argument("--e2e-psk-identity", metavar="ID", help="end-to-end PSK identity")
    e2e.add_argument("--e2e-psk", metavar="KEY", help="end-to-end PSK (text, or hex with 0x)")
    e2e.add_argument("--e2e-ca", metavar="PEM", help="CA that authenticates the end server")
    e2e.add_argument("--e2e-cert", metavar="PEM", help="end-to-end client certificate")
    e2e.add_argument("--e2e-key", metavar="PEM", help="end-to-end client private key")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    # libcoap spells the client key --key as well; accept it for the certificate key.
    argv = ["--key-file" if a == "--key" else a for a in (sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(argv)
    if args.config:
        args._config_dir = str(Path(args.config).parent)
        cfg.merge_config(parser, args, cfg.load_toml(args.config))
    if not args.uri:
        parser.error("a URI is required")
    if args.text is not None and args.file is not None:
        parser.error("-e and -f cannot be combined")
    if (args.identity is None) != (args.key is None):
        parser.error("-u and -k go together")
    return args


def layer1_credentials(args: argparse.Namespace) -> layer1.ClientCredentials:
    creds = (
        layer1.ClientCredentials.from_file(args.credentials)
        if args.credentials else layer1.ClientCredentials()
    )
    if args.identity is not None:
        creds.add_psk("coaps://*", args.identity.encode(), dtls.parse_key_text(args.key))
    elif args.cert or args.ca:
        if args.cert:
            cc = cfg.certificate_from(args.cert, args.cert_key, args.ca)
        else:
            cc = dtls.CertificateCredentials.trust_only(args.ca)
        assert cc is not None
        creds.add_certificate("coaps://*", cc)
    return creds


def e2e_options(args: argparse.Namespace) -> E2EClientOptions | None:
    if args.e2e is None:
        if any((args.e2e_psk_identity, args.e2e_psk, args.e2e_ca, args.e2e_cert, args.e2e_key)):
            raise dtls.ConfigurationError("end-to-end credentials given without --e2e dtls|oscore")
        return None
    psk = None
    if args.e2e_psk_identity or args.e2e_psk:
        if not (args.e2e_psk_identity and args.e2e_psk):
            raise dtls.ConfigurationError("--e2e-psk-identity and --e2e-psk go together")
        psk = dtls.PskClientCredentials(
            args.e2e_psk_identity.encode(), dtls.parse_key_text(args.e2e_psk)
        )
    cert = None
    if args.e2e_cert or args.e2e_key:
        cert = cfg.certificate_from(args.e2e_cert, args.e2e_key, args.e2e_ca, what="e2e-")
    elif args.e2e_ca:
        cert = dtls.CertificateCredentials.trust_only(args.e2e_ca)
    if psk is None and cert is None:
        raise dtls.ConfigurationError(
            "--e2e needs --e2e-psk-identity/--e2e-psk or --e2e-ca (with --e2e-cert/--e2e-key)"
        )
    if args.e2e == "oscore" and cert is None:
        raise dtls.ConfigurationError(
            "--e2e oscore keys OSCORE from a certificate-mode handshake: give --e2e-ca"
        )
    return E2EClientOptions(mode=args.e2e, psk=psk, certificate=cert)


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
    e2e = e2e_options(args)
    timeout = args.timeout if args.timeout is not None else 90.0
    limits = layer1.Layer1Limits(handshake_timeout=min(30.0, max(1.0, timeout * 0.8)))
    ctx = await layer1.create_context(
        client_credentials=creds, limits=limits, loggername="coap-client"
    )
    out = output.Printer(args.output, verbose=args.verbose)
    try:
        requester = await open_requester(ctx, proxy=args.proxy, e2e=e2e, target=args.uri)
        request = build_request(args)
        if args.observe is not None:
            return await _observe(requester, request, args.observe, timeout, out)
        pr = requester.request(request)
        if out.progress_wanted():
            out.attach_progress(pr)
        response = await asyncio.wait_for(pr.response, timeout)
        out.response(response, requester.describe(response))
        return exit_code(response)
    finally:
        await ctx.shutdown()


async def _observe(requester: Any, request: aiocoap.Message, seconds: float, timeout: float,
                   out: output.Printer) -> int:
    pr = requester.request(request)
    first = await asyncio.wait_for(pr.response, timeout)
    out.response(first, requester.describe(first))
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


def classify(exc: BaseException) -> tuple[int, str]:
    """Exit status and one line naming what failed and the likely cause."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, dtls.ConfigurationError):
            return EXIT_USAGE, str(cause)
        if isinstance(cause, layer1.Layer1Error):
            if isinstance(cause.cause, dtls.HandshakeTimeout | dtls.AuthenticationFailed |
                          dtls.PeerAlert):
                return EXIT_SECURITY, f"Layer 1 security failure: {cause}"
            return EXIT_OTHER, f"Layer 1: {cause}"
        if getattr(cause, "security_failure", False):
            return EXIT_SECURITY, str(cause)
        if isinstance(cause, dtls.DtlsError):
            return EXIT_SECURITY, f"end-to-end security failure: {cause}"
        if isinstance(cause, TimeoutError | aiocoap.error.ConRetransmitsExceeded):
            return EXIT_TIMEOUT, "no answer in time: is the server (or proxy) running and " \
                "reachable, and is the port right?"
        if isinstance(cause, aiocoap.error.ResolutionError):
            return EXIT_OTHER, f"cannot resolve the host: {cause}"
        cause = cause.__cause__ or cause.__context__
    return EXIT_OTHER, f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except dtls.ConfigurationError as exc:
        print(f"coap-client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_main_task(args))
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        code, line = classify(exc)
        print(f"coap-client: {line}", file=sys.stderr)
        if args.verbose > 1:
            import traceback

            traceback.print_exception(exc)
        return code


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
