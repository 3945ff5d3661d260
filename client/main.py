"""coap-client: reach a device or server over CoAP, with Layer 1 and end-to-end protection.

Flags follow libcoap's coap-client where libcoap has a flag for the same thing
(:mod:`.options`). Only what a run needs is imported: a plain ``coap://`` request never loads
the DTLS engines, which are most of the start-up time.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .options import ClientConfig

# asyncio, aiocoap and the DTLS engines are imported where a run needs them: --help and
# usage errors never load them (start-up time, docs/BENCHMARKS.md).

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
  coap-client -P coaps://proxy.example -u dev1 -k secret --layer0 dtls \\
              --e2e-psk-identity dev1 --e2e-psk e2e-secret coap://app.example/hello
  coap-client -P coap://proxy.example --layer0 oscore --e2e-ca ca.pem \\
              coap://app.example/firmware -o fw.bin
  coap-client --layer0 dtls --e2e-rpk-key client-rpk.key --e2e-rpk-server-key server-rpk.pub \\
              coap://app.example/hello
  coap-client --rpk-key client-hop-rpk.key --rpk-server-key server-hop-rpk.pub \\
              coaps://gateway.example/hello

output: the payload on stdout (-o FILE: to FILE; -o -: stdout). Piped or to a file it is
written byte for byte as received (-w adds a newline). On a terminal (or with --pretty) text
ends with a newline, JSON is pretty-printed, CBOR shown in diagnostic notation, and binary is
not shown. -v 5 adds the response code, options and, per layer, the hop, mode and cipher
suite on stderr; -v 7 also every message sent and received. Block-wise downloads show a
progress bar on stderr when stderr is a terminal. An observation (-s) whose notifications
stop for longer than their Max-Age (plus a margin, or -K) is registered again; if that
fails, coap-client says so and exits {EXIT_TIMEOUT}.

--config FILE.toml takes the long flag names as keys, and for short flags these names:
method text file content-format accept output observe timeout proxy verbose identity
psk-key (-k) block non token option hop-limit address port no-uri-host newline repeat ping
loss; "key" is --key. A flag on the command line wins over the file; Layer 1
credentials given as flags replace all of the file's. End-to-end credentials from the file
are used only when --layer0 (flag or file) picks a mode.

Layer 1 credentials: -u/-k (PSK), --cert/--key/--ca (certificates) or --rpk-key with
--rpk-server-key (raw public keys, RFC 7250) for every coaps:// first hop, or --credentials
FILE.json per URI pattern ("dtls", "dtls-cert", and "dtls-rpk": {{"key": "client.key",
"peer-keys": ["server.pub"]}}; file names relative to FILE.json). Layer 1 and end-to-end keys
are kept apart: the same raw public key at both layers is refused.

end-to-end credentials: a handshake uses one kind. --e2e-auth psk|cert|rpk names it; without
it, a kind given on the command line wins over the file's, and among several the order is
rpk (raw public keys, RFC 7250), psk, cert (--layer0 oscore keys from any of them: its PSK
handshake runs on OpenSSL, for the TLS exporter).

exit status: {EXIT_OK} for 2.xx; {EXIT_CLIENT_ERROR} for 4.xx; {EXIT_SERVER_ERROR} for 5.xx;
{EXIT_TIMEOUT} no answer (timeout, the port or host unreachable, an observation gone silent);
{EXIT_SECURITY} security failure (handshake, key, certificate);
{EXIT_USAGE} usage or configuration error; {EXIT_OTHER} other errors (e.g. unknown host).
Every failure prints one line on stderr naming what failed, at which hop, and the likely
cause. libcoap's coap-client exits 0 instead; --exit-zero does the same for scripts that
expect it (usage errors still exit {EXIT_USAGE}).
"""

OBSERVE_MARGIN = 2.0
"""Seconds past a notification's Max-Age before an observation counts as silent."""
DEFAULT_MAX_AGE = 60.0


@dataclass
class RunState:
    """What the run learned that a failure message needs (built credentials, chosen kinds)."""

    e2e_kind: str | None = None
    e2e_rpk_fingerprint: str | None = None
    layer1_credentials: Any = None
    hops: list[str] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    from . import options

    warnings.showwarning = _warn_line
    try:
        config = options.load(argv)
    except SystemExit as exc:  # --help
        code = int(exc.code or 0)
        if argv is None:
            _exit_now(code)
        return code
    except Exception as exc:
        from coaplayers.dtls import ConfigurationError

        if not isinstance(exc, ConfigurationError):
            raise
        print(f"coap-client: {exc}", file=sys.stderr)
        if argv is None:
            _exit_now(EXIT_USAGE)
        return EXIT_USAGE
    from coaplayers.loglimit import LogLimits, install_log_limits

    install_log_limits(LogLimits(tracebacks=config.traceback))
    import asyncio

    state = RunState()
    try:
        code = asyncio.run(_main_task(config, state))
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = _quiet_broken_pipe()
    except BaseException as exc:
        code, line = classify(exc, config, state)
        print(f"coap-client: {line}", file=sys.stderr)
        if config.traceback:
            import traceback

            traceback.print_exception(exc)
    if config.exit_zero and code not in (EXIT_USAGE, 130):
        code = EXIT_OK
    if argv is None:
        _exit_now(code)
    return code


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as other tools do."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return EXIT_OTHER


def _exit_now(code: int) -> None:
    """Leave without the interpreter's final garbage collection.

    A Layer 0 PSK handshake abandoned by -B leaves a tinydtls session behind whose collection
    crashes DTLSSocket (exit 139 instead of the documented status). The context is shut down
    and the output flushed by now, so there is nothing left to clean up.
    """
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, OSError):
            pass
    os._exit(code)


def _warn_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Warnings (such as a key file readable by others) as one line on stderr."""
    print(f"coap-client: warning: {message}", file=sys.stderr, flush=True)


async def _main_task(config: ClientConfig, state: RunState) -> int:
    import asyncio
    import signal

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        from .run import run

        return await run(config, state)
    except asyncio.CancelledError:
        return 130


def classify(exc: BaseException, config: ClientConfig | None = None, state: RunState | None = None
             ) -> tuple[int, str]:
    """Exit status and one line naming what failed and the likely cause."""
    from .failures import classify as _classify

    return _classify(exc, config, state or RunState())


if __name__ == "__main__":
    sys.exit(main())
