"""LivePortrait's preparation: the source portrait's appearance and keypoints, once per avatar.

LivePortrait animates one source image: its appearance features (``feature_3d``
[32, 16, 64, 64] from ``appearance_feature_extractor``) and its implicit keypoints and
pose (``motion_extractor``: canonical keypoints, pitch/yaw/roll as 66 bins each,
expression, scale, translation) are computed here, from a 256 px crop of the clip's
first frame, and stored in the bundle (``source.npz``); workers run only the motion
source, the stitching and the warping. Both extractors are the user's ONNX exports
(RGB / 255 in).
"""

from __future__ import annotations

import hashlib

import numpy as np

from avatarfarm.preparation.faces import PreparationError

SIDE = 256


def model_id(appearance: bytes, motion: bytes) -> str:
    return hashlib.sha256(hashlib.sha256(appearance).digest() + hashlib.sha256(motion).digest()).hexdigest()


def degrees(bins: np.ndarray) -> float:
    """A 66-bin head angle -> degrees: softmax . index * 3 - 97.5 (LivePortrait's)."""
    e = np.exp(bins - bins.max())
    return float((e / e.sum()) @ np.arange(bins.size) * 3.0 - 97.5)


def source_of(crop_bgr: np.ndarray, appearance: bytes, motion: bytes) -> dict[str, np.ndarray]:
    """The source's features and motion from its [256, 256, 3] uint8 BGR crop."""
    import onnxruntime as ort

    img = np.ascontiguousarray(crop_bgr[:, :, ::-1].transpose(2, 0, 1)[None], np.float32) / 255.0
    out: dict[str, np.ndarray] = {}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for role, model in (("appearance_feature_extractor", appearance), ("motion_extractor", motion)):
        try:
            s = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
            (inp,) = s.get_inputs()
            results = s.run(None, {inp.name: img})
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise PreparationError(f"the {role} does not run on a [1, 3, 256, 256] image: {e}") from e
        named = {o.name: np.asarray(r, np.float32) for o, r in zip(s.get_outputs(), results, strict=True)}
        if role == "appearance_feature_extractor":
            volumes = [v for v in named.values() if v.ndim == 5]
            if len(volumes) != 1:
                raise PreparationError(f"the {role} gives {[list(v.shape) for v in named.values()]}; "
                                       "expected feature_3d [1, 32, 16, 64, 64]")
            out["feature_3d"] = volumes[0][0]
        else:
            missing = {"pitch", "yaw", "roll", "t", "exp", "scale", "kp"} - set(named)
            if missing:
                raise PreparationError(f"the {role} has outputs {sorted(named)}; missing {sorted(missing)}")
            for k in ("t", "exp", "scale", "kp"):
                out[k] = named[k][0]
            out["pose"] = np.array([degrees(named[k][0]) for k in ("pitch", "yaw", "roll")], np.float32)
    return out
