"""Reclaiming capacity for a room that must run (a premium room within its tenant's
reservation): on the worker where the fewest actions suffice, best-effort rooms are
preempted first (most recent first), then standard rooms are stepped down the
degradation ladder, then standard rooms are preempted; premium rooms are never
touched; actions that turn out unnecessary are dropped again, so no smaller set of
the chosen actions works."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from avatarfarm.domain import Tier
from scheduler.policy.placement.worker import RoomReq, WorkerState


class ActionKind(enum.Enum):
    PREEMPT = "preempt"
    DEGRADE = "degrade"


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    session_id: str
    step: int = 0  # for DEGRADE: the ladder step to go to


@dataclass(frozen=True, slots=True)
class Reclaim:
    worker_id: str
    actions: tuple[Action, ...]


def plan(workers: Iterable[WorkerState], room: RoomReq,
         degrade_to: Callable[[RoomReq], RoomReq | None], target: float,
         max_workers: int = 64) -> Reclaim | None:
    """The fewest actions on one worker that let `room` fit: preempt best-effort rooms
    (most recent first), step standard rooms down to the ladder's last rung (via
    `degrade_to`), preempt standard rooms (most recent first). Premium rooms are never
    touched. None when no worker can make room."""
    best: tuple[tuple[int, int, float], Reclaim] | None = None
    looked = 0
    ranked = sorted(workers,
                    key=lambda w: sum(w.premium.values()) - len(w.rooms))  # most borrowers first
    for w in ranked:
        if not w.accepting or w.demand(room) is None:
            continue
        if looked >= max_workers:
            break
        looked += 1
        actions = _plan_on(w, room, degrade_to, target)
        if actions is None:
            continue
        preempts = sum(1 for a in actions if a.kind is ActionKind.PREEMPT)
        key = (preempts, len(actions) - preempts, 0.0)
        if best is None or key < best[0]:
            best = (key, Reclaim(w.worker_id, tuple(actions)))
    return None if best is None else best[1]


def _plan_on(w: WorkerState, room: RoomReq, degrade_to: Callable[[RoomReq], RoomReq | None],
             target: float) -> list[Action] | None:
    newest_first = sorted(w.rooms.values(), key=lambda r: -r.seq)
    order: list[Action] = [Action(ActionKind.PREEMPT, r.session_id) for r in newest_first
                           if r.tier is Tier.BEST_EFFORT]
    lowered: dict[str, RoomReq] = {}
    for r in newest_first:
        if r.tier is Tier.STANDARD:
            low = degrade_to(r)
            if low is not None and low.step > r.step:
                lowered[r.session_id] = low
                order.append(Action(ActionKind.DEGRADE, r.session_id, low.step))
    order += [Action(ActionKind.PREEMPT, r.session_id) for r in newest_first
              if r.tier is Tier.STANDARD]

    # One trial copy of the worker, moved action by action (each room is at its own
    # quality, its lowered one, or gone, as the set of actions taken says).
    trial = w.copy()
    original = dict(w.rooms)
    status: dict[str, str] = {}
    acts: set[tuple[ActionKind, str]] = set()

    def sync(sid: str) -> None:
        want = ("gone" if (ActionKind.PREEMPT, sid) in acts else
                "low" if (ActionKind.DEGRADE, sid) in acts else "orig")
        have = status.get(sid, "orig")
        if want == have:
            return
        if have != "gone":
            trial.remove(sid)
        if want != "gone":
            trial.add(original[sid] if want == "orig" else lowered[sid])
        status[sid] = want

    def fits() -> bool:
        d = trial.demand(room)
        return d is not None and trial.fits(d, target)

    if fits():
        return []
    taken: list[Action] = []
    for a in order:
        taken.append(a)
        acts.add((a.kind, a.session_id))
        sync(a.session_id)
        if fits():
            break
    else:
        return None
    # Only as much as needed: drop any action the rest do without.
    for a in reversed(list(taken)):
        acts.discard((a.kind, a.session_id))
        sync(a.session_id)
        if fits():
            taken.remove(a)
        else:
            acts.add((a.kind, a.session_id))
            sync(a.session_id)
    return taken
