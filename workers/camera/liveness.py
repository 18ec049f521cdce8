"""Is a camera room's driver live? Platforms that require a live human driver count a
room as driven only while a person is on camera in real time, so a feed that is not
live must be told apart within seconds:

* frozen: the same picture over and over (a still image, a stalled capture);
* looped: a recording played again and again (its frames come back: each frame of
  the last seconds is, all but for compression noise, the frame one period earlier);
* no face: nobody in front of the camera;
* absent: no driver connected (waiting for the first one, or one who left).

Every frame of the driver's camera is reduced, on the decoder's thread, to its
`Signature` (`Signer`): the share of its pixels that changed since the frame before,
and a small grey thumbnail. `LivenessMonitor` keeps the last seconds of them: a live
camera never shows the same picture for long (its sensor noise and the person's
motion see to that, however still the person holds), and never shows an earlier
stretch of frames again; a recording does, with only compression noise between its
plays, which is small against the stream's own change from frame to frame.

`avatarfarm.live_driver.DriverPolicy` says what the room does about it (drive, hold on
the idle loop, end). The monitor is pure: stream times and signatures in, verdicts out.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import cv2
import numpy as np

from avatarfarm.live_driver import DriverState

THUMB = 32  # thumbnail side, pixels
PIXEL_STEP = 3  # luma levels a pixel must move by to count as changed (codecs flicker by 2)


@dataclass(frozen=True, slots=True)
class Signature:
    """What liveness keeps of one frame."""

    changed: float  # share of its pixels that changed since the frame before (1: the first)
    thumb: np.ndarray  # grey thumbnail, [THUMB * THUMB] float32 0..1


class Signer:
    """Signatures of one stream's frames, in order (on the decoder's thread: a few OpenCV
    calls per frame, about a millisecond at 720p)."""

    def __init__(self) -> None:
        self._prev: np.ndarray | None = None

    def __call__(self, rgb: np.ndarray) -> Signature:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        changed = 1.0
        if self._prev is not None and self._prev.shape == grey.shape:
            moved = cv2.absdiff(grey, self._prev) > PIXEL_STEP
            changed = cv2.countNonZero(moved.view(np.uint8)) / grey.size
        self._prev = grey
        small = cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
        return Signature(changed, small.reshape(-1).astype(np.float32) * np.float32(1 / 255))


@dataclass(frozen=True, slots=True)
class LivenessLimits:
    """How a feed that is not live is recognised (stream seconds)."""

    # A frame with fewer of its pixels changed than this shows the same picture again.
    same_picture: float = 0.0005
    frozen_seconds: float = 2.0  # that long of the same picture is a frozen feed
    # ...in this share of its frames: a key frame re-encodes the picture, and a camera
    # short of light may send each of its frames twice (half the frames the same).
    frozen_share: float = 0.9
    no_face_seconds: float = 3.0
    # A loop is seen once it has played a block of this long twice...
    loop_block_seconds: float = 2.0
    loop_min_period_seconds: float = 1.0
    history_seconds: float = 12.0  # ...within this long (the longest period found)
    # ...and the block is this close to its earlier play, relative to how much the feed
    # changes from frame to frame (a live camera: never under 1).
    loop_match: float = 0.35
    check_seconds: float = 0.5  # loops are looked for this often (a matrix product)


class LivenessMonitor:
    """A camera room's verdict on its driver, from their frames as they come."""

    def __init__(self, limits: LivenessLimits = LivenessLimits()) -> None:
        self.limits = limits
        self._times: collections.deque[float] = collections.deque()
        self._thumbs: collections.deque[np.ndarray] = collections.deque()
        self._changes: collections.deque[float] = collections.deque()  # thumbnail RMS, from the last
        self._same: collections.deque[bool] = collections.deque()  # the same picture as the last
        self._connected = False
        self._ever = False
        self._looped = False
        self._checked = -np.inf
        self._first_t = 0.0
        self._last_face = -np.inf

    # -- what happens

    def connected(self) -> None:
        """A driver started publishing: their stream has times of its own."""
        self._connected = self._ever = True
        self._times.clear()
        self._thumbs.clear()
        self._changes.clear()
        self._same.clear()
        self._looped = False
        self._checked = self._last_face = -np.inf

    def disconnected(self) -> None:
        self._connected = False

    def frame(self, t: float, sig: Signature) -> None:
        """A frame of the driver's camera at stream time ``t`` (seconds), by its signature."""
        if not self._times:
            self._first_t = t
        elif t <= self._times[-1]:
            return  # a repeated timestamp is not a new frame
        thumb = sig.thumb
        change = float(np.sqrt(np.mean((thumb - self._thumbs[-1]) ** 2))) if self._thumbs else 0.0
        self._times.append(t)
        self._thumbs.append(thumb)
        self._changes.append(change)
        self._same.append(sig.changed < self.limits.same_picture)
        while self._times and t - self._times[0] > self.limits.history_seconds:
            self._times.popleft()
            self._thumbs.popleft()
            self._changes.popleft()
            self._same.popleft()
        if t - self._checked >= self.limits.check_seconds:
            self._checked = t
            self._looped = self._loop_found()

    def face(self, t: float, found: bool) -> None:
        """Whether a face was found in the frame at stream time ``t``."""
        if found:
            self._last_face = t

    # -- the verdict

    @property
    def state(self) -> DriverState:
        if not self._connected:
            return DriverState.ABSENT if self._ever else DriverState.WAITING
        if self._frozen():
            return DriverState.FROZEN
        if self._looped:
            return DriverState.LOOPED
        if self._times and self._times[-1] - max(self._last_face, self._first_t) \
                >= self.limits.no_face_seconds:
            return DriverState.NO_FACE
        return DriverState.LIVE

    def _recent(self, seconds: float) -> int:
        """How many of the latest frames span ``seconds`` of stream (0: not that much yet)."""
        if not self._times or self._times[-1] - self._times[0] < seconds:
            return 0
        start = self._times[-1] - seconds
        n = 0
        for t in reversed(self._times):
            if t < start:
                break
            n += 1
        return n

    def _frozen(self) -> bool:
        n = self._recent(self.limits.frozen_seconds)
        if n < 2:
            return False
        recent = list(self._same)[-n + 1:]
        return sum(recent) >= self.limits.frozen_share * len(recent)

    def _loop_found(self) -> bool:
        lim = self.limits
        b = self._recent(lim.loop_block_seconds)
        if b < 2:
            return False
        times = np.fromiter(self._times, np.float64)
        h = np.stack(self._thumbs)  # [N, D]
        n = len(h)
        # Lags (in frames) at least a minimum period back that leave a whole block.
        lags = np.arange(1, n - b + 1)
        lags = lags[times[n - 1] - times[n - 1 - lags] >= lim.loop_min_period_seconds]
        if lags.size == 0:
            return False
        block = h[n - b:]
        # Squared distances of each block frame to every frame: |a|^2 + |b|^2 - 2 a.b.
        sq = (block ** 2).sum(1)[:, None] + (h ** 2).sum(1)[None, :] - 2.0 * block @ h.T
        cols = (n - b + np.arange(b))[None, :] - lags[:, None]  # [lags, b]
        per_lag = np.sqrt(np.maximum(sq[np.arange(b)[None, :], cols], 0.0).mean(1) / h.shape[1])
        changes = np.asarray(list(self._changes)[n - b + 1:])
        step = float(np.sqrt(np.mean(changes ** 2)))
        # (A still picture, whose step is nil, is frozen rather than looped.)
        return bool(step > 0 and per_lag.min() < lim.loop_match * step)
