"""The Wav2Lip family's adapter: mel windows computed on the host, one per frame.

Wav2Lip's input is a normalised log-mel window (`workers.media.wav2lip_audio`); a
window with no speech in it shows the base frame (no model call).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.device.binding import WAV2LIP_AUDIO, FaceLayout
from workers.device.engine import BatchKey
from workers.families.base import FaceFamily, FrameAudio, Redraw
from workers.media.wav2lip_audio import Wav2LipAudioStream, is_silent


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
