"""A worker over its capacity: what the scheduler does when a worker is losing frames.

A profile can be optimistic, a noisy neighbour can slow the host, rooms can arrive in
a burst: a worker can be placed past what it delivers. Its rooms' progress says how
many frames it showed late; once the late share of a tick (a second of reports)
stays over `late_share` for `ticks` in a row the scheduler (1) takes the worker's
capacity down to what it delivers, so nothing more is placed there, and (2) steps
down one room, lowest tier first and never premium, and waits `cooldown` for the
effect before the next step. Once the worker has been quiet for `recover_after`
ticks its capacity creeps back (`recovery` of the gap per tick), and degraded rooms
step back up as placement finds room.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from avatarfarm.domain import Tier


@dataclass(frozen=True, slots=True)
class OverloadPolicy:
    late_share: float = 0.01
    ticks: int = 3
    cooldown: float = 5.0
    recover_after: int = 30
    recovery: float = 0.05


@dataclass(frozen=True, slots=True)
class OverloadWatch:
    """One worker's recent ticks, as the policy reads them."""

    over: int = 0  # ticks in a row over the late share
    quiet: int = 0  # ticks in a row at or under it
    acted_at: float = -math.inf

    @property
    def overloaded(self) -> bool:
        return self.over > 0

    def after(self, late_share: float, now: float, policy: OverloadPolicy) -> tuple[OverloadWatch, bool]:
        """The watch after a tick's reports, and whether to act now."""
        if late_share <= policy.late_share:
            return OverloadWatch(0, self.quiet + 1, self.acted_at), False
        over = self.over + 1
        act = over >= policy.ticks and now - self.acted_at >= policy.cooldown
        return OverloadWatch(over, 0, now if act else self.acted_at), act


@dataclass(frozen=True, slots=True)
class RoomOnWorker:
    session_id: str
    tier: Tier
    step: int
    can_step_down: bool
    seq: int  # creation order


def room_to_step_down(rooms: Sequence[RoomOnWorker]) -> str | None:
    """The room that gives way: lowest tier first (best effort, then standard; premium
    never), among those the least stepped down (losses spread over rooms), then the
    newest."""
    order = {Tier.BEST_EFFORT: 0, Tier.STANDARD: 1}
    able = [r for r in rooms if r.can_step_down and r.tier in order]
    if not able:
        return None
    return min(able, key=lambda r: (order[r.tier], r.step, -r.seq)).session_id


def delivered_capacity(capacity: float, load: float, late_share: float, target: float) -> float:
    """The capacity a worker shows it has: what it delivers of the load placed on it,
    at the utilisation target; never more than it had."""
    return min(capacity, load * (1.0 - late_share) / max(target, 1e-9))


def recovered_capacity(current: float, full: float, policy: OverloadPolicy) -> float:
    return current + (full - current) * policy.recovery
