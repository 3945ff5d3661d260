"""The fault model alone: seeded RNG, hand-advanced time, no sockets and no sleeping."""

from __future__ import annotations

import itertools
import random

import pytest

from coaplayers_tools.relay import Delivery, Direction, Fate, FaultModel, Faults

UP, DOWN = Direction.UP, Direction.DOWN


def model(faults: Faults, seed: int = 1, start: float = 0.0) -> FaultModel[int]:
    return FaultModel(faults, random.Random(seed), start=start)


def run(
    m: FaultModel[int], n: int, direction: Direction = UP, step: float = 0.001
) -> list[Delivery[int]]:
    """Submit packets 0..n-1 one ``step`` apart; return every delivery, held ones included."""
    out: list[Delivery[int]] = []
    now = 0.0
    for i in range(n):
        out += m.expire(now)
        out += m.submit(i, direction, now).deliveries
        now += step
    out += m.release_all(now + 10)
    return out


def test_no_faults_delivers_everything_at_once_in_order() -> None:
    m = model(Faults())
    for i in range(100):
        v = m.submit(i, UP, float(i))
        assert v.fate is Fate.DELIVERED
        assert v.deliveries == (Delivery(i, float(i)),)
    s = m.stats(UP)
    assert (s.received, s.dropped, s.duplicated, s.reordered, s.delayed) == (100, 0, 0, 0, 0)


def test_loss_rate_within_bounds() -> None:
    m = model(Faults(loss=0.2), seed=7)
    n = 10_000
    delivered = run(m, n)
    lost = m.stats(UP).lost
    # Binomial(10000, 0.2): sd = 40, so +-200 is five standard deviations.
    assert 1800 <= lost <= 2200
    assert len(delivered) == n - lost
    assert m.stats(UP).dropped == lost


def test_loss_is_reproducible_from_the_seed_and_independent_of_other_settings() -> None:
    def lost_ids(faults: Faults, seed: int) -> set[int]:
        m = model(faults, seed)
        return {i for i in range(500) if m.submit(i, UP, i * 0.01).fate is Fate.LOST}

    a = lost_ids(Faults(loss=0.3), 5)
    assert a == lost_ids(Faults(loss=0.3), 5)
    assert a != lost_ids(Faults(loss=0.3), 6)
    # Same seed, delay and duplication added: the same datagrams are lost.
    assert a == lost_ids(Faults(loss=0.3, delay=0.1, jitter=0.05, duplicate=0.2), 5)


def test_directions_are_independent() -> None:
    faults = Faults(loss=0.5)
    m1 = model(faults, seed=3)
    up_only = [m1.submit(i, UP, 0.0).fate for i in range(200)]
    m2 = model(faults, seed=3)
    interleaved = []
    for i in range(200):
        interleaved.append(m2.submit(i, UP, 0.0).fate)
        m2.submit(i, DOWN, 0.0)
    assert up_only == interleaved


def test_per_direction_override() -> None:
    faults = Faults(loss=0.2, loss_down=0.0, delay=0.01, delay_up=0.05)
    assert faults.link(UP).loss == 0.2 and faults.link(DOWN).loss == 0.0
    assert faults.link(UP).delay == 0.05 and faults.link(DOWN).delay == 0.01
    m = model(faults)
    run(m, 1000, DOWN)
    assert m.stats(DOWN).lost == 0


def test_duplication() -> None:
    m = model(Faults(duplicate=0.25), seed=2)
    n = 4000
    deliveries = run(m, n)
    dups = [d for d in deliveries if d.duplicate]
    assert 800 <= len(dups) <= 1200
    assert len(deliveries) == n + len(dups) == n + m.stats(UP).duplicated
    # The copy follows its original immediately, at the same time.
    for i, d in enumerate(deliveries):
        if d.duplicate:
            assert deliveries[i - 1].packet == d.packet and deliveries[i - 1].at == d.at
            assert not deliveries[i - 1].duplicate


def test_duplicate_fate_has_two_deliveries() -> None:
    m = model(Faults(duplicate=1.0))
    v = m.submit("x", UP, 1.0)
    assert v.fate is Fate.DUPLICATED
    assert [(d.packet, d.at, d.duplicate) for d in v.deliveries] == [
        ("x", 1.0, False),
        ("x", 1.0, True),
    ]


def test_reorder_swaps_with_the_next_datagram() -> None:
    m = model(Faults(reorder=1.0))
    v0 = m.submit(0, UP, 0.0)
    assert v0.fate is Fate.HELD and v0.deliveries == ()
    v1 = m.submit(1, UP, 0.001)
    # The successor is never held itself, so it releases the held one right after it.
    assert [(d.packet, d.reordered) for d in v1.deliveries] == [(1, False), (0, True)]
    assert m.stats(UP).reordered == 1
    assert m.next_expiry() is None


def test_reorder_rate_and_nothing_lost() -> None:
    m = model(Faults(reorder=0.3), seed=4)
    n = 3000
    deliveries = run(m, n)
    order = [d.packet for d in deliveries]
    assert sorted(order) == list(range(n))
    swaps = sum(1 for a, b in itertools.pairwise(order) if a > b)
    assert swaps == m.stats(UP).reordered
    # A datagram is held with p=0.3 only when nothing is held already.
    assert 0.15 * n <= swaps <= 0.3 * n


def test_reorder_is_per_flow() -> None:
    m = model(Faults(reorder=1.0))
    assert m.submit("a0", UP, 0.0, flow="a").fate is Fate.HELD
    # Another client's datagram does not release client a's held one (it is held itself).
    assert m.submit("b0", UP, 0.0, flow="b").fate is Fate.HELD
    v = m.submit("a1", UP, 0.001, flow="a")
    assert [d.packet for d in v.deliveries] == ["a1", "a0"]


def test_held_datagram_goes_out_at_the_bound_when_no_successor_comes() -> None:
    m = model(Faults(reorder=1.0, reorder_hold=0.05))
    assert m.submit(0, UP, 1.0).fate is Fate.HELD
    assert m.next_expiry() == pytest.approx(1.05)
    assert m.expire(1.04) == []
    released = m.expire(1.05)
    assert [(d.packet, d.at, d.reordered) for d in released] == [(0, 1.05, False)]
    assert m.next_expiry() is None
    assert m.stats(UP).reordered == 0 and m.stats(UP).delayed == 1


def test_fixed_delay_keeps_order() -> None:
    m = model(Faults(delay=0.1))
    for i in range(50):
        (d,) = m.submit(i, UP, i * 0.01).deliveries
        assert d.at == pytest.approx(i * 0.01 + 0.1)
    assert m.stats(UP).delayed == 50


def test_jitter_spreads_delay_within_bounds_and_can_reorder() -> None:
    m = model(Faults(delay=0.1, jitter=0.04), seed=9)
    times = []
    for i in range(2000):
        now = i * 0.001
        (d,) = m.submit(i, UP, now).deliveries
        assert 0.06 - 1e-9 <= d.at - now <= 0.14 + 1e-9
        times.append(d.at)
    # Delivery times are not monotonic: jitter reorders, as on a real path.
    assert any(b < a for a, b in itertools.pairwise(times))
    spread = [t - i * 0.001 for i, t in enumerate(times)]
    assert min(spread) < 0.065 and max(spread) > 0.135


def test_jitter_never_makes_negative_delay() -> None:
    m = model(Faults(delay=0.0, jitter=0.05), seed=1)
    for i in range(500):
        (d,) = m.submit(i, UP, 2.0).deliveries
        assert d.at >= 2.0


def test_blackhole_window_from_faults() -> None:
    m = model(Faults(blackholes=((1.0, 2.0),)), start=10.0)
    fates = {t: m.submit(t, UP, 10.0 + t).fate for t in (0.0, 0.999, 1.0, 2.5, 2.999, 3.0, 4.0)}
    assert fates == {
        0.0: Fate.DELIVERED,
        0.999: Fate.DELIVERED,
        1.0: Fate.BLACKHOLED,
        2.5: Fate.BLACKHOLED,
        2.999: Fate.BLACKHOLED,
        3.0: Fate.DELIVERED,
        4.0: Fate.DELIVERED,
    }
    assert m.stats(UP).blackholed == 3 and m.stats(UP).dropped == 3


def test_blackhole_on_command_drops_both_ways() -> None:
    m = model(Faults())
    m.blackhole(5.0, 1.0)
    assert m.submit(0, UP, 5.5).fate is Fate.BLACKHOLED
    assert m.submit(0, DOWN, 5.5).fate is Fate.BLACKHOLED
    assert m.submit(0, UP, 6.0).fate is Fate.DELIVERED


def test_update_changes_faults_from_now_on() -> None:
    m = model(Faults())
    assert all(m.submit(i, UP, 0.0).fate is Fate.DELIVERED for i in range(100))
    m.update(Faults(loss=1.0))
    assert all(m.submit(i, UP, 0.0).fate is Fate.LOST for i in range(100))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loss": 1.5},
        {"duplicate": -0.1},
        {"reorder_up": 2.0},
        {"delay": -1.0},
        {"jitter_down": -0.5},
        {"blackholes": ((-1.0, 1.0),)},
        {"rebind_every": 0.0},
    ],
)
def test_invalid_faults_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Faults(**kwargs)  # type: ignore[arg-type]


def test_end_blackholes_closes_open_and_cancels_later_windows() -> None:
    m = model(Faults(blackholes=((1.0, 10.0), (20.0, 5.0))))
    assert m.submit(0, UP, 2.0).fate is Fate.BLACKHOLED
    m.end_blackholes(3.0)
    assert m.submit(1, UP, 3.0).fate is Fate.DELIVERED
    assert m.submit(2, UP, 21.0).fate is Fate.DELIVERED
    m.blackhole(30.0, 1.0)
    assert m.submit(3, UP, 30.5).fate is Fate.BLACKHOLED
