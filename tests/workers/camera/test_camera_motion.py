"""Face motion read from a driver's camera (the real photograph, its mouth opened and an
eye closed by hand, the face moved in the frame): the reader on the device, the face
found by OpenCV's detector, and the calibration against the driver's resting face."""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from avatarfarm.face_motion import HEAD, INDEX
from avatarfarm.preparation.faces import default_detector
from tests.driver_publisher import driver_frame, mouth_open
from workers.camera.motion import HOLD_FRAMES, Calibration, FaceTracker, driver_detector, face_crop
from workers.models.camera import EYE_RIGHT, build_face_reader


@pytest.fixture(scope="module")
def reader() -> ort.InferenceSession:
    return ort.InferenceSession(build_face_reader().SerializeToString(), providers=["CPUExecutionProvider"])


def read(reader: ort.InferenceSession, frames: list[np.ndarray]) -> np.ndarray:
    """Face motion of each frame, as a camera room reads it."""
    tracker, calibration = FaceTracker(driver_detector()), Calibration()
    out = []
    for rgb in frames:
        box = tracker.track(rgb)
        assert box is not None
        (measures,) = reader.run(None, {"face": face_crop(rgb, box)[None]})
        out.append(calibration.face_motion(measures[0], box))
    return np.array(out)


def close_right_eye(rgb: np.ndarray) -> np.ndarray:
    """The performer's right eye (the image's left) under lid-coloured skin."""
    box = default_detector().detect(driver_frame(0))[0]
    x0, x1, y0, y1 = EYE_RIGHT
    centre = (round(box.x + box.w * (x0 + x1) / 2), round(box.y + box.h * (y0 + y1) / 2))
    skin = rgb[box.y + int(box.h * 0.6), box.x + int(box.w * 0.25)].tolist()
    out = rgb.copy()
    cv2.ellipse(out, centre, (int(box.w * 0.1), int(box.h * 0.05)), 0, 0, 360, skin, -1)
    return out


def test_the_jaw_follows_the_drivers_mouth(reader: ort.InferenceSession) -> None:
    motion = read(reader, [driver_frame(i) for i in range(50)])
    jaw = motion[:, INDEX["jawOpen"]]
    opened = np.array([mouth_open(i) for i in range(50)])
    assert jaw[opened].min() > 0.8 and jaw[~opened].max() < 0.2
    # Nothing else moved: the eyes stay open, the head still (within the detector's
    # jitter: its box moves a few pixels as the mouth opens).
    assert motion[:, INDEX["eyeBlinkLeft"]].max() < 0.2 and motion[:, INDEX["eyeBlinkRight"]].max() < 0.2
    assert np.abs(motion[:, HEAD:HEAD + 2]).max() < 8.0


def test_a_closed_eye_blinks_that_eye(reader: ort.InferenceSession) -> None:
    frames = [driver_frame(0) for _ in range(40)]
    frames[30:34] = [close_right_eye(f) for f in frames[30:34]]
    motion = read(reader, frames)
    right, left = motion[:, INDEX["eyeBlinkRight"]], motion[:, INDEX["eyeBlinkLeft"]]
    assert right[30:34].min() > 0.8 and right[:30].max() < 0.1 and left.max() < 0.2


def test_the_head_turns_as_the_face_moves_in_the_frame(reader: ort.InferenceSession) -> None:
    still = driver_frame(0)
    moved = np.roll(still, -14, axis=1)  # the face moved to the image's left: a turn to their right
    motion = read(reader, [still] * 40 + [moved] * 5)
    yaw, pitch = motion[:, HEAD], motion[:, HEAD + 1]
    assert np.abs(yaw[:40]).max() < 1.0
    # 14 px of a ~120 px face: ~14 degrees, less a few for the box the detector finds in a
    # frame searched at DRIVER_SEARCH_SIDE.
    assert yaw[-1] > 10.0 and abs(pitch[-1]) < 5.0


def test_a_face_missed_for_a_moment_is_held_then_let_go() -> None:
    tracker = FaceTracker(driver_detector())
    face = tracker.track(driver_frame(0))
    blank = np.full_like(driver_frame(0), 128)
    held = [tracker.track(blank) for _ in range(HOLD_FRAMES)]
    assert face is not None and all(b == held[0] for b in held) and held[0] is not None
    assert tracker.track(blank) is None
