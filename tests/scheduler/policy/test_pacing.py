"""The report interval the scheduler chooses for its fleet (scheduler.policy.pacing)."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.policy.pacing import STEP, ReportPacing, flush_part, flush_parts

PACING = ReportPacing(base=1.0, reports_per_second=500.0, ceiling=10.0)


def test_a_small_fleet_reports_at_the_base_interval() -> None:
    assert PACING.interval(0, 1.0) == PACING.interval(500, 1.0) == 1.0


def test_the_interval_grows_in_steps_so_reports_stay_within_the_rate() -> None:
    assert PACING.interval(501, 1.0) == 1.5
    assert PACING.interval(1000, 1.0) == 2.0
    assert PACING.interval(1001, 2.0) == 2.5
    assert PACING.interval(10_000, 1.0) == 10.0  # the ceiling


def test_the_ceiling_is_a_third_of_the_worker_timeout_and_never_under_the_base() -> None:
    assert ReportPacing.of(1.0, 500.0, 30.0).ceiling == 10.0
    assert ReportPacing.of(1.0, 500.0, 5.0).interval(5000, 1.0) == pytest.approx(5.0 / 3)
    assert ReportPacing.of(2.0, 500.0, 3.0).interval(0, 2.0) == 2.0


def test_it_shortens_only_once_the_fleet_has_clearly_shrunk() -> None:
    assert PACING.interval(999, 2.0) == 2.0  # one worker less: the same interval
    assert PACING.interval(700, 2.0) == 2.0  # 1.4 s needed, within the margin of 1.5
    assert PACING.interval(600, 2.0) == 1.5


@given(st.integers(0, 100_000), st.sampled_from([1.0, 1.5, 2.0, 3.0, 7.5, 10.0]))
def test_reports_stay_within_the_rate_unless_at_the_ceiling(workers: int, current: float) -> None:
    got = PACING.interval(workers, current)
    assert PACING.base <= got <= PACING.ceiling
    assert got == PACING.ceiling or workers / got <= PACING.reports_per_second + 1e-6
    assert round((got - PACING.base) / STEP, 9).is_integer() or got in (current, PACING.ceiling)
    again = PACING.interval(workers, got)
    assert again == got  # settled: asked again with the same fleet, nothing changes


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        ReportPacing(reports_per_second=0.0)


def test_workers_are_written_in_parts_each_always_in_the_same_one() -> None:
    assert flush_parts(5.0, 1.0) == 5 and flush_parts(0.5, 1.0) == 1 and flush_parts(3.4, 1.0) == 3
    workers = [f"gpu-{i:04d}" for i in range(1000)]
    sizes = collections.Counter(flush_part(w, 5) for w in workers)
    assert set(sizes) == set(range(5)) and max(sizes.values()) < 1.25 * 200  # even shares
    assert [flush_part(w, 5) for w in workers] == [flush_part(w, 5) for w in workers]
    assert {flush_part(w, 1) for w in workers} == {0}
