"""Motion coefficients: the layout every driver, model and renderer agrees on,
and the idle animation that keeps a room alive between script segments.

A motion vector holds one float per coefficient, in MOTION_NAMES order. Mouth
coefficients come from audio-to-motion (or mocap); blink, breathing and small
head sway come from the idle generator, so a speaking avatar still blinks.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np


class Coef(enum.IntEnum):
    JAW_OPEN = 0
    MOUTH_WIDE = 1
    MOUTH_ROUND = 2
    BLINK = 3
    BROW_RAISE = 4
    HEAD_YAW = 5
    HEAD_PITCH = 6
    HEAD_ROLL = 7


MOTION_NAMES: tuple[str, ...] = tuple(c.name.lower() for c in Coef)
MOTION_DIM = len(MOTION_NAMES)
MOUTH = slice(Coef.JAW_OPEN, Coef.MOUTH_ROUND + 1)


@dataclass(slots=True)
class IdleAnimator:
    """Procedural idle motion: random blinks, breathing and slow head sway.

    Randomness is injected (``rng``) so a room's idle loop is reproducible in
    tests yet never visibly periodic in a stream.
    """

    fps: float
    rng: np.random.Generator
    _t: float = 0.0
    _next_blink: float = 0.0
    _blink_start: float = -1.0
    _sway: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.float32))
    _sway_target: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.float32))

    def __post_init__(self) -> None:
        self._next_blink = float(self.rng.uniform(0.8, 2.5))

    def step(self) -> np.ndarray:
        """Returns the idle motion for the next frame and advances time."""
        dt = 1.0 / self.fps
        m = np.zeros(MOTION_DIM, dtype=np.float32)
        # Blink: ~150 ms close/open, every 2-6 s.
        if self._t >= self._next_blink:
            self._blink_start = self._t
            self._next_blink = self._t + float(self.rng.uniform(2.0, 6.0))
        if self._blink_start >= 0:
            phase = (self._t - self._blink_start) / 0.15
            if phase <= 1.0:
                m[Coef.BLINK] = math.sin(math.pi * phase)
        # Breathing: a slow nod at ~0.25 Hz.
        m[Coef.HEAD_PITCH] = 0.15 * math.sin(2 * math.pi * 0.25 * self._t)
        # Sway: drift towards a random target that changes now and then.
        if self.rng.random() < dt / 1.5:
            self._sway_target = self.rng.uniform(-0.35, 0.35, size=3).astype(np.float32)
        self._sway += (self._sway_target - self._sway) * min(1.0, dt * 1.2)
        m[Coef.HEAD_YAW] += self._sway[0]
        m[Coef.HEAD_PITCH] += 0.5 * self._sway[1]
        m[Coef.HEAD_ROLL] += 0.5 * self._sway[2]
        self._t += dt
        return m


def compose(idle: np.ndarray, driven: np.ndarray | None, *, mouth_only: bool) -> np.ndarray:
    """Combines idle motion with a driver's motion.

    Audio-driven motion owns the mouth and adds to the head; mocap (``mouth_only``
    false) owns everything it sends, so the performer's own blinks come through.
    """
    if driven is None:
        return idle
    if not mouth_only:
        return np.clip(driven, -1.0, 1.0).astype(np.float32)
    out = idle.copy()
    out[MOUTH] = driven[MOUTH]
    out[Coef.BROW_RAISE] = driven[Coef.BROW_RAISE]
    out[Coef.HEAD_YAW :] += driven[Coef.HEAD_YAW :]
    return np.clip(out, -1.0, 1.0)
