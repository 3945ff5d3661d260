"""Replica identity and the proxy's replica-set choice, without a network."""

from __future__ import annotations

import aiocoap
import pytest
from aiocoap.numbers.optionnumbers import OptionNumber

from coaplayers import replica
from coaplayers.layer0.core import Layer0ServerCore
from coaplayers.oscore import ContextStore
from coaplayers.proxy.config import ConfigError, ProxyConfig, Route, config_from_mapping
from coaplayers.proxy.replicas import Member, ReplicaSet, parse_probe_answer
from coaplayers.proxy.routing import Refusal, Router


def test_session_names_carry_the_replica_without_growing() -> None:
    core = Layer0ServerCore(listener=None)  # type: ignore[arg-type]
    plain = core._new_sid()
    for n in range(replica.MAX_REPLICA + 1):
        core.replica = n
        names = {core._new_sid() for _ in range(50)}
        assert all(len(s) == len(plain) for s in names)
        assert {replica.replica_of_session(s) for s in names} == {n}
        assert len(names) > 40  # still random
    assert replica.replica_of_session("hello") is None
    assert replica.replica_of_session("~") is None
    assert replica.replica_of_session("~!abc") is None


def test_client_ids_carry_the_replica_and_stay_one_byte_while_few() -> None:
    store = ContextStore(replica=9)
    ids = [store.allocate_client_id() for _ in range(20)]
    assert all(len(i) == 1 and replica.replica_of_kid(i) == 9 for i in ids)
    assert all(replica.replica_of_kid(store.allocate_client_id(3)) == 9 for _ in range(20))
    assert ContextStore().replica is None
    with pytest.raises(ValueError):
        replica.check_replica(16)
    with pytest.raises(ValueError):
        replica.check_replica(-1)


@pytest.mark.parametrize(
    ("option", "kid"),
    [
        (b"", None),
        (bytes([0x09, 0x05, 0x42]), b"\x42"),  # Partial IV 1 byte, kid 0x42
        (bytes([0x19, 0x05, 0x02, 0xAA, 0xBB, 0x71, 0x72]), b"\x71\x72"),  # with kid context
        (bytes([0x01, 0x05]), None),  # no kid flag
        (bytes([0x89, 0x05, 0x42]), None),  # reserved bit
        (bytes([0x19, 0x05]), None),  # kid context length missing
        (bytes([0x19, 0x05, 0x09, 0x01]), None),  # kid context longer than the option
    ],
)
def test_kid_of_option(option: bytes, kid: bytes | None) -> None:
    assert replica.kid_of_option(option) == kid


def _request(path: tuple[str, ...] = (), oscore: bytes | None = None,
             payload: bytes = b"") -> aiocoap.Message:
    m = aiocoap.Message(code=aiocoap.POST, uri_path=path, payload=payload)
    if oscore is not None:
        m.opt.add_option(aiocoap.optiontypes.OpaqueOption(OptionNumber.OSCORE, oscore))
    return m


def test_replica_of_request_reads_kid_then_session_name() -> None:
    assert replica.replica_of_request(_request(("~" + "M" + "abcd",)).opt) == 3  # M = 12
    assert replica.replica_of_request(_request(("hello",)).opt) is None
    assert replica.replica_of_request(_request(("~Mabcd", "x")).opt) is None
    kid = replica.client_id(7, b"\x05\x06")
    assert replica.replica_of_request(_request(("echo",), bytes([0x09, 1]) + kid).opt) == 7


def _hello(random: bytes) -> bytes:
    return bytes([22, 0xFE, 0xFD]) + bytes(10) + bytes([1]) + bytes(11) + b"\xfe\xfd" + random


def test_balance_key_is_the_client_hello_random_on_the_entry_resource() -> None:
    r = bytes(range(32))
    entry = _request((".well-known", "atls"), payload=_hello(r) + b"rest")
    assert replica.balance_key(entry, "10.0.0.1:5683") == r.hex()
    assert replica.balance_key(_request(("hello",), payload=_hello(r)), "c") == "c"
    assert replica.balance_key(_request((".well-known", "atls"), payload=b"\x16short"), "c") == "c"


def _set(n: int = 3) -> ReplicaSet:
    route = Route.make("/", [f"coap://127.0.0.{i + 1}:5683" for i in range(n)])
    s = ReplicaSet(route, timeout=3.0)
    for i, m in enumerate(sorted(s.members.values(), key=lambda m: m.key)):
        assert s.answered(m, i, now=0.0) == "up"
    return s


def test_two_proxies_choose_alike_and_only_a_dead_replicas_clients_move() -> None:
    a, b = _set(), _set()
    clients = [f"10.1.0.{i}:40000" for i in range(300)]
    first = [a.pick(None, c).replica for c in clients]  # type: ignore[union-attr]
    assert first == [b.pick(None, c).replica for c in clients]  # type: ignore[union-attr]
    assert min(first.count(r) for r in range(3)) > 60
    # Named replicas win over hashing.
    assert all(a.pick(2, c).replica == 2 for c in clients[:20])  # type: ignore[union-attr]
    # Replica 1 goes silent: down after the timeout, not before; only its clients move.
    for m in a.members.values():
        if m.replica != 1:
            a.answered(m, m.replica, now=2.5)
    assert a.expire(now=3.0) == []
    gone = a.expire(now=3.1)
    assert [m.replica for m in gone] == [1]
    after = [a.pick(None, c).replica for c in clients]  # type: ignore[union-attr]
    assert all(x == y for x, y in zip(first, after, strict=True) if x != 1)
    assert 1 not in after
    assert a.pick(1, "x").replica != 1  # type: ignore[union-attr]
    # Back with its first answer.
    m1 = next(m for m in a.members.values() if m.replica == 1)
    assert a.answered(m1, 1, now=4.0) == "up"
    assert [a.pick(None, c).replica for c in clients] == first  # type: ignore[union-attr]


def test_no_healthy_member_is_a_503_with_max_age() -> None:
    config = ProxyConfig(routes=(Route.parse("/=replicas:coap://127.0.0.1:1,coap://127.0.0.1:2"),))
    router = Router(config)
    with pytest.raises(Refusal) as refused:
        router.decide(_request(("hello",)), "10.0.0.1:1")
    assert refused.value.code == aiocoap.SERVICE_UNAVAILABLE and refused.value.max_age == 1
    s = router.sets["/"]
    for i, m in enumerate(s.members.values()):
        s.answered(m, i + 4, now=0.0)
    d = router.decide(_request(("~" + replica.session_name(5, "AAAAA")[0] + "bcd",)), "c")
    assert d.upstream.port == 2 and d.path[0].startswith("~")


def test_dns_members_follow_the_names_addresses() -> None:
    s = ReplicaSet(Route.parse("/=replicas:coap://app-server:5683"), timeout=1.0)
    assert s.members == {} and [n.host for n in s.names] == ["app-server"]
    s.set_addresses(s.names[0], ["10.0.0.2", "10.0.0.3"])
    assert sorted(s.members) == ["coap://10.0.0.2:5683", "coap://10.0.0.3:5683"]
    for i, m in enumerate(s.members.values()):
        s.answered(m, i, now=0.0)
    s.set_addresses(s.names[0], ["10.0.0.3"])
    assert sorted(s.members) == ["coap://10.0.0.3:5683"] and s.healthy in ([0], [1])
    member: Member = s.pick(None, "c")  # type: ignore[assignment]
    assert member.name == "app-server"


def test_probe_answers_and_configuration() -> None:
    ok = aiocoap.Message(code=aiocoap.CONTENT, payload=b"7")
    assert parse_probe_answer(ok) == 7
    for bad in (b"", b"16", b"x", b"123"):
        assert parse_probe_answer(aiocoap.Message(code=aiocoap.CONTENT, payload=bad)) is None
    assert parse_probe_answer(aiocoap.Message(code=aiocoap.NOT_FOUND, payload=b"1")) is None
    cfg = config_from_mapping({"routes": {"/": ["coap://a:1", "coap://b:2"]},
                               "health_interval": 0.5})
    assert cfg.routes[0].is_set and len(cfg.routes[0].members) == 2
    assert str(cfg.routes[0]) == "/=replicas:coap://a:1,coap://b:2"
    with pytest.raises(ConfigError):
        Route.parse("/=replicas:coap://a:1,coaps://b:2")
    with pytest.raises(ConfigError):
        Route.parse("/=replicas:")
    with pytest.raises(ConfigError):
        ProxyConfig(health_interval=0)


def test_an_unreachable_member_is_down_at_once_and_the_request_decided_again() -> None:
    config = ProxyConfig(routes=(Route.parse("/=replicas:coap://127.0.0.1:1,coap://127.0.0.1:2"),))
    router = Router(config)
    s = router.sets["/"]
    seen: list[tuple[int | None, str, str]] = []
    s.changed = lambda _s, m, state, reason: seen.append((m.replica, state, reason))
    for i, m in enumerate(sorted(s.members.values(), key=lambda m: m.key)):
        s.answered(m, i, now=0.0)
    request = _request(("~" + replica.session_name(0, "AAAAA")[0] + "bcd",))
    first = router.decide(request, "c")
    assert first.upstream.port == 1
    again = router.upstream_unreachable(first, request, "c")
    assert again is not None and again.upstream.port == 2
    assert seen == [(0, "down", "unreachable")] and s.healthy == [1]
    # Another request that was already on its way there: decided again, no second event.
    assert router.upstream_unreachable(first, request, "c").upstream.port == 2  # type: ignore[union-attr]
    assert len(seen) == 1
    # The last member gone too: nothing to try.
    assert router.upstream_unreachable(again, request, "c") is None
    plain = Router(ProxyConfig(routes=(Route.parse("/=coap://127.0.0.1:1"),)))
    d = plain.decide(_request(("x",)), "c")
    assert plain.upstream_unreachable(d, _request(("x",)), "c") is None


def test_a_forward_request_for_a_set_name_goes_to_a_replica() -> None:
    config = ProxyConfig(routes=(
        Route.parse("app-server=replicas:coaps://10.0.0.8:5684,coaps://10.0.0.9:5684"),),
        allow=("elsewhere",))  # the set's name needs no entry: its route allows it
    router = Router(config)
    s = router.sets["app-server"]
    for i, m in enumerate(sorted(s.members.values(), key=lambda m: m.key)):
        s.answered(m, i + 2, now=0.0)
    m = aiocoap.Message(code=aiocoap.POST, payload=b"x")
    m.opt.proxy_uri = "coaps://app-server:5684/~" + replica.session_name(3, "AAAAA")[0] + "bcd"
    d = router.decide(m, "c")
    assert (d.kind, d.upstream.host, d.upstream.scheme) == ("forward", "10.0.0.9", "coaps")
    assert d.uri_host == "app-server" and d.path[0].startswith("~")
    # Another name is forwarded as before.
    other = aiocoap.Message(code=aiocoap.GET)
    other.opt.proxy_uri = "coap://elsewhere:5683/x"
    assert router.decide(other, "c").upstream.host == "elsewhere"


def test_auto_replica_is_a_valid_number() -> None:
    assert 0 <= replica.auto_replica() <= replica.MAX_REPLICA
