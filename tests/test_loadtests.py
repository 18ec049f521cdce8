"""The packing simulator behind the load test's cost figures: on a small day of the
load test's own trace, the bound is below every strategy and packing beats the
baselines (the claim the load test prints at scale)."""

from __future__ import annotations

import random

from loadtests import scheduler_load as load
from loadtests.packing_sim import compare


def test_packing_beats_the_baselines_and_stays_above_the_bound() -> None:
    rng = random.Random(3)
    tenants = load.make_tenants()
    avatars = sorted({a for t in tenants for a in t.avatars})
    workers = load.make_workers(20, 0.2, avatars, rng)
    trace = load.make_day(200, tenants, 3)
    result = compare(trace, workers)
    pack, least, rr = (result.by(s).cost_per_stream_hour
                       for s in ("pack", "least_loaded", "round_robin"))
    assert 0 < result.lower_bound <= pack
    assert pack < least and pack < rr
    assert result.by("pack").unplaced <= result.by("least_loaded").unplaced
    assert "lower bound" in str(result)
