"""Frames of a Wav2Lip-family avatar: the prepared bundle's base frames played forward
and backward (no jump where the clip would restart), the mouth redrawn by the lip-sync
model where the audio speaks. A frame whose mel window is silent shows its base frame
as it is, without the model: device time saved on every pause. The frames that do
need the model go to it as one batch, so rooms (and frames of one room) share calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avatarfarm.preparation.bundle import Bundle
from workers.device.binding import LipSyncRunner
from workers.media.face_paste import face_pixels, paste
from workers.media.wav2lip_audio import is_silent


def loop_index(i: int, n: int) -> int:
    """Base frame shown at output frame i of an n-frame clip played forward and back:
    0, 1, ..., n-1, n-2, ..., 1, 0, 1, ..."""
    if n <= 1:
        return 0
    period = 2 * n - 2
    k = i % period
    return k if k < n else period - k


@dataclass(frozen=True, slots=True)
class RenderStats:
    frames: int
    model_frames: int  # frames the model redrew (the rest were silent: base frames)


class Wav2LipFrames:
    """Output frames for one avatar bundle and one lip-sync model of crop side `side`."""

    def __init__(self, bundle: Bundle, runner: LipSyncRunner) -> None:
        side = runner.binding.side
        self.crops = np.ascontiguousarray(bundle.crops(side))
        self.boxes = bundle.boxes
        self.base = [np.ascontiguousarray(f[:, :, ::-1]) for f in bundle.frames()]  # BGR
        self.runner = runner

    def render(self, start: int, windows: np.ndarray) -> tuple[list[np.ndarray], RenderStats]:
        """Frames start .. start + len(windows) - 1 (RGB uint8, the clip's size) for the
        mel windows [n, 1, 80, 16] of those frames."""
        n = len(self.base)
        idx = [loop_index(start + k, n) for k in range(len(windows))]
        speaking = [k for k, quiet in enumerate(is_silent(windows)[:, 0]) if not quiet]
        out = [self.base[i] for i in idx]
        if speaking:
            faces = self.runner.run(np.ascontiguousarray(windows[speaking]),
                                    self.crops[[idx[k] for k in speaking]])
            pixels = face_pixels(faces)
            for j, k in enumerate(speaking):
                out[k] = paste(self.base[idx[k]], self.boxes[idx[k]], pixels[j])
        return [np.ascontiguousarray(f[:, :, ::-1]) for f in out], RenderStats(len(out), len(speaking))
