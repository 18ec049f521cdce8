"""Motion coefficients: the layout every driver, model and renderer agrees on,
and the idle animation that keeps a room alive between script segments.

A motion vector holds one float per coefficient, in MOTION_NAMES order. Mouth
coefficients come from audio-to-motion (or mocap); blink, breathing and small
head sway come from the idle generator, so a speaking avatar still blinks.

Motion capture arrives as face motion (ARKit blendshapes and head rotation,
`avatarfarm.face_motion`); `reference_motion` maps it onto these coefficients, mirrored
as a performer expects of their avatar (they turn to their right, so does it: toward
the viewer's left).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from avatarfarm.face_motion import FACE_MOTION_DIM, HEAD, INDEX


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
# The head's rotation a coefficient of 1 stands for (yaw, pitch, roll), in degrees.
HEAD_DEGREES = np.array([30.0, 20.0, 20.0], np.float32)
# Yaw is mirrored: the performer's right is the avatar's, on the viewer's left.
_HEAD_SIGN = np.array([-1.0, 1.0, 1.0], np.float32)


def reference_motion(face: np.ndarray) -> np.ndarray:
    """The coefficients of one frame of face motion: the jaw opens with ``jawOpen`` (and
    ``mouthClose`` shuts it), the mouth widens with stretch and half the smile, rounds
    with pucker or funnel, the eyes blink together, the brows rise with the inner and
    outer raisers against the lowerers; the head turns by its rotation."""
    def b(name: str) -> float:
        return float(face[INDEX[name]])

    m = np.zeros(MOTION_DIM, np.float32)
    m[Coef.JAW_OPEN] = b("jawOpen") - b("mouthClose")
    m[Coef.MOUTH_WIDE] = (0.5 * (b("mouthStretchLeft") + b("mouthStretchRight"))
                          + 0.25 * (b("mouthSmileLeft") + b("mouthSmileRight")))
    m[Coef.MOUTH_ROUND] = max(b("mouthPucker"), b("mouthFunnel"))
    m[Coef.BLINK] = 0.5 * (b("eyeBlinkLeft") + b("eyeBlinkRight"))
    m[Coef.BROW_RAISE] = (0.5 * (b("browInnerUp") + 0.5 * (b("browOuterUpLeft") + b("browOuterUpRight")))
                          - 0.5 * (b("browDownLeft") + b("browDownRight")))
    m[Coef.HEAD_YAW:] = _HEAD_SIGN * face[HEAD:HEAD + 3] / HEAD_DEGREES
    return np.clip(m, -1.0, 1.0)


def face_from_reference(coefficients: np.ndarray) -> np.ndarray:
    """The face motion an older client's eight coefficients stand for: `reference_motion`
    of it gives them back (within their ranges: mouth shapes and blink 0..1)."""
    c = np.clip(np.asarray(coefficients, np.float32), -1.0, 1.0)
    face = np.zeros(FACE_MOTION_DIM, np.float32)

    def put(names: tuple[str, ...], value: float) -> None:
        for name in names:
            face[INDEX[name]] = max(value, 0.0)

    put(("jawOpen",), c[Coef.JAW_OPEN])
    put(("mouthClose",), -c[Coef.JAW_OPEN])
    put(("mouthStretchLeft", "mouthStretchRight"), c[Coef.MOUTH_WIDE])
    put(("mouthPucker",), c[Coef.MOUTH_ROUND])
    put(("eyeBlinkLeft", "eyeBlinkRight"), c[Coef.BLINK])
    put(("browInnerUp", "browOuterUpLeft", "browOuterUpRight"), c[Coef.BROW_RAISE])
    put(("browDownLeft", "browDownRight"), -c[Coef.BROW_RAISE])
    face[HEAD:HEAD + 3] = _HEAD_SIGN * c[Coef.HEAD_YAW:] * HEAD_DEGREES
    return face


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
