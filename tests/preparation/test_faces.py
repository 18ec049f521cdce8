"""Face tracking for avatar preparation, on a real photograph of a person (scikit-image's
astronaut, a public-domain NASA portrait) and base videos made from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import data

from avatarfarm.preparation.faces import (
    Box,
    HaarFaceDetector,
    OnnxFaceDetector,
    PreparationError,
    TrackPolicy,
    load_detector,
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


# -- a user's own detector in ONNX -------------------------------------------------------

# Where the stand-in detector reports the face: away from the photograph's real face, so
# a box there shows which detector prepared a bundle.
FACE_BOX = (0.05, 0.50, 0.35, 0.85)


def ssd_detector(path: Path, *, wrong: bool = False) -> Path:
    """A detector graph of the light single-shot signature (input [1, 3, 240, 320], scores
    [1, N, 2] and boxes [1, N, 4]): three anchors, two overlapping on FACE_BOX and one in a
    corner; the face score rises with the frame's mean brightness, so a lit frame has the
    face and a black one has none. A stand-in for a real detector's weights (none can be
    downloaded), exercising the binding, preprocessing, threshold, suppression and scaling."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x0, y0, x1, y1 = FACE_BOX
    boxes = np.array([[[x0, y0, x1, y1], [x0 + 0.01, y0 + 0.01, x1 + 0.01, y1 + 0.01],
                       [0.0, 0.0, 0.1, 0.1]]], np.float32)
    gain = np.array([[10.0], [9.0], [0.0]], np.float32)  # per anchor
    bias = np.array([[9.0], [8.0], [-5.0]], np.float32)
    inits = [numpy_helper.from_array(boxes, "anchors"), numpy_helper.from_array(gain, "gain"),
             numpy_helper.from_array(bias, "bias"),
             numpy_helper.from_array(np.zeros((3, 1), np.float32), "background")]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),  # scalar, -1 (black) .. 1
        helper.make_node("Mul", ["gain", "m"], ["gm"]),
        helper.make_node("Add", ["gm", "bias"], ["logit"]),  # [3, 1]
        helper.make_node("Concat", ["background", "logit"], ["pair"], axis=1),  # [3, 2]
        helper.make_node("Softmax", ["pair"], ["soft"], axis=1),
        helper.make_node("Unsqueeze", ["soft", "zero"], ["scores"]),
        helper.make_node("Identity", ["anchors"], ["boxes"]),
    ]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero"))
    side = [1, 3, 240, 320] if not wrong else [1, 3, "h", "w"]
    graph = helper.make_graph(
        nodes, "face_detector", [helper.make_tensor_value_info("input", TensorProto.FLOAT, side)],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, 2]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 3, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def test_a_users_onnx_detector_finds_the_face_it_reports(photo: np.ndarray, tmp_path: Path) -> None:
    det = OnnxFaceDetector(ssd_detector(tmp_path / "det.onnx"))
    faces = det.detect(photo)
    # The two overlapping anchors are one face after suppression, scaled to the frame.
    assert len(faces) == 1
    x0, y0, x1, y1 = FACE_BOX
    assert faces[0] == Box(round(x0 * 512), round(y0 * 512), round((x1 - x0) * 512),
                           round((y1 - y0) * 512))
    assert det.detect(np.zeros((300, 400, 3), np.uint8)) == []  # a black frame: no face
    # Preparation tracks what this detector finds (the chin margin added below).
    track = track_faces(head_motion(photo, 12)[0], det, TrackPolicy(min_side=64))
    assert track.found == 12 and abs(track.boxes[0].x - faces[0].x) <= 6


def test_a_detector_of_another_signature_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(PreparationError, match=r"expected one input float32 \[1, 3, H, W\]"):
        OnnxFaceDetector(ssd_detector(tmp_path / "det.onnx", wrong=True))
    assert isinstance(load_detector(None), HaarFaceDetector)
