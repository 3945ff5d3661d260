"""The relay's capture file: every datagram the relay saw on its hop, one text line each.

Why text and not pcap: the tests that use it ask one question ("did this plaintext marker ever
cross this hop?"), which is a substring search over hex; a line per datagram can be grepped, diffed
and read by a person without tools.

Line format (space separated, newline terminated)::

    <seconds since the relay started, 6 decimals> <up|down> <payload as lowercase hex>

Datagrams are recorded as they arrive at the relay, before faults are applied, so a datagram that
the relay then dropped is in the file too: it did cross the wire on the side it came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TextIO

from .faults import Direction

__all__ = ["CaptureWriter", "CapturedDatagram", "read_capture"]


@dataclass(frozen=True, slots=True)
class CapturedDatagram:
    time: float
    direction: Direction
    data: bytes


class CaptureWriter:
    """Appends datagrams to a capture file, line buffered so a test can read it while it runs."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file: TextIO | None = open(path, "w", encoding="ascii", buffering=1)

    def write(self, time: float, direction: Direction, data: bytes) -> None:
        if self._file is not None:
            self._file.write(f"{time:.6f} {direction.value} {data.hex()}\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_capture(path: str | os.PathLike[str]) -> list[CapturedDatagram]:
    """Parse a capture file written by the relay (``--record``)."""
    out: list[CapturedDatagram] = []
    with open(path, encoding="ascii") as f:
        for number, line in enumerate(f, 1):
            parts = line.rstrip("\n").split(" ")
            if len(parts) != 3:
                raise ValueError(f"{path}:{number}: expected 'time direction hex'")
            time, direction, hexdata = parts
            out.append(CapturedDatagram(float(time), Direction(direction), bytes.fromhex(hexdata)))
    return out
