"""The autoscaler's policy with plain values: fast up, slow down, floors and ceilings,
pending rooms shared over pools, rooms that fit nowhere given workers, and no thrash on a
noisy load."""

from __future__ import annotations

import itertools
import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.autoscale.provisioners import PoolConfig
from scheduler.policy.autoscaler import Autoscaler, AutoscalerConfig, PoolSignals, Signals


def make_scaler(window: float = 300.0, step: int = 1, headroom: float = 0.2, ramp: float = 0.0,
                **pools: PoolConfig) -> Autoscaler:
    """A policy with a flat headroom unless `ramp` (seconds of growth started ahead) is given."""
    pools = pools or {"l4": PoolConfig(device_type="l4", min_workers=1, max_workers=50)}
    return Autoscaler(AutoscalerConfig(headroom=headroom, scale_down_window_seconds=window,
                                       scale_down_step=step, ramp_seconds=ramp, pools=dict(pools)))


def pool(ready: int, load: float, per: float = 10.0, booting: int = 0,
         reserved: float = 0.0) -> PoolSignals:
    return PoolSignals(ready=ready, booting=booting, load_units=load, units_per_worker=per,
                       reserved_units=reserved)


def one(scaler: Autoscaler, sig: PoolSignals, now: float, pending: float = 0.0) -> int:
    (d,) = scaler.decide(Signals(pending, {"l4": sig}), now)
    return d.desired


def test_an_evening_ramp_is_met_at_once() -> None:
    a = make_scaler()
    assert one(a, pool(2, 15.0), 0.0) == 2  # 15 * 1.2 / 10 -> 2
    # 200 units wait: all of it at once, with the headroom, not a worker at a time.
    assert one(a, pool(2, 15.0), 5.0, pending=200.0) == math.ceil(215 * 1.2 / 10)


def test_booting_workers_count_so_a_ramp_is_not_answered_twice() -> None:
    a = make_scaler()
    (d,) = a.decide(Signals(100.0, {"l4": pool(2, 15.0, booting=12)}), 0.0)
    assert d.current == 14 and d.delta == 0


def test_rooms_that_fit_nowhere_get_workers_of_their_own_once() -> None:
    a = make_scaler()
    # 10 workers carry 60 units: 72 with the headroom, 8 workers' worth: no growth on the
    # units alone, yet 12 units of rooms found no worker with room (capacity in pieces).
    assert one(a, pool(10, 60.0), 0.0, pending=12.0) == 10
    (d,) = a.decide(Signals(12.0, {"l4": pool(10, 60.0)}, stuck_units=12.0), 5.0)
    assert d.desired == 12 and "found no worker with room" in d.reason
    # The two are booting: asked once, not again at every decision.
    (d,) = a.decide(Signals(12.0, {"l4": pool(10, 60.0, booting=2)}, stuck_units=12.0), 10.0)
    assert d.delta == 0


def test_reserved_capacity_no_reserved_room_uses_is_kept_free_on_top_of_the_headroom() -> None:
    a = Autoscaler(AutoscalerConfig(headroom=0.2, reserved_spare=1.0,
                                    pools={"l4": PoolConfig(device_type="l4", max_workers=50)}))
    # 60 units placed, 40 of a 50-unit reservation unused: 60 * 1.2 + 40 = 112 -> 12 workers,
    # so a premium room arriving finds room without preempting a room that borrowed it.
    sig = PoolSignals(ready=10, booting=0, load_units=60.0, units_per_worker=10.0,
                      reserved_units=50.0, reserved_free=40.0)
    (d,) = a.decide(Signals(0.0, {"l4": sig}), 0.0)
    assert d.desired == 12 and "40.0 reserved and unused" in d.reason
    assert one(make_scaler(), pool(8, 60.0, reserved=50.0), 0.0) == 8  # all of it in use: 72 -> 8


def test_an_operator_may_let_rooms_borrow_a_share_of_unused_reservations() -> None:
    def held(spare: float) -> int:
        a = Autoscaler(AutoscalerConfig(headroom=0.2, reserved_spare=spare,
                                        pools={"l4": PoolConfig(device_type="l4", max_workers=50)}))
        # 60 units placed, 40 of a 50-unit reservation unused.
        return one(a, PoolSignals(ready=5, booting=0, load_units=60.0, units_per_worker=10.0,
                                  reserved_units=50.0, reserved_free=40.0), 0.0)

    assert held(1.0) == 12  # 72 + 40 held
    assert held(0.5) == 10  # 72 + 20
    assert held(AutoscalerConfig().reserved_spare) == 9  # the default, a quarter: 72 + 10
    assert held(0.0) == 8  # 72: the rest borrowed, taken back when reserved rooms arrive


def test_down_slowly_after_the_stabilisation_window_one_step_at_a_time() -> None:
    a = make_scaler(window=300.0, step=2)
    assert one(a, pool(10, 80.0), 0.0) == 10
    t, n = 5.0, 10
    while t <= 300.0:  # the load fell to 10 units: held by the window
        assert one(a, pool(n, 10.0), t) == 10
        t += 5.0
    downs = []
    while n > 2:
        n2 = one(a, pool(n, 10.0), t)
        assert n - n2 <= 2
        downs.append(n2)
        n, t = n2, t + 5.0
    assert downs == [8, 6, 4, 2]  # then 10 * 1.2 / 10 -> 2 is held


def test_never_below_reservations_or_min_never_above_max() -> None:
    a = make_scaler(window=0.0, l4=PoolConfig(device_type="l4", min_workers=2, max_workers=6))
    assert one(a, pool(6, 0.0), 0.0) == 5  # one step down from 6 toward min 2
    assert one(a, pool(5, 0.0, reserved=35.0), 5.0) == 4  # 35 reserved units need 4
    assert one(a, pool(4, 0.0, reserved=35.0), 10.0) == 4
    assert one(a, pool(2, 0.0), 15.0) == 2
    assert one(a, pool(2, 10.0), 20.0, pending=1000.0) == 6


def test_no_scale_down_while_rooms_wait() -> None:
    a = make_scaler(window=0.0, h200=PoolConfig(device_type="h200", max_workers=10),
                    l4=PoolConfig(device_type="l4", max_workers=8))
    # The waiting rooms go to h200 (listed first); l4's own load would let it shrink,
    # but not while rooms wait: they may need it if h200 cannot boot in time.
    ds = a.decide(Signals(30.0, {"l4": pool(8, 20.0), "h200": pool(0, 0.0)}), 0.0)
    by = {d.pool: d for d in ds}
    assert by["l4"].desired == 8 and by["l4"].reason == "rooms are waiting"
    assert by["h200"].desired == 4  # 30 * 1.2 / 10
    ds = a.decide(Signals(0.0, {"l4": pool(8, 20.0), "h200": pool(4, 30.0)}), 5.0)
    assert {d.pool: d.desired for d in ds} == {"l4": 7, "h200": 4}


def test_pending_goes_to_pools_in_configuration_order() -> None:
    a = make_scaler(window=0.0, l4=PoolConfig(device_type="l4", max_workers=3),
                    h200=PoolConfig(device_type="h200", max_workers=10))
    ds = {d.pool: d.desired for d in a.decide(
        Signals(50.0, {"l4": pool(1, 5.0), "h200": pool(0, 0.0, per=20.0)}), 0.0)}
    assert ds["l4"] == 3  # 5 + 25 units: 36 with headroom -> 4, capped at its max of 3
    assert ds["h200"] == 2  # the other 25 * 1.2 / 20


def test_a_pool_with_no_measured_capacity_starts_one_worker_when_rooms_wait() -> None:
    a = make_scaler(l4=PoolConfig(device_type="l4", max_workers=5))
    assert a.decide(Signals(3.0, {"l4": pool(0, 0.0, per=0.0)}), 0.0)[0].desired == 1
    assert a.decide(Signals(0.0, {"l4": pool(0, 0.0, per=0.0)}), 5.0)[0].desired == 0
    b = make_scaler(l4=PoolConfig(device_type="l4", max_workers=5, units_per_worker=4.0))
    assert b.decide(Signals(10.0, {"l4": pool(0, 0.0, per=0.0)}), 0.0)[0].desired == 3


def _replay(loads: list[float], per: float, window: float, interval: float,
            ramp: float = 0.0) -> list[int]:
    a = make_scaler(window=window, ramp=ramp)
    n, counts = 1, []
    for i, load in enumerate(loads):
        n = one(a, pool(n, load, per=per), i * interval)
        counts.append(n)
    return counts


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), mean=st.floats(20.0, 400.0),
       noise=st.floats(0.0, 0.15))
def test_a_noisy_flat_load_does_not_thrash(seed: int, mean: float, noise: float) -> None:
    """Two hours at 5 s decisions of a load that wobbles by up to 15 % around its mean:
    after the first ramp the pool never goes down and back up again."""
    rng = random.Random(seed)
    loads = [mean * (1 + rng.uniform(-noise, noise)) for _ in range(1440)]
    for ramp in (0.0, 120.0):  # a wobble is not a ramp: the slope of many points averages out
        counts = _replay(loads, per=10.0, window=300.0, interval=5.0, ramp=ramp)
        changes = [b - a for a, b in itertools.pairwise(counts) if b != a]
        ups_after_a_down = [i for i in range(1, len(changes))
                            if changes[i] > 0 and changes[i - 1] < 0]
        assert not ups_after_a_down, (ramp, changes)
        if not ramp:  # and it stays within its headroom: never over the peak recommendation
            assert max(counts) <= math.ceil(max(loads) * 1.2 / 10.0)


def test_a_ramp_is_started_ahead_by_its_rise_over_a_boot() -> None:
    flat, ahead = make_scaler(headroom=0.05), make_scaler(headroom=0.05, ramp=120.0)
    # The evening ramp: +0.5 units a second for five minutes, a decision every 5 s.
    for i in range(61):
        load = 100.0 + 0.5 * 5 * i
        n_flat, n_ahead = one(flat, pool(1, load), i * 5.0), one(ahead, pool(1, load), i * 5.0)
    assert n_flat == math.ceil(250 * 1.05 / 10)
    # 0.5 units/s for the next 120 s: 60 units more, started now.
    assert n_ahead == math.ceil((250 * 1.05 + 60) / 10)
    (d,) = ahead.decide(Signals(0.0, {"l4": pool(1, 252.5)}), 305.0)
    assert "for the ramp" in d.reason


def test_a_single_burst_adds_no_more_than_it_rose() -> None:
    a = make_scaler(headroom=0.0, ramp=120.0)
    assert one(a, pool(2, 15.0), 0.0) == 2
    # 200 units at once: the slope says 40 a second, but a burst is not a ramp's promise.
    assert one(a, pool(2, 15.0), 5.0, pending=200.0) == math.ceil((215 + 200) / 10)
    # Once flat, the ramp's part goes with the window and the pool comes down to the load.
    n = 42
    for i in range(2, 200):
        n = one(a, pool(n, 215.0), i * 5.0)
    assert n == math.ceil(215 * 1.1 / 10)  # with the scale-down tolerance


@settings(max_examples=60, deadline=None)
@given(loads=st.lists(st.floats(0.0, 500.0), min_size=2, max_size=200),
       window=st.floats(0.0, 600.0), step=st.integers(1, 5))
def test_down_never_below_any_recommendation_in_the_window(loads: list[float], window: float,
                                                           step: int) -> None:
    a = make_scaler(window=window, step=step)
    n, history = 1, []
    for i, load in enumerate(loads):
        t = i * 5.0
        raw = min(max(math.ceil(load * 1.2 / 10.0 - 1e-9), 1), 50)
        history.append((t, raw))
        new = one(a, pool(n, load), t)
        if new < n:
            assert n - new <= step
            assert new >= max(r for at, r in history if at >= t - window)
        else:
            assert new == max(n, raw) or new == raw
        n = new
