"""When a room's lip sync is worth an event for its tenant, with plain values."""

from __future__ import annotations

from avatarfarm.domain import Progress
from scheduler.policy.sync import SyncWatch


def check(n: int, offset: float) -> Progress:
    return Progress(sync_checks=n, av_offset_seconds=offset)


def test_the_tenant_hears_of_an_offset_that_stays_out_of_bounds_once_and_of_its_end() -> None:
    w, told = SyncWatch(), []
    reports = [check(1, 0.04), check(2, 0.12), check(2, 0.12), check(3, 0.12), check(4, 0.16),
               check(5, 0.0), check(6, 0.0)]
    before = Progress()
    for p in reports:
        w, message = w.after(before, p, fps=25)
        told.append(message)
        before = p
    # One frame off is within bounds; two checks three frames off are news, once; a report
    # without a new check changes nothing; back in bounds is news too, once.
    assert [bool(m) for m in told] == [False, False, False, True, False, True, False]
    assert "120 ms apart (video behind)" in told[3] and "back in sync" in told[5]


def test_a_single_check_out_of_bounds_is_not_news() -> None:
    w, m1 = SyncWatch().after(Progress(), check(1, -0.2), fps=25)
    w, m2 = w.after(check(1, -0.2), check(2, 0.0), fps=25)
    assert (m1, m2) == ("", "")
