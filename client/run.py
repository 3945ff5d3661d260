"""One coap-client run: the context, the requester for the mode, the requests and their output.

The DTLS engines (OpenSSL, GnuTLS, tinydtls) load only when the run can use them (a coaps://
first hop, end-to-end protection, or Layer 1 credentials given); a plain ``coap://`` run
uses an aiocoap context with the UDP transport alone.
"""

from __future__ import annotations

import asyncio
import urllib.parse
import warnings
from typing import TYPE_CHECKING, Any, TypeAlias

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber

from . import output
from .failures import ObservationSilent, classify, exit_code, gateway_hint
from .main import RunState
from .options import ClientConfig

if TYPE_CHECKING:
    from coaplayers.layer0_modes import Requester
    from coaplayers.layer1 import LayeredContext

ClientContext: TypeAlias = "PlainContext | LayeredContext"

METHODS = {
    "get": Code.GET, "post": Code.POST, "put": Code.PUT, "delete": Code.DELETE,
    "fetch": Code.FETCH, "patch": Code.PATCH, "ipatch": Code.iPATCH,
}

# -b with a payload sets Block1's size the way aiocoap 0.4.17 still takes it (from the
# request's Block1 option); its deprecation notice is not the user's business.
warnings.filterwarnings("ignore", message="Setting a block1 option", category=DeprecationWarning)


class PlainContext:
    """An aiocoap context with only the UDP transport (no DTLS engine loaded)."""

    layer1 = None

    def __init__(self, context: aiocoap.Context) -> None:
        self.context = context

    async def shutdown(self) -> None:
        await self.context.shutdown()


async def open_context(config: ClientConfig, state: RunState) -> ClientContext:
    bind = None
    if config.local_address is not None or config.local_port is not None:
        bind = (config.local_address or "::", config.local_port or 0)
    if not config.needs_security:
        from coaplayers import _aiocoap

        ctx = aiocoap.Context(loggername="coap-client")
        try:
            await _aiocoap.append_udp6(ctx, None if bind is None else _bind_host(bind))
        except BaseException:
            await ctx.shutdown()
            raise
        return PlainContext(ctx)
    from coaplayers import layer1

    from .security import layer1_credentials

    creds = layer1_credentials(config.layer1)
    state.layer1_credentials = creds  # for the raw-public-key wording of Layer 1 failures
    limits = layer1.Layer1Limits(handshake_timeout=min(30.0, max(1.0, config.timeout * 0.8)))
    listen = [f"coap://{_hostport(*_bind_host(bind))}"] if bind is not None else []
    return await layer1.create_context(
        client_credentials=creds, limits=limits, loggername="coap-client", listen=listen)


def _bind_host(bind: tuple[str, int]) -> tuple[str, int]:
    host, port = bind
    if "." in host and ":" not in host:
        host = "::ffff:" + host  # the UDP socket is IPv6 with IPv4 mapped in
    return host, port


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PlainRequester:
    """Requests as aiocoap sends them (Layer 1 on coaps:// hops), optionally via a proxy.

    Through a proxy the routing options are set here rather than by aiocoap's
    ``ProxyForwarder``, which drops ``handle_blockwise`` (so a block-by-block download through
    a proxy was re-assembled by aiocoap under our feet).
    """

    def __init__(self, context: ClientContext, proxy: str | None) -> None:
        from aiocoap.message import UndecidedRemote

        self._context = context
        self._proxy = UndecidedRemote.from_pathless_uri(proxy) if proxy else None

    def request(self, message: aiocoap.Message, handle_blockwise: bool = True) -> Any:
        if self._proxy is not None:
            from aiocoap.util import hostportsplit

            host, port = hostportsplit(message.remote.hostinfo)
            message.opt.uri_port = port
            message.opt.uri_host = host
            message.opt.proxy_scheme = message.remote.scheme
            message.remote = self._proxy
        return self._context.context.request(message, handle_blockwise=handle_blockwise)

    def describe(self, response: aiocoap.Message) -> dict[str, Any]:
        from coaplayers.layer0_modes import layer1_details

        return {"layer 1": layer1_details(response)}


async def open_requester(ctx: ClientContext, config: ClientConfig, state: RunState
                         ) -> Requester:
    if config.layer0.mode is None:
        if config.needs_security:
            from .security import e2e_options

            e2e_options(config, state)  # refuses end-to-end credentials without --layer0
        return PlainRequester(ctx, config.proxy)
    from coaplayers.layer0_modes import open_requester as open_e2e

    from .security import check_layers_apart, e2e_options

    e2e = e2e_options(config, state)
    check_layers_apart(state.layer1_credentials, e2e)
    from pathlib import Path

    from coaplayers.clientstate import StateFolderError, owner_only_folder, state_root
    from coaplayers.dtls import ConfigurationError
    from coaplayers.oscore.errors import PersistenceError

    state_dir = None
    try:
        if e2e is not None and config.keep:
            state_dir = owner_only_folder(
                Path(config.state_dir) if config.state_dir else state_root(),
                "what coap-client keeps between runs", tighten=not config.state_dir)
        # A Layer 0 mode needs security (ClientConfig.needs_security): the context has Layer 1.
        assert not isinstance(ctx, PlainContext)
        return await open_e2e(ctx, proxy=config.proxy, e2e=e2e, target=config.uri,
                              state=state_dir)
    except (StateFolderError, PersistenceError) as e:
        raise ConfigurationError(f"--state-dir: {e} (or --no-keep)") from e


def build_request(config: ClientConfig) -> aiocoap.Message:
    msg = aiocoap.Message(code=METHODS[config.method], payload=config.payload or b"",
                          mtype=aiocoap.CON if config.confirmable else aiocoap.NON)
    scheme, _, rest = config.uri.partition("://")
    if scheme.lower() in ("http", "https"):
        # Through a cross-proxy: options as for a coap:// URI, then the remote's scheme says
        # which one the proxy is to speak (Proxy-Scheme, or the origin of the e2e modes).
        from aiocoap.message import UndecidedRemote

        msg.set_request_uri("coap://" + rest, set_uri_host=not config.omit_uri_host)
        msg.remote = UndecidedRemote(scheme.lower(), msg.remote.hostinfo)
    else:
        msg.set_request_uri(config.uri, set_uri_host=not config.omit_uri_host)
    if not config.omit_uri_host and config.layer0.mode is None:
        # As libcoap: a port that is not the scheme's default goes in Uri-Port too (the
        # end-to-end modes leave the outer options to their own rules).
        port = urllib.parse.urlsplit(config.uri).port
        if port is not None and port != (5684 if config.uri[:6].lower() == "coaps:" else 5683):
            msg.opt.uri_port = port
    if config.content_format is not None:
        msg.opt.content_format = config.content_format
    if config.accept is not None:
        msg.opt.accept = config.accept
    if config.observe is not None:
        msg.opt.observe = 0
    if config.hop_limit is not None:
        msg.opt.add_option(OptionNumber.HOP_LIMIT.create_option(value=config.hop_limit))
    for number, value in config.options:
        msg.opt.add_option(OptionNumber(number).create_option(decode=value))
    if config.block_size_exp is not None:
        if msg.code in (Code.GET, Code.FETCH):
            msg.opt.block2 = (config.block_start, False, config.block_size_exp)
        if config.payload:
            msg.opt.block1 = (0, False, config.block_size_exp)
    return msg


async def run(config: ClientConfig, state: RunState) -> int:
    ctx = await open_context(config, state)
    if config.dump or config.loss or config.token is not None:
        from .tap import install

        install(ctx.context, config)
    printer = output.Printer(config)
    requester: Requester | None = None
    try:
        requester = await open_requester(ctx, config, state)
        code = 0
        for i in range(config.repeat):
            if i:
                await asyncio.sleep(1.0)  # -G: libcoap's pace, a second between requests
            if config.observe is not None:
                code = await _observe(requester, config, printer, ctx, state)
            else:
                response = await asyncio.wait_for(_one(requester, config, printer, ctx),
                                                  config.timeout)
                printer.response(response, describe(requester, response, ctx),
                                 gateway_hint(response.code, config))
                code = exit_code(response)
        return code
    finally:
        printer.close()
        await _close(requester)
        await ctx.shutdown()


async def _one(requester: Requester, config: ClientConfig, printer: output.Printer,
               ctx: ClientContext) -> aiocoap.Message:
    request = build_request(config)
    plain = isinstance(requester, PlainRequester)
    if config.block_start > 0 and request.opt.block2 is not None and isinstance(
            requester, PlainRequester):
        # libcoap's -b NUM,SIZE: that one block.
        return await requester.request(request, handle_blockwise=False).response
    if printer.progress_wanted() and plain and request.code in (Code.GET, Code.FETCH):
        return await output.blockwise_with_progress(
            requester.request, request, printer.progress, szx=config.block_size_exp)
    return await requester.request(request).response


async def _close(requester: Requester | None) -> None:
    """End the Layer 0 session or OSCORE keying session (frees the DTLS engine's state)."""
    close = getattr(requester, "close", None)
    if close is None:
        return
    try:
        await asyncio.wait_for(close(), 2.0)
    except Exception:  # best effort: the peer may be gone, the outcome is already decided
        pass


def describe(requester: Requester, response: aiocoap.Message, ctx: ClientContext
             ) -> dict[str, Any]:
    """Per-layer details for -v; the first hop's Layer 1 session also in end-to-end modes."""
    layers: dict[str, Any] = dict(requester.describe(response))
    if "layer 1" not in layers:
        layers["layer 1"] = _first_hop(ctx)
    return layers


def _first_hop(ctx: ClientContext) -> dict[str, Any] | None:
    # The end-to-end requesters answer with the inner response, whose remote is the Layer 0
    # session; the first hop's DTLS session is the one our Layer 1 transport holds as client.
    from types import SimpleNamespace

    from coaplayers.layer0_modes import layer1_details

    for remote in list(getattr(ctx.layer1, "_remotes", {}).values()):
        peer = getattr(remote, "peer", None)
        if peer is not None and getattr(peer, "is_client", False) and peer.session is not None:
            details = layer1_details(SimpleNamespace(remote=remote))
            if details is not None:
                return details
    return {"mode": "none (plain CoAP on the first hop)"}


def _max_age(message: aiocoap.Message) -> float:
    value = message.opt.max_age
    return float(value) if value is not None else 60.0


async def _observe(requester: Requester, config: ClientConfig, printer: output.Printer,
                   ctx: ClientContext, state: RunState) -> int:
    """Observe for -s seconds. A notification is due within the last one's Max-Age (RFC 7641
    section 3.3.1); when none comes (plus a margin, or -K), the path may have died without a
    word (a proxy stopped, a NAT forgot us): register again, and fail if that finds nobody."""
    from .main import OBSERVE_MARGIN

    loop = asyncio.get_running_loop()
    end = loop.time() + config.observe if config.observe is not None else loop.time()
    pr = requester.request(build_request(config))
    first = await asyncio.wait_for(pr.response, config.timeout)
    printer.response(first, describe(requester, first, ctx), gateway_hint(first.code, config))
    if not first.code.is_successful() or pr.observation is None:
        return exit_code(first)
    if first.opt.observe is None:
        # Not added to the observers (RFC 7641 3.1: the resource cannot be observed): the
        # answer printed is all there is, as for a plain GET.
        _stop(pr.observation)
        return exit_code(first)
    last = first
    try:
        it = pr.observation.__aiter__()
        while (remaining := end - loop.time()) > 0:
            quiet = _max_age(last) + OBSERVE_MARGIN
            if config.ping_interval is not None:
                quiet = min(quiet, config.ping_interval)
            try:
                note = await asyncio.wait_for(it.__anext__(), min(remaining, quiet))
            except TimeoutError:
                if loop.time() >= end:
                    break
                why = f"no notification for {quiet:g} s (Max-Age {_max_age(last):g} s)"
            except StopAsyncIteration:
                why = "the server ended the observation"
            except Exception as exc:  # the observation failed (network error, 5.xx, ...)
                why = f"the observation failed ({classify(exc, config, state)[1]})"
            else:
                printer.response(note, None, gateway_hint(note.code, config))
                last = note
                continue
            _stop(pr.observation)
            pr = requester.request(build_request(config))
            try:
                again = await asyncio.wait_for(
                    pr.response, min(config.timeout, max(1.0, end - loop.time())))
            except Exception as exc:
                raise ObservationSilent(
                    f"observation of {config.uri}: {why}; registering again failed:"
                    f" {classify(exc, config, state)[1]}") from exc
            printer.response(again, None, gateway_hint(again.code, config))
            if not again.code.is_successful() or pr.observation is None:
                return exit_code(again)
            last = again
            it = pr.observation.__aiter__()
    finally:
        if pr.observation is not None:
            _stop(pr.observation)
    return 0


def _stop(observation: Any) -> None:
    """Cancel an observation once: aiocoap's ends itself when the server ends it (or never
    started it) and asserts on a second cancel."""
    if not getattr(observation, "cancelled", False):
        observation.cancel()


