"""The fleet: every worker and the rooms placed on it, indexed (workers by render
group, by warm avatar, idle workers) so one placement looks at a bounded number of
candidates whatever the fleet size, and the strategies that choose among them."""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from avatarfarm.domain import Quality, Tier
from scheduler.policy.placement.reclaim import Reclaim, plan
from scheduler.policy.placement.worker import _A2M, MEMORY_SHARE, Demand, RoomReq, WorkerState

# The third tier of `Fleet._tiers`: busy workers rendering other shapes.
_OTHER_SHAPES = 2


class Strategy(enum.Enum):
    PACK = "pack"  # batch-aware, affinity, tightest fit, idle workers last
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"


@dataclass(frozen=True, slots=True)
class Choice:
    worker_id: str
    demand: Demand
    step: int  # degradation step the room is placed at (0: full quality)
    quality: Quality


# Rungs of the degradation ladder for a room: (step, quality) in order; step 0 first.
Rungs = Callable[[RoomReq], Sequence[tuple[int, Quality]]]


def _full_only(room: RoomReq) -> Sequence[tuple[int, Quality]]:
    return [(room.step, room.quality)]


class Fleet:
    """The workers and the rooms placed on them, indexed for bounded-cost placement."""

    def __init__(self, utilisation_target: float = 0.9, strategy: Strategy = Strategy.PACK,
                 premium_spread: int = 4, candidates: int = 16) -> None:
        self.target = utilisation_target
        self.strategy = strategy
        self.premium_spread = premium_spread
        self.candidates = candidates
        self.workers: dict[str, WorkerState] = {}
        self.where: dict[str, str] = {}  # session_id -> worker_id
        # Ordered sets (dict keys): workers with rooms in a render group and room left,
        # workers with an avatar warm, busy workers with room left, idle workers.
        self._group: dict[int, dict[str, None]] = {}
        self._warm: dict[str, dict[str, None]] = {}
        self._busy: dict[str, None] = {}
        self._idle: dict[str, None] = {}
        self._idle_by_type: dict[str, dict[str, None]] = {}
        self._free: dict[str, float] = {}
        self._load: dict[str, float] = {}
        self._occupied: set[str] = set()
        self.free_total = 0.0  # compute left below the target on accepting workers
        self.load_total = 0.0  # compute placed on all workers
        self._rr = 0

    # -- membership ---------------------------------------------------------------

    def add_worker(self, w: WorkerState) -> None:
        self.remove_worker(w.worker_id)
        self.workers[w.worker_id] = w
        for a in w.warm:
            self._warm.setdefault(a, {})[w.worker_id] = None
        for room in list(w.rooms.values()):
            self.where[room.session_id] = w.worker_id
        self._reindex(w)

    def remove_worker(self, worker_id: str) -> list[RoomReq]:
        w = self.workers.pop(worker_id, None)
        if w is None:
            return []
        for s in self._group.values():
            s.pop(worker_id, None)
        for s in self._warm.values():
            s.pop(worker_id, None)
        self._busy.pop(worker_id, None)
        self._idle.pop(worker_id, None)
        self._idle_by_type.get(w.device_type, {}).pop(worker_id, None)
        self.free_total -= self._free.pop(worker_id, 0.0)
        self.load_total -= self._load.pop(worker_id, 0.0)
        self._occupied.discard(worker_id)
        for sid in w.rooms:
            self.where.pop(sid, None)
        return list(w.rooms.values())

    def set_accepting(self, worker_id: str, accepting: bool) -> None:
        w = self.workers[worker_id]
        w.accepting = accepting
        self._reindex(w)

    def set_capacity(self, worker_id: str, compute_capacity: float) -> None:
        """The worker's compute capacity as it has shown it (an overloaded worker's is
        taken down to what it delivers; see scheduler.policy.overload)."""
        w = self.workers[worker_id]
        w.compute_capacity = compute_capacity
        self._reindex(w)

    def _reindex(self, w: WorkerState) -> None:
        wid = w.worker_id
        free = max(0.0, w.compute_capacity * self.target - w.compute_load) if w.accepting else 0.0
        self.free_total += free - self._free.get(wid, 0.0)
        self._free[wid] = free
        self.load_total += w.compute_load - self._load.get(wid, 0.0)
        self._load[wid] = w.compute_load
        roomy = w.accepting and w.utilisation() < self.target * 0.97
        for side in {k for k in w.groups if k != _A2M} | set(self._group):
            in_group = side in w.groups
            if in_group and roomy:
                self._group.setdefault(side, {})[wid] = None
            else:
                self._group.get(side, {}).pop(wid, None)
        idle_here = self._idle_by_type.setdefault(w.device_type, {})
        if w.rooms:
            self._occupied.add(wid)
            self._idle.pop(wid, None)
            idle_here.pop(wid, None)
            if roomy:
                self._busy[wid] = None
            else:
                self._busy.pop(wid, None)
        else:
            self._occupied.discard(wid)
            self._busy.pop(wid, None)
            if w.accepting:
                self._idle[wid] = None
                idle_here[wid] = None
            else:
                self._idle.pop(wid, None)
                idle_here.pop(wid, None)

    # -- rooms --------------------------------------------------------------------

    def assign(self, room: RoomReq, worker_id: str) -> Demand:
        self.release(room.session_id)
        w = self.workers[worker_id]
        d = w.add(room)
        self.where[room.session_id] = worker_id
        self._warm.setdefault(room.avatar_id, {})[worker_id] = None
        self._reindex(w)
        return d

    def release(self, session_id: str) -> RoomReq | None:
        wid = self.where.pop(session_id, None)
        if wid is None or wid not in self.workers:
            return None
        w = self.workers[wid]
        room = w.remove(session_id)
        self._reindex(w)
        return room

    def room(self, session_id: str) -> RoomReq | None:
        wid = self.where.get(session_id)
        return None if wid is None else self.workers[wid].rooms.get(session_id)

    # -- choosing -----------------------------------------------------------------

    def choose(self, room: RoomReq, rungs: Rungs = _full_only) -> Choice | None:
        """The worker for `room` at the best rung of its ladder that fits anywhere."""
        for step, quality in rungs(room):
            req = dataclasses.replace(room, quality=quality, frame=room.frame_size, step=step)
            found = self._choose_at(req)
            if found is not None:
                return Choice(found[0], found[1], step, quality)
        return None

    @property
    def busy_workers(self) -> int:
        """Workers carrying at least one room (idle ones could be released)."""
        return len(self._occupied)

    def _tiers(self, room: RoomReq) -> Iterator[Iterable[str]]:
        """Candidate workers in order of preference, tier by tier: workers rendering the
        room's shape (those with its avatar warm first), idle workers of every device type,
        then busy workers of other shapes."""
        side = room.quality.render_side
        group = self._group.get(side, {})
        warm = self._warm.get(room.avatar_id, {})
        yield itertools.chain((wid for wid in itertools.islice(warm, self.candidates * 4)
                               if wid in group), group)
        yield itertools.chain.from_iterable(
            itertools.islice(ids, self.candidates) for ids in self._idle_by_type.values())
        yield (wid for wid in self._busy if wid not in group)

    def _choose_at(self, room: RoomReq) -> tuple[str, Demand] | None:
        if self.strategy is Strategy.ROUND_ROBIN:
            order = sorted(self.workers)
            for i in range(len(order)):
                w = self.workers[order[(self._rr + i) % len(order)]]
                d = w.demand(room) if w.accepting else None
                if d is not None and w.fits(d, self.target):
                    self._rr = (self._rr + i + 1) % len(order)
                    return w.worker_id, d
            return None
        if self.strategy is Strategy.LEAST_LOADED:
            for w in sorted((w for w in self.workers.values() if w.accepting),
                            key=lambda w: w.utilisation()):
                d = w.demand(room)
                if d is not None and w.fits(d, self.target):
                    return w.worker_id, d
            return None
        # PACK: the first tier with a worker that fits wins (a worker already rendering
        # the shape: its batches grow; else the idle worker cheapest to open; else a
        # worker of other shapes, where the room's batches start from one). Within a
        # tier: the fullest (emptier workers can be released; among workers of other
        # shapes the emptiest, where the room's shape has room to grow), then the cheapest
        # marginal compute, warmth, the fewest of this tenant's premium rooms. A premium
        # room avoids workers that already carry `premium_spread` of its tenant's
        # premium rooms while any other worker can take it.
        premium = room.tier is Tier.PREMIUM
        crowded_best: tuple[str, Demand] | None = None
        indexes = (self._group.get(room.quality.render_side, {}),
                   self._warm.get(room.avatar_id, {}), self._busy)
        for rank, tier in enumerate(self._tiers(room)):
            best: tuple[tuple[float, ...], str, Demand] | None = None
            seen: set[str] = set()
            looked = fitting = 0
            full: list[str] = []
            for wid in tier:
                if wid in seen:
                    continue
                seen.add(wid)
                looked += 1
                if looked > self.candidates * 4 or fitting >= self.candidates:
                    break
                cand = self.workers.get(wid)
                if cand is None or not cand.accepting:
                    continue
                d = cand.demand(room)
                if d is None or not cand.fits(d, self.target):
                    full.append(wid)
                    continue
                fitting += 1
                if premium and cand.premium[room.tenant] >= self.premium_spread:
                    crowded_best = crowded_best or (wid, d)
                    continue
                marginal = d.compute / cand.compute_capacity
                after = (cand.compute_load + d.compute) / cand.compute_capacity
                warm = room.avatar_id in cand.warm or cand.avatar_rooms[(room.avatar_id, room.quality.render_side)] > 0
                # Opening an idle worker costs its whole price: the one whose price per
                # share of it this room takes is lowest.
                opening = cand.price * max(marginal, d.cpu / cand.cpu_capacity if cand.cpu_capacity
                                        else 0.0) if not cand.rooms else 0.0
                # A room starting its side on a worker of other sides goes to the emptiest:
                # its side's next rooms join its batch there (on the fullest, each would
                # start another batch of one elsewhere).
                fill = round(after, 3) if rank == _OTHER_SHAPES else -round(after, 3)
                score = (round(opening, 6), fill, round(marginal, 4),
                         float(not warm), float(cand.premium[room.tenant]) if premium else 0.0)
                if best is None or score < best[0]:
                    best = (score, wid, d)
            self._to_back(full, indexes)
            if best is not None:
                return best[1], best[2]
        return crowded_best

    @staticmethod
    def _to_back(full: list[str], indexes: Iterable[dict[str, None]]) -> None:
        """Workers a room did not fit go to the back of the indexes the search reads in
        order, so a search bounded to the first candidates keeps finding workers with room
        on a large fleet instead of the same nearly full ones (which would open an idle
        worker, or refuse the room, while hundreds further on had room)."""
        for wid in full:
            for index in indexes:
                if wid in index:
                    del index[wid]
                    index[wid] = None

    # -- reclaiming -----------------------------------------------------------------

    def reclaim(self, room: RoomReq, degrade_to: Callable[[RoomReq], RoomReq | None],
                max_workers: int = 64) -> Reclaim | None:
        """The fewest actions on one worker that let `room` fit (`reclaim.plan`)."""
        return plan(self.workers.values(), room, degrade_to, self.target, max_workers)

    # -- views ----------------------------------------------------------------------

    def totals(self) -> Mapping[str, tuple[int, float, float]]:
        """Per device type: workers, compute capacity, compute load."""
        out: dict[str, tuple[int, float, float]] = {}
        for w in self.workers.values():
            n, cap, load = out.get(w.device_type, (0, 0.0, 0.0))
            out[w.device_type] = (n + 1, cap + w.compute_capacity, load + w.compute_load)
        return out

    def why_not(self, room: RoomReq) -> str:
        """Why `room` cannot be placed now, in words a tenant can act on."""
        open_workers = [w for w in self.workers.values() if w.accepting]
        if not open_workers:
            return "no worker is connected and accepting rooms"
        if room.face and room.face_family and all(
                w.families and room.face_family not in w.families for w in open_workers):
            return (f"no connected worker renders {room.face_family} avatars (their model folders "
                    f"lack that family's models{' or feature model' if '/' in room.face_family else ''})")
        if room.voice and not any(room.voice in w.voices for w in open_workers):
            return (f"no connected worker speaks voice {room.voice!r} (the avatar's registered "
                    "voice: a neural voice in a worker's model folder, or a TTS service's)")
        # A sample is enough to say why, and keeps a refusal cheap on a large fleet.
        demands = [(w, w.demand(room)) for w in itertools.islice(open_workers, 64)]
        measured = [(w, d) for w, d in demands if d is not None]
        if not measured:
            return (f"no connected worker has measured what {room.quality} "
                    f"{room.drive_mode.value}-driven rooms need")
        w, d = min(measured, key=lambda wd: wd[0].utilisation())
        assert d is not None
        free = max(w.compute_capacity * self.target - w.compute_load, 0.0)
        what = "device time"
        if w.cpu_capacity > 0 and w.cpu_load + d.cpu > w.cpu_capacity * self.target:
            what, free = "CPU encode time", max(w.cpu_capacity * self.target - w.cpu_load, 0.0)
            need = d.cpu
        elif w.memory_capacity > 0 and w.memory_used + d.memory > w.memory_capacity * MEMORY_SHARE:
            return (f"needs {d.memory / 1e9:.2f} GB of device memory for {room.quality}; the least "
                    f"loaded of {len(open_workers)} worker(s) has "
                    f"{max(w.memory_capacity * MEMORY_SHARE - w.memory_used, 0) / 1e9:.2f} GB free")
        else:
            need = d.compute
        return (f"needs {need:.2f} of a worker's {what} for {room.quality}; the least loaded of "
                f"{len(open_workers)} worker(s) has {free:.2f} free")
