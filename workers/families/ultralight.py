"""The Ultralight / Duix family's adapter: learnt audio features on the device, a
per-person UNet.

Audio: the worker's feature model (`workers.families.features`), HuBERT or wenet, runs
on the device, batched across rooms, on chunks of the room's audio as it arrives. A
chunk with no sound in it is not run: it takes the rows the model gives silence,
computed once at load. Video frame ``i`` at ``fps`` takes the window of rows centred on
its own audio, rows before the stream's start read as silence, at any frame rate:
- HuBERT: chunks of two rows (720 samples every 640: 40 ms), two rows a frame at the
  family's 25 fps, so a window of 8 frames is ``[16, 32, 32]`` and of 16 frames
  ``[32, 32, 32]``; a frame waits for half its window of audio (160 ms for 8 frames),
  as Wav2Lip waits for its 200 ms;
- wenet: one encoder step a frame at the family's 20 fps (`workers.families.wenet`),
  8 frames ``[128, 16, 32]``; a frame waits for half its window and the step's 365 ms
  of look-ahead.
The UNet's audio input must hold whole frames of the worker's kind of rows
(`FeatureKind`): a UNet trained on the other kind is refused when it loads.

Faces: ``input`` [B, 6, 160, 160] is the real crop then the masked one (the rectangle
(5, 5, 150, 145) blacked out), BGR / 255: `LAYOUT`. Each avatar has its own UNet,
carried in its bundle (`avatarfarm.preparation.bundle`); the feature model is the
worker's, in its model folder.
"""

from __future__ import annotations

import functools
import logging
import threading
import typing
from collections.abc import Callable

from avatarfarm.avatars import face_family, face_model
from workers.device.binding import (
    AudioRole,
    ChannelOrder,
    ColourOrder,
    FaceLayout,
    InputScale,
    LipSyncDeviceModel,
)
from workers.device.engine import BatchKey
from workers.device.timing import measure_curve, run_batch_of
from workers.families.base import FaceFamily, Points, Redraw, Served, WorkerContext
from workers.families.features import AudioFeatures, FeatureKind
from workers.families.rows import RowStream, Submit

if typing.TYPE_CHECKING:
    from avatarfarm.preparation.bundle import Bundle, Manifest
    from workers.models.folder import ModelFolder

log = logging.getLogger(__name__)

LAYOUT = FaceLayout(ChannelOrder.UNMASKED_FIRST, ColourOrder.BGR, InputScale.UNIT, mask=(5, 5, 150, 145))



def audio_role(*kinds: FeatureKind) -> AudioRole:
    """The UNet's audio input: a window of whole video frames of rows of one of ``kinds``."""
    said = " or ".join(f"{k.name} rows ({k.frame_rows} rows of H x W = {k.row} a frame, e.g. "
                       f"{k.example()} for 8 frames)" for k in kinds)
    return AudioRole(f"audio float32 [B, C, H, W] holding whole video frames of {said}",
                     lambda shape: any(k.frames(shape) > 0 for k in kinds))


def features_of(audio_shape: tuple[int, ...], *kinds: FeatureKind) -> FeatureKind:
    """The kind of rows a bound UNet's audio input holds (the first of ``kinds`` that fits)."""
    return next(k for k in kinds if k.frames(audio_shape) > 0)


def family(key: BatchKey, audio_shape: tuple[int, ...], features: AudioFeatures,
           submit: Submit, redraw: Redraw) -> FaceFamily:
    """The family of one avatar's UNet (its key), fed by the worker's feature model."""
    role = audio_role(features.kind)
    rows = features.grid(audio_shape)

    def speech(fps: int, priority: int, on_seconds: Callable[[float], None]) -> RowStream:
        return RowStream(fps, rows, features.silence, submit, priority, on_seconds)

    return FaceFamily("ultralight", key, LAYOUT, role, speech, redraw)


class Runtime:
    """Ultralight on one worker: each avatar's own UNet, loaded from its bundle when its
    first room starts, bound, timed and served under its own key."""

    name = "ultralight"

    def __init__(self, ctx: WorkerContext) -> None:
        self._ctx = ctx
        self.models: dict[BatchKey, LipSyncDeviceModel] = {}
        self._lock = threading.Lock()  # avatars load on the pipeline's loading thread

    def served(self) -> list[Served]:
        with self._lock:
            return [Served(k, m) for k, m in self.models.items()]

    def refusal(self, avatar_id: str, manifest: Manifest) -> str | None:
        features = self._ctx.features
        if features is None:
            return (f"avatar {avatar_id!r} is an Ultralight avatar and this worker's model "
                    "folder has no audio feature model (hubert.onnx or wenet.onnx) to feed it")
        reads = manifest.features or "hubert"
        if reads != features.kind.name:
            return (f"avatar {avatar_id!r} has an Ultralight model that reads {reads} features and "
                    f"this worker's feature model gives {features.kind.name} rows: place it on "
                    f"workers whose folder has a {reads} model")
        return None

    def family(self, bundle: Bundle) -> FaceFamily:
        features = self._ctx.features
        assert features is not None
        bid = bundle.manifest.bundle_id
        path = bundle.model_path
        if path is None:
            raise ValueError(f"bundle {bid[:12]} is an Ultralight avatar without its model.onnx")
        name = face_model(self.name, bid)
        with self._lock:
            found = [(k, m) for k, m in self.models.items() if k.model == name]
        if found:
            key, model = found[0]
        else:
            model = LipSyncDeviceModel(self._ctx.load(name, path), LAYOUT, audio_role(features.kind))
            key = BatchKey(name, model.side)
            self._ctx.engine.serve(key, model, measure_curve(
                functools.partial(run_batch_of, model, model.example_item()), (1, 4), 1))
            with self._lock:
                self.models[key] = model
            log.info("avatar model %s loaded: crop side %d, audio %s", name, model.side,
                     list(model.runner.binding.audio_shape))
        return family(key, model.runner.binding.audio_shape, features, self._ctx.submit_features,
                      self._ctx.redraw_crop(key))

    def renders(self) -> list[str]:
        features = self._ctx.features
        return [face_family(self.name, features.kind.name)] if features is not None else []

    def release(self, key: BatchKey) -> bool:
        """Unloads an avatar's UNet (its session and device memory) when its last room on
        this worker has ended: the scheduler counts its memory from the avatar's first
        room to its last, and a later room loads it again."""
        with self._lock:
            if self.models.pop(key, None) is None:
                return False
        self._ctx.engine.unserve(key)
        log.info("avatar model %s unloaded: no room of its avatar is left on this worker", key.model)
        return True

    def face_keys(self) -> list[BatchKey]:
        with self._lock:
            return sorted(self.models)

    def face_profile(self, key: BatchKey) -> tuple[str, Points] | None:
        with self._lock:
            if key not in self.models:
                return None
        return key.model, self._ctx.engine.curve(key).points


def load(folder: ModelFolder, ctx: WorkerContext) -> Runtime:
    """Ultralight needs no folder models of its own (each avatar brings its UNet); its
    avatars are refused where the folder has no feature model."""
    return Runtime(ctx)
