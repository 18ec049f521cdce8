"""Frames of a Wav2Lip-family avatar: the prepared bundle's base frames played forward
and backward (no jump where the clip would restart), the mouth redrawn by the lip-sync
model where the audio speaks. A frame whose mel window is silent shows its base frame
as it is, without the model: device time saved on every pause.

`FaceAvatar` is a bundle loaded for one crop side: what a room takes its model inputs
from (`item`) and composes its output frames with (`compose`, on the encoder thread).
A room's frame travels as a `FaceFrame`: the base frame's index and the model's face,
or no face where the base frame is shown as it is. `Wav2LipFrames` renders a stretch
offline in one batch (tests, benchmarks).
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
class FaceFrame:
    """One output frame of a Wav2Lip room, before composition."""

    index: int  # base frame
    face: np.ndarray | None = None  # model output [3, S, S] BGR in 0..1; None: the base frame


class FaceAvatar:
    """A prepared bundle at one crop side: base frames (RGB, memory-mapped from the
    bundle), crops (BGR, as the model takes them, in memory) and the boxes to paste
    back into."""

    def __init__(self, bundle: Bundle, side: int) -> None:
        self.bundle_id = bundle.manifest.bundle_id
        self.side = side
        self.crops = np.ascontiguousarray(bundle.crops(side))
        self.boxes = bundle.boxes
        self.frames = bundle.frames()
        self.masks = bundle.masks()  # per-frame jaw masks (mapped), or None: the fixed shape
        self.width, self.height = bundle.manifest.width, bundle.manifest.height

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (the crops); the frames are mapped from the bundle."""
        return int(self.crops.nbytes)

    def index(self, n: int) -> int:
        """The base frame of output frame n."""
        return loop_index(n, len(self.frames))

    def compose(self, f: FaceFrame) -> np.ndarray:
        """The output frame, RGB uint8 at the clip's size: the base frame, with the face
        pasted back where the model redrew it. A new array where a face is pasted; the
        base frame itself (never to be written to) where none is."""
        base = np.asarray(self.frames[f.index])
        if f.face is None:
            return base
        rgb = face_pixels(f.face[None])[0][:, :, ::-1]
        mask = self.masks[f.index] if self.masks is not None else None
        return paste(base, self.boxes[f.index], np.ascontiguousarray(rgb), mask)

    def mouth_view(self, f: FaceFrame) -> np.ndarray:
        """The face crop as the lip-sync check reads it: [3, S, S] RGB in 0..1."""
        if f.face is not None:
            return np.ascontiguousarray(f.face[::-1])
        return np.ascontiguousarray(self.crops[f.index][:, :, ::-1].transpose(2, 0, 1),
                                    dtype=np.float32) * np.float32(1 / 255)


@dataclass(frozen=True, slots=True)
class RenderStats:
    frames: int
    model_frames: int  # frames the model redrew (the rest were silent: base frames)


class Wav2LipFrames:
    """Offline: output frames for one avatar bundle and one lip-sync model of crop side
    `side`, a stretch at a time, every speaking frame of it in one model call."""

    def __init__(self, bundle: Bundle, runner: LipSyncRunner) -> None:
        self.avatar = FaceAvatar(bundle, runner.binding.side)
        self.runner = runner

    def render(self, start: int, windows: np.ndarray) -> tuple[list[np.ndarray], RenderStats]:
        """Frames start .. start + len(windows) - 1 (RGB uint8, the clip's size) for the
        mel windows [n, 1, 80, 16] of those frames."""
        a = self.avatar
        frames = [FaceFrame(a.index(start + k)) for k in range(len(windows))]
        speaking = [k for k, quiet in enumerate(is_silent(windows)[:, 0]) if not quiet]
        if speaking:
            faces = self.runner.run(np.ascontiguousarray(windows[speaking]),
                                    a.crops[[frames[k].index for k in speaking]])
            for j, k in enumerate(speaking):
                frames[k] = FaceFrame(frames[k].index, faces[j])
        return [a.compose(f) for f in frames], RenderStats(len(frames), len(speaking))
