"""A worker past what it delivers, with plain values: when to act, which room gives
way, and what capacity it keeps."""

from __future__ import annotations

import pytest

from avatarfarm.domain import Tier
from scheduler.policy.overload import (
    OverloadPolicy,
    OverloadWatch,
    RoomOnWorker,
    delivered_capacity,
    recovered_capacity,
    room_to_step_down,
)

P = OverloadPolicy(late_share=0.01, ticks=3, cooldown=5.0)


def test_it_acts_after_ticks_in_a_row_over_the_share_then_waits_for_the_effect() -> None:
    w, acted = OverloadWatch(), []
    shares = [0.2, 0.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.005]
    for t, share in enumerate(shares):
        w, act = w.after(share, float(t), P)
        acted.append(act)
    # A blip resets the count; three in a row act; then not again within the cooldown.
    assert [t for t, a in enumerate(acted) if a] == [4, 9]
    assert w.quiet == 1 and w.over == 0


def room(sid: str, tier: Tier, step: int = 0, can: bool = True, seq: int = 0) -> RoomOnWorker:
    return RoomOnWorker(sid, tier, step, can, seq)


def test_the_lowest_tier_gives_way_spread_over_its_rooms_and_premium_never() -> None:
    rooms = [room("p", Tier.PREMIUM), room("s", Tier.STANDARD), room("b1", Tier.BEST_EFFORT, 1, seq=1),
             room("b2", Tier.BEST_EFFORT, 0, seq=2), room("b3", Tier.BEST_EFFORT, 0, seq=3)]
    assert room_to_step_down(rooms) == "b3"  # least stepped down, then the newest
    no_best = [r for r in rooms if r.tier is not Tier.BEST_EFFORT]
    assert room_to_step_down(no_best) == "s"
    assert room_to_step_down([room("p", Tier.PREMIUM), room("s", Tier.STANDARD, can=False)]) is None


def test_capacity_is_what_the_worker_delivers_and_comes_back_slowly() -> None:
    # 1.2 device-s/s placed, 25% of frames late, filled to 90%: it shows 1.0.
    assert delivered_capacity(2.0, 1.2, 0.25, 0.9) == pytest.approx(1.0)
    assert delivered_capacity(1.0, 0.9, 0.0, 0.9) == 1.0  # never more than it had
    assert recovered_capacity(1.0, 2.0, OverloadPolicy(recovery=0.05)) == pytest.approx(1.05)
