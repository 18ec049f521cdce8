"""Pure policies next to placement: the degradation ladder, tenant budgets and
reservations, the fair admission queue and the usage ledger."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avatarfarm.domain import Quality, Tier
from scheduler.policy import tenants
from scheduler.policy.admission import FairQueue
from scheduler.policy.ladder import Ladder
from scheduler.policy.ledger import Dimension, Ledger
from scheduler.policy.tenants import BudgetAction, BudgetKind, BudgetPolicy, TenantConfig


def test_the_ladder_steps_720p30_down_through_720p25_and_540p25() -> None:
    ladder = Ladder.parse(["1.0@25", "0.75@25", "0.5@25"])
    steps = ladder.qualities(Quality(1280, 720, 30))
    assert steps == ((0, Quality(1280, 720, 30)), (1, Quality(1280, 720, 25)),
                     (2, Quality(960, 540, 25)), (3, Quality(640, 360, 25)))
    # A 25 fps room skips the rung that would change nothing for it.
    assert [s for s, _ in ladder.qualities(Quality(512, 512, 25))] == [0, 2, 3]
    assert ladder.next_down(Quality(512, 512, 25), 0) == (2, Quality(384, 384, 25))
    assert ladder.next_up(Quality(512, 512, 25), 3) == (2, Quality(384, 384, 25))
    assert ladder.next_up(Quality(512, 512, 25), 0) is None
    # Never below the minimum side.
    assert ladder.lowest(Quality(200, 200, 25)) == (2, Quality(150, 150, 25))
    with pytest.raises(ValueError, match="scale@fps"):
        Ladder.parse(["half"])


def test_stepping_up_waits_for_room_and_for_the_dwell_time() -> None:
    ladder = Ladder(step_up_margin=0.15, dwell_seconds=30)
    assert not ladder.may_step_up(0.80, 0.9, since_change=100)  # inside the hysteresis band
    assert not ladder.may_step_up(0.50, 0.9, since_change=10)  # too soon after the last step
    assert ladder.may_step_up(0.70, 0.9, since_change=31)


def test_budgets_refuse_with_the_budget_and_the_amount() -> None:
    t = TenantConfig(concurrency_units=10, spend_budget=50, spend_period_seconds=86400)
    assert tenants.check_admission("acme", t, units=2, units_in_use=8, spent=10) is None
    over = tenants.check_admission("acme", t, units=2.5, units_in_use=8, spent=10)
    assert over is not None and over.kind is BudgetKind.CONCURRENCY
    assert "10.00" in over.message and "by 0.50" in over.message
    spent = tenants.check_admission("acme", t, units=1, units_in_use=0, spent=51.25)
    assert spent is not None and spent.kind is BudgetKind.SPEND
    assert "over by 1.25" in spent.message and "per day" in spent.message
    assert tenants.check_admission("x", tenants.UNLIMITED, units=1e6, units_in_use=1e9,
                                   spent=1e9) is None
    with pytest.raises(ValueError):
        TenantConfig(weight=0)


def test_a_reservation_guarantees_premium_rooms_up_to_its_size() -> None:
    t = TenantConfig(reserved_units=4)
    assert tenants.guaranteed(t, Tier.PREMIUM, 2, reserved_in_use=2, now=0.0)
    assert not tenants.guaranteed(t, Tier.PREMIUM, 2, reserved_in_use=3, now=0.0)
    assert not tenants.guaranteed(t, Tier.STANDARD, 1, reserved_in_use=0, now=0.0)
    # Non-preemptible rooms must leave the others' unused reservations reclaimable.
    assert tenants.may_take_protected(units_needed=1, free=2, preemptible=3, unused_reservations=4)
    assert not tenants.may_take_protected(units_needed=2, free=2, preemptible=3,
                                          unused_reservations=4)


HOUR = 3600.0
MIDNIGHT_UTC = 20_000 * 86400.0  # some day's midnight, UTC


def test_a_reservation_with_hours_holds_only_within_them_in_its_timezone() -> None:
    # A brand's evening show, 19:00-23:00 in Shanghai (UTC+8): 11:00-15:00 UTC.
    t = TenantConfig(reserved_units=4, reserved_hours=["19:00-23:00"], timezone="Asia/Shanghai")
    at = lambda h: MIDNIGHT_UTC + h * HOUR  # noqa: E731
    assert [t.reserved_at(at(h)) for h in (10.99, 11.0, 14.99, 15.0, 19.0)] == [0, 4, 4, 0, 0]
    assert tenants.guaranteed(t, Tier.PREMIUM, 2, reserved_in_use=0, now=at(12))
    assert not tenants.guaranteed(t, Tier.PREMIUM, 2, reserved_in_use=0, now=at(16))
    # What capacity started now must be ready for: the hours opening within the lead.
    assert t.reserved_within(at(11) - 120, lead=120.0) == 4
    assert t.reserved_within(at(11) - 121, lead=120.0) == 0
    assert t.reserved_within(at(13), lead=0.0) == 4
    # Unused reservations count only what is in force (or about to be).
    configs = {"brand": t, "all-day": TenantConfig(reserved_units=3)}
    used = {"brand": 1.0, "all-day": 0.0}
    assert tenants.unused_reservations(configs, used, at(12)) == 3 + 3
    assert tenants.unused_reservations(configs, used, at(16)) == 3
    assert tenants.unused_reservations(configs, used, at(11) - 60, lead=120.0) == 3 + 3


def test_reserved_hours_may_run_past_midnight_and_malformed_ones_are_refused() -> None:
    t = TenantConfig(reserved_units=2, reserved_hours=["22:00-02:00", "12:00-13:30"])
    at = lambda h: MIDNIGHT_UTC + h * HOUR  # noqa: E731
    assert [t.reserved_at(at(h)) for h in (21.9, 22.0, 23.5, 25.9, 26.0, 12.5, 13.5)] == \
        [0, 2, 2, 2, 0, 2, 0]
    assert TenantConfig(reserved_units=2, reserved_hours=["00:00-24:00"]).reserved_at(at(23.99)) == 2
    for hours, why in ((["7pm-11pm"], "HH:MM"), (["19:00"], "HH:MM"), (["25:00-26:00"], "HH:MM"),
                       (["19:60-20:00"], "HH:MM"), (["19:00-19:00"], "starts where it ends")):
        with pytest.raises(ValueError, match=why):
            TenantConfig(reserved_units=2, reserved_hours=hours)
    with pytest.raises(ValueError, match="unknown timezone"):
        TenantConfig(reserved_units=2, reserved_hours=["19:00-23:00"], timezone="Mars/Olympus")


def test_a_spent_budget_degrades_or_stops_after_the_grace_period() -> None:
    degrade = TenantConfig(spend_budget=10, on_budget_exhausted=BudgetPolicy.DEGRADE)
    stop = TenantConfig(spend_budget=10, on_budget_exhausted=BudgetPolicy.STOP, grace_seconds=60)
    assert tenants.budget_action(degrade, 9.9, None, 0) is BudgetAction.NONE
    assert tenants.budget_action(degrade, 10, None, 0) is BudgetAction.DEGRADE
    assert tenants.budget_action(stop, 10, None, 100) is BudgetAction.WARN
    assert tenants.budget_action(stop, 10, 100, 159) is BudgetAction.WARN
    assert tenants.budget_action(stop, 10, 100, 160) is BudgetAction.STOP


def test_a_flooding_tenant_does_not_starve_another() -> None:
    q = FairQueue()
    for i in range(100):
        q.push(f"flood-{i}", "big", Tier.STANDARD, units=1)
    q.push("small-0", "small", Tier.STANDARD, units=1)
    order = q.ordered()
    assert order.index("small-0") <= 1
    assert q.position("small-0") == order.index("small-0") + 1
    # Guaranteed (reserved) rooms go first; among the rest premium flows get 4x the share
    # of best-effort flows.
    q.push("vip", "brand", Tier.PREMIUM, units=1, guaranteed=True)
    assert q.ordered(1) == ["vip"]
    q2 = FairQueue()
    for i in range(8):
        q2.push(f"p{i}", "a", Tier.PREMIUM, units=1)
        q2.push(f"b{i}", "b", Tier.BEST_EFFORT, units=1)
    first = q2.ordered(5)
    assert sum(1 for s in first if s.startswith("p")) >= 4


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(list(Tier))),
                min_size=1, max_size=60))
def test_the_queue_serves_every_room_once(rooms) -> None:  # type: ignore[no-untyped-def]
    q = FairQueue()
    for i, (tenant, tier) in enumerate(rooms):
        q.push(f"s{i}", tenant, tier, units=1)
    served = []
    while len(q):
        head = q.ordered(1)[0]
        q.served(head)
        served.append(head)
    assert sorted(served) == sorted(f"s{i}" for i in range(len(rooms)))


def _ledger() -> Ledger:
    return Ledger({"h200": 5.0, "l4": 0.8}.__getitem__)


def test_the_ledger_keeps_intervals_and_reports_by_tenant_tier_and_avatar() -> None:
    led = _ledger()
    led.open("s1", tenant="acme", avatar_id="anna", tier=Tier.PREMIUM, quality="1280x720@30",
             worker_id="w1", device_type="h200", units=2.0, now=0)
    led.add("s1", 0, 1800, 360)  # progress is cumulative over the assignment
    # Degraded at t=1800: the next interval carries the lower quality.
    led.open("s1", tenant="acme", avatar_id="anna", tier=Tier.PREMIUM, quality="960x540@25",
             worker_id="w1", device_type="h200", units=1.0, now=1800)
    led.add("s1", 0, 3600, 540)
    led.close("s1", 3600)
    led.open("s2", tenant="shop", avatar_id="bob", tier=Tier.STANDARD, quality="512x512@25",
             worker_id="w2", device_type="l4", units=1.0, now=0)
    led.add("s2", 0, 3600, 3600)
    led.close("s2", 3600)
    rows = {r.tenant: r for r in led.report(3600, group_by=(Dimension.TENANT,))}
    assert rows["acme"].stream_seconds == pytest.approx(3600)
    assert rows["acme"].cost == pytest.approx(540 * 5.0 / 3600)
    assert rows["acme"].compute_unit_seconds == pytest.approx(2.0 * 1800 + 1.0 * 1800)
    assert rows["acme"].cost_per_stream_hour == pytest.approx(0.75)
    assert rows["shop"].cost_per_stream_hour == pytest.approx(0.8)
    by_avatar = {r.avatar_id: r for r in led.report(3600, group_by=(Dimension.AVATAR,
                                                                      Dimension.TIER))}
    assert by_avatar["anna"].tier is Tier.PREMIUM and by_avatar["bob"].tier is Tier.STANDARD
    total = led.report(3600)
    assert len(total) == 1 and len(total[0].sessions) == 2
    # A window that cuts intervals takes their share.
    first_half = {r.tenant: r for r in led.report(3600, group_by=(Dimension.TENANT,),
                                                  start=0, end=1800)}
    assert first_half["acme"].device_seconds == pytest.approx(360)
    assert first_half["shop"].device_seconds == pytest.approx(1800)
    assert led.spent("acme", since=1800, now=3600) == pytest.approx(180 * 5.0 / 3600)


def test_usage_reports_apply_once_and_gaps_are_counted() -> None:
    led = _ledger()
    assert led.accept_report("w1", epoch=7, seq=1).apply
    assert not led.accept_report("w1", epoch=7, seq=1).apply  # a retry
    v = led.accept_report("w1", epoch=7, seq=4)
    assert v.apply and v.lost == 2
    assert not led.accept_report("w1", epoch=7, seq=3).apply  # late, already covered
    # The worker restarted: a new epoch counts from 1 again.
    assert led.accept_report("w1", epoch=8, seq=1).apply
    assert led.last_seq("w1", 8) == 1 and led.last_seq("w1", 7) == 0
