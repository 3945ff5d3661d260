"""Which worker of a coap-server takes a datagram: the kernel decides, from outer options.

``coap-server --workers N`` runs N processes on one port (:mod:`coaplayers.workers`). A Layer 0
session and an OSCORE context live in one of them, and requests that come through a proxy may
all share one source address and port, so the kernel's usual SO_REUSEPORT hash of the
address 4-tuple would send them all to one worker, or a session's requests to the wrong one.
Instead, each worker writes its index into the routing keys it hands out, and a classic BPF
program attached to the port's SO_REUSEPORT group (``SO_ATTACH_REUSEPORT_CBPF``) reads them
from each datagram (the program sees the UDP payload, i.e. the CoAP message):

- a one-segment Uri-Path ``~xy...`` (a Layer 0 session): worker = the byte value of its
  third character (``y``) modulo N;
- an OSCORE option with a ``kid``: worker = the kid's last byte modulo N;
- a payload that is a DTLS ClientHello (a Layer 0 first flight): 4 bytes of its random modulo
  N (the ClientHello repeated with a HelloVerifyRequest cookie carries the same random, so it
  reaches the worker whose cookie it returns);
- anything else (a plain request, a malformed message): the kernel's address hash, so a
  client's block-wise transfers and observations stay with one worker.

No datagram is copied between processes and no table is kept: steering costs the kernel a
few dozen BPF instructions per datagram and the workers nothing. The replica number
(:mod:`coaplayers.replica`) sits in other bits of the same keys, so a proxy routes to the
replica and the replica's kernel to the worker.
"""

from __future__ import annotations

import ctypes
import socket
from dataclasses import dataclass

SO_ATTACH_REUSEPORT_CBPF = 51
FALLBACK = 0xFFFFFFFF  # an index beyond the group: the kernel uses its address hash

# Classic BPF opcodes (linux/filter.h).
_LD_IMM, _LDX_IMM, _LD_MEM, _LDX_MEM, _ST = 0x00, 0x01, 0x60, 0x61, 0x02
_LDB_ABS, _LDB_IND, _LDH_IND, _LDW_IND = 0x30, 0x50, 0x48, 0x40
_SUB_X = 0x1C
_ADD_K, _ADD_X, _SUB_K, _AND_K, _RSH_K, _MOD_K = 0x04, 0x0C, 0x14, 0x54, 0x74, 0x94
_TAX = 0x07
_JA, _JEQ, _JGT, _JGE, _JSET, _JGT_X = 0x05, 0x15, 0x25, 0x35, 0x45, 0x2D
_LD_LEN = 0x80
_RET_K, _RET_A = 0x06, 0x16

# Scratch memory slots.
_NUMBER, _POS, _DELTA, _LENGTH, _VALUE, _HEADER = range(6)

OPTIONS_READ = 8
"""Options looked at before giving up (a session request has Uri-Path first or after
Uri-Host and Observe; an OSCORE request has its option before the 11th; a first flight has
Uri-Host, two Uri-Path segments, Content-Format and Hop-Limit before its payload)."""


@dataclass(frozen=True, slots=True)
class _Insn:
    code: int
    k: int | str = 0  # a number, or a label (for ja)
    jt: str | None = None
    jf: str | None = None


class _Program:
    def __init__(self) -> None:
        self.insns: list[_Insn | str] = []  # instructions and labels
        self._n = 0

    def label(self) -> str:
        self._n += 1
        return f"L{self._n}"

    def at(self, label: str) -> None:
        self.insns.append(label)

    def op(self, code: int, k: int | str = 0, jt: str | None = None,
           jf: str | None = None) -> None:
        self.insns.append(_Insn(code, k, jt, jf))

    def assemble(self) -> list[tuple[int, int, int, int]]:
        where: dict[str, int] = {}
        n = 0
        for item in self.insns:
            if isinstance(item, str):
                where[item] = n
            else:
                n += 1
        out: list[tuple[int, int, int, int]] = []
        for item in self.insns:
            if isinstance(item, str):
                continue
            pc = len(out)

            def rel(label: str | None, limit: int, pc: int = pc) -> int:
                if label is None:
                    return 0
                offset = where[label] - pc - 1
                if not 0 <= offset <= limit:
                    raise ValueError(f"jump to {label} out of range ({offset})")
                return offset

            k = rel(item.k, 0xFFFFFFFF) if isinstance(item.k, str) else item.k
            out.append((item.code, rel(item.jt, 255), rel(item.jf, 255), k))
        return out


def steering_program(workers: int) -> list[tuple[int, int, int, int]]:
    """The classic BPF program for ``workers`` sockets (see module docstring)."""
    if not 1 <= workers <= 255:
        raise ValueError("1 to 255 workers")
    p = _Program()
    fallback, oscore, uri_path, payload = "fallback", "oscore", "uri_path", "payload"
    p.op(_LDB_ABS, 0)
    p.op(_AND_K, 0x0F)  # token length
    p.op(_JGT, 8, jt="pad0", jf=None)
    p.op(_ADD_K, 4)
    p.op(_ST, _POS)
    p.op(_LD_IMM, 0)
    p.op(_ST, _NUMBER)
    p.op(_JA, "it1")
    p.at("pad0")
    p.op(_JA, fallback)
    for i in range(1, OPTIONS_READ + 1):
        p.at(f"it{i}")
        pad_fb, pad_os, pad_up, pad_pl = f"fb{i}", f"os{i}", f"up{i}", f"pl{i}"
        next_option = f"next{i}"
        p.op(_LDX_MEM, _POS)
        p.op(_LD_LEN)
        p.op(_JGT_X, jf=pad_fb)  # the message ends here (a load beyond it would return 0)
        p.op(_LDB_IND, 0)
        p.op(_JEQ, 0xFF, jt=pad_pl)  # payload marker
        p.op(_ST, _HEADER)
        p.op(_RSH_K, 4)
        p.op(_ST, _DELTA)
        p.op(_LD_MEM, _HEADER)
        p.op(_AND_K, 0x0F)
        p.op(_ST, _LENGTH)
        p.op(_LD_MEM, _POS)
        p.op(_ADD_K, 1)
        p.op(_ST, _VALUE)
        for slot in (_DELTA, _LENGTH):  # extended forms (RFC 7252 3.1)
            one, two, done = p.label(), p.label(), p.label()
            p.op(_LD_MEM, slot)
            p.op(_JEQ, 15, jt=pad_fb)
            p.op(_JEQ, 13, jt=one)
            p.op(_JEQ, 14, jt=two)
            p.op(_JA, done)
            for label, load, extra, size in ((one, _LDB_IND, 13, 1), (two, _LDH_IND, 269, 2)):
                p.at(label)
                p.op(_LDX_MEM, _VALUE)
                p.op(load, 0)
                p.op(_ADD_K, extra)
                p.op(_ST, slot)
                p.op(_LD_MEM, _VALUE)
                p.op(_ADD_K, size)
                p.op(_ST, _VALUE)
                p.op(_JA, done)
            p.at(done)
        p.op(_LD_MEM, _NUMBER)
        p.op(_LDX_MEM, _DELTA)
        p.op(_ADD_X)
        p.op(_ST, _NUMBER)
        p.op(_JEQ, 9, jt=pad_os)
        p.op(_JEQ, 11, jf=next_option)
        # Uri-Path: "~" starts a session name; other segments (the entry resource's) go on.
        p.op(_LDX_MEM, _VALUE)
        p.op(_LDB_IND, 0)
        p.op(_JEQ, ord("~"), jt=pad_up)
        p.at(next_option)
        p.op(_LD_MEM, _VALUE)
        p.op(_LDX_MEM, _LENGTH)
        p.op(_ADD_X)
        p.op(_ST, _POS)
        p.op(_JA, f"it{i + 1}")
        p.at(pad_fb)
        p.op(_JA, fallback)
        p.at(pad_os)
        p.op(_JA, oscore)
        p.at(pad_up)
        p.op(_JA, uri_path)
        p.at(pad_pl)
        p.op(_JA, payload)
    p.at(f"it{OPTIONS_READ + 1}")
    p.op(_JA, fallback)
    # OSCORE option: flags byte with the kid flag (0x08), then the kid ends the value.
    p.at(oscore)
    p.op(_LD_MEM, _LENGTH)
    p.op(_JEQ, 0, jt=fallback)
    p.op(_LDX_MEM, _VALUE)
    p.op(_LDB_IND, 0)
    p.op(_JSET, 0x08, jt="kid", jf=fallback)
    p.at("kid")
    p.op(_LD_MEM, _VALUE)
    p.op(_LDX_MEM, _LENGTH)
    p.op(_ADD_X)
    p.op(_SUB_K, 1)
    p.op(_TAX)
    p.op(_LDB_IND, 0)
    p.op(_MOD_K, workers)
    p.op(_RET_A)
    # Uri-Path: a session name "~xy..." (at least 3 bytes).
    p.at(uri_path)
    p.op(_LD_MEM, _LENGTH)
    p.op(_JGE, 3, jf=fallback)
    p.op(_LDX_MEM, _VALUE)
    p.op(_LDB_IND, 0)
    p.op(_JEQ, ord("~"), jf=fallback)
    p.op(_LDB_IND, 2)
    p.op(_MOD_K, workers)
    p.op(_RET_A)
    # Payload: a DTLS ClientHello (record type 22, handshake type 1) is steered by 4 bytes of
    # its random, which its retry with a HelloVerifyRequest cookie repeats.
    p.at(payload)
    p.op(_LD_MEM, _POS)
    p.op(_ADD_K, 1)
    p.op(_TAX)
    p.op(_LD_LEN)
    p.op(_SUB_X)
    p.op(_JGE, 59, jf=fallback)
    p.op(_LDB_IND, 0)
    p.op(_JEQ, 22, jf=fallback)
    p.op(_LDB_IND, 13)
    p.op(_JEQ, 1, jf=fallback)
    p.op(_LDW_IND, 27 + 28)  # the random's last 4 bytes (its first 4 may be a time)
    p.op(_MOD_K, workers)
    p.op(_RET_A)
    p.at(fallback)
    p.op(_RET_K, FALLBACK)
    return p.assemble()


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def attach(sock: socket.socket, workers: int) -> None:
    """Steer the SO_REUSEPORT group ``sock`` belongs to; socket i of the group (in the order
    they were bound) is worker i. OSError where the kernel refuses (not Linux, too old)."""
    program = steering_program(workers)
    array = (_SockFilter * len(program))(*[_SockFilter(c, t, f, k) for c, t, f, k in program])
    fprog = _SockFprog(len(program), ctypes.cast(array, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def session_name_for(name: str, worker: int, workers: int) -> bool:
    """Whether a session name (without ``~``) steers to ``worker``."""
    return ord(name[1]) % workers == worker


def client_id_for(kid: bytes, worker: int, workers: int) -> bool:
    """Whether an OSCORE client ID steers to ``worker``."""
    return kid[-1] % workers == worker
