"""The one batch-latency curve both planes read: the worker's batcher plans with it and
the scheduler's per-item costs come from it, so the two cannot disagree."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avatarfarm.latency import LatencyCurve
from scheduler.policy.placement import per_item_table


@st.composite
def curves(draw: st.DrawFn) -> LatencyCurve:
    sizes = sorted(draw(st.sets(st.integers(1, 64), min_size=1, max_size=7)))
    first = draw(st.floats(1e-4, 0.05))
    points, seconds = [], first
    for b in sizes:
        points.append((b, seconds))
        seconds += draw(st.floats(0.0, 0.02))  # a larger batch never costs less per call
    return LatencyCurve(tuple(points))


@given(curves(), st.sampled_from([0.0, 0.05, 0.2, 0.5]))
def test_the_schedulers_per_item_costs_are_the_workers_curve(curve: LatencyCurve, budget: float) -> None:
    table = per_item_table(curve.points, budget)
    assert table == curve.per_item(budget, 64)
    # Never increasing: n rooms sharing batches never cost more each than fewer do.
    assert all(b <= a for a, b in itertools.pairwise(table))
    for n, each in enumerate(table, start=1):
        # What the batcher pays for a batch of n, per item, or a smaller batch's if cheaper.
        assert each <= curve.seconds(n) / n + 1e-12
        assert each == pytest.approx(min(curve.seconds(k) / k for k in range(1, n + 1)))
    # Up to the cheapest measured batch whose call fits half the latency budget.
    bound = budget / 2 if budget > 0 else float("inf")
    fitting = [(b, s) for b, s in curve.points if s <= bound] or [curve.points[0]]
    assert len(table) == min(min(fitting, key=lambda p: p[1] / p[0])[0], 64)


def test_a_size_reported_twice_counts_at_its_fastest() -> None:
    assert per_item_table([(1, 0.02), (1, 0.01), (4, 0.02)]) == per_item_table([(1, 0.01), (4, 0.02)])


def test_between_and_below_measured_sizes() -> None:
    c = LatencyCurve(((2, 0.010), (4, 0.014)))
    assert c.seconds(1) == pytest.approx(0.005)  # below the smallest: per item
    assert c.seconds(3) == pytest.approx(0.012)  # linear between
    assert c.seconds(6) == pytest.approx(0.018)  # past the largest: the last step's slope
    assert c.throughput() == (4, pytest.approx(4 / 0.014))
    with pytest.raises(ValueError, match="ascending"):
        LatencyCurve(((4, 0.01), (2, 0.01)))
