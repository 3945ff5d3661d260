"""coap-client's command line and configuration file, read once into a typed configuration.

Flags follow libcoap 4.3's coap-client where libcoap has a flag for the same thing, with the
meaning its ``--help`` gives; the libcoap flags this client cannot honour are refused with one
line saying why (:data:`REFUSED`). The command line and ``--config FILE.toml`` meet in
:func:`load` and nowhere else: the rest of the program reads a frozen :class:`ClientConfig`.
"""

from __future__ import annotations

import argparse
import re
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from coaplayers.dtls import ConfigurationError

METHODS = ("delete", "fetch", "get", "ipatch", "patch", "post", "put")

DEFAULT_TIMEOUT = 90.0
DEFAULT_VERBOSITY = 3
"""libcoap's default log level (errors only)."""
DETAILS_LEVEL = 5
"""From this ``-v`` level on: response code, options and the layers on stderr."""
DUMP_LEVEL = 7
"""From this level on (libcoap's debug): every message sent and received, one line each."""
TRACEBACK_LEVEL = 8
"""From this level on: a failure's traceback after its one line."""

REFUSED = {
    "-r": "reliable transport (CoAP over TCP/TLS, RFC 8323) is not implemented; coap-client"
          " speaks CoAP over UDP and DTLS only",
    "-X": "the maximum message size applies to CoAP over TCP, which is not implemented",
    "-L": "block-wise transfers are always handled by coap-client (libcoap's -L 1); the"
          " other COAP_BLOCK_* modes have no counterpart",
    "-n": "the server's certificate is always checked (safe by default); give its CA with -C",
    "-J": "PKCS #11 tokens are not supported; give PEM files (-c/-j, -M)",
    "-S": "SNI-dependent certificate choice is not supported; give one certificate (-c/-j)",
    "-h": "identity-hint matching is not supported: the PSK engine does not pass the server's"
          " hint on; give per-server PSKs with --credentials FILE.json",
}
"""libcoap flags coap-client does not support, and why (each refused with one line)."""

_REFUSED_WITH_VALUE = {"-X", "-L", "-J", "-S", "-h"}
_TAKES_VALUE = {"-m", "-e", "-f", "-t", "-A", "-o", "-s", "-B", "-P", "-b", "-T", "-O", "-H",
                "-a", "-p", "-G", "-K", "-l", "-u", "-k", "-c", "-j", "-C", "-R", "-M", "-X",
                "-L", "-J", "-S"}

LIBCOAP_EPILOG = """\
libcoap compatibility: the flags of libcoap 4.3's coap-client mean what they mean there
  (-a -b -e -f -m -o -p -s -t -v -w -A -B -G -H -K -l -N -O -P -T -U, PSK -u -k, PKI -c -j
  -C -R -M), with these deliberate differences:
  exit status  ours says what failed (below); libcoap exits 0 after most failures
               (--exit-zero does the same)
  -v N         levels as libcoap's (default 3); from 5 the response and layers, from 7 every
               message sent and received, from 8 a failure's traceback; -v alone is 6
  -M FILE      raw public key (RFC 7250) = --rpk-key; the server's key must be pinned with
               --rpk-server-key (libcoap accepts any)
  -C / -R      the CA that authenticates the server (= --ca); the server is always checked
  -K SECONDS   a silent observation is checked by registering again, not by a CoAP ping
               (a ping reaches only the first hop)
  output       the payload as received when stdout is not a terminal (as libcoap); on a
               terminal, or with --pretty, JSON and CBOR are pretty-printed and text ends
               with a newline
  refused      -r -X (TCP), -L, -n, -J, -S, -h FILE (one line says why); -h alone and
               --help print this help
"""


class UsageError(ConfigurationError):
    """A mistake on the command line: exit status 2 with one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        flags = [a for a in unknown[1].split() if a.startswith("-")] if unknown else []
        if flags:
            message = f"unknown flag {flags[0]}"
        raise UsageError(f"{message} (coap-client --help lists the flags)")


@dataclass(frozen=True)
class Layer1Settings:
    """First-hop (``coaps://``) credentials, as given; built into credentials at run time."""

    identity: str | None = None
    psk_key: str | None = None
    credentials: str | None = None
    ca: str | None = None
    cert: str | None = None
    cert_key: str | None = None
    rpk_key: str | None = None
    rpk_server_keys: tuple[str, ...] = ()

    @property
    def given(self) -> bool:
        return any((self.identity, self.psk_key, self.credentials, self.ca, self.cert,
                    self.cert_key, self.rpk_key, self.rpk_server_keys))


@dataclass(frozen=True)
class Layer0Settings:
    """End-to-end (Layer 0 / OSCORE) mode and credentials, as given."""

    mode: str | None = None
    psk_identity: str | None = None
    psk: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    rpk_key: str | None = None
    rpk_server_keys: tuple[str, ...] = ()
    auth: str | None = None
    kinds_on_command_line: tuple[str, ...] = ()
    """Kinds given as flags: they win over the file's when no --e2e-auth picks one."""

    @property
    def given(self) -> bool:
        return any((self.mode, self.psk_identity, self.psk, self.ca, self.cert, self.key,
                    self.rpk_key, self.rpk_server_keys, self.auth))


@dataclass(frozen=True)
class ClientConfig:
    """Everything one coap-client run does, from the command line and the file."""

    uri: str
    method: str = "get"
    payload: bytes | None = None
    content_format: int | None = None
    accept: int | None = None
    output: str | None = None
    """A file name; ``-`` is stdout."""
    observe: float | None = None
    timeout: float = DEFAULT_TIMEOUT
    proxy: str | None = None
    verbosity: int = DEFAULT_VERBOSITY
    layer1: Layer1Settings = field(default_factory=Layer1Settings)
    layer0: Layer0Settings = field(default_factory=Layer0Settings)
    block_size_exp: int | None = None
    """-b: SZX of Block2 (and of Block1 when there is a payload)."""
    block_start: int = 0
    confirmable: bool = True
    token: bytes | None = None
    options: tuple[tuple[int, bytes], ...] = ()
    hop_limit: int | None = None
    local_address: str | None = None
    local_port: int | None = None
    omit_uri_host: bool = False
    newline: bool = False
    repeat: int = 1
    ping_interval: float | None = None
    loss: str | None = None
    pretty: bool | None = None
    """None: pretty-print only on a terminal."""
    exit_zero: bool = False
    state_dir: str | None = None
    """Where the OSCORE mode keeps its contexts between runs (None: the default folder)."""
    keep: bool = True
    """False with --no-keep: nothing is kept between runs."""

    @property
    def details(self) -> bool:
        return self.verbosity >= DETAILS_LEVEL

    @property
    def dump(self) -> bool:
        return self.verbosity >= DUMP_LEVEL

    @property
    def traceback(self) -> bool:
        return self.verbosity >= TRACEBACK_LEVEL

    @property
    def needs_security(self) -> bool:
        """Whether the run may need the DTLS engines (a coaps:// hop or end-to-end mode)."""
        schemes = [urllib.parse.urlsplit(u).scheme.lower() for u in (self.uri, self.proxy) if u]
        if self.proxy:
            schemes = schemes[1:]  # only the first hop is ours to secure
        return "coaps" in schemes or self.layer0.given or self.layer1.given


def build_parser() -> argparse.ArgumentParser:
    from .main import EPILOG

    p = _Parser(
        prog="coap-client",
        description="CoAP client with hop-by-hop (Layer 1) and end-to-end (Layer 0 DTLS or "
        "OSCORE) security.",
        epilog=EPILOG + "\n" + LIBCOAP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    p.add_argument("uri", nargs="?", help="coap:// or coaps:// URI of the resource (http:// or"
                   " https:// through a CoAP-to-HTTP proxy, -P)")
    p.add_argument("--help", action="help", help="show this help and exit (also -h alone)")
    p.add_argument("--config", metavar="FILE.toml", help="configuration file (flags win)")
    p.add_argument("-m", dest="method", type=str.lower, choices=METHODS,
                   help="request method, in any case (default get)")
    p.add_argument("-e", dest="text", metavar="TEXT",
                   help="payload text (percent-encoding for non-ASCII bytes, as libcoap)")
    p.add_argument("-f", dest="file", metavar="FILE", help="payload from FILE ('-' for stdin)")
    p.add_argument("-t", dest="content_format", metavar="TYPE",
                   help="Content-Format: a number or a name such as text/plain")
    p.add_argument("-A", dest="accept", metavar="TYPE", help="Accept: a number or a name")
    p.add_argument("-o", dest="output", metavar="FILE",
                   help="write the payload to FILE ('-' for stdout)")
    p.add_argument("-s", dest="observe", type=float, metavar="SECONDS",
                   help="observe for that long, printing each notification")
    p.add_argument("-B", dest="timeout", type=float, metavar="SECONDS",
                   help="give up after that long (default 90)")
    p.add_argument("-P", dest="proxy", metavar="PROXY_URI", help="send through that proxy")
    p.add_argument("-v", dest="verbose", metavar="LEVEL", type=int,
                   help="verbosity as libcoap's (default 3; 5: response and layers, 7: every"
                   " message, 8: tracebacks); -v alone is 6")
    p.add_argument("-b", dest="block", metavar="[NUM,]SIZE",
                   help="block size (16..1024, a power of two) for Block2, and Block1 with a"
                   " payload; NUM: fetch that one block")
    p.add_argument("-N", dest="non", action="store_true", help="send a NON request")
    p.add_argument("-T", dest="token", metavar="TOKEN",
                   help="the token counter's start (text, up to 8 bytes; as libcoap, the"
                   " first request carries the next value)")
    p.add_argument("-O", dest="option", action="append", default=[], metavar="NUM,TEXT",
                   help="add option NUM with TEXT (0x... for hex bytes; repeatable)")
    p.add_argument("-H", dest="hop_limit", type=int, metavar="HOPLIMIT",
                   help="Hop-Limit option for proxies (1..255)")
    p.add_argument("-a", dest="address", metavar="ADDR", help="local address to send from")
    p.add_argument("-p", dest="port", type=int, metavar="PORT", help="local port to send from")
    p.add_argument("-U", dest="no_uri_host", action="store_true",
                   help="never send Uri-Host or Uri-Port")
    p.add_argument("-w", dest="newline", action="store_true",
                   help="append a newline to received data")
    p.add_argument("-G", dest="repeat", type=int, metavar="COUNT",
                   help="repeat the request COUNT times (1..255), a second apart")
    p.add_argument("-K", dest="ping", type=float, metavar="SECONDS",
                   help="while observing, check the path after that long without a"
                   " notification (by registering again; libcoap sends a ping)")
    p.add_argument("-l", dest="loss", metavar="LIST|LOSS%",
                   help="drop the datagrams numbered in LIST (1,3-4) or LOSS%% of them at"
                   " random (for testing only)")
    p.add_argument("--pretty", action=argparse.BooleanOptionalAction, default=None,
                   help="pretty-print JSON, CBOR and link-format (default: only on a terminal)")
    p.add_argument("--exit-zero", action="store_true",
                   help="exit 0 after any answer or network/security failure, as libcoap's"
                   " coap-client does (usage errors still exit 2)")
    l1 = p.add_argument_group("Layer 1 (first hop, coaps://)")
    l1.add_argument("-u", dest="identity", metavar="IDENTITY", help="PSK identity")
    l1.add_argument("-k", dest="psk_key", metavar="KEY", help="PSK (text, or hex with 0x)")
    l1.add_argument("--credentials", metavar="FILE", help="aiocoap credentials JSON")
    l1.add_argument("--ca", "-C", "-R", dest="ca", metavar="PEM",
                    help="CA that authenticates the first hop's server (libcoap: -C, -R)")
    l1.add_argument("--cert", "-c", dest="cert", metavar="PEM",
                    help="client certificate (libcoap: -c)")
    l1.add_argument("--key", "--key-file", "--cert-key", "-j", dest="cert_key", metavar="PEM",
                    help="client private key (libcoap: -j)")
    l1.add_argument("--rpk-key", "-M", dest="rpk_key", metavar="PEM",
                    help="raw public key mode (RFC 7250): our ECDSA P-256 private key"
                    " (libcoap: -M)")
    l1.add_argument("--rpk-server-key", action="append", default=[], metavar="PEM",
                    help="public key(s) the first hop's server may present (pinned; repeatable)")
    e2e = p.add_argument_group("Layer 0 (end to end, through proxies)")
    e2e.add_argument("--layer0", "--e2e", dest="layer0", choices=["dtls", "oscore"],
                     help="Layer 0 mode: end-to-end DTLS, or OSCORE keyed by a Layer 0"
                     " handshake (--e2e is the same flag, its earlier name)")
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
    e2e.add_argument("--e2e-auth", choices=sorted(LAYER0_KINDS),
                     help="which end-to-end credentials to use when several are configured")
    e2e.add_argument("--state-dir", metavar="DIR",
                     help="owner-only folder for what end-to-end runs keep between runs:"
                     " OSCORE contexts, Layer 0 sessions to resume (default"
                     " $XDG_STATE_HOME/coaplayers, i.e. ~/.local/state/coaplayers)")
    e2e.add_argument("--no-keep", action="store_true",
                     help="keep nothing between runs: every end-to-end run starts afresh")
    refused = p.add_argument_group("libcoap flags refused (one line says why)")
    for flag in REFUSED:
        if flag == "-h":
            continue  # handled before parsing: -h alone is help
        if flag in _REFUSED_WITH_VALUE:
            refused.add_argument(flag, dest="refused_" + flag[1], help=argparse.SUPPRESS)
        else:
            refused.add_argument(flag, dest="refused_" + flag[1], action="store_true",
                                 help=argparse.SUPPRESS)
    return p


LAYER0_KINDS = {
    "rpk": ("e2e_rpk_key", "e2e_rpk_server_key"),
    "psk": ("e2e_psk_identity", "e2e_psk"),
    "cert": ("e2e_ca", "e2e_cert", "e2e_key"),
}
"""The end-to-end credential kinds and their options, in the order of preference."""
_LAYER0_DESTS = (*(d for dests in LAYER0_KINDS.values() for d in dests), "e2e_auth")
_LAYER1_DESTS = ("identity", "psk_key", "credentials", "ca", "cert", "cert_key", "rpk_key",
                 "rpk_server_key")


def _normalise(argv: list[str]) -> list[str]:
    """libcoap's optional-looking forms as argparse reads them: ``-v`` without a number is
    level 6 (``-vv`` 7, ...), ``-h`` alone asks for help, ``-h FILE`` is refused."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--":
            out += argv[i:]
            break
        if a in _TAKES_VALUE and nxt is not None and nxt != "--":
            # A value such as "-e -v" is the flag's, as getopt reads it (argparse takes a
            # value that starts with "-" only attached to its flag).
            out += [a + nxt] if nxt.startswith("-") else [a, nxt]
            i += 2
            continue
        if re.fullmatch(r"-v+", a) and not (nxt is not None and nxt.isdigit() and a == "-v"):
            out += ["-v", str(min(9, 5 + len(a) - 1))]
        elif a == "-h":
            if nxt is None or nxt.startswith("-") or nxt.lower().startswith("coap"):
                out.append("--help")
            else:
                raise UsageError(f"-h {nxt}: {REFUSED['-h']}")
        else:
            out.append(a)
        i += 1
    return out


def load(argv: list[str] | None) -> ClientConfig:
    """The run's configuration: the command line over the file (``--config``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(_normalise(argv))
    for flag in REFUSED:
        if getattr(args, "refused_" + flag[1], None) not in (None, False):
            raise UsageError(f"{flag}: {REFUSED[flag]}")
    e2e_kinds_on_command_line = tuple(_kinds_given(args))
    if args.config:
        _merge_file(parser, args)
    return _build(args, e2e_kinds_on_command_line)


def _merge_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from coaplayers.programs import config as cfg

    e2e_on_command_line = {d: getattr(args, d) for d in _LAYER0_DESTS}
    layer1_on_command_line = any(getattr(args, d) for d in _LAYER1_DESTS)
    config = cfg.load_toml(args.config)
    if layer1_on_command_line:
        # Layer 1 credentials are one choice: a kind given as flags replaces the file's
        # (which would otherwise win by matching the URI more closely, or mix kinds).
        layer1_keys = {a.dest: a for a in parser._actions if a.dest in _LAYER1_DESTS}
        names = {d.replace("_", "-") for d in _LAYER1_DESTS} | {
            o[2:] for a in layer1_keys.values() for o in a.option_strings if o.startswith("--")}
        config = {k: v for k, v in config.items() if k not in names}
    # In the file, "key" is the long flag --key (the certificate's key), as on the command
    # line; the PSK (-k) has no long flag and is spelled "psk-key" there.
    cfg.merge_config(parser, args, config, base=Path(args.config).parent)
    if args.layer0 is None:
        # A file holding end-to-end credentials (as coap-keys writes them) must not force a
        # mode: they wait for --layer0, and only flags given without it are a mistake.
        for dest, value in e2e_on_command_line.items():
            setattr(args, dest, value)


def _kinds_given(args: argparse.Namespace) -> list[str]:
    return [k for k, dests in LAYER0_KINDS.items() if any(getattr(args, d) for d in dests)]


def _build(args: argparse.Namespace, e2e_kinds_on_command_line: tuple[str, ...]
           ) -> ClientConfig:
    if not args.uri:
        raise UsageError("a URI is required (coap-client --help lists the flags)")
    uri: str = args.uri
    if uri.lower().startswith(("http://", "https://")):
        # Figure 2 of the Layered DTLS draft: CoAP to a cross-proxy, HTTP behind it.
        if not args.proxy:
            raise UsageError(f"an {uri.split(':', 1)[0].lower()}:// target needs a"
                             " CoAP-to-HTTP cross-proxy: give one with -P coap://PROXY")
    elif not uri.lower().startswith(("coap://", "coaps://")):
        schemes = "coap+tcp:// and coaps+tcp:// (TCP) are not supported; " if re.match(
            r"(?i)coaps?\+tcp://", uri) else ""
        raise UsageError(f"the URI must start with coap:// or coaps:// (got {uri!r}); "
                         f"{schemes}".rstrip("; "))
    for name, value in (("URI", uri), ("-P", args.proxy)):
        try:
            if value:
                urllib.parse.urlsplit(value).port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise UsageError(f"not a usable {name}: {value!r} ({exc})") from exc
    if args.text is not None and args.file is not None:
        raise UsageError("-e and -f cannot be combined")
    if (args.identity is None) != (args.psk_key is None):
        raise UsageError("-u and -k go together")
    block_exp, block_start = _block(args.block) if args.block else (None, 0)
    if args.hop_limit is not None and not 1 <= args.hop_limit <= 255:
        raise UsageError(f"-H {args.hop_limit}: the Hop-Limit must be 1..255")
    if args.repeat is not None and not 1 <= args.repeat <= 255:
        raise UsageError(f"-G {args.repeat}: the count must be 1..255")
    if args.ping is not None and args.ping <= 0:
        raise UsageError("-K takes a positive number of seconds")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"-p {args.port}: not a port number")
    if args.loss is not None:
        _check_loss(args.loss)
    first_hop = (args.proxy or uri).lower()
    if (args.address is not None or args.port is not None) and first_hop.startswith("coaps:"):
        raise UsageError("-a/-p bind the plain CoAP socket; a coaps:// first hop gets a DTLS"
                         " socket of its own, which they cannot choose (not supported)")
    from . import output

    verbosity = args.verbose if args.verbose is not None else DEFAULT_VERBOSITY
    if not 0 <= verbosity <= 9:
        raise UsageError(f"-v {verbosity}: the level is 0..9")
    return ClientConfig(
        uri=uri,
        method=args.method or "get",
        payload=_payload(args.text, args.file),
        content_format=(output.content_format(args.content_format)
                        if args.content_format is not None else None),
        accept=output.content_format(args.accept) if args.accept is not None else None,
        output=args.output,
        observe=args.observe,
        timeout=args.timeout if args.timeout is not None else DEFAULT_TIMEOUT,
        proxy=args.proxy,
        verbosity=int(verbosity),
        layer1=Layer1Settings(
            identity=args.identity, psk_key=args.psk_key, credentials=args.credentials,
            ca=args.ca, cert=args.cert, cert_key=args.cert_key, rpk_key=args.rpk_key,
            rpk_server_keys=tuple(args.rpk_server_key),
        ),
        layer0=Layer0Settings(
            mode=args.layer0, psk_identity=args.e2e_psk_identity, psk=args.e2e_psk,
            ca=args.e2e_ca, cert=args.e2e_cert, key=args.e2e_key, rpk_key=args.e2e_rpk_key,
            rpk_server_keys=tuple(args.e2e_rpk_server_key), auth=args.e2e_auth,
            kinds_on_command_line=e2e_kinds_on_command_line,
        ),
        block_size_exp=block_exp,
        block_start=block_start,
        confirmable=not args.non,
        token=_token(args.token) if args.token is not None else None,
        options=tuple(_option(o) for o in args.option),
        hop_limit=args.hop_limit,
        local_address=args.address,
        local_port=args.port,
        omit_uri_host=args.no_uri_host,
        newline=args.newline,
        repeat=args.repeat or 1,
        ping_interval=args.ping,
        loss=args.loss,
        pretty=args.pretty,
        exit_zero=args.exit_zero,
        state_dir=args.state_dir,
        keep=not args.no_keep,
    )


def _payload(text: str | None, file: str | None) -> bytes | None:
    if text is not None:
        # libcoap reads -e with percent-encoding, so that any byte can be given.
        return urllib.parse.unquote_to_bytes(text)
    if file is None:
        return None
    if file == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(file).read_bytes()
    except OSError as exc:
        raise UsageError(f"-f {file}: cannot read it: {exc.strerror}") from exc


def _block(text: str) -> tuple[int, int]:
    num, _, size = text.rpartition(",")
    if not size.isdigit() or (num and not num.isdigit()):
        raise UsageError(f"-b {text}: expected [NUM,]SIZE")
    value = int(size)
    if value not in (16, 32, 64, 128, 256, 512, 1024):
        raise UsageError(f"-b {text}: the block size must be a power of two from 16 to 1024")
    return value.bit_length() - 5, int(num or 0)


def _token(text: str) -> bytes:
    token = text.encode()
    if len(token) > 8:
        raise UsageError(f"-T {text}: a token is at most 8 bytes")
    return token


def _option(text: str) -> tuple[int, bytes]:
    num, sep, value = text.partition(",")
    if not sep or not num.isdigit() or not 0 < int(num) <= 65535:
        raise UsageError(f"-O {text}: expected NUM,TEXT with NUM 1..65535")
    if value[:2].lower() == "0x":
        try:
            return int(num), bytes.fromhex(value[2:])
        except ValueError as exc:
            raise UsageError(f"-O {text}: not hex after 0x") from exc
    return int(num), value.encode()


def _check_loss(text: str) -> None:
    if re.fullmatch(r"\d+(\.\d+)?%", text):
        if float(text[:-1]) > 100:
            raise UsageError(f"-l {text}: at most 100%")
        return
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
        raise UsageError(f"-l {text}: expected a list such as 1,3-4 or a loss such as 10%")

