from __future__ import annotations

import pytest

from avatarfarm.domain import Progress, Tier
from scheduler.cost import CostBook, cost_per_stream_hour, usage_delta


def test_cost_per_stream_hour_charges_the_share_of_device_time() -> None:
    # A quarter of a $4/h GPU per stream second costs $1 per stream-hour.
    assert cost_per_stream_hour(900.0, 3600.0, 4.0) == pytest.approx(1.0)
    assert cost_per_stream_hour(10.0, 0.0, 4.0) == 0.0


def test_usage_delta_counts_only_what_is_new_and_never_goes_negative() -> None:
    before = Progress(frames_rendered=100, stream_seconds=4.0, device_seconds=1.0)
    after = Progress(frames_rendered=150, stream_seconds=6.0, device_seconds=1.5)
    d = usage_delta(Tier.PREMIUM, "h200", before, after)
    assert (d.stream_seconds, d.device_seconds) == (pytest.approx(2.0), pytest.approx(0.5))
    stale = usage_delta(Tier.PREMIUM, "h200", after, before)
    assert (stale.stream_seconds, stale.device_seconds) == (0.0, 0.0)


def test_cost_book_prices_by_device_type_and_splits_by_tier() -> None:
    prices = {"h200": 6.0, "l4": 0.8}
    book = CostBook(lambda dev: prices[dev])
    start = Progress()
    book.add(usage_delta(Tier.PREMIUM, "h200", start, Progress(stream_seconds=3600, device_seconds=600)))
    book.add(usage_delta(Tier.STANDARD, "l4", start, Progress(stream_seconds=3600, device_seconds=1800)))
    assert book.per_stream_hour(Tier.PREMIUM) == pytest.approx(1.0)  # 1/6 h of a $6 GPU
    assert book.per_stream_hour(Tier.STANDARD) == pytest.approx(0.4)
    assert book.per_stream_hour() == pytest.approx(0.7)
    assert book.per_stream_hour(Tier.BEST_EFFORT) == 0.0
