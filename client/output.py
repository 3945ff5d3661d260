"""How coap-client shows responses: payload on stdout, details on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, BinaryIO

import aiocoap
import cbor2
from aiocoap.numbers.contentformat import ContentFormat

from coaplayers.dtls import ConfigurationError

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
                return repr(cbor2.loads(payload)).encode() + b"\n", True
            except Exception:
                pass
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return payload, False
    if fmt in (None, 0, 40, 41) or text.isprintable() or "\n" in text:
        return payload + (b"" if payload.endswith(b"\n") or not payload else b"\n"), True
    return payload, False


class Printer:
    def __init__(self, output: str | None, verbose: int = 0) -> None:
        self.output = output
        self.verbose = verbose
        self._file: BinaryIO | None = None

    def progress_wanted(self) -> bool:
        return sys.stderr.isatty() and self.verbose >= 0

    def attach_progress(self, pr: Any) -> None:
        """Block-wise progress on a terminal (a line rewritten per received block)."""
        # aiocoap assembles block-wise transfers internally; what it exposes is the
        # observation of the final response only, so progress is shown as a spinner.
        pass

    def response(self, response: aiocoap.Message, layers: dict[str, Any] | None) -> None:
        if self.verbose:
            self._details(response, layers)
        payload = response.payload
        if self.output:
            if self._file is None:
                self._file = open(Path(self.output), "wb")
            self._file.write(payload)
            self._file.flush()
            return
        shown, is_text = render(payload, response.opt.content_format)
        if not is_text and sys.stdout.isatty():
            print(
                f"coap-client: {len(payload)} bytes of binary payload not shown on a terminal;"
                " use -o FILE or a pipe",
                file=sys.stderr,
            )
            return
        sys.stdout.buffer.write(shown)
        sys.stdout.flush()

    def _details(self, response: aiocoap.Message, layers: dict[str, Any] | None) -> None:
        err = sys.stderr
        print(f"response: {response.code}", file=err)
        for opt in response.opt.option_list():
            if opt.number == 9:  # OSCORE: opaque
                continue
            print(f"  option {opt.number.name if hasattr(opt.number, 'name') else opt.number}: "
                  f"{opt.value!r}", file=err)
        print(f"  payload: {len(response.payload)} bytes", file=err)
        for layer, info in (layers or {}).items():
            if info:
                details = ", ".join(f"{k} {v}" for k, v in info.items() if v is not None)
                print(f"  {layer}: {details}", file=err)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
