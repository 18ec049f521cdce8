"""Finding and tracking the person's face through a base video.

Every frame goes through a real face detector (OpenCV's trained frontal-face Haar
cascade by default; anything with `FaceDetector`'s one method can stand in, e.g. a
user's own ONNX detector). The per-frame boxes are then made usable for lip-sync
crops: frames where the detector missed take the nearest found box, the boxes are
smoothed over a few frames (a crop that jitters makes the pasted mouth swim), and a
chin margin is added below, since a frontal-face box ends at the lips' lower edge
and lip-sync models need the jaw. A clip that cannot make a good avatar is refused
with the reason, before anything is stored: no face in too many frames, more than
one face, or a face too small for the family's crop.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


class PreparationError(ValueError):
    """The clip cannot make an avatar; the message says why and what to change."""


@dataclass(frozen=True, slots=True)
class Box:
    """A face's rectangle in pixels: left, top, width, height."""

    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    def clipped(self, width: int, height: int) -> Box:
        x0, y0 = max(0, self.x), max(0, self.y)
        x1, y1 = min(width, self.x + self.w), min(height, self.y + self.h)
        return Box(x0, y0, max(0, x1 - x0), max(0, y1 - y0))


class FaceDetector(Protocol):
    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Faces in an [H, W, 3] uint8 RGB frame, largest first."""
        ...


class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade as shipped in the opencv-python-headless wheel."""

    # alt2: no false second face on the test photograph's moving video where the
    # default cascade finds one in a quarter of the frames, at the same recall.
    def __init__(self, cascade: str = "haarcascade_frontalface_alt2.xml", *,
                 scale_factor: float = 1.1, min_neighbors: int = 5, min_side: int = 24,
                 max_side: int = 320) -> None:
        import cv2

        path = cv2.data.haarcascades + cascade  # type: ignore[attr-defined]  # untyped in the stubs
        self._classifier = cv2.CascadeClassifier(path)
        if self._classifier.empty():
            raise PreparationError(f"face detector {path!r} could not be loaded")
        self._scale, self._neighbors, self._min = scale_factor, min_neighbors, min_side
        # Frames are searched at most this large (3x faster at 320 than at 512 px, the
        # boxes within a pixel or two once scaled back): a lip-sync crop is ~96-384 px.
        self._max_side = max_side

    def detect(self, rgb: np.ndarray) -> list[Box]:
        import cv2

        h, w = rgb.shape[:2]
        scale = min(1.0, self._max_side / max(h, w))
        img = np.ascontiguousarray(rgb)
        if scale < 1.0:
            img = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
        least = max(8, round(self._min * scale))
        found = self._classifier.detectMultiScale(gray, scaleFactor=self._scale,
                                                  minNeighbors=self._neighbors,
                                                  minSize=(least, least))
        boxes = [Box(round(x / scale), round(y / scale), round(fw / scale), round(fh / scale))
                 for x, y, fw, fh in found]
        return sorted(boxes, key=lambda b: -b.area)


class OnnxFaceDetector:
    """A user's own face detector in ONNX, of the signature the light single-shot
    detectors publish (UltraFace's RFB-320 and slim exports, and detectors exported
    the same way): one input ``float32 [1, 3, H, W]`` (RGB, ``(pixel - 127) / 128``,
    H and W fixed in the model) and two outputs found by shape, ``scores [1, N, 2]``
    (background, face) and ``boxes [1, N, 4]`` (left, top, right, bottom as fractions
    of the frame). Boxes above ``threshold`` go through non-maximum suppression."""

    def __init__(self, path: str | Path, *, threshold: float = 0.7, nms_iou: float = 0.3) -> None:
        import onnxruntime as ort

        try:
            self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise PreparationError(f"face detector {path}: cannot load it ({e})") from e
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        shape = list(inputs[0].shape) if len(inputs) == 1 else []
        by_last = {o.shape[-1]: o.name for o in outputs if len(o.shape) == 3}
        if not (len(shape) == 4 and shape[1] == 3 and all(isinstance(d, int) for d in shape[2:])
                and set(by_last) >= {2, 4}):
            raise PreparationError(
                f"face detector {path}: expected one input float32 [1, 3, H, W] (fixed H, W) and "
                f"outputs scores [1, N, 2] and boxes [1, N, 4]; it has inputs "
                f"{[(i.name, i.shape) for i in inputs]} and outputs {[(o.name, o.shape) for o in outputs]}")
        self._input = inputs[0].name
        self._height, self._width = int(shape[2]), int(shape[3])
        self._scores, self._boxes = by_last[2], by_last[4]
        self._threshold, self._iou = threshold, nms_iou

    def detect(self, rgb: np.ndarray) -> list[Box]:
        import cv2

        h, w = rgb.shape[:2]
        img = cv2.resize(np.ascontiguousarray(rgb), (self._width, self._height),
                         interpolation=cv2.INTER_AREA).astype(np.float32)
        x = ((img - 127.0) / 128.0).transpose(2, 0, 1)[None]
        scores, boxes = self._session.run([self._scores, self._boxes], {self._input: x})
        keep = scores[0, :, 1] > self._threshold
        found = boxes[0][keep] * np.array([w, h, w, h], np.float32)
        conf = scores[0, keep, 1]
        rects = [[float(x0), float(y0), float(x1 - x0), float(y1 - y0)] for x0, y0, x1, y1 in found]
        chosen = cv2.dnn.NMSBoxes(rects, conf.tolist(), self._threshold, self._iou) if rects else []
        out = [Box(round(rects[i][0]), round(rects[i][1]), round(rects[i][2]), round(rects[i][3]))
               for i in np.asarray(chosen).reshape(-1)]
        return sorted((b.clipped(w, h) for b in out if b.w > 0 and b.h > 0), key=lambda b: -b.area)


def load_detector(path: str | Path | None) -> FaceDetector:
    """The user's ONNX detector at ``path``; OpenCV's cascade when none is given."""
    return default_detector() if path is None or str(path) == "" else OnnxFaceDetector(path)


def crop(frame: np.ndarray, box: Box, side: int) -> np.ndarray:
    """The box's pixels resized to side x side (uint8, the frame's channel order): what a
    lip-sync model of that side sees."""
    import cv2

    region = frame[box.y: box.y + box.h, box.x: box.x + box.w]
    return cv2.resize(region, (side, side), interpolation=cv2.INTER_AREA)


@functools.cache
def default_detector() -> HaarFaceDetector:
    return HaarFaceDetector()


CHIN = 0.12  # the margin added below a face box, as a share of its height


@dataclass(frozen=True, slots=True)
class TrackPolicy:
    min_found: float = 0.8  # share of frames the detector must find the face in
    second_face: float = 0.5  # a face this large next to the first (area share) is a second person
    several: float = 0.2  # share of frames with a second person that refuses the clip
    min_side: int = 96  # the family's crop side: a smaller face would be upscaled to it
    smooth_frames: int = 5  # moving-average window over the boxes (odd)
    chin: float = CHIN  # margin below the box, as a share of its height


@dataclass(frozen=True, slots=True)
class FaceTrack:
    boxes: tuple[Box, ...]  # one per frame: smoothed, with the chin margin, inside the frame
    detected: tuple[Box | None, ...]  # what the detector found per frame (None: missed)

    @property
    def found(self) -> int:
        return sum(b is not None for b in self.detected)


def track_faces(frames: Iterable[np.ndarray], detector: FaceDetector | None = None,
                policy: TrackPolicy = TrackPolicy()) -> FaceTrack:
    """The face's box in every frame (RGB uint8 [H, W, 3], one size), or PreparationError."""
    detector = detector or default_detector()
    detected: list[Box | None] = []
    size: tuple[int, int] | None = None
    crowded: list[int] = []  # frames with a second person
    for i, frame in enumerate(frames):
        size = size or (frame.shape[1], frame.shape[0])
        faces = detector.detect(frame)
        people = [f for f in faces if f.area >= policy.second_face * faces[0].area]
        if len(people) > 1:
            crowded.append(i)
        # The same person as before: the face nearest the last one found, so a stray
        # detection in one frame does not make the crop jump.
        last = next((b for b in reversed(detected) if b is not None), None)
        pick = min(people, key=lambda f: _distance(f, last)) if people and last else \
            (people[0] if people else None)
        detected.append(pick)
    if size is None:
        raise PreparationError("the clip has no frames")
    if len(crowded) > policy.several * len(detected):
        raise PreparationError(
            f"more than one face in {len(crowded)} of {len(detected)} frames (from frame "
            f"{crowded[0]}): an avatar is made from a clip of one person")
    found = [b for b in detected if b is not None]
    if len(found) < policy.min_found * len(detected):
        raise PreparationError(
            f"a face was found in {len(found)} of {len(detected)} frames (at least "
            f"{policy.min_found:.0%} needed): use a clip where the face is frontal and lit")
    side = float(np.median([min(b.w, b.h) for b in found]))
    if side < policy.min_side:
        raise PreparationError(
            f"the face is {side:.0f} px across, smaller than the {policy.min_side} px crop the "
            "model works at: use a closer or higher-resolution clip")
    filled = _fill(detected)
    smoothed = _smooth(filled, policy.smooth_frames)
    width, height = size
    out = tuple(with_chin(b, policy.chin).clipped(width, height) for b in smoothed)
    return FaceTrack(out, tuple(detected))


def _distance(a: Box, b: Box) -> float:
    (ax, ay), (bx, by) = a.center, b.center
    return float(np.hypot(ax - bx, ay - by))


def _fill(detected: Sequence[Box | None]) -> list[Box]:
    """Frames the detector missed take the nearest frame's box (earlier on a tie)."""
    idx = [i for i, b in enumerate(detected) if b is not None]
    out = []
    for i, b in enumerate(detected):
        if b is None:
            j = min(idx, key=lambda k: (abs(k - i), k))
            b = detected[j]
        assert b is not None
        out.append(b)
    return out


def _smooth(boxes: Sequence[Box], window: int) -> list[Box]:
    """Centred moving average of each edge, the window shrinking at the clip's ends."""
    if window <= 1 or len(boxes) < 2:
        return list(boxes)
    arr = np.array([(b.x, b.y, b.x + b.w, b.y + b.h) for b in boxes], dtype=np.float64)
    half = window // 2
    out = []
    for i in range(len(boxes)):
        lo, hi = max(0, i - half), min(len(boxes), i + half + 1)
        x0, y0, x1, y1 = arr[lo:hi].mean(axis=0)
        out.append(Box(round(x0), round(y0), round(x1 - x0), round(y1 - y0)))
    return out


def with_chin(b: Box, share: float = CHIN) -> Box:
    """The box with the chin margin below it (a frontal-face box ends at the lips)."""
    return Box(b.x, b.y, b.w, b.h + round(b.h * share))
