"""Face tracking for avatar preparation, on a real photograph of a person (scikit-image's
astronaut, a public-domain NASA portrait) and base videos made from it."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from avatarfarm.preparation.faces import (
    Box,
    HaarFaceDetector,
    PreparationError,
    TrackPolicy,
    track_faces,
)
from tests.media import head_motion


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return data.astronaut()  # 512x512 RGB


@pytest.fixture(scope="module")
def detector() -> HaarFaceDetector:
    return HaarFaceDetector()


def test_the_detector_finds_the_one_face_in_the_photograph(photo: np.ndarray,
                                                           detector: HaarFaceDetector) -> None:
    faces = detector.detect(photo)
    assert len(faces) == 1
    (face,) = faces
    # The astronaut's face (eyes ~y 120, mouth ~y 160, x 190-270 in this 512x512 photo).
    cx, cy = face.center
    assert 200 < cx < 260 and 90 < cy < 150 and 70 < face.w < 140
    # Nothing is found where there is no face: the photo's left half is the flag and suit.
    assert detector.detect(np.ascontiguousarray(photo[:, :160])) == []


def test_a_base_video_is_tracked_smoothly_with_the_chin_included(
        photo: np.ndarray, detector: HaarFaceDetector) -> None:
    frames, moves = head_motion(photo)
    track = track_faces(frames, detector, TrackPolicy(min_side=64))
    assert len(track.boxes) == len(frames) and track.found >= 0.9 * len(frames)
    raw = [b for b in track.detected if b is not None]
    base = raw[0]
    # The boxes follow the head: centre minus the applied shift stays put.
    residual = np.array([(b.center[0] - dx, b.center[1] - dy)
                         for b, (dx, dy) in zip(track.boxes, moves, strict=True)])
    assert np.abs(residual - residual.mean(axis=0)).max() < 6
    # Smoother than the detector: less frame-to-frame jitter of the box size.
    def jitter(boxes: list[Box]) -> float:
        return float(np.mean(np.abs(np.diff([b.w for b in boxes]))))
    assert jitter(list(track.boxes)) <= jitter(raw)
    # The chin margin: boxes reach below the detector's, within the frame.
    assert all(b.y + b.h > base.y + base.h - 8 for b in track.boxes)
    assert all(0 <= b.x and b.x + b.w <= 512 and 0 <= b.y and b.y + b.h <= 512 for b in track.boxes)


def test_frames_the_detector_misses_take_the_nearest_box(photo: np.ndarray,
                                                         detector: HaarFaceDetector) -> None:
    frames = [photo] * 9 + [np.zeros_like(photo)] + [photo] * 10  # one black frame
    track = track_faces(frames, detector, TrackPolicy(min_side=64, smooth_frames=1))
    assert track.detected[9] is None and track.found == 19
    assert track.boxes[9] == track.boxes[8] == track.boxes[10]


def test_a_clip_without_a_face_is_refused(photo: np.ndarray, detector: HaarFaceDetector) -> None:
    blank = np.full_like(photo, 128)
    with pytest.raises(PreparationError, match=r"found in 2 of 10 frames"):
        track_faces([photo, photo] + [blank] * 8, detector, TrackPolicy(min_side=64))
    with pytest.raises(PreparationError, match="no frames"):
        track_faces([], detector)


def test_two_people_are_refused(photo: np.ndarray, detector: HaarFaceDetector) -> None:
    face = photo[40:240, 130:330]
    two = np.concatenate([face, face], axis=1)  # the same face twice, side by side
    solo = np.concatenate([face, np.full_like(face, 128)], axis=1)
    assert len(detector.detect(two)) == 2 and len(detector.detect(solo)) == 1
    with pytest.raises(PreparationError, match=r"more than one face in 3 of 4 frames \(from frame 1\)"):
        track_faces([solo, two, two, two], detector, TrackPolicy(min_side=32))
    # A second face now and then (a passer-by, a poster) does not refuse the clip, and
    # the crop stays on the person it followed.
    track = track_faces([solo] * 9 + [two], detector, TrackPolicy(min_side=32, smooth_frames=1))
    picked, before = track.detected[9], track.detected[8]
    assert picked is not None and before is not None
    assert abs(picked.center[0] - before.center[0]) < 5  # the left face, not the one at x ~ 300


def test_a_face_too_small_for_the_crop_is_refused(photo: np.ndarray, detector: HaarFaceDetector) -> None:
    with pytest.raises(PreparationError, match=r"smaller than the 256 px crop"):
        track_faces([photo] * 3, detector, TrackPolicy(min_side=256))
