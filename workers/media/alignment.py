"""Alignment: keeping a room's lips and voice together over hours.

Per emitted frame a room records the audio that goes out with it (as one mean
log-mel column) and the mouth region of the rendered frame. Every check
interval the last window of both is scored by the lip-sync model, batched
across rooms on the device like the other models; `estimate` turns its scores
into an offset with a confidence, and a confident offset of a frame or more is
corrected by `AvDelay`, which holds back the outgoing audio or video by whole
frames without changing the stream's timing. Only the state here is per room; the
model call is the room's.
"""

from __future__ import annotations

import collections
import typing
from dataclasses import dataclass

import numpy as np

from workers.media.audio import LOG_FLOOR, N_MELS, log_mel
from workers.models.template import TEMPLATE, FaceTemplate


@dataclass(frozen=True, slots=True)
class SyncEstimate:
    offset_frames: int  # > 0: the video lags the audio by this many frames
    peak: float  # correlation at the offset
    confidence: float  # peak minus the median score over all lags


def estimate(scores: np.ndarray, *, min_peak: float = 0.3,
             min_confidence: float = 0.15) -> SyncEstimate | None:
    """Offset from the lip-sync scores over lags -L..L; None when the window is not
    conclusive (silence, a still face, or no clear peak)."""
    lags = scores.shape[-1]
    i = int(np.argmax(scores))
    peak = float(scores[i])
    confidence = peak - float(np.median(scores))
    if peak < min_peak or confidence < min_confidence:
        return None
    return SyncEstimate(i - lags // 2, peak, confidence)


class DriftPolicy:
    """When a measured offset is worth correcting. An offset of two frames or more
    (80 ms at 25 fps, past what viewers notice when video lags) is corrected at
    once; a one-frame offset only when two checks in a row agree, so a check's
    one-frame jitter does not make the correction flap."""

    def __init__(self) -> None:
        self._previous = 0

    def correction(self, est: SyncEstimate | None) -> int:
        """Frames to correct by (0: none) after a check."""
        if est is None:
            return 0
        o = est.offset_frames
        if abs(o) >= 2 or (o != 0 and o == self._previous):
            self._previous = 0
            return o
        self._previous = o
        return 0


def audio_feature(samples: np.ndarray) -> np.ndarray:
    """One frame's audio as the lip-sync model reads it: its mean log-mel column."""
    mel = log_mel(samples)
    if mel.shape[1] == 0:
        return np.full(N_MELS, LOG_FLOOR, np.float32)
    return mel.mean(axis=1)


class MouthCrop:
    """Cuts the mouth region out of rendered portraits, at a fixed crop size for any side."""

    def __init__(self, height: int, width: int, template: FaceTemplate = TEMPLATE) -> None:
        self.height, self.width = height, width
        cu, cv = template.mouth_center
        hw = template.mouth_half_width * 1.6
        self._u = np.linspace(cu - hw, cu + hw, width)
        self._v = np.linspace(cv - hw * 0.7, cv + hw * 0.9, height)
        self._index: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """[3, S, S] -> [3, height, width]."""
        side = frame.shape[-1]
        if side not in self._index:
            rows = np.clip((self._v * side).astype(np.int64), 0, side - 1)
            cols = np.clip((self._u * side).astype(np.int64), 0, side - 1)
            self._index[side] = (rows[:, None], cols[None, :])
        rows, cols = self._index[side]
        return np.ascontiguousarray(frame[:, rows, cols])


class SyncMonitor:
    """A room's rolling window of (audio, frame) and its check schedule.

    Pushing a frame only keeps references (the emitted audio chunk and the frame as
    rendered, neither written to afterwards); the audio features and mouth crops are
    computed for the one window a check takes, not for every frame of the stream."""

    def __init__(self, window: int, crop: MouthCrop, every_frames: int) -> None:
        self.window = window
        self.crop = crop
        self.every_frames = max(every_frames, window)
        self._audio: collections.deque[np.ndarray] = collections.deque(maxlen=window)
        self._frames: collections.deque[np.ndarray] = collections.deque(maxlen=window)
        self._since = 0

    def push(self, audio: np.ndarray, frame: np.ndarray) -> None:
        self._audio.append(audio)
        self._frames.append(frame)
        self._since += 1

    def due(self) -> bool:
        return len(self._audio) == self.window and self._since >= self.every_frames

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """The window to check ([T, 80], [T, 3, H, W]); the schedule restarts."""
        self._since = 0
        return (np.stack([audio_feature(a) for a in self._audio]),
                np.stack([self.crop(f) for f in self._frames]))

    def restart(self) -> None:
        """Forget the window (after a correction, old frames no longer describe the stream)."""
        self._audio.clear()
        self._frames.clear()
        self._since = 0


F = typing.TypeVar("F")  # a frame as the room carries it


class AvDelay:
    """Holds back a room's outgoing audio or video by whole frames to bring them together.

    `correct(+d)` (the video lags by d frames) delays the audio by d more frames, or
    first undoes a video delay; `correct(-d)` does the opposite. Every `process`
    call takes one frame and its audio and returns one frame and one chunk of
    audio, so the stream's timing never changes: a delay that grows emits silence
    or repeats the last frame once, one that shrinks skips what it held.
    """

    def __init__(self) -> None:
        self.audio_frames = 0
        self.video_frames = 0
        self._audio: collections.deque[np.ndarray] = collections.deque()
        self._video: collections.deque[typing.Any] = collections.deque()
        self._last_video: typing.Any = None

    @property
    def net_frames(self) -> int:
        """Audio delay minus video delay: the correction in force."""
        return self.audio_frames - self.video_frames

    def correct(self, offset_frames: int) -> None:
        net = self.net_frames + offset_frames
        self.audio_frames, self.video_frames = max(net, 0), max(-net, 0)

    def process(self, frame: F, audio: np.ndarray) -> tuple[F, np.ndarray]:
        self._audio.append(audio)
        self._video.append(frame)
        while len(self._audio) > self.audio_frames + 1:
            self._audio.popleft()
        while len(self._video) > self.video_frames + 1:
            self._video.popleft()
        out_audio = (self._audio.popleft() if len(self._audio) > self.audio_frames
                     else np.zeros_like(audio))
        if len(self._video) > self.video_frames:
            self._last_video = self._video.popleft()
        out_video = self._last_video if self._last_video is not None else frame
        return out_video, out_audio
