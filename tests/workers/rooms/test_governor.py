"""The worker's frame-rate governor, on plain values."""

from __future__ import annotations

from avatarfarm.domain import Tier
from workers.rooms.governor import Governor, GovernorPolicy, RoomTick, Step

P, S, B = Tier.PREMIUM, Tier.STANDARD, Tier.BEST_EFFORT


def rooms(late_share: float, fps: dict[str, int] | None = None) -> list[RoomTick]:
    """Two premium, three standard, three best-effort rooms, each at its rate for half a
    second with `late_share` of its frames late."""
    tiers = {"p0": P, "p1": P, "s0": S, "s1": S, "s2": S, "b0": B, "b1": B, "b2": B}
    out = []
    for seq, (sid, tier) in enumerate(tiers.items()):
        rate = (fps or {}).get(sid, 25)
        frames = round(rate / 2)
        out.append(RoomTick(sid, tier, seq, rate, 25, frames, round(frames * late_share)))
    return out


def test_a_quiet_worker_and_a_single_bad_tick_change_nothing() -> None:
    g = Governor()
    assert g.tick(rooms(0.0), 0.0) == []
    assert g.tick(rooms(0.3), 0.5) == []  # one tick is noise


def test_losses_go_to_the_lowest_tier_first_and_never_to_premium() -> None:
    g = Governor(GovernorPolicy(ticks=2))
    g.tick(rooms(0.1), 0.0)
    steps = g.tick(rooms(0.1), 0.5)
    # 10% of 200 frames/s late: 20 frames/s to save, two best-effort rooms halved (13 each).
    assert steps == [Step("b1", 12), Step("b2", 12)]
    g = Governor(GovernorPolicy(ticks=2))
    g.tick(rooms(0.5), 0.0)
    steps = {s.session_id: s.fps for s in g.tick(rooms(0.5), 0.5)}
    # 100 frames/s to save: every best-effort room down to the floor before a standard
    # room loses a frame; premium rooms never.
    assert steps["b0"] == steps["b1"] == steps["b2"] == 5
    assert {"s0", "s1", "s2"} & set(steps) and not {"p0", "p1"} & set(steps)


def test_it_waits_for_a_step_to_show_before_the_next() -> None:
    g = Governor(GovernorPolicy(ticks=2, cooldown=2.5))
    g.tick(rooms(0.2), 0.0)
    first = g.tick(rooms(0.2), 0.5)
    assert first
    slowed = {s.session_id: s.fps for s in first}
    assert g.tick(rooms(0.2, slowed), 1.0) == []
    assert g.tick(rooms(0.2, slowed), 2.0) == []
    assert g.tick(rooms(0.2, slowed), 3.0)  # past the cooldown, still losing frames


def test_rates_come_back_one_room_at_a_time_highest_tier_first() -> None:
    g = Governor(GovernorPolicy(recover_after=3))
    slowed = {"s1": 12, "b0": 5, "b1": 5}
    assert g.tick(rooms(0.0, slowed), 0.0) == []
    assert g.tick(rooms(0.0, slowed), 0.5) == []
    assert g.tick(rooms(0.0, slowed), 1.0) == [Step("s1", 24)]
    slowed["s1"] = 24
    assert g.tick(rooms(0.0, slowed), 1.5) == []
    assert g.tick(rooms(0.0, slowed), 2.0) == []
    assert g.tick(rooms(0.0, slowed), 2.5) == [Step("s1", 25)]
