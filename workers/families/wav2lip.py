"""The Wav2Lip family's adapter: mel windows computed on the host, one per frame.

Wav2Lip's input is a normalised log-mel window (`workers.media.wav2lip_audio`); a
window with no speech in it shows the base frame (no model call).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import numpy as np

from workers.device.binding import WAV2LIP_AUDIO, FaceLayout, LipSyncDeviceModel
from workers.device.engine import BatchKey
from workers.families.base import FaceFamily, FrameAudio, Points, Redraw, Served, WorkerContext
from workers.media.wav2lip_audio import Wav2LipAudioStream, is_silent

if typing.TYPE_CHECKING:
    from avatarfarm.preparation.bundle import Bundle, Manifest
    from workers.models.folder import ModelFolder


@dataclass(frozen=True, slots=True)
class MelWindow:
    window: np.ndarray  # [1, 80, 16]
    silent: bool

    async def value(self) -> np.ndarray:
        return self.window


class Wav2LipSpeech:
    def __init__(self, fps: int) -> None:
        self._stream = Wav2LipAudioStream(fps)

    @property
    def frames_emitted(self) -> int:
        return self._stream.frames_emitted

    def push(self, samples: np.ndarray, deadline: float) -> list[FrameAudio]:
        return _frames(self._stream.push(samples))

    def finish(self, n_frames: int) -> list[FrameAudio]:
        return _frames(self._stream.finish(n_frames))


def _frames(windows: np.ndarray) -> list[FrameAudio]:
    if not len(windows):
        return []
    return [MelWindow(w, bool(q)) for w, q in zip(windows, is_silent(windows)[:, 0], strict=True)]


def family(key: BatchKey, layout: FaceLayout, redraw: Redraw) -> FaceFamily:
    return FaceFamily("wav2lip", key, layout, WAV2LIP_AUDIO,
                      lambda fps, priority, on_seconds: Wav2LipSpeech(fps), redraw)


class Runtime:
    """The model folder's Wav2Lip-family model, shared by every Wav2Lip avatar."""

    name = "wav2lip"

    def __init__(self, model: LipSyncDeviceModel, layout: FaceLayout, ctx: WorkerContext) -> None:
        self.model = model
        self.key = BatchKey(model.name, model.side)
        self._engine = ctx.engine
        self._family = family(self.key, layout, ctx.redraw_crop(self.key))

    def served(self) -> list[Served]:
        return [Served(self.key, self.model)]

    def refusal(self, avatar_id: str, manifest: Manifest) -> str | None:
        return None

    def family(self, bundle: Bundle) -> FaceFamily:
        return self._family

    def renders(self) -> list[str]:
        return ["wav2lip"]

    def release(self, key: BatchKey) -> bool:
        return False  # the folder's models serve every avatar of the family

    def face_keys(self) -> list[BatchKey]:
        return [self.key]

    def face_profile(self, key: BatchKey) -> tuple[str, Points] | None:
        if key != self.key:
            return None
        return f"wav2lip/{self.model.name}", self._engine.curve(key).points


def load(folder: ModelFolder, ctx: WorkerContext) -> Runtime | None:
    """The folder's Wav2Lip-family model (its ``"wav2lip"`` entry), bound by shape."""
    if folder.wav2lip is None:
        return None
    model = LipSyncDeviceModel(ctx.load(folder.wav2lip.name, folder.wav2lip.path), folder.wav2lip.layout)
    return Runtime(model, folder.wav2lip.layout, ctx)
