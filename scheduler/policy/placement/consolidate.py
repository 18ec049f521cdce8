"""Consolidation: moving rooms off under-filled workers into fuller ones, so that a
day's rooms leaving one by one do not strand half-empty GPUs. Pure: the fleet and
time come in, the moves come out; the core carries them out as handovers (the room's
output continues on the new worker) and the autoscaler removes the workers it empties.

A worker is emptied only whole: every room on it must fit on the fuller workers at
the utilisation target; a worker that cannot be emptied whole keeps its rooms, since
moving some of them frees nothing. Moves are spent carefully, because each costs its
room a handover:
- never while rooms wait for capacity (capacity is what they need, not fewer workers),
  nor while the fleet still fills up: only once its load has fallen below `after_peak`
  of its highest in the last `window_seconds` (after the peak, as rooms leave);
- premium rooms stay where they are unless their tenant consents (`movable_premium`);
- each room moves at most `max_moves_per_room` times, and the fleet at most
  `max_moves_per_hour` times an hour;
- each room goes where it adds the least device time (it joins a batch of its shape),
  and a worker is emptied only if its rooms take no more device time where they go
  than it frees (within `max_cost_increase`);
- workers whose rooms hand over seamlessly (HLS, a file) are emptied before those
  whose viewers would see a reconnect (RTMP), and one with more than
  `max_reconnects` such rooms is left alone;
- only workers under `max_utilisation` are emptied (one 70% full or more is not
  stranded), and at most a share of the busy workers per pass (`pass_share`, at
  least one), so a large fleet empties its stranded workers as fast as a small one.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from avatarfarm.domain import Tier
from scheduler.policy.placement.fleet import Fleet
from scheduler.policy.placement.worker import RoomReq, WorkerState

HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class ConsolidationConfig:
    max_utilisation: float = 0.7
    max_moves_per_room: int = 2
    max_moves_per_hour: int = 600
    pass_share: float = 0.1  # of the busy workers, emptied in one pass at most
    max_targets: int = 64  # fuller workers tried per pass (the fullest first)
    max_reconnects: int = 4
    # Device time the moved rooms may take where they go beyond what the emptied worker
    # frees, as a fraction of it (rooms that join batches cost less than they did).
    max_cost_increase: float = 0.1
    # Only once the load has fallen to this share of its recent peak (rooms leaving).
    after_peak: float = 0.9
    window_seconds: float = 3600.0
    movable_premium: frozenset[str] = frozenset()  # tenants who consent to moving premium rooms


@dataclass(frozen=True, slots=True)
class Move:
    session_id: str
    source: str
    target: str


@dataclass(slots=True)
class MoveBudget:
    """Moves made so far: per room, and the fleet's in the last hour."""

    per_room: collections.Counter[str] = field(default_factory=collections.Counter)
    recent: collections.deque[float] = field(default_factory=collections.deque)

    def left_this_hour(self, now: float, per_hour: int) -> int:
        while self.recent and self.recent[0] <= now - HOUR:
            self.recent.popleft()
        return per_hour - len(self.recent)

    def spend(self, moves: Collection[Move], now: float) -> None:
        for m in moves:
            self.per_room[m.session_id] += 1
            self.recent.append(now)

    def forget(self, session_id: str) -> None:
        """The room ended."""
        self.per_room.pop(session_id, None)


def consolidation_moves(fleet: Fleet, now: float, budget: MoveBudget,
                        config: ConsolidationConfig = ConsolidationConfig(), *, waiting: int = 0,
                        recent_peak: float = 0.0,
                        reconnects: Callable[[RoomReq], bool] = lambda r: False) -> list[Move]:
    """The moves that empty under-filled workers this pass: none while rooms wait, nor
    while the fleet's load is near ``recent_peak`` (its highest over the last
    `ConsolidationConfig.window_seconds`: a fleet still filling up would only open new
    workers for the rooms to come)."""
    if waiting or fleet.load_total > config.after_peak * recent_peak:
        return []
    left = budget.left_this_hour(now, config.max_moves_per_hour)
    busy = [w for w in fleet.workers.values() if w.accepting and w.rooms]
    if left <= 0 or len(busy) < 2:
        return []

    def movable(room: RoomReq) -> bool:
        return (budget.per_room[room.session_id] < config.max_moves_per_room
                and (room.tier is not Tier.PREMIUM or room.tenant in config.movable_premium))

    candidates = []
    for w in busy:
        if w.utilisation() >= config.max_utilisation or not all(movable(r) for r in w.rooms.values()):
            continue
        n_reconnect = sum(reconnects(r) for r in w.rooms.values())
        if n_reconnect <= config.max_reconnects:
            # Seamless first; then the emptiest, the dearest of equals (it saves the most).
            candidates.append(((n_reconnect, round(w.utilisation(), 3), -w.price), w))
    candidates.sort(key=lambda c: c[0])
    per_pass = max(1, math.ceil(config.pass_share * len(busy)))
    emptied: set[str] = set()
    targets: dict[str, WorkerState] = {}  # copies, with the moves planned so far added
    moves: list[Move] = []
    for _, source in candidates:
        if len(emptied) >= per_pass:
            break
        if source.worker_id in targets:
            continue  # it takes rooms this pass
        if len(moves) + len(source.rooms) > left:
            continue
        fuller = sorted((w for w in busy if w.worker_id not in emptied and w.worker_id != source.worker_id
                         and w.utilisation() > source.utilisation()),
                        key=lambda w: -w.utilisation())[:config.max_targets]
        found = _empty(source, fuller, targets, fleet.target, config.max_cost_increase)
        if found is not None:
            emptied.add(source.worker_id)
            targets.update(found[1])
            moves.extend(found[0])
    return moves


def _empty(source: WorkerState, others: list[WorkerState], targets: dict[str, WorkerState],
           utilisation_target: float, max_cost_increase: float,
           ) -> tuple[list[Move], dict[str, WorkerState]] | None:
    """Where every room of ``source`` would go among ``others`` (each where it adds the
    least device time; ``targets`` holds copies of workers already given rooms), and
    those workers' copies with the rooms added; None if a room fits nowhere or the
    rooms would take more device time than ``source`` frees (by ``max_cost_increase``)."""
    trial: dict[str, WorkerState] = {}
    planned: list[Move] = []
    added = 0.0
    for room in sorted(source.rooms.values(), key=lambda r: -r.quality.render_side):
        best: tuple[float, WorkerState] | None = None
        for w in others:
            t = trial.get(w.worker_id) or targets.get(w.worker_id) or w
            d = t.demand(room)
            if d is not None and t.fits(d, utilisation_target) and (best is None or d.compute < best[0]):
                best = (d.compute, w)
        if best is None:
            return None  # it fits nowhere: the worker is not emptied
        w = best[1]
        if w.worker_id not in trial:
            trial[w.worker_id] = (targets.get(w.worker_id) or w).copy()
        trial[w.worker_id].add(room)
        added += best[0]
        planned.append(Move(room.session_id, source.worker_id, w.worker_id))
    # Worth it only where the rooms cost no more where they go than where they are.
    if added > source.compute_load * (1 + max_cost_increase) + 1e-12:
        return None
    return planned, trial


def drainable(fleet: Fleet, candidates: list[str], n: int, max_targets: int = 64) -> list[str]:
    """Up to ``n`` of ``candidates`` (in order) whose rooms all fit on the fleet's other
    accepting workers together, now: workers to drain without leaving rooms stranded at
    the drain's deadline (a worker with no room always qualifies)."""
    chosen: list[str] = []
    targets: dict[str, WorkerState] = {}
    for wid in candidates:
        if len(chosen) >= n:
            break
        source = fleet.workers.get(wid)
        if wid in targets:
            continue  # rooms of a worker chosen before would go to it
        if source is None or not source.rooms:
            chosen.append(wid)
            continue
        others = sorted((w for w in fleet.workers.values() if w.accepting and w.worker_id != wid
                         and w.worker_id not in chosen), key=lambda w: -w.utilisation())[:max_targets]
        found = _empty(source, others, targets, fleet.target, float("inf"))
        if found is not None:
            chosen.append(wid)
            targets.update(found[1])
    return chosen
