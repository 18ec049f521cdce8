"""Face motion as trackers send it (ARKit blendshapes, head rotation) and its mapping
onto the reference renderer's coefficients: checked values, a round trip for older
clients' coefficients, and the rendered portrait moving the way the performer did."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from avatarfarm.face_motion import ARKIT, FACE_MOTION_DIM, HEAD, INDEX, FaceMotionError, face_motion
from workers.device.pipeline import Pipeline
from workers.media.motion import MOTION_DIM, Coef, face_from_reference, reference_motion
from workers.models.template import TEMPLATE


def test_a_frame_takes_arkit_names_and_refuses_what_a_tracker_never_sends() -> None:
    assert len(ARKIT) == len(set(ARKIT)) == 52 and FACE_MOTION_DIM == 55
    v = face_motion({"jawOpen": 0.7, "eyeBlinkLeft": 1.02, "mouthSmileRight": -0.01, "_neutral": 0.9},
                    yaw=12.5, pitch=-3.0, roll=1.0)
    assert v[INDEX["jawOpen"]] == pytest.approx(0.7)
    assert v[INDEX["eyeBlinkLeft"]] == 1.0 and v[INDEX["mouthSmileRight"]] == 0.0  # clipped
    assert list(v[HEAD:]) == [12.5, -3.0, 1.0]
    assert np.count_nonzero(v[:HEAD]) == 2  # MediaPipe's _neutral is no blendshape
    with pytest.raises(FaceMotionError, match="'jaw_open' is not an ARKit blendshape name"):
        face_motion({"jaw_open": 1.0})
    with pytest.raises(FaceMotionError, match="jawOpen is nan"):
        face_motion({"jawOpen": float("nan")})
    with pytest.raises(FaceMotionError, match="head yaw 400"):
        face_motion({}, yaw=400.0)


@given(st.tuples(st.floats(-1, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(-1, 1),
                 st.floats(-1, 1), st.floats(-1, 1), st.floats(-1, 1)))
def test_an_older_clients_coefficients_come_back_through_face_motion(c: tuple[float, ...]) -> None:
    coefs = np.array(c, np.float32)
    assert np.allclose(reference_motion(face_from_reference(coefs)), coefs, atol=1e-6)


def test_the_mapping_follows_the_face() -> None:
    m = reference_motion(face_motion({"jawOpen": 0.8, "mouthClose": 0.2, "mouthPucker": 0.4,
                                      "mouthFunnel": 0.6, "browDownLeft": 1.0, "browDownRight": 1.0,
                                      "eyeBlinkLeft": 1.0}, yaw=15.0, pitch=40.0))
    assert m.shape == (MOTION_DIM,)
    assert m[Coef.JAW_OPEN] == pytest.approx(0.6) and m[Coef.MOUTH_ROUND] == pytest.approx(0.6)
    assert m[Coef.BLINK] == pytest.approx(0.5)  # one eye closed of two
    assert m[Coef.BROW_RAISE] == pytest.approx(-1.0)
    assert m[Coef.HEAD_YAW] == pytest.approx(-0.5)  # mirrored: toward the viewer's left
    assert m[Coef.HEAD_PITCH] == 1.0  # 40 degrees is past the renderer's 20: clipped


def _render(pipeline: Pipeline, face: np.ndarray) -> np.ndarray:
    portrait = pipeline.avatar_tensor_sync(pipeline.folder.portrait_ids()[0], 256)
    frame = pipeline.render_sync(portrait, reference_motion(face)).value
    return np.asarray(frame).transpose(1, 2, 0)  # [256, 256, 3] in 0..1


def test_the_portrait_moves_as_the_performer_did(pipeline: Pipeline) -> None:
    still = _render(pipeline, face_motion({}))
    talking = _render(pipeline, face_motion({"jawOpen": 1.0}))
    mx, my = TEMPLATE.mouth_center
    mouth = (slice(int((my + 0.01) * 256), int((my + 0.04) * 256)),
             slice(int((mx - 0.03) * 256), int((mx + 0.03) * 256)))
    assert talking[mouth].mean() < still[mouth].mean() - 0.05  # the open mouth is dark

    # The performer turns to their right: their avatar turns to its right, the viewer's left.
    turned = _render(pipeline, face_motion({}, yaw=25.0))

    def shift(a: np.ndarray, b: np.ndarray) -> int:
        """The horizontal shift (pixels) that best lays b's middle rows on a's."""
        rows = slice(96, 160)
        ga, gb = a[rows].mean(axis=2), b[rows].mean(axis=2)
        errs = {s: float(np.abs(ga[:, 40:216] - np.roll(gb, s, axis=1)[:, 40:216]).mean())
                for s in range(-8, 9)}
        return min(errs, key=errs.__getitem__)

    assert shift(still, turned) > 0  # turned is still moved left: rolling it right matches
    assert shift(still, _render(pipeline, face_motion({}, yaw=-25.0))) < 0
