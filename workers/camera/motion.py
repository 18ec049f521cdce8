"""Face motion from a driver's camera, for the reference family: the face found in each
frame (OpenCV's frontal-face detector, its box smoothed and held through a missed frame
or two), cropped and read on the device by the face reader (`workers.models.camera`,
batched across rooms), and its measures turned into blendshapes against the driver's
own resting face (`Calibration`): what an open mouth or a closed eye is depends on the
face and the light, so each is judged against what this face showed over the last
seconds. The head's turn and nod come from how the face box moved from where it rests.

`Calibration` is pure (values in, face motion out); `FaceTracker` holds the box.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field

import cv2
import numpy as np

from avatarfarm.face_motion import FACE_MOTION_DIM, HEAD, INDEX
from avatarfarm.preparation.faces import Box, FaceDetector, HaarFaceDetector
from workers.models.camera import SIDE

MOUTH_SPAN = 0.3  # mouth darkness (luma 0..1) over the resting face of a wide-open mouth
BLINK_SHARE = 0.6  # an eye this much less dark than when open is closed
DEGREES_PER_BOX = 120.0  # the head's turn (or nod) when the box moves by its own width
MAX_DEGREES = 45.0
HOLD_FRAMES = 5  # a face missed for fewer frames keeps its last box
# A driver sits in front of their camera: their face is a large part of the frame, so the
# frame is searched at most this large (faces from 15% of its width; ~10 ms a 256 px frame
# against ~20 ms at full size, on the room's tracking thread every frame).
DRIVER_SEARCH_SIDE = 160


@functools.cache
def driver_detector() -> HaarFaceDetector:
    """The frontal-face detector as a camera room's tracker uses it."""
    return HaarFaceDetector(max_side=DRIVER_SEARCH_SIDE)


@dataclass(slots=True)
class Calibration:
    """The driver's resting face, learnt from the last ``window`` frames: the mouth at
    its most closed (a low percentile), the eyes at their most open, the head where it
    mostly is."""

    window: int = 75  # 3 s at 25 fps
    _mouth: collections.deque[float] = field(default_factory=collections.deque)
    _eyes: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)
    _centre: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)

    def face_motion(self, measures: np.ndarray, box: Box) -> np.ndarray:
        """One frame's face motion vector (`avatarfarm.face_motion`) from the reader's
        measures (mouth, left eye, right eye darkness) and the face box."""
        mouth, left, right = (float(v) for v in measures[:3])
        cx, cy = box.x + box.w / 2, box.y + box.h / 2
        for q, v in ((self._mouth, mouth), (self._eyes, (left, right)),
                     (self._centre, (cx / box.w, cy / box.h))):
            q.append(v)  # type: ignore[arg-type]
            if len(q) > self.window:
                q.popleft()
        out = np.zeros(FACE_MOTION_DIM, np.float32)
        rest = float(np.percentile(self._mouth, 10))
        out[INDEX["jawOpen"]] = np.clip((mouth - rest) / MOUTH_SPAN, 0.0, 1.0)
        eyes = np.percentile(np.asarray(self._eyes), 90, axis=0)
        for name, now, open_ in (("eyeBlinkLeft", left, eyes[0]), ("eyeBlinkRight", right, eyes[1])):
            if open_ > 1e-3:
                out[INDEX[name]] = np.clip((open_ - now) / (BLINK_SHARE * open_), 0.0, 1.0)
        centre = np.median(np.asarray(self._centre), axis=0)
        # The performer turns to their right: their face moves to the camera image's left.
        out[HEAD] = -(cx / box.w - centre[0]) * DEGREES_PER_BOX
        out[HEAD + 1] = (cy / box.h - centre[1]) * DEGREES_PER_BOX
        out[HEAD:HEAD + 2] = np.clip(out[HEAD:HEAD + 2], -MAX_DEGREES, MAX_DEGREES)
        return out


@dataclass(slots=True)
class FaceTracker:
    """The driver's face box, frame to frame: the largest face found, smoothed; the last
    box held through a few missed frames; None once the face is gone."""

    detector: FaceDetector
    smoothing: float = 0.5
    _box: np.ndarray | None = None  # x, y, w, h
    _missed: int = 0

    def track(self, rgb: np.ndarray) -> Box | None:
        found = self.detector.detect(rgb)
        if not found:
            self._missed += 1
            if self._missed > HOLD_FRAMES:
                self._box = None
        else:
            self._missed = 0
            b = found[0]
            now = np.array([b.x, b.y, b.w, b.h], np.float64)
            self._box = now if self._box is None else self._box + self.smoothing * (now - self._box)
        if self._box is None:
            return None
        x, y, w, h = (round(v) for v in self._box)
        return Box(x, y, w, h).clipped(rgb.shape[1], rgb.shape[0])


def face_crop(rgb: np.ndarray, box: Box, side: int = SIDE) -> np.ndarray:
    """A face model's input: the box's pixels at ``side`` (the face reader's by default),
    [3, side, side] float32 0..1."""
    region = rgb[box.y: box.y + box.h, box.x: box.x + box.w]
    crop = cv2.resize(region, (side, side), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32) * np.float32(1 / 255)
