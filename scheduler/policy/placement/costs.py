"""What a worker measured, as placement reads it: per-stage costs from its latency
profiles (per item when n rooms share batches), its memory profile, and compute
units (what one 512x512@25 text-driven room costs on the same device)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from avatarfarm.domain import HOST_TTS, DriveMode, Quality, Stage
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

    For RENDER the size is the square portrait side (width == height); for FACE the
    face model's crop side (its cost does not depend on the frame's size), and
    ``model`` the face model (`avatarfarm.avatars.face_model`: a family's shared models,
    or one avatar's own) whose cost it is; for ENCODE
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
    model: str = ""

    @classmethod
    def measured(cls, stage: Stage, width: int, height: int,
                 points: Sequence[tuple[int, float]], latency_budget: float = 0.0,
                 model: str = "") -> StageCost:
        table = per_item_table(points, latency_budget)
        return cls(stage, width, height, min(table), table, model)

    def serves(self, face_model: str) -> bool:
        """A FACE cost measured for ``face_model``: that exact model, or one of that
        family's shared models (``"wav2lip"`` matches ``"wav2lip/<export name>"``)."""
        return self.model == face_model or self.model.startswith(face_model + "/")

    def per_item(self, n: int) -> float:
        """Seconds per item when n rooms' items share this stage's batches."""
        if not self.batch:
            return self.seconds
        return self.batch[min(max(n, 1), len(self.batch)) - 1]


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    costs: tuple[StageCost, ...]
    _lookup: dict[tuple[Stage, int, int, str], tuple[StageCost, float] | None] = field(
        default_factory=dict, compare=False, repr=False)

    def cost(self, stage: Stage, width: int = 0, height: int = 0,
             model: str = "") -> tuple[StageCost, float] | None:
        """The measured cost nearest (width, height) and the pixel ratio to scale it by;
        None if the stage was never measured. For TTS, ``model`` is a neural voice (""
        espeak-ng, on the host). For FACE, ``model`` picks the costs of that
        face model (`StageCost.serves`); where the worker has not measured it (an avatar
        whose own model it has not loaded yet), its face costs stand in, the dearest: an
        estimate until it loads and reports the model."""
        key = (stage, width, height, model)
        if key in self._lookup:
            return self._lookup[key]
        measured = [c for c in self.costs if c.stage is stage]
        if stage is Stage.TTS:
            # A neural voice's (``model`` the voice, device seconds), else espeak-ng's
            # (host seconds): never one for the other. A worker that names its host TTS
            # otherwise (one that predates neural voices) has it as its only TTS cost.
            named = [c for c in measured if c.model == model or (not model and c.model == HOST_TTS)]
            measured = named if named or model else measured
        if stage is Stage.FACE and model:
            own = [c for c in measured if c.serves(model)]
            if not own and measured:
                estimate = (max(measured, key=lambda c: c.seconds), 1.0)
                self._lookup[key] = estimate
                return estimate
            measured = own
        found: tuple[StageCost, float] | None = None
        if measured:
            if stage in (Stage.TTS, Stage.AUDIO_TO_MOTION, Stage.ALIGNMENT, Stage.FACE):
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
        fresh = {(c.stage, c.width, c.height, c.model) for c in update.costs}
        kept = tuple(c for c in self.costs if (c.stage, c.width, c.height, c.model) not in fresh)
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

    def units(self, quality: Quality, mode: DriveMode, encode: bool = True) -> float | None:
        """Compute units of a room: its load relative to the unit room on this device
        (``encode=False``: device time only, for a device whose host CPU encodes, as a
        worker's capacity in units is then counted)."""
        load, unit = self.room_load(quality, mode, encode), self.room_load(UNIT_QUALITY, UNIT_MODE, encode)
        if load is None or not unit:
            return None
        return load / unit


def nominal_units(quality: Quality, mode: DriveMode) -> float:
    """Units before any worker has measured anything: by pixels and frame rate."""
    base = quality.render_side ** 2 * quality.fps / (UNIT_QUALITY.render_side ** 2 * UNIT_QUALITY.fps)
    return base * (0.95 if mode.motion_driven else 1.0)


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    models_bytes: float = 0.0
    avatar_bytes_per_pixel: float = 0.0
    room_bytes_per_pixel: float = 0.0
