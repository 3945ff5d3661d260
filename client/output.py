"""How coap-client shows responses: payload on stdout, details on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO

import aiocoap
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import BlockOption

from coaplayers.dtls import ConfigurationError

if TYPE_CHECKING:
    from .options import ClientConfig

_NAMES = {
    "text": 0, "text/plain": 0, "link": 40, "application/link-format": 40,
    "xml": 41, "application/xml": 41, "octet": 42, "application/octet-stream": 42,
    "json": 50, "application/json": 50, "cbor": 60, "application/cbor": 60,
    "senml+json": 110, "senml+cbor": 112,
}


def content_format(text: str) -> int:
    """A Content-Format from a number or a name (``text/plain``, ``json``, ``cbor``, ...)."""
    if text.isdigit():
        value = int(text)
        if value > 65535:
            raise ConfigurationError(f"Content-Format {value} is out of range")
        return value
    key = text.strip().lower()
    if key in _NAMES:
        return _NAMES[key]
    try:
        return int(ContentFormat.by_media_type(key))
    except (KeyError, ValueError) as exc:
        raise ConfigurationError(f"unknown Content-Format {text!r}") from exc


def render(payload: bytes, fmt: int | None) -> tuple[bytes, bool]:
    """The payload as shown on a terminal, and whether it is text at all."""
    if fmt in (50, 110):
        try:
            return json.dumps(json.loads(payload), indent=2).encode() + b"\n", True
        except ValueError:
            pass
    if fmt in (60, 112):
        try:
            from cbor_diag import cbor2diag

            return cbor2diag(payload).encode() + b"\n", True
        except Exception:
            try:
                import cbor2

                return repr(cbor2.loads(payload)).encode() + b"\n", True
            except Exception:
                pass
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return payload, False
    if fmt == 40 and "\n" not in text:
        return text.replace(">,<", ">,\n<").encode() + b"\n", True
    if fmt in (None, 0, 40, 41) or text.isprintable() or "\n" in text:
        return payload + (b"" if payload.endswith(b"\n") or not payload else b"\n"), True
    return payload, False


class Progress:
    """A one-line bar on stderr, rewritten when a received block moves it by a per cent (only
    used on a terminal; a server may answer in thousands of small blocks, as coap-server and
    coap-proxy do for an address they have not verified)."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.shown = False
        self._percent = -1

    def update(self, received: int, total: int | None) -> None:
        if total:
            done = min(received, total)
            percent = 100 * done // total
            if percent == self._percent:
                return
            self._percent = percent
            filled = self.WIDTH * done // total
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            text = f"\r[{bar}] {done}/{total} bytes {100 * done // total:3d}%"
        else:
            text = f"\r{received} bytes received"
        self.stream.write(text)
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


async def blockwise_with_progress(
    send: Callable[..., Any], request: aiocoap.Message, progress: Progress, *,
    szx: int | None = None,
) -> aiocoap.Message:
    """A GET/FETCH with Block2 driven here, one block at a time, so that each shows as progress.

    aiocoap assembles Block2 internally and reports nothing per block, so the client asks for
    each block itself (``handle_blockwise=False``) and asks for the total size (Size2 0,
    RFC 7959 section 4). A response without Block2 is returned as it is.
    """
    szx = 6 if szx is None else szx
    number = 0
    offset = 0
    body = bytearray()
    first_etag = None
    try:
        while True:
            msg = request.copy()
            msg.opt.block2 = BlockOption.BlockwiseTuple(number, False, szx)
            if not body:
                msg.opt.size2 = 0
            response = await send(msg, handle_blockwise=False).response
            block2 = response.opt.block2
            if block2 is None or not response.code.is_successful():
                if not body:
                    return response
                raise aiocoap.error.UnexpectedBlock2(f"block {number} answered {response.code}")
            if not body:
                first_etag = response.opt.etag
                # The server may answer with smaller blocks than asked (RFC 7959 2.4).
                offset = block2.block_number << (block2.size_exponent + 4)
            elif response.opt.etag != first_etag:
                raise aiocoap.error.UnexpectedBlock2("the resource changed during the transfer")
            at = block2.block_number << (block2.size_exponent + 4)
            if at != offset + len(body):
                raise aiocoap.error.UnexpectedBlock2(
                    f"asked for the block at offset {offset + len(body)}, got offset {at}")
            body += response.payload
            progress.update(offset + len(body), response.opt.size2)
            if not block2.more:
                response.payload = bytes(body)
                response.opt.block2 = None
                return response
            szx = block2.size_exponent
            number = (offset + len(body)) >> (szx + 4)
    finally:
        progress.finish()


class Printer:
    """Where and how payloads go: as received on a pipe or into a file (like libcoap),
    rendered for reading on a terminal or with --pretty."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.to_file = config.output is not None and config.output != "-"
        # libcoap ends its stdout output with a newline, unless -o names a file or "-".
        self.final_newline = config.output is None
        self.wrote = False
        self._file: IO[bytes] | None = None
        self.progress = Progress(sys.stderr)
        self.pretty = config.pretty if config.pretty is not None else (
            not self.to_file and sys.stdout.isatty())

    def progress_wanted(self) -> bool:
        return sys.stderr.isatty()

    def response(self, response: aiocoap.Message, layers: dict[str, Any] | None,
                 hint: str = "") -> None:
        if self.config.details:
            self._details(response, layers)
        payload = response.payload
        if not response.code.is_successful():
            # Failures go to stderr as one line: the code, the server's diagnostic text and,
            # for a proxy's 5.02/5.04, which hop failed.
            why = payload.decode(errors="replace").strip().replace("\n", " ")[:200]
            print(f"coap-client: {response.code}" + (f": {why}" if why else "")
                  + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
            return
        data = payload
        if self.pretty:
            shown, is_text = render(payload, response.opt.content_format)
            if not is_text and not self.to_file and sys.stdout.isatty():
                print(
                    f"coap-client: {len(payload)} bytes of binary payload not shown on a"
                    " terminal; use -o FILE or a pipe",
                    file=sys.stderr,
                )
                return
            data = shown if is_text else payload
            if self.config.newline and not data.endswith(b"\n"):
                data += b"\n"
        elif self.config.newline and data:
            data += b"\n"
        if not data:
            return  # as libcoap: nothing received, nothing written (not even the newline)
        out = self._open()
        out.write(data)
        out.flush()
        self.wrote = True

    def _open(self) -> IO[bytes]:
        if not self.to_file:
            return sys.stdout.buffer
        if self._file is None:
            assert self.config.output is not None  # to_file
            try:
                self._file = open(Path(self.config.output), "wb")
            except OSError as exc:
                raise ConfigurationError(
                    f"-o {self.config.output}: cannot write it: {exc.strerror}") from exc
        return self._file

    def _details(self, response: aiocoap.Message, layers: dict[str, Any] | None) -> None:
        err = sys.stderr
        print(f"response: {response.code}", file=err)
        for opt in response.opt.option_list():
            if opt.number == 9:  # OSCORE: opaque
                continue
            print(f"  {option_name(opt.number)}: {option_value(opt)}", file=err)
        print(f"  payload: {len(response.payload)} bytes", file=err)
        for layer, info in (layers or {}).items():
            if info:
                details = ", ".join(f"{k} {v}" for k, v in info.items() if v is not None)
                print(f"  {layer}: {details}", file=err)
        err.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self.wrote and self.final_newline and not self.pretty:
            sys.stdout.buffer.write(b"\n")
            sys.stdout.flush()


def option_name(number: Any) -> str:
    name = getattr(number, "name", None)
    if not name:
        return f"option {int(number)}"
    return "-".join(w.capitalize() if w not in ("ETAG",) else "ETag" for w in name.split("_"))


def option_value(opt: Any) -> str:
    value = opt.value
    if opt.number == OptionNumber.CONTENT_FORMAT or opt.number == OptionNumber.ACCEPT:
        media = getattr(value, "media_type", None)
        return f"{int(value)} ({media})" if media else str(int(value))
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, BlockOption.BlockwiseTuple):
        return f"{value.block_number}/{int(value.more)}/{value.size}"
    return str(value)
