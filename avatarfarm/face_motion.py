"""Face motion as motion-capture apps and SDKs send it: ARKit's 52 blendshapes and the
head's rotation, shared by the clients that push it and the workers that map it onto
each family's motion input.

ARKit names the blendshapes (``eyeBlinkLeft`` ... ``tongueOut``, each 0..1) and face
trackers speak them: iPhone face-tracking apps, and MediaPipe's face landmarker, which
gives the same names (with ``_neutral`` first, ignored here). Left and right are the
performer's own. The head's rotation is in degrees: yaw positive as the performer turns
to their right, pitch positive as they nod down, roll positive as they tilt toward their
right shoulder.

Inside the farm one frame of face motion is a vector of `FACE_MOTION_DIM` floats: the 52
blendshapes in `ARKIT` order, then yaw, pitch and roll. Over gRPC it is a MotionFrame;
over a camera driver's WebRTC data channel, a JSON message (`from_message`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

ARKIT: tuple[str, ...] = (
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft",
    "eyeSquintLeft", "eyeWideLeft", "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight",
    "eyeLookOutRight", "eyeLookUpRight", "eyeSquintRight", "eyeWideRight", "jawForward",
    "jawLeft", "jawRight", "jawOpen", "mouthClose", "mouthFunnel", "mouthPucker", "mouthLeft",
    "mouthRight", "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthPressLeft",
    "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthUpperUpLeft",
    "mouthUpperUpRight", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft",
    "browOuterUpRight", "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "noseSneerLeft",
    "noseSneerRight", "tongueOut",
)
INDEX: dict[str, int] = {name: i for i, name in enumerate(ARKIT)}
IGNORED = frozenset({"_neutral"})  # MediaPipe's extra category
HEAD = len(ARKIT)  # yaw, pitch, roll follow the blendshapes
FACE_MOTION_DIM = HEAD + 3
MAX_DEGREES = 90.0  # a head turned further is not a face a tracker follows


class FaceMotionError(ValueError):
    """A frame of face motion that cannot be taken (names what is wrong)."""


def face_motion(blendshapes: Mapping[str, float], yaw: float = 0.0, pitch: float = 0.0,
                roll: float = 0.0) -> np.ndarray:
    """One frame's face motion vector from blendshapes by name (those not given are 0;
    values a little outside 0..1, as trackers give, are clipped) and the head's rotation
    in degrees; raises FaceMotionError for an unknown name or a value that is not a number."""
    v = np.zeros(FACE_MOTION_DIM, np.float32)
    for name, value in blendshapes.items():
        if name in IGNORED:
            continue
        i = INDEX.get(name)
        if i is None:
            raise FaceMotionError(f"{name[:40]!r} is not an ARKit blendshape name (e.g. jawOpen, "
                                  "eyeBlinkLeft)")
        if not math.isfinite(value):
            raise FaceMotionError(f"blendshape {name} is {value}, not a number in 0..1")
        v[i] = min(max(value, 0.0), 1.0)
    for k, (axis, deg) in enumerate((("yaw", yaw), ("pitch", pitch), ("roll", roll))):
        if not (math.isfinite(deg) and abs(deg) <= MAX_DEGREES):
            raise FaceMotionError(f"head {axis} {deg} is not an angle within +-{MAX_DEGREES:g} degrees")
        v[HEAD + k] = deg
    return v


MAX_MESSAGE = 8192  # bytes of one face motion message: 52 names and numbers fit many times


def from_message(data: str | bytes) -> np.ndarray:
    """One frame's face motion from a JSON message, as a face-tracking app sends it over a
    WebRTC data channel: ``{"blendshapes": {"jawOpen": 0.4, ...}, "head": {"yaw": 5,
    "pitch": 0, "roll": 0}}`` (head optional, degrees); FaceMotionError otherwise."""
    if len(data) > MAX_MESSAGE:
        raise FaceMotionError(f"a face motion message is at most {MAX_MESSAGE} bytes")
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FaceMotionError(f"a face motion message is JSON: {e}") from None
    shapes = msg.get("blendshapes") if isinstance(msg, dict) else None
    head = msg.get("head", {}) if isinstance(msg, dict) else None
    if not isinstance(shapes, dict) or not isinstance(head, dict) or len(shapes) > 64:
        raise FaceMotionError('a face motion message is {"blendshapes": {name: 0..1}, '
                              '"head": {"yaw", "pitch", "roll": degrees}}')

    def number(x: object, what: str) -> float:
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise FaceMotionError(f"{what} is not a number")
        return float(x)

    return face_motion({str(k): number(v, f"blendshape {str(k)[:40]!r}") for k, v in shapes.items()},
                       *(number(head.get(a, 0.0), f"head {a}") for a in ("yaw", "pitch", "roll")))


def value(v: np.ndarray, name: str) -> float:
    """A named blendshape's value in a face motion vector."""
    return float(v[INDEX[name]])
