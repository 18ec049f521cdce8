"""Placement: which worker renders which room. Pure policy, no I/O.

Capacity is measured, not a slot count. Each worker reports latency profiles:
seconds per call of each stage at the sizes and batch sizes it measured. Workers
batch frames across rooms, so a room's cost depends on its company: rooms that
render at the same side on one worker share batches and each frame costs
``call_seconds(n) / n`` for a batch of n (up to the best batch whose call fits
half the worker's latency budget). Packing therefore prefers workers that
already render the room's shape (Nexus's "squishy" bin packing: the bins'
sizes depend on what goes in them).

Three resources are checked on every worker:
- compute: device-seconds per second of the inference stages (render and
  audio-to-motion batched per group; TTS and, on CPU workers, encoding too);
- CPU encode: host core-seconds per second; GPUs like H100/H200 have no NVENC
  so every stream is encoded on the host's cores;
- device memory: the models once, each warm avatar's cache, each room's buffers.

`Fleet` keeps these per worker, with indexes (workers by render group, by warm
avatar, idle workers) so one placement looks at a bounded number of candidates
whatever the fleet size. The default strategy packs: workers that already
render the room's shape come first (the batch grows), the fullest of them
first; then an idle worker, the cheapest to open; workers of other shapes
last (mixed shapes keep every batch small). Idle workers can be released, so
a spread-out fleet costs every device. A tenant's premium rooms are spread:
at most `premium_spread` of them on one worker while others can take them.
Round-robin and least-loaded are kept as baselines for the load test.

Reclaiming capacity for a room that must run (a premium room within its
tenant's reservation) is `Fleet.reclaim`: on the worker where the fewest
actions suffice, best-effort rooms are preempted first (most recent first),
then standard rooms are stepped down the degradation ladder, then standard
rooms are preempted; premium rooms are never touched; actions that turn out
unnecessary are dropped again, so no smaller set of the chosen actions works.
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from avatarfarm.domain import DriveMode, Quality, Stage, Tier
from avatarfarm.latency import LatencyCurve

MAX_BATCH = 64
# 1 compute unit = what one 512x512@25 text-driven room costs on the same device.
UNIT_QUALITY = Quality(512, 512, 25)
UNIT_MODE = DriveMode.TEXT


def item_seconds(points: Sequence[tuple[int, float]], latency_budget: float = 0.0) -> float:
    """Seconds per item at the best-throughput batch size whose call fits within half the
    latency budget (any size when the budget is 0 or unknown); batch 1 when none fits."""
    return min(per_item_table(points, latency_budget))


def per_item_table(points: Sequence[tuple[int, float]], latency_budget: float = 0.0
                   ) -> tuple[float, ...]:
    """Seconds per item when n items share batches on the worker that measured `points`
    (`LatencyCurve.per_item`: the same curve the worker's batcher plans with)."""
    fastest: dict[int, float] = {}
    for b, s in sorted((b, s) for b, s in points if b > 0 and s > 0):
        fastest.setdefault(b, s)  # a size reported twice counts at its fastest
    if not fastest:
        raise ValueError("no measured batch sizes")
    return LatencyCurve(tuple(fastest.items())).per_item(latency_budget, MAX_BATCH)


@dataclass(frozen=True, slots=True)
class StageCost:
    """Measured cost of one stage at one size.

    For RENDER the size is the square portrait side (width == height); for ENCODE
    the frame size (host CPU seconds per frame); for AUDIO_TO_MOTION and TTS 0x0
    (TTS seconds are per second of speech). ``seconds`` is the per-item cost at the
    best batch; ``batch`` the per-item cost for n = 1..cap items sharing batches
    (empty: no batching, ``seconds`` at any n).
    """

    stage: Stage
    width: int
    height: int
    seconds: float
    batch: tuple[float, ...] = ()

    @classmethod
    def measured(cls, stage: Stage, width: int, height: int,
                 points: Sequence[tuple[int, float]], latency_budget: float = 0.0) -> StageCost:
        table = per_item_table(points, latency_budget)
        return cls(stage, width, height, min(table), table)

    def per_item(self, n: int) -> float:
        """Seconds per item when n rooms' items share this stage's batches."""
        if not self.batch:
            return self.seconds
        return self.batch[min(max(n, 1), len(self.batch)) - 1]


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    costs: tuple[StageCost, ...]
    _lookup: dict[tuple[Stage, int, int], tuple[StageCost, float] | None] = field(
        default_factory=dict, compare=False, repr=False)

    def cost(self, stage: Stage, width: int = 0, height: int = 0) -> tuple[StageCost, float] | None:
        """The measured cost nearest (width, height) and the pixel ratio to scale it by;
        None if the stage was never measured."""
        key = (stage, width, height)
        if key in self._lookup:
            return self._lookup[key]
        measured = [c for c in self.costs if c.stage is stage]
        found: tuple[StageCost, float] | None = None
        if measured:
            if stage in (Stage.TTS, Stage.AUDIO_TO_MOTION, Stage.ALIGNMENT):
                found = (min(measured, key=lambda c: c.seconds), 1.0)
            else:
                pixels = width * height
                nearest = min(measured, key=lambda c: abs(c.width * c.height - pixels))
                found = (nearest, pixels / max(nearest.width * nearest.height, 1))
        self._lookup[key] = found
        return found

    def stage_seconds(self, stage: Stage, width: int = 0, height: int = 0) -> float | None:
        """Seconds per item at the best batch at (width, height), scaled by pixel count
        from the nearest measured size; None if the stage was never measured."""
        found = self.cost(stage, width, height)
        return None if found is None else found[0].seconds * found[1]

    def merged(self, update: WorkerProfile) -> WorkerProfile:
        """This profile with the costs in `update` replacing those of the same stage and size."""
        fresh = {(c.stage, c.width, c.height) for c in update.costs}
        kept = tuple(c for c in self.costs if (c.stage, c.width, c.height) not in fresh)
        return WorkerProfile(kept + update.costs)

    def room_load(self, quality: Quality, mode: DriveMode, encode: bool = True) -> float | None:
        """Device-seconds per second of stream at full batching, every stage on one device
        (``encode=False``: without the encoder, for a device whose host CPU encodes);
        None if a needed stage is unmeasured."""
        side = quality.render_side
        parts = [self.stage_seconds(Stage.RENDER, side, side)]
        if encode:
            parts.append(self.stage_seconds(Stage.ENCODE, quality.width, quality.height))
        if mode.uses_audio_to_motion:
            parts.append(self.stage_seconds(Stage.AUDIO_TO_MOTION))
        if any(p is None for p in parts):
            return None
        load = quality.fps * sum(p for p in parts if p is not None)
        if mode.uses_tts:
            tts = self.stage_seconds(Stage.TTS)
            if tts is None:
                return None
            load += tts
        return load

    def units(self, quality: Quality, mode: DriveMode) -> float | None:
        """Compute units of a room: its load relative to the unit room on this device."""
        load, unit = self.room_load(quality, mode), self.room_load(UNIT_QUALITY, UNIT_MODE)
        if load is None or not unit:
            return None
        return load / unit


def nominal_units(quality: Quality, mode: DriveMode) -> float:
    """Units before any worker has measured anything: by pixels and frame rate."""
    base = quality.render_side ** 2 * quality.fps / (UNIT_QUALITY.render_side ** 2 * UNIT_QUALITY.fps)
    return base * (0.95 if mode is DriveMode.MOCAP else 1.0)


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    models_bytes: float = 0.0
    avatar_bytes_per_pixel: float = 0.0
    room_bytes_per_pixel: float = 0.0


@dataclass(frozen=True, slots=True)
class RoomReq:
    """What placement needs to know of a room. ``quality`` is what it renders at (after
    any degradation step); ``frame`` the output size it is encoded at."""

    session_id: str
    tenant: str
    avatar_id: str
    quality: Quality
    drive_mode: DriveMode
    tier: Tier
    seq: int = 0
    frame: tuple[int, int] = (0, 0)
    step: int = 0

    @property
    def frame_size(self) -> tuple[int, int]:
        return self.frame if self.frame != (0, 0) else (self.quality.width, self.quality.height)


@dataclass(frozen=True, slots=True)
class Demand:
    compute: float  # device-seconds per second
    cpu: float  # host core-seconds per second (encoding)
    memory: float  # bytes

    def __add__(self, other: Demand) -> Demand:
        return Demand(self.compute + other.compute, self.cpu + other.cpu, self.memory + other.memory)


# A batch group on a worker: the render queue of one portrait side (the side, > 0)
# or the audio-to-motion queue (0). Plain ints: these are hot dictionary keys.
GroupKey = int
_A2M: GroupKey = 0


@dataclass(frozen=True, slots=True)
class _RoomCosts:
    """What a room shape costs on one profile, looked up once per shape."""

    groups: tuple[tuple[GroupKey, StageCost, float], ...]  # key, cost, pixel scale
    host: float  # encode (+ TTS) seconds per second of stream


@dataclass(slots=True)
class WorkerState:
    """One worker's capacities and what is placed on it; loads are kept incrementally."""

    worker_id: str
    profile: WorkerProfile
    compute_capacity: float = 1.0  # device-seconds per second
    cpu_capacity: float = 0.0  # host core-seconds per second for encoding; 0: encode on device
    memory_capacity: float = 0.0  # bytes; 0: not reported (unchecked)
    memory: MemoryProfile = MemoryProfile()
    device_type: str = "unknown"
    warm: frozenset[str] = frozenset()
    accepting: bool = True
    price: float = 0.0  # per device-hour: which idle worker is cheapest to open
    rooms: dict[str, RoomReq] = field(default_factory=dict)
    groups: dict[GroupKey, tuple[int, float]] = field(default_factory=dict)  # n rooms, frames/s
    group_load: dict[GroupKey, float] = field(default_factory=dict)
    other_compute: float = 0.0
    cpu_load: float = 0.0
    memory_used: float = 0.0
    avatar_rooms: Counter[tuple[str, int]] = field(default_factory=Counter)
    premium: Counter[str] = field(default_factory=Counter)
    _compute: float = 0.0
    _shapes: dict[tuple[int, int, int, int, int, str], _RoomCosts | None] = field(
        default_factory=dict)

    def __post_init__(self) -> None:
        self.memory_used = self.memory.models_bytes

    @property
    def compute_load(self) -> float:
        return self._compute

    @property
    def encode_on_device(self) -> bool:
        return self.cpu_capacity <= 0

    def unit_capacity(self, target: float) -> float:
        """Compute units (512x512@25 text rooms) this worker carries at the utilisation
        target at full batching: device time, and the host's cores where they encode
        (0: unmeasured)."""
        q = UNIT_QUALITY
        device = self.profile.room_load(q, UNIT_MODE, encode=self.encode_on_device)
        if not device:
            return 0.0
        n = self.compute_capacity * target / device
        if not self.encode_on_device:
            enc = self.profile.stage_seconds(Stage.ENCODE, q.width, q.height)
            if enc:
                n = min(n, self.cpu_capacity * target / (enc * q.fps))
        return n

    def utilisation(self) -> float:
        parts = [self._compute / self.compute_capacity if self.compute_capacity > 0 else 1.0]
        if self.cpu_capacity > 0:
            parts.append(self.cpu_load / self.cpu_capacity)
        if self.memory_capacity > 0:
            parts.append(self.memory_used / self.memory_capacity)
        return max(parts)

    def _costs(self, room: RoomReq) -> _RoomCosts | None:
        q = room.quality
        w, h = room.frame_size
        key = (q.width, q.height, q.fps, w, h, room.drive_mode.value)
        if key in self._shapes:
            return self._shapes[key]
        p = self.profile
        side = q.render_side
        found: _RoomCosts | None = None
        render = p.cost(Stage.RENDER, side, side)
        a2m = p.cost(Stage.AUDIO_TO_MOTION) if room.drive_mode.uses_audio_to_motion else None
        enc = p.stage_seconds(Stage.ENCODE, w, h)
        tts = p.stage_seconds(Stage.TTS) if room.drive_mode.uses_tts else 0.0
        needs_a2m = room.drive_mode.uses_audio_to_motion
        if render is not None and enc is not None and tts is not None and (a2m or not needs_a2m):
            groups = [(side, render[0], render[1])]
            if a2m is not None:
                groups.append((_A2M, a2m[0], a2m[1]))
            found = _RoomCosts(tuple(groups), q.fps * enc + tts)
        self._shapes[key] = found
        return found

    def _group_load(self, cost: StageCost, scale: float, n: int, rate: float) -> float:
        return rate * cost.per_item(n) * scale if n > 0 else 0.0

    def _parts(self, room: RoomReq) -> tuple[_RoomCosts, float, float, float] | None:
        """The room's costs, and its unbatched compute, cpu and memory."""
        costs = self._costs(room)
        if costs is None:
            return None
        compute, host = (costs.host, 0.0) if self.encode_on_device else (0.0, costs.host)
        w, h = room.frame_size
        side = room.quality.render_side
        memory = self.memory.room_bytes_per_pixel * w * h
        if self.avatar_rooms[(room.avatar_id, side)] == 0:
            memory += self.memory.avatar_bytes_per_pixel * side * side
        return costs, compute, host, memory

    def demand(self, room: RoomReq) -> Demand | None:
        """What adding `room` would add to this worker (its batch groups grow, so the
        compute is marginal); None if the worker never measured a stage it needs."""
        parts = self._parts(room)
        if parts is None:
            return None
        costs, compute, cpu, memory = parts
        fps = room.quality.fps
        for key, cost, scale in costs.groups:
            n, rate = self.groups.get(key, (0, 0.0))
            compute += self._group_load(cost, scale, n + 1, rate + fps) - \
                self.group_load.get(key, 0.0)
        return Demand(compute, cpu, memory)

    def fits(self, d: Demand, target: float) -> bool:
        if self._compute + d.compute > self.compute_capacity * target + 1e-12:
            return False
        if self.cpu_capacity > 0 and self.cpu_load + d.cpu > self.cpu_capacity * target + 1e-12:
            return False
        return not (self.memory_capacity > 0
                    and self.memory_used + d.memory > self.memory_capacity * 0.95)

    def add(self, room: RoomReq) -> Demand:
        parts = self._parts(room)
        if parts is None:
            raise ValueError(f"worker {self.worker_id} cannot serve {room.quality}")
        d = self.demand(room)
        assert d is not None
        costs, compute, cpu, memory = parts
        for key, cost, scale in costs.groups:
            n, rate = self.groups.get(key, (0, 0.0))
            self._set_group(key, cost, scale, n + 1, rate + room.quality.fps)
        self.other_compute += compute
        self.cpu_load += cpu
        self.memory_used += memory
        self._compute = sum(self.group_load.values()) + self.other_compute
        self.avatar_rooms[(room.avatar_id, room.quality.render_side)] += 1
        if room.tier is Tier.PREMIUM:
            self.premium[room.tenant] += 1
        self.rooms[room.session_id] = room
        return d

    def remove(self, session_id: str) -> RoomReq | None:
        room = self.rooms.pop(session_id, None)
        if room is None:
            return None
        side = room.quality.render_side
        self.avatar_rooms[(room.avatar_id, side)] -= 1
        if self.avatar_rooms[(room.avatar_id, side)] <= 0:
            del self.avatar_rooms[(room.avatar_id, side)]
        parts = self._parts(room)
        assert parts is not None
        costs, compute, cpu, memory = parts
        for key, cost, scale in costs.groups:
            n, rate = self.groups[key]
            self._set_group(key, cost, scale, n - 1, rate - room.quality.fps)
        self.other_compute = max(0.0, self.other_compute - compute)
        self.cpu_load = max(0.0, self.cpu_load - cpu)
        self.memory_used = max(self.memory.models_bytes, self.memory_used - memory)
        self._compute = sum(self.group_load.values()) + self.other_compute
        if room.tier is Tier.PREMIUM:
            self.premium[room.tenant] -= 1
            if self.premium[room.tenant] <= 0:
                del self.premium[room.tenant]
        return room

    def _set_group(self, key: GroupKey, cost: StageCost, scale: float, n: int,
                   rate: float) -> None:
        if n <= 0:
            self.groups.pop(key, None)
            self.group_load.pop(key, None)
            return
        self.groups[key] = (n, rate)
        self.group_load[key] = self._group_load(cost, scale, n, rate)

    def copy(self) -> WorkerState:
        c = WorkerState(self.worker_id, self.profile, self.compute_capacity, self.cpu_capacity,
                        self.memory_capacity, self.memory, self.device_type, self.warm,
                        self.accepting, self.price)
        for room in self.rooms.values():
            c.add(room)
        return c


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
            req = RoomReq(room.session_id, room.tenant, room.avatar_id, quality, room.drive_mode,
                          room.tier, room.seq, room.frame_size, step)
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
        # tier: the fullest (emptier workers can be released), then the cheapest
        # marginal compute, warmth, the fewest of this tenant's premium rooms. A premium
        # room avoids workers that already carry `premium_spread` of its tenant's
        # premium rooms while any other worker can take it.
        premium = room.tier is Tier.PREMIUM
        crowded_best: tuple[str, Demand] | None = None
        for tier in self._tiers(room):
            best: tuple[tuple[float, ...], str, Demand] | None = None
            seen: set[str] = set()
            looked = fitting = 0
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
                score = (round(opening, 6), -round(after, 3), round(marginal, 4),
                         float(not warm), float(cand.premium[room.tenant]) if premium else 0.0)
                if best is None or score < best[0]:
                    best = (score, wid, d)
            if best is not None:
                return best[1], best[2]
        return crowded_best

    # -- reclaiming -----------------------------------------------------------------

    def reclaim(self, room: RoomReq, degrade_to: Callable[[RoomReq], RoomReq | None],
                max_workers: int = 64) -> Reclaim | None:
        """The fewest actions on one worker that let `room` fit: preempt best-effort rooms
        (most recent first), step standard rooms down to the ladder's last rung (via
        `degrade_to`), preempt standard rooms (most recent first). Premium rooms are never
        touched. None when no worker can make room."""
        best: tuple[tuple[int, int, float], Reclaim] | None = None
        looked = 0
        ranked = sorted(self.workers.values(),
                        key=lambda w: sum(w.premium.values()) - len(w.rooms))  # most borrowers first
        for w in ranked:
            if not w.accepting or w.demand(room) is None:
                continue
            if looked >= max_workers:
                break
            looked += 1
            plan = self._plan_on(w, room, degrade_to)
            if plan is None:
                continue
            preempts = sum(1 for a in plan if a.kind is ActionKind.PREEMPT)
            key = (preempts, len(plan) - preempts, 0.0)
            if best is None or key < best[0]:
                best = (key, Reclaim(w.worker_id, tuple(plan)))
        return None if best is None else best[1]

    def _plan_on(self, w: WorkerState, room: RoomReq,
                 degrade_to: Callable[[RoomReq], RoomReq | None]) -> list[Action] | None:
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
            return d is not None and trial.fits(d, self.target)

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
        elif w.memory_capacity > 0 and w.memory_used + d.memory > w.memory_capacity * 0.95:
            return (f"needs {d.memory / 1e9:.2f} GB of device memory for {room.quality}; the least "
                    f"loaded of {len(open_workers)} worker(s) has "
                    f"{max(w.memory_capacity * 0.95 - w.memory_used, 0) / 1e9:.2f} GB free")
        else:
            need = d.compute
        return (f"needs {need:.2f} of a worker's {what} for {room.quality}; the least loaded of "
                f"{len(open_workers)} worker(s) has {free:.2f} free")
