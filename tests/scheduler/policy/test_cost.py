from __future__ import annotations

import pytest

from avatarfarm.domain import Tier
from scheduler.policy.cost import CostBook, UsageDelta, cost_per_stream_hour
from scheduler.policy.ledger import Ledger


def test_cost_per_stream_hour_charges_the_share_of_device_time() -> None:
    # A quarter of a $4/h GPU per stream second costs $1 per stream-hour.
    assert cost_per_stream_hour(900.0, 3600.0, 4.0) == pytest.approx(1.0)
    assert cost_per_stream_hour(10.0, 0.0, 4.0) == 0.0


def test_the_ledger_counts_each_assignments_progress_once_beyond_its_mark() -> None:
    led = Ledger(lambda dev: 1.0)

    def open_(epoch: int, now: float, quality: str = "512x512@25") -> None:
        led.open("s", tenant="t", avatar_id="a", tier=Tier.STANDARD, quality=quality,
                 worker_id=f"w{epoch}", device_type="cpu", units=1.0, now=now, epoch=epoch)

    open_(1, 0.0)
    assert led.add("s", 1, 4.0, 1.0) == (4.0, 1.0)
    assert led.add("s", 1, 6.0, 1.5) == (pytest.approx(2.0), pytest.approx(0.5))
    assert led.add("s", 1, 6.0, 1.5) == (0.0, 0.0)  # the same report again
    assert led.add("s", 1, 5.0, 1.2) == (0.0, 0.0)  # an older one, replayed
    open_(1, 10.0, "384x384@25")  # a degradation step: same assignment, the mark carries over
    assert led.add("s", 1, 7.0, 1.6) == (pytest.approx(1.0), pytest.approx(0.1))
    open_(2, 20.0)  # moved: the new worker counts from zero
    assert led.add("s", 1, 9.0, 2.0) == (0.0, 0.0)  # the old worker, still reporting
    assert led.add("s", 2, 1.0, 0.2) == (1.0, 0.2)
    (row,) = led.report(30.0)
    assert row.stream_seconds == pytest.approx(8.0) and row.device_seconds == pytest.approx(1.8)


def test_cost_book_prices_by_device_type_and_splits_by_tier() -> None:
    prices = {"h200": 6.0, "l4": 0.8}
    book = CostBook(lambda dev: prices[dev])
    book.add(UsageDelta(Tier.PREMIUM, "h200", 3600, 600))
    book.add(UsageDelta(Tier.STANDARD, "l4", 3600, 1800))
    assert book.per_stream_hour(Tier.PREMIUM) == pytest.approx(1.0)  # 1/6 h of a $6 GPU
    assert book.per_stream_hour(Tier.STANDARD) == pytest.approx(0.4)
    assert book.per_stream_hour() == pytest.approx(0.7)
    assert book.per_stream_hour(Tier.BEST_EFFORT) == 0.0
