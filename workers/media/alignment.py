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
    """When a measured offset is worth correcting: only what is real, since every
    correction is a change the viewer may notice.

    * three frames or more (120 ms at 25 fps: plainly visible, never a check's jitter):
      at once;
    * two frames: when two checks in a row say so;
    * one frame: when the mean of the last `window` conclusive checks (two minutes at
      the default interval) is at least `one_frame` frames off, and the newest agrees.
      A steady offset under a frame (a pipeline whose lips lead or lag by ~20 ms) reads
      -1, 0 and +1 in turn around a mean near its true value: inside the dead band, it
      is left alone, as no whole-frame correction could represent it; a real drift (an
      audio clock a little fast) moves the mean past the band and is corrected once per
      frame it accumulates.

    After a correction the history starts again: the checks before it describe another
    stream."""

    def __init__(self, window: int = 12, one_frame: float = 0.9) -> None:
        self.window = window
        self.one_frame = one_frame
        self._recent: collections.deque[int] = collections.deque(maxlen=window)

    def correction(self, est: SyncEstimate | None) -> int:
        """Frames to correct by (0: none) after a check."""
        if est is None:
            return 0
        o = est.offset_frames
        self._recent.append(o)
        r = self._recent
        fire = 0
        if abs(o) >= 3:
            fire = o
        elif abs(o) == 2 and len(r) >= 2 and r[-2] == o:
            fire = o
        elif len(r) == self.window:
            mean = sum(r) / len(r)
            if abs(mean) >= self.one_frame and o * mean > 0:
                fire = 1 if mean > 0 else -1
        if fire:
            r.clear()
        return fire


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
    the room carries it, neither written to afterwards); the audio features and mouth
    crops are computed for the one window a check takes, not for every frame of the
    stream. `view` turns a carried frame into the [3, S, S] image the crop reads (a
    video avatar's frame is its base index and redrawn face)."""

    def __init__(self, window: int, crop: MouthCrop, every_frames: int,
                 view: typing.Callable[[typing.Any], np.ndarray] = lambda frame: frame) -> None:
        self.window = window
        self.crop = crop
        self.view = view
        self.every_frames = max(every_frames, window)
        self._audio: collections.deque[np.ndarray] = collections.deque(maxlen=window)
        self._frames: collections.deque[typing.Any] = collections.deque(maxlen=window)
        self._since = 0

    def push(self, audio: np.ndarray, frame: typing.Any) -> None:
        self._audio.append(audio)
        self._frames.append(frame)
        self._since += 1

    def due(self) -> bool:
        return len(self._audio) == self.window and self._since >= self.every_frames

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """The window to check ([T, 80], [T, 3, H, W]); the schedule restarts."""
        self._since = 0
        return (np.stack([audio_feature(a) for a in self._audio]),
                np.stack([self.crop(self.view(f)) for f in self._frames]))

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

    A correction waits for a quiet frame (a pause in the speech, RMS at most `quiet`),
    where inserting or skipping a frame of audio is inaudible; after `max_wait_frames`
    without one (music, a presenter who never pauses) it is applied anyway, the first
    `fade_samples` of the new audio crossfaded from what would have followed, so the
    waveform has no step.
    """

    def __init__(self, *, quiet: float = 0.003, max_wait_frames: int = 250,
                 fade_samples: int = 160) -> None:
        self.audio_frames = 0
        self.video_frames = 0
        self.quiet = quiet
        self.max_wait_frames = max_wait_frames
        self.fade_samples = fade_samples
        self._pending = 0  # frames of correction asked for, not yet applied
        self._waited = 0
        self._audio: collections.deque[np.ndarray] = collections.deque()
        self._video: collections.deque[typing.Any] = collections.deque()
        self._last_video: typing.Any = None

    @property
    def net_frames(self) -> int:
        """Audio delay minus video delay: the correction in force."""
        return self.audio_frames - self.video_frames

    @property
    def pending_frames(self) -> int:
        return self._pending

    def correct(self, offset_frames: int) -> None:
        """Corrects by `offset_frames` at the next quiet frame (see the class)."""
        self._pending += offset_frames

    def _apply(self) -> None:
        net = self.net_frames + self._pending
        self.audio_frames, self.video_frames = max(net, 0), max(-net, 0)
        self._pending = self._waited = 0

    def process(self, frame: F, audio: np.ndarray) -> tuple[F, np.ndarray]:
        before: np.ndarray | None = None
        if self._pending:
            if audio.size == 0 or float(np.sqrt(np.mean(np.square(audio)))) <= self.quiet:
                self._apply()
            elif self._waited >= self.max_wait_frames:
                # What the stream would have continued with, to fade from.
                before = _take(collections.deque([*self._audio, audio]), self.audio_frames, audio)
                self._apply()
            else:
                self._waited += 1
        self._audio.append(audio)
        self._video.append(frame)
        while len(self._video) > self.video_frames + 1:
            self._video.popleft()
        out_audio = _take(self._audio, self.audio_frames, audio)
        if before is not None:
            out_audio = _crossfade(before, out_audio, self.fade_samples)
        if len(self._video) > self.video_frames:
            self._last_video = self._video.popleft()
        out_video = self._last_video if self._last_video is not None else frame
        return out_video, out_audio


def _take(held: collections.deque[np.ndarray], delay: int, current: np.ndarray) -> np.ndarray:
    """The audio chunk out of a delay line holding `held` (the newest last) at `delay`
    frames: silence while it fills."""
    while len(held) > delay + 1:
        held.popleft()
    return held.popleft() if len(held) > delay else np.zeros_like(current)


def _crossfade(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """`b`, its first `n` samples faded in from `a`'s."""
    n = min(n, a.size, b.size)
    out = np.array(b, dtype=np.float32, copy=True)
    ramp = np.linspace(0.0, 1.0, n, endpoint=False, dtype=np.float32)
    out[:n] = a[:n] * (1.0 - ramp) + b[:n] * ramp
    return out
