"""One worker as placement sees it: its capacities (compute, host CPU for encoding,
device memory) and the rooms on it, with loads kept incrementally as rooms come and
go; a room's demand on it depends on the rooms already sharing its batches."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

from avatarfarm.domain import HOST_TTS, DriveMode, Quality, Stage, Tier
from scheduler.policy.placement.costs import (
    UNIT_MODE,
    UNIT_QUALITY,
    MemoryProfile,
    StageCost,
    WorkerProfile,
)


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
    face: bool = False  # a video avatar: a face family's model draws its frames
    face_model: str = ""  # which (avatarfarm.avatars.face_model); "": any the worker has
    face_model_bytes: int = 0  # the avatar's own model (loaded with its first room), if any
    face_family: str = ""  # what the worker must render (avatarfarm.avatars.face_family); "": any
    # A text room's neural voice: one that workers name (on their device, or a TTS
    # service's), which only they speak, or a Piper voice registered in the avatar folder
    # (``voice_shared``), which every worker loads when a room names it. "": espeak-ng's
    # or a registered service voice's (any worker, no device time).
    voice: str = ""
    voice_shared: bool = False

    @property
    def frame_size(self) -> tuple[int, int]:
        return self.frame if self.frame != (0, 0) else (self.quality.width, self.quality.height)


# Share of a device's memory rooms may fill (the rest: the runtime's own allocations).
MEMORY_SHARE = 0.95
# Unit rooms tried one by one when a worker's capacity in units is worked out, before
# the rest is counted at once.
_UNIT_FILL_LIMIT = 256


@dataclass(frozen=True, slots=True)
class Demand:
    compute: float  # device-seconds per second
    cpu: float  # host core-seconds per second (encoding)
    memory: float  # bytes

    def __add__(self, other: Demand) -> Demand:
        return Demand(self.compute + other.compute, self.cpu + other.cpu, self.memory + other.memory)


# A batch group on a worker: the render queue of one portrait side (the side, > 0),
# the audio-to-motion queue (0), the face model's queue (-1) or a neural voice's
# (below -1, one per voice name). Plain ints: these are hot dictionary keys.
GroupKey = int
_A2M: GroupKey = 0
_VOICE_GROUPS: dict[str, GroupKey] = {}


def voice_group(voice: str) -> GroupKey:
    """The batch group of a neural voice's sentences (the same key on every worker)."""
    return _VOICE_GROUPS.setdefault(voice, -2 - len(_VOICE_GROUPS))


# Seconds of speech a text room's voice is planned for, per second of stream: a script
# without pauses (as the face model is planned for every frame); pauses are device
# time saved, seen in the room's metered cost.
SPEECH_SHARE = 1.0
_FACE: GroupKey = -1


@dataclass(frozen=True, slots=True)
class _RoomCosts:
    """What a room shape costs on one profile, looked up once per shape."""

    # key, cost, pixel scale, items per second (frames; seconds of speech for a voice)
    groups: tuple[tuple[GroupKey, StageCost, float, float], ...]
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
    # The video avatars' families it renders (avatarfarm.avatars.face_family); empty: not
    # said (a worker from before workers said), taken as any.
    families: frozenset[str] = frozenset()
    driver_ingest: bool = False  # it takes camera drivers' streams: it can run camera rooms
    # Voices it speaks besides espeak-ng's: neural voices (on its device where its profile
    # has a TTS cost for the voice) and TTS services' voices.
    voices: frozenset[str] = frozenset()
    rooms: dict[str, RoomReq] = field(default_factory=dict)
    # Bumped by every add and remove: a reader that keeps what it derived from the rooms
    # (the core's snapshot) knows when to derive it again.
    changes: int = 0
    groups: dict[GroupKey, tuple[int, float]] = field(default_factory=dict)  # n rooms, frames/s
    group_load: dict[GroupKey, float] = field(default_factory=dict)
    other_compute: float = 0.0
    cpu_load: float = 0.0
    memory_used: float = 0.0
    avatar_rooms: Counter[tuple[str, int]] = field(default_factory=Counter)
    avatar_totals: Counter[str] = field(default_factory=Counter)  # rooms per avatar, any side
    premium: Counter[str] = field(default_factory=Counter)
    _compute: float = 0.0
    _shapes: dict[tuple[int, int, int, int, int, str, bool, str, str, bool], _RoomCosts | None] = field(
        default_factory=dict)
    # What a room of each shape would add now, by (shape, first of its avatar at its side,
    # first of its avatar): placement asks every candidate for every room, and a worker's
    # answer changes only when its rooms do, so it is kept until the next `add`/`remove`.
    _demands: dict[tuple[object, ...], Demand | None] = field(default_factory=dict)
    # The last `unit_capacity` asked, by what it depends on (the profile never changes).
    _unit_capacity: tuple[tuple[float, float, float], float] | None = None

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
        target at full batching: as many unit rooms of one avatar as placement would put
        on it, device time, host cores and memory alike (0: unmeasured)."""
        key = (target, self.compute_capacity, self.cpu_capacity)
        if self._unit_capacity is None or self._unit_capacity[0] != key:
            self._unit_capacity = (key, self._units_at(target))
        return self._unit_capacity[1]

    def _units_at(self, target: float) -> float:
        return _unit_rooms(self.profile, self.compute_capacity, self.cpu_capacity,
                           self.memory_capacity, self.memory, target)

    def _rooms_like(self, d: Demand, target: float) -> float:
        """How many more rooms that each add `d` fit (a fraction of the last one too)."""
        room = [(self.compute_capacity * target - self._compute) / d.compute if d.compute > 0
                else float("inf")]
        if self.cpu_capacity > 0 and d.cpu > 0:
            room.append((self.cpu_capacity * target - self.cpu_load) / d.cpu)
        if self.memory_capacity > 0 and d.memory > 0:
            room.append((self.memory_capacity * MEMORY_SHARE - self.memory_used) / d.memory)
        found = max(0.0, min(room))
        return found if found < float("inf") else 0.0  # nothing it uses is limited

    def utilisation(self) -> float:
        parts = [self._compute / self.compute_capacity if self.compute_capacity > 0 else 1.0]
        if self.cpu_capacity > 0:
            parts.append(self.cpu_load / self.cpu_capacity)
        if self.memory_capacity > 0:
            parts.append(self.memory_used / self.memory_capacity)
        return max(parts)

    @staticmethod
    def _shape(room: RoomReq) -> tuple[int, int, int, int, int, str, bool, str, str, bool]:
        q = room.quality
        w, h = room.frame_size
        return (q.width, q.height, q.fps, w, h, room.drive_mode.value, room.face, room.face_model,
                room.voice, room.voice_shared)

    def _costs(self, room: RoomReq) -> _RoomCosts | None:
        key = self._shape(room)
        if key in self._shapes:
            return self._shapes[key]
        q = room.quality
        w, h = room.frame_size
        p = self.profile
        side = q.render_side
        found: _RoomCosts | None = None
        if room.drive_mode is DriveMode.CAMERA and not self.driver_ingest:
            self._shapes[key] = None  # no ingest for the room's driver
            return None
        enc = p.stage_seconds(Stage.ENCODE, w, h)
        tts: float | None = 0.0
        voice: list[tuple[GroupKey, StageCost, float, float]] = []
        if room.drive_mode.uses_tts and room.voice:
            if room.voice not in self.voices and not room.voice_shared:
                self._shapes[key] = None  # it does not speak the avatar's voice
                return None
            neural = p.cost(Stage.TTS, model=room.voice)
            if neural is None and room.voice_shared:
                # Not loaded here yet: its dearest measured neural voice stands in.
                neural = max((c for c in ((x, 1.0) for x in p.costs if x.stage is Stage.TTS
                                          and x.model not in ("", HOST_TTS))),
                             key=lambda c: c[0].seconds, default=None)
            if neural is not None:  # on its device, batched with other rooms' sentences
                voice.append((voice_group(room.voice), neural[0], 1.0, SPEECH_SHARE))
        elif room.drive_mode.uses_tts:
            tts = p.stage_seconds(Stage.TTS)
        if room.face:
            if room.face_family and self.families and room.face_family not in self.families:
                self._shapes[key] = None  # this worker cannot render the avatar's family
                return None
            # The face model works at its own crop side whatever the frame's size, and is
            # planned for every frame (a script without pauses); silent frames that skip
            # it are device time saved, seen in the room's metered cost.
            face = p.cost(Stage.FACE, model=room.face_model)
            if face is not None and enc is not None and tts is not None:
                found = _RoomCosts(((_FACE, face[0], 1.0, q.fps), *voice), q.fps * enc + tts)
            self._shapes[key] = found
            return found
        render = p.cost(Stage.RENDER, side, side)
        a2m = p.cost(Stage.AUDIO_TO_MOTION) if room.drive_mode.uses_audio_to_motion else None
        needs_a2m = room.drive_mode.uses_audio_to_motion
        if render is not None and enc is not None and tts is not None and (a2m or not needs_a2m):
            groups = [(side, render[0], render[1], float(q.fps))]
            if a2m is not None:
                groups.append((_A2M, a2m[0], a2m[1], float(q.fps)))
            found = _RoomCosts((*groups, *voice), q.fps * enc + tts)
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
        if room.face_model_bytes and self.avatar_totals[room.avatar_id] == 0:
            memory += room.face_model_bytes  # the first room of the avatar loads its own model
        return costs, compute, host, memory

    def demand(self, room: RoomReq) -> Demand | None:
        """What adding `room` would add to this worker (its batch groups grow, so the
        compute is marginal); None if the worker never measured a stage it needs."""
        side = room.quality.render_side
        key = (self._shape(room), self.avatar_rooms[(room.avatar_id, side)] == 0,
               room.face_model_bytes if self.avatar_totals[room.avatar_id] == 0 else 0)
        try:
            return self._demands[key]
        except KeyError:
            d = self._demands[key] = self._demand(room)
            return d

    def _demand(self, room: RoomReq) -> Demand | None:
        parts = self._parts(room)
        if parts is None:
            return None
        costs, compute, cpu, memory = parts
        for key, cost, scale, items in costs.groups:
            n, rate = self.groups.get(key, (0, 0.0))
            compute += self._group_load(cost, scale, n + 1, rate + items) - \
                self.group_load.get(key, 0.0)
        return Demand(compute, cpu, memory)

    def fits(self, d: Demand, target: float) -> bool:
        if self._compute + d.compute > self.compute_capacity * target + 1e-12:
            return False
        if self.cpu_capacity > 0 and self.cpu_load + d.cpu > self.cpu_capacity * target + 1e-12:
            return False
        return not (self.memory_capacity > 0
                    and self.memory_used + d.memory > self.memory_capacity * MEMORY_SHARE)

    def add(self, room: RoomReq) -> Demand:
        parts = self._parts(room)
        if parts is None:
            raise ValueError(f"worker {self.worker_id} cannot serve {room.quality}")
        d = self.demand(room)
        assert d is not None
        costs, compute, cpu, memory = parts
        for key, cost, scale, items in costs.groups:
            n, rate = self.groups.get(key, (0, 0.0))
            self._set_group(key, cost, scale, n + 1, rate + items)
        self.other_compute += compute
        self.cpu_load += cpu
        self.memory_used += memory
        self._compute = sum(self.group_load.values()) + self.other_compute
        self.avatar_rooms[(room.avatar_id, room.quality.render_side)] += 1
        self.avatar_totals[room.avatar_id] += 1
        if room.tier is Tier.PREMIUM:
            self.premium[room.tenant] += 1
        self.rooms[room.session_id] = room
        self.changes += 1
        self._demands.clear()
        return d

    def remove(self, session_id: str) -> RoomReq | None:
        room = self.rooms.pop(session_id, None)
        if room is None:
            return None
        self.changes += 1
        self._demands.clear()
        side = room.quality.render_side
        self.avatar_rooms[(room.avatar_id, side)] -= 1
        if self.avatar_rooms[(room.avatar_id, side)] <= 0:
            del self.avatar_rooms[(room.avatar_id, side)]
        self.avatar_totals[room.avatar_id] -= 1
        if self.avatar_totals[room.avatar_id] <= 0:
            del self.avatar_totals[room.avatar_id]
        parts = self._parts(room)
        assert parts is not None
        costs, compute, cpu, memory = parts
        for key, cost, scale, items in costs.groups:
            n, rate = self.groups[key]
            self._set_group(key, cost, scale, n - 1, rate - items)
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
                        self.accepting, self.price, families=self.families,
                        driver_ingest=self.driver_ingest, voices=self.voices)
        for room in self.rooms.values():
            c.add(room)
        return c


@functools.lru_cache(maxsize=256)
def _unit_rooms(profile: WorkerProfile, compute_capacity: float, cpu_capacity: float,
                memory_capacity: float, memory: MemoryProfile, target: float) -> float:
    """Unit rooms of one avatar placement fits on an empty worker of this profile and
    these capacities (a fleet's workers mostly share a few of them: worked out once)."""
    # Filled by the same model placement uses, not from the profile's per-room load:
    # that one counts a text room's host-side speech as device time, and read a
    # simulated H200 that fits 28 unit rooms as one that fits 20 (the autoscaler kept
    # 117 workers at the evening peak where 102 did the same work).
    trial = WorkerState("unit", profile, compute_capacity, cpu_capacity, memory_capacity, memory)
    last: Demand | None = None
    n = 0
    while n < _UNIT_FILL_LIMIT:
        room = RoomReq(f"unit-{n}", "", "unit", UNIT_QUALITY, UNIT_MODE, Tier.STANDARD)
        d = trial.demand(room)
        if d is None:
            return 0.0
        if d == last:
            # Past the profile's largest batch each room adds the same: the rest of the
            # worker holds as many more as its scarcest resource allows.
            return n + trial._rooms_like(d, target)
        if not trial.fits(d, target):
            return n + min(1.0, trial._rooms_like(d, target))
        trial.add(room)
        last = d
        n += 1
    return float(n)
