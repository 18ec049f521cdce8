"""Placement: which worker renders which room. Pure policy, no I/O.

Capacity is not a slot count: each worker reports measured latency profiles
(seconds per call for each stage at the sizes and batch sizes it measured;
workers batch frames across rooms), reduced here to seconds per item at the
worker's best batch size whose call fits half its latency budget (a frame may
wait out one call before its own). A room's load on that worker is the device
time its frames need per second of stream:

    load = fps * (render(side) + encode(w, h) + audio_to_motion [unless mocap])
           + tts_seconds_per_audio_second [text rooms]

A worker accepts rooms while the sum of their loads stays within its capacity
times the utilisation target. Rooms are placed premium first, then in arrival
order, each on the worker left least utilised (spreading keeps headroom for
real-time jitter; batch-aware packing is a later refinement).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from avatarfarm.domain import DriveMode, Quality, Stage, Tier


def item_seconds(points: Sequence[tuple[int, float]], latency_budget: float = 0.0) -> float:
    """Seconds per item at the best-throughput batch size whose call fits within half the
    latency budget (any size when the budget is 0 or unknown); batch 1 when none fits."""
    bound = latency_budget / 2 if latency_budget > 0 else float("inf")
    fitting = [(b, s) for b, s in points if s <= bound and b > 0]
    if not fitting:
        fitting = [min(points)]
    return min(s / b for b, s in fitting)


@dataclass(frozen=True, slots=True)
class StageCost:
    """Measured seconds per item of one stage at one size (see item_seconds).

    For RENDER the size is the square portrait side (width == height); for
    ENCODE the frame size; for AUDIO_TO_MOTION and TTS it is 0x0. TTS seconds
    are per second of speech.
    """

    stage: Stage
    width: int
    height: int
    seconds: float


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    costs: tuple[StageCost, ...]

    def stage_seconds(self, stage: Stage, width: int = 0, height: int = 0) -> float | None:
        """Seconds per call at (width, height), scaled by pixel count from the nearest
        measured size; None if the stage was never measured."""
        measured = [c for c in self.costs if c.stage is stage]
        if not measured:
            return None
        if stage in (Stage.TTS, Stage.AUDIO_TO_MOTION):
            return min(c.seconds for c in measured)
        pixels = width * height
        nearest = min(measured, key=lambda c: abs(c.width * c.height - pixels))
        return nearest.seconds * pixels / max(nearest.width * nearest.height, 1)

    def merged(self, update: WorkerProfile) -> WorkerProfile:
        """This profile with the costs in `update` replacing those of the same stage and size."""
        fresh = {(c.stage, c.width, c.height) for c in update.costs}
        kept = tuple(c for c in self.costs if (c.stage, c.width, c.height) not in fresh)
        return WorkerProfile(kept + update.costs)

    def room_load(self, quality: Quality, mode: DriveMode) -> float | None:
        """Device-seconds per second of stream; None if a needed stage is unmeasured."""
        side = quality.render_side
        parts = [self.stage_seconds(Stage.RENDER, side, side),
                 self.stage_seconds(Stage.ENCODE, quality.width, quality.height)]
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


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    profile: WorkerProfile
    capacity: float = 1.0  # device-seconds per second
    load: float = 0.0  # sum of the loads of rooms already on it
    accepting: bool = True


@dataclass(frozen=True, slots=True)
class PendingRoom:
    session_id: str
    quality: Quality
    drive_mode: DriveMode
    tier: Tier
    seq: int  # arrival order


@dataclass(frozen=True, slots=True)
class Placement:
    session_id: str
    worker_id: str
    load: float


@dataclass(frozen=True, slots=True)
class PlacementResult:
    placements: tuple[Placement, ...]
    waiting: Mapping[str, str]  # session_id -> why it is still pending


def place(pending: Sequence[PendingRoom], workers: Sequence[WorkerView],
          utilisation_target: float = 0.9) -> PlacementResult:
    loads = {w.worker_id: w.load for w in workers}
    open_workers = [w for w in workers if w.accepting]
    placements: list[Placement] = []
    waiting: dict[str, str] = {}
    for room in sorted(pending, key=lambda r: (r.tier.priority, r.seq)):
        best: tuple[float, WorkerView, float] | None = None
        smallest_need: float | None = None
        for w in open_workers:
            need = w.profile.room_load(room.quality, room.drive_mode)
            if need is None:
                continue
            limit = w.capacity * utilisation_target
            smallest_need = need if smallest_need is None else min(smallest_need, need)
            after = loads[w.worker_id] + need
            if after <= limit + 1e-12:
                score = after / w.capacity
                if best is None or score < best[0]:
                    best = (score, w, need)
        if best is not None:
            _, w, need = best
            loads[w.worker_id] += need
            placements.append(Placement(room.session_id, w.worker_id, need))
        else:
            waiting[room.session_id] = _why(room, open_workers, loads, smallest_need,
                                            utilisation_target)
    return PlacementResult(tuple(placements), waiting)


def _why(room: PendingRoom, workers: Sequence[WorkerView], loads: Mapping[str, float],
         need: float | None, target: float) -> str:
    if not workers:
        return "no worker is connected and accepting rooms"
    if need is None:
        return (f"no connected worker has measured what {room.quality} "
                f"{room.drive_mode.value}-driven rooms need")
    free = max(w.capacity * target - loads[w.worker_id] for w in workers)
    return (f"needs {need:.2f} of a worker's device time for {room.quality}; "
            f"the most free of {len(workers)} worker(s) has {max(free, 0.0):.2f}")
