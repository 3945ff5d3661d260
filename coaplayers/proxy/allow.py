"""Which upstreams forward proxying may reach: the operator's allow-list, closed by default.

A forward proxy that relays to any ``Proxy-Uri`` is a request-forgery tool: a client that can
reach the proxy reaches every UDP port the proxy can, its own loopback services included. So a
forward-proxy target must match an ``allow`` entry (``HOST[:PORT]``, HOST a name, an address or
a CIDR prefix, or ``*``), and the proxy's own addresses, loopback, link-local, unspecified and
multicast addresses need an entry that names them (an address or a prefix other than ``/0``):
``*`` does not open them. Reverse routes are the operator's own choice and are not checked.

A name entry trusts whatever the name resolves to (the operator named it). A name reached only
through ``*`` or a prefix is checked again on the address it resolved to, so a name that
resolves to loopback (as an attacker's DNS can arrange) is refused like the literal.

Pure: the question "is this address one of this host's own" is asked through a callable
(``local_address``), which the proxy answers by binding a probe socket.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .config import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One ``allow`` entry: a name, or an address prefix, or everything; any port or one."""

    spec: str
    name: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    @classmethod
    def parse(cls, spec: str) -> AllowRule:
        text = spec.strip()
        if not text:
            raise ConfigError("allow: an empty entry")
        port: int | None = None
        host = text
        if text.startswith("["):  # [v6] or [v6/len] with an optional :PORT
            inner, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ConfigError(f"allow {spec!r}: expected [ADDRESS]:PORT")
            host, port_s = inner, rest[1:]
            port = _port(spec, port_s) if rest else None
        elif text.count(":") == 1:  # name:port, v4:port, v4/len:port
            host, port_s = text.split(":")
            port = _port(spec, port_s)
        if host == "*":
            return cls(spec, port=port)
        if "/" in host:
            try:
                network = ipaddress.ip_network(host, strict=False)
            except ValueError as exc:
                raise ConfigError(f"allow {spec!r}: not an address prefix") from exc
            return cls(spec, network=network, port=port)
        ip = _address(host)
        if ip is not None:
            return cls(spec, network=ipaddress.ip_network(ip), port=port)
        name = host.lower().rstrip(".")
        if not name or any(c in name for c in "/@ ") or ":" in name:
            raise ConfigError(f"allow {spec!r}: expected HOST[:PORT] (a name, an address, a"
                              " CIDR prefix or *)")
        return cls(spec, name=name, port=port)

    @property
    def everything(self) -> bool:
        """``*``, or a prefix of length 0: any address, but not the special ones."""
        return self.name is None and (self.network is None or self.network.prefixlen == 0)

    def port_ok(self, port: int) -> bool:
        return self.port is None or self.port == port


def _port(spec: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"allow {spec!r}: bad port")
    return int(text)


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    REFUSED = "refused"
    #: a name only a prefix or ``*`` could allow: check the address it resolves to
    CHECK_ADDRESS = "check_address"


def special_kind(ip: IPAddress) -> str | None:
    """Why an address is never reached through ``*``: loopback, link-local, ... (or None)."""
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    return None


def bind_probe(ip: IPAddress) -> bool:
    """Whether ``ip`` is one of this host's addresses: only those can be bound."""
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True


class AllowList:
    """The allow-list with the special-address rule (see module docstring)."""

    def __init__(self, specs: Iterable[str],
                 local_address: Callable[[IPAddress], bool] = bind_probe) -> None:
        self.rules = tuple(AllowRule.parse(s) for s in specs)
        self.names = tuple(r for r in self.rules if r.name is not None)
        self.addresses = tuple(r for r in self.rules if r.name is None)
        self.opens_everything = any(r.everything for r in self.rules)
        self._local_address = local_address
        self._verdicts: dict[tuple[IPAddress, int], bool] = {}
        self._targets: dict[tuple[str, int], Verdict] = {}  # (host, port) -> check_target

    def check_target(self, host: str, port: int) -> Verdict:
        """The verdict for a forward-proxy target before its name is resolved."""
        key = (host, port)
        verdict = self._targets.get(key)
        if verdict is None:
            verdict = self._check_target(host, port)
            if len(self._targets) >= 4096:  # targets come from the network: bounded
                self._targets.clear()
            self._targets[key] = verdict
        return verdict

    def _check_target(self, host: str, port: int) -> Verdict:
        ip = _address(host)
        if ip is not None:
            return Verdict.ALLOWED if self.address_allowed(ip, port) else Verdict.REFUSED
        name = host.lower().rstrip(".")
        for rule in self.names:
            if rule.name == name and rule.port_ok(port):
                return Verdict.ALLOWED
        if any(r.port_ok(port) for r in self.addresses):
            return Verdict.CHECK_ADDRESS
        return Verdict.REFUSED

    def address_allowed(self, ip: IPAddress | str, port: int) -> bool:
        """Whether the address (a literal, or what a name resolved to) may be reached."""
        if isinstance(ip, str):
            parsed = _address(ip)
            if parsed is None:
                return False
            ip = parsed
        key = (ip, port)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._address_allowed(ip, port)
            if len(self._verdicts) >= 4096:  # addresses come from the network: bounded
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def _address_allowed(self, ip: IPAddress, port: int) -> bool:
        special = special_kind(ip) is not None or self._local_address(ip)
        for rule in self.addresses:
            if not rule.port_ok(port):
                continue
            if rule.everything:
                if not special:
                    return True
            elif rule.network is not None and ip in rule.network:
                return True
        return False

    def describe_refusal(self, host: str, port: int) -> str:
        """The diagnostic payload of a 4.03: what was refused and why, never the list."""
        hostinfo = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        ip = _address(host)
        if ip is not None:
            kind = special_kind(ip) or ("own" if self._local_address(ip) else None)
            if kind is not None:
                return f"upstream {hostinfo} ({kind} address) is not allowed"
        return f"upstream {hostinfo} is not allowed"
