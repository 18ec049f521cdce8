"""The batching policy with deterministic time: a simulated device that takes
exactly the planned time per batch, fed by scripted or generated arrivals."""

from __future__ import annotations

import collections
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avatarfarm.latency import LatencyCurve
from workers.device.batching import BatchPolicy, Queued, decide, forecast

# A device where batching pays: 10 ms for one item, 16 ms for four, 28 ms for eight.
CURVE = LatencyCurve(((1, 0.010), (2, 0.012), (4, 0.016), (8, 0.028)))
CURVES: Mapping[Hashable, LatencyCurve] = {"render@256": CURVE, "render@512": CURVE.scaled(3.0)}
EXACT = BatchPolicy(max_batch=8, max_wait=0.005, margin=0.0)


@dataclass
class Outcome:
    finished: dict[int, float] = field(default_factory=dict)
    dropped: dict[int, float] = field(default_factory=dict)
    shed: dict[int, float] = field(default_factory=dict)
    batches: list[tuple[Hashable, int]] = field(default_factory=list)
    order: list[int] = field(default_factory=list)


def simulate(arrivals: Sequence[Queued], policy: BatchPolicy = EXACT) -> Outcome:
    """Event-driven: decide, run a batch for exactly its planned time, repeat."""
    out = Outcome()
    future = sorted(arrivals, key=lambda q: q.enqueued)
    queue: list[Queued] = []
    now = 0.0
    while future or queue:
        while future and future[0].enqueued <= now:
            queue.append(future.pop(0))
        if not queue:
            now = future[0].enqueued
            continue
        d = decide(queue, now, CURVES, policy)
        for q in d.drop:
            out.dropped[q.item_id] = now
        for q in d.shed:
            out.shed[q.item_id] = now
        if d.shed:  # a shed is a prefix of lowest tier first: nothing kept is of a lower tier
            kept = [q for q in queue if q.item_id not in out.shed and q not in d.drop]
            assert not kept or min(q.priority for q in d.shed) >= max(q.priority for q in kept)
        gone = {q.item_id for q in d.drop} | {q.item_id for q in d.run} | {q.item_id for q in d.shed}
        queue = [q for q in queue if q.item_id not in gone]
        if d.run:
            now += CURVES[d.run[0].key].seconds(len(d.run)) * (1 + policy.margin)
            out.batches.append((d.run[0].key, len(d.run)))
            for q in d.run:
                out.finished[q.item_id] = now
                out.order.append(q.item_id)
        elif not d.drop and not d.shed:
            wake = d.wake_at if d.wake_at is not None else math.inf
            nxt = future[0].enqueued if future else math.inf
            assert min(wake, nxt) < math.inf, "the batcher waits with nothing to wake it"
            now = max(now, min(wake, nxt))
    return out


def item(i: int, deadline: float, *, at: float = 0.0, key: str = "render@256",
         priority: int = 1) -> Queued:
    return Queued(i, key, deadline, priority, at)


def test_curve_interpolates_extends_and_reports_best_throughput() -> None:
    assert CURVE.seconds(3) == pytest.approx(0.014)
    assert CURVE.seconds(16) == pytest.approx(0.028 + 8 * 0.003)
    assert CURVE.throughput() == (8, pytest.approx(8 / 0.028))
    assert CURVE.throughput(latency_bound=0.02) == (4, pytest.approx(4 / 0.016))
    with pytest.raises(ValueError):
        LatencyCurve(((4, 0.01), (2, 0.02)))


def test_earliest_deadline_runs_first() -> None:
    out = simulate([item(1, 0.9), item(2, 0.1), item(3, 0.5)], BatchPolicy(max_batch=1, margin=0))
    assert out.order == [2, 3, 1]
    assert not out.dropped


def test_batch_grows_while_it_still_makes_the_earliest_deadline() -> None:
    # Eight items could run as one batch of 28 ms, but the first is due at 20 ms:
    # the batch stops at the largest size that finishes by then (5 items, 19 ms).
    items = [item(0, 0.020)] + [item(i, 1.0) for i in range(1, 8)]
    d = decide(items, 0.0, CURVES, EXACT)
    assert [q.item_id for q in d.run] == [0, 1, 2, 3, 4]
    assert CURVE.seconds(len(d.run)) <= 0.020


def test_a_lone_frame_waits_for_company_only_within_its_slack() -> None:
    d = decide([item(0, 1.0)], 0.0, CURVES, EXACT)
    assert not d.run and d.wake_at == pytest.approx(EXACT.max_wait)
    # Due in 30 ms: a full batch (28 ms) must still fit after the wait, so it may wait 2 ms.
    d = decide([item(0, 0.030)], 0.0, CURVES, EXACT)
    assert d.wake_at == pytest.approx(0.030 - 0.028)
    # Due in 20 ms: no slack for growth: it runs at once.
    d = decide([item(0, 0.020)], 0.0, CURVES, EXACT)
    assert [q.item_id for q in d.run] == [0]


def test_the_device_never_idles_waiting_for_company_while_other_items_are_queued() -> None:
    lone = item(0, 0.5, key="render@256")  # due first, alone of its shape
    others = [item(1 + i, 1.0, key="render@512") for i in range(4)]  # 48 ms as a batch
    patient = BatchPolicy(max_batch=8, max_wait=0.1, margin=0.0)
    # Alone, it waits for company (up to max_wait)...
    assert decide([lone], 0.0, CURVES, patient).wake_at == pytest.approx(0.1)
    # ...but with other items queued, their batch runs meanwhile: it ends within the wait.
    d = decide([lone, *others], 0.0, CURVES, patient)
    assert [q.item_id for q in d.run] == [1, 2, 3, 4] and d.wake_at is None
    # A wait shorter than their batch: the lone item runs as it is, the device never idles.
    d = decide([lone, *others], 0.0, CURVES, EXACT)
    assert [q.item_id for q in d.run] == [0]
    # Both ways every deadline is made, in the simulated device too.
    for policy in (patient, EXACT):
        out = simulate([lone, *others], policy)
        assert not out.dropped and all(out.finished[q.item_id] <= q.deadline for q in (lone, *others))


def test_a_frame_that_cannot_make_its_deadline_is_dropped_not_run() -> None:
    d = decide([item(0, 0.005), item(1, 1.0)], 0.0, CURVES, EXACT)
    assert [q.item_id for q in d.drop] == [0]
    assert 0 not in {q.item_id for q in d.run}


def test_shapes_batch_separately() -> None:
    items = [item(i, 1.0, key="render@256") for i in range(3)]
    items += [item(10 + i, 1.0, key="render@512") for i in range(3)]
    out = simulate(items)
    assert sorted(out.batches, key=str) == [("render@256", 3), ("render@512", 3)]


def test_premium_frames_are_served_first_when_not_everything_fits() -> None:
    # Forty standard frames and four premium ones, all due within 60 ms: the device
    # can finish about 17 items in 60 ms, so most standard frames must go.
    items = [item(i, 0.060, priority=1) for i in range(40)]
    items += [item(100 + i, 0.060, priority=0) for i in range(4)]
    assert forecast(items, 0.0, CURVES, EXACT).misses > 0
    out = simulate(items)
    premium = {100, 101, 102, 103}
    assert premium <= set(out.finished)
    assert all(out.finished[i] <= 0.060 for i in out.finished)
    lost = set(out.dropped) | set(out.shed)
    assert lost and not premium & lost
    assert len(out.finished) + len(lost) == 44
    # Given up at once, not after the device spent its time on frames that miss anyway.
    assert set(out.shed) and all(t == 0.0 for t in out.shed.values())


def test_without_overload_ties_keep_arrival_order_across_tiers() -> None:
    d = decide([item(1, 1.0, priority=2), item(2, 1.0, priority=0)], 0.0, CURVES,
               BatchPolicy(max_batch=1, margin=0.0))
    assert [q.item_id for q in d.run] == [1]


deadlines = st.floats(min_value=0.0, max_value=0.4, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["render@256", "render@512"]), deadlines,
                          st.integers(0, 2)), min_size=1, max_size=40))
def test_when_the_profile_says_the_queue_fits_no_deadline_is_missed(
        spec: list[tuple[str, float, int]]) -> None:
    items = [item(i, 0.010 + d, key=k, priority=p) for i, (k, d, p) in enumerate(spec)]
    if forecast(items, 0.0, CURVES, EXACT).misses:
        return
    out = simulate(items)
    assert not out.dropped
    assert all(out.finished[q.item_id] <= q.deadline + 1e-12 for q in items)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["render@256", "render@512"]),
                          st.floats(0.0, 0.3), deadlines, st.integers(0, 2)),
                min_size=1, max_size=60))
def test_every_frame_is_run_in_time_or_dropped_and_none_is_forgotten(
        spec: list[tuple[str, float, float, int]]) -> None:
    items = [item(i, at + d, at=at, key=k, priority=p) for i, (k, at, d, p) in enumerate(spec)]
    out = simulate(items)
    assert set(out.finished) | set(out.dropped) | set(out.shed) == {q.item_id for q in items}
    assert not set(out.finished) & (set(out.dropped) | set(out.shed))
    by_id = {q.item_id: q for q in items}
    for i, t in out.finished.items():
        assert t <= by_id[i].deadline + 1e-12
    for i, t in out.dropped.items():  # dropped only when even a batch of one would be late
        assert t + CURVES[by_id[i].key].seconds(1) > by_id[i].deadline


def test_batches_do_not_grow_past_the_size_where_throughput_stops_improving() -> None:
    # A CPU-like curve: one call fills the cores, batching only adds latency.
    cpu = LatencyCurve(((1, 0.010), (2, 0.029), (8, 0.100)))
    assert cpu.useful_batch(8) == 1
    assert CURVE.useful_batch(8) == 8
    d = decide([item(i, 1.0) for i in range(5)], 0.0, {"render@256": cpu}, EXACT)
    assert [q.item_id for q in d.run] == [0]  # at once: a batch of one is already full


# -- sustained overload: rooms at a steady frame rate, more than the device can serve


def rooms_arrivals(tiers: Sequence[int], seconds: float, fps: int = 25,
                   budget: float = 0.3) -> list[Queued]:
    """One item per frame of each room (tier per room), rooms spread over a frame period,
    each due `budget` after it is released."""
    out: list[Queued] = []
    n_rooms = len(tiers)
    for r, tier in enumerate(tiers):
        for n in range(int(seconds * fps)):
            at = n / fps + r / (n_rooms * fps)
            out.append(Queued(len(out), "render@256", at + budget, tier, at))
    return out


def test_at_one_and_a_half_times_capacity_the_device_delivers_its_peak_and_the_lowest_tier_loses():
    best = max(b / s for b, s in CURVE.points)  # 286 items/s at batch 8
    capacity_rooms = best / 25
    # 17 rooms ~ 1.5x capacity: 2 premium, 8 standard, 7 best effort (who alone can absorb
    # the excess: 175 of their 425 frames/s offered).
    tiers = [0] * 2 + [1] * 8 + [2] * 7
    assert len(tiers) / capacity_rooms == pytest.approx(1.5, abs=0.05)
    items = rooms_arrivals(tiers, seconds=4.0)
    out = simulate(items, BatchPolicy(max_batch=8, max_wait=0.02, margin=0.0))
    by_id = {q.item_id: q for q in items}
    horizon = max(out.finished.values())
    delivered = len(out.finished) / horizon
    assert delivered >= 0.95 * best
    lost_by_tier = collections.Counter(by_id[i].priority for i in (*out.dropped, *out.shed))
    assert lost_by_tier[0] == 0 and lost_by_tier[1] == 0 and lost_by_tier[2] > 0
    # Nothing the device ran was late: no work spent on frames that are not shown.
    assert all(t <= by_id[i].deadline + 1e-12 for i, t in out.finished.items())


def test_premium_items_are_never_shed_on_a_forecast_only_dropped_when_hopeless() -> None:
    # Forty premium frames due within 60 ms: about 17 can be served; the rest are dropped
    # one by one once even a batch of one would be late, never given up on the plan.
    items = [item(i, 0.060, priority=0) for i in range(40)]
    out = simulate(items)
    assert not out.shed and out.dropped
    assert len(out.finished) + len(out.dropped) == 40


# -- chained items: a frame's motion, then its render, queued as the motion comes back

CHAINED: Mapping[Hashable, LatencyCurve] = {"motion": CURVE, "render@256": CURVE}


def simulate_chained(frames: Sequence[tuple[float, float]], policy: BatchPolicy
                     ) -> tuple[dict[int, float], set[int], float]:
    """Frames (released at, due at): each is a motion item (due a full batch ahead of the
    frame, for the render), whose result queues the frame's render item. Returns when
    each frame's render finished, the frames lost (a stage dropped or shed), and how long
    the device slept waiting for company while another model's items were queued."""
    reserve = CURVE.seconds(8)
    arrivals = sorted(range(len(frames)), key=lambda f: frames[f][0])
    queue: list[Queued] = []
    frame_of: dict[int, int] = {}
    finished: dict[int, float] = {}
    lost: set[int] = set()
    now, ids, idle = 0.0, 0, 0.0
    while arrivals or queue:
        while arrivals and frames[arrivals[0]][0] <= now:
            f = arrivals.pop(0)
            queue.append(Queued(ids, "motion", frames[f][1] - reserve, 1, frames[f][0]))
            frame_of[ids], ids = f, ids + 1
        if not queue:
            now = frames[arrivals[0]][0]
            continue
        d = decide(queue, now, CHAINED, policy)
        gone = {q.item_id for q in (*d.drop, *d.shed, *d.run)}
        lost |= {frame_of[q.item_id] for q in (*d.drop, *d.shed)}
        queue = [q for q in queue if q.item_id not in gone]
        if d.run:
            now += CHAINED[d.run[0].key].seconds(len(d.run)) * (1 + policy.margin)
            for q in d.run:
                f = frame_of[q.item_id]
                if q.key == "motion":
                    queue.append(Queued(ids, "render@256", frames[f][1], 1, now))
                    frame_of[ids], ids = f, ids + 1
                else:
                    finished[f] = now
        elif not d.drop and not d.shed:
            wake = d.wake_at if d.wake_at is not None else math.inf
            until = max(now, min(wake, frames[arrivals[0]][0] if arrivals else math.inf))
            if len({q.key for q in queue}) > 1:
                idle += until - now
            now = until
    return finished, lost, idle


def test_a_chained_pipeline_that_fell_behind_catches_up_under_load_it_can_carry() -> None:
    # 4 rooms at 25 fps: 100 frames/s of two items each, 70% of what the device serves in
    # batches of 8 (143 frames/s). The worker stalled for 0.3 s at the start: the first
    # 0.3 s of frames arrive at once, then the rooms run at their rate.
    fps, budget = 25, 0.4
    frames = []
    for r in range(4):
        for n in range(int(6.0 * fps)):
            at = n / fps + r / (4 * fps)
            frames.append((max(at, 0.3), at + budget))
    finished, lost, idle = simulate_chained(frames, BatchPolicy(max_batch=8, max_wait=0.02,
                                                                margin=0.0))
    # The render items wait for company only while no motion item is queued.
    assert idle == 0.0
    assert set(finished) | lost == set(range(len(frames)))
    assert all(t <= frames[f][1] + 1e-12 for f, t in finished.items())
    # Caught up: after the first second no frame is lost.
    assert not {f for f in lost if frames[f][0] >= 1.0}
