"""The LivePortrait family's adapter: a motion source, keypoints, stitching and warping.

The avatar is one source portrait (the clip's first frame), prepared once: its
appearance features and keypoints (`avatarfarm.preparation.keypoints`). Per speaking
frame: the audio-to-motion model reads a window of HuBERT rows (the worker's feature
model, as for Ultralight) and gives the 70-value motion (63 expression, scale,
translation 3, pitch/yaw/roll in degrees) relative to the source (in a motion-capture
room, the performer's face motion gives it instead: `motion_of`; in a camera room, the
motion extractor reads the driver's face, and the motion is how far the driver moved from
their first frame read, as LivePortrait drives a portrait from a video); the driving keypoints
are the source's canonical keypoints rotated, deformed, scaled and moved by it
(LivePortrait's transform, here on the host: 21 points); the stitching model corrects
them ([126] -> [65]: 63 offsets and an x/y shift); the warping model draws the face at
512 px from the source's features and both sets of keypoints. Each model is an item
of the batcher, across rooms.

A warping export onnxruntime cannot run (those made for TensorRT use a GridSample3D
plugin op; some builds lacked 5-D GridSample, LivePortrait#150) is refused at load,
saying so.
"""

from __future__ import annotations

import math
import time
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np

from avatarfarm.face_motion import ARKIT, HEAD, INDEX
from avatarfarm.preparation import keypoints
from avatarfarm.preparation.keypoints import SIDE as EXTRACTOR_SIDE
from workers.device.binding import WAV2LIP_LAYOUT, AudioRole, describe
from workers.device.engine import BatchKey
from workers.device.onnx import ModelInterfaceError, OrtModel
from workers.families.base import CameraReading, FaceFamily, Points, Served, WorkerContext
from workers.families.rows import RowStream

if typing.TYPE_CHECKING:
    from avatarfarm.preparation.bundle import Bundle, Manifest
    from workers.models.folder import LivePortraitSpec, ModelFolder

N_KP = 21
MOTION = 70
AUDIO_SHAPE = (16, 1024)

# Face motion onto the expression keypoints LivePortrait's expression editors move (the
# implicit keypoints have no names; these are their roles): the jaw keypoint (19) drops
# as the mouth opens, 14 and 20 rise with a smile, 14 drops with a pucker, the lid
# keypoints (11 left, 15 right; 13 and 16 below them) close over the eyes, the brow
# keypoints (1 left, 2 right) rise. Offsets are in keypoint units at a blendshape of 1
# (an open mouth is ~0.1, as the editors open it), (keypoint, axis, blendshapes, offset).
_EXPRESSION: tuple[tuple[int, int, tuple[str, ...], float], ...] = (
    (19, 1, ("jawOpen",), 0.10),
    (19, 1, ("mouthClose",), -0.05),
    (14, 1, ("mouthSmileLeft", "mouthSmileRight"), -0.010),
    (20, 1, ("mouthSmileLeft", "mouthSmileRight"), -0.005),
    (14, 1, ("mouthPucker", "mouthFunnel"), 0.008),
    (11, 1, ("eyeBlinkLeft",), 0.012),
    (13, 1, ("eyeBlinkLeft",), -0.004),
    (15, 1, ("eyeBlinkRight",), 0.012),
    (16, 1, ("eyeBlinkRight",), -0.004),
    (1, 1, ("browInnerUp", "browOuterUpLeft"), -0.010),
    (2, 1, ("browInnerUp", "browOuterUpRight"), -0.010),
    (1, 1, ("browDownLeft",), 0.006),
    (2, 1, ("browDownRight",), 0.006),
)
_EXP_MAP = np.zeros((len(ARKIT), 3 * N_KP), np.float32)  # blendshapes -> expression offsets
for _kp, _axis, _names, _offset in _EXPRESSION:
    for _name in _names:
        _EXP_MAP[INDEX[_name], 3 * _kp + _axis] += _offset / len(_names)


def motion_of(face: np.ndarray) -> np.ndarray:
    """The 70-value motion (63 expression offsets, scale, translation, pitch/yaw/roll in
    degrees, relative to the source) of one frame of face motion: its blendshapes mapped
    onto the expression keypoints (`_EXPRESSION`), its head rotation passed through, the
    scale and position the source's."""
    mo = np.zeros(MOTION, np.float32)
    mo[:63] = face[:HEAD] @ _EXP_MAP
    mo[67:70] = face[HEAD + 1], face[HEAD], face[HEAD + 2]  # LivePortrait's order: pitch, yaw, roll
    return mo


def rotation(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """LivePortrait's rotation from degrees: (Rz Ry Rx) transposed, to right-multiply."""
    p, y, r = np.radians([pitch, yaw, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return (rz @ ry @ rx).T.astype(np.float32)


def transform(kp: np.ndarray, pose: np.ndarray, exp: np.ndarray, scale: float, t: np.ndarray) -> np.ndarray:
    """Canonical keypoints [21, 3] -> posed: (kp R + exp) * scale, moved by t in x and y."""
    out = (kp.reshape(N_KP, 3) @ rotation(*pose) + exp.reshape(N_KP, 3)) * np.float32(scale)
    out[:, :2] += t[:2]
    return out.astype(np.float32)


def _refuse(name: str, why: str, model: OrtModel) -> ModelInterfaceError:
    return ModelInterfaceError(f"LivePortrait {name} {model.name}: {why}; it has inputs "
                               f"{describe(model.session.get_inputs())} and outputs "
                               f"{describe(model.session.get_outputs())}")


class _Positional:
    """A model fed by position (as FasterLivePortrait feeds its exports) after its
    inputs' ranks are checked; per-item feeds are named by role."""

    def __init__(self, model: OrtModel, roles: tuple[str, ...], ranks: tuple[int, ...], what: str) -> None:
        self.name, self.provider, self.session = model.name, model.provider, model.session
        inputs = self.session.get_inputs()
        if tuple(len(a.shape) for a in inputs) != ranks:
            raise _refuse(what, f"expected inputs of ranks {list(ranks)} ({', '.join(roles)})", model)
        self._names = [a.name for a in inputs]
        self._roles = roles
        self._output = self.session.get_outputs()[0].name

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[typing.Any], float]:
        t0 = time.perf_counter()
        (out,) = self.session.run([self._output], {n: feeds[r] for n, r in zip(self._names, self._roles,
                                                                              strict=True)})
        return [np.asarray(out)], time.perf_counter() - t0


class AudioToMotion(_Positional):
    FEATURES = "features"

    def __init__(self, model: OrtModel) -> None:
        super().__init__(model, (self.FEATURES,), (3,), "audio-to-motion model")
        shape = model.session.get_inputs()[0].shape
        out = model.session.get_outputs()[0].shape
        if list(shape[1:]) != list(AUDIO_SHAPE) or out[-1] != MOTION:
            raise _refuse("audio-to-motion model", "expected features [B, 16, 1024] (8 frames of "
                          "HuBERT rows) -> motion [B, 70]", model)

    def example_item(self) -> dict[str, np.ndarray]:
        return {self.FEATURES: np.random.default_rng(0).normal(-7, 1, AUDIO_SHAPE).astype(np.float32)}


class Stitching(_Positional):
    INPUT = "input"

    def __init__(self, model: OrtModel) -> None:
        super().__init__(model, (self.INPUT,), (2,), "stitching model")
        if model.session.get_inputs()[0].shape[-1] != 2 * 3 * N_KP or \
                model.session.get_outputs()[0].shape[-1] != 3 * N_KP + 2:
            raise _refuse("stitching model", "expected input [B, 126] -> output [B, 65]", model)

    def example_item(self) -> dict[str, np.ndarray]:
        return {self.INPUT: np.zeros(2 * 3 * N_KP, np.float32)}


class Warping(_Positional):
    """``feature_3d``, ``kp_driving``, ``kp_source`` by position (kp_driving before
    kp_source, as FasterLivePortrait feeds them) -> the face [B, 3, 512, 512] BGR 0..1."""

    FEATURE, DRIVING, SOURCE = "feature_3d", "kp_driving", "kp_source"

    def __init__(self, model: OrtModel) -> None:
        super().__init__(model, (self.FEATURE, self.DRIVING, self.SOURCE), (5, 3, 3), "warping model")
        side = model.session.get_outputs()[0].shape[-1]
        self.side = side if isinstance(side, int) else 512

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[typing.Any], float]:
        (rgb,), dt = super().run(feeds)
        return [np.clip(rgb[:, ::-1], 0.0, 1.0)], dt

    def example_item(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        kp = rng.uniform(-0.5, 0.5, (N_KP, 3)).astype(np.float32)
        return {self.FEATURE: rng.normal(0, 1, (32, 16, 64, 64)).astype(np.float32),
                self.DRIVING: kp, self.SOURCE: kp}


def load_warping(load: Callable[[str, Path], OrtModel], name: str, path: Path) -> Warping:
    """The warping model (``load`` opens the session), or a clear refusal where
    onnxruntime cannot run it."""
    try:
        return Warping(load(name, path))
    except ModelInterfaceError as e:
        if "GridSample3D" in str(e) or "NOT_IMPLEMENTED" in str(e) or "No Op registered" in str(e):
            raise ModelInterfaceError(
                f"LivePortrait warping model {name} ({path}) cannot run on this onnxruntime: it "
                "needs 5-D grid sampling that this build does not provide (an export made for "
                "TensorRT's GridSample3D plugin, or a build without 5-D GridSample: "
                "LivePortrait#150); export the warping with the standard GridSample op "
                f"(opset 16 or later). onnxruntime said: {e}") from e
        raise


# A face's motion as the motion extractor gives it, packed: pitch, yaw, roll (degrees),
# translation, expression, scale.
POSE, T, EXP, SCALE = slice(0, 3), slice(3, 6), slice(6, 69), 69
EXTRACTED = ("pitch", "yaw", "roll", "t", "exp", "scale")


class MotionExtractor:
    """LivePortrait's ``motion_extractor``: ``img`` [B, 3, 256, 256] RGB / 255 -> pitch,
    yaw, roll (66 bins each), t [B, 3], exp [B, 63], scale [B, 1] (and kp, unused), bound
    by its outputs' names; packed into [B, 70] (pose in degrees first). An export with
    its batch fixed at 1 runs a batch as that many calls."""

    IMG = "img"

    def __init__(self, model: OrtModel) -> None:
        self.name, self.provider, self.session = model.name, model.provider, model.session
        inputs = self.session.get_inputs()
        outputs = {o.name for o in self.session.get_outputs()}
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or set(EXTRACTED) - outputs:
            raise _refuse("motion extractor", "expected img [B, 3, 256, 256] -> pitch, yaw, roll, t, "
                          "exp, scale (and kp)", model)
        self._input = inputs[0].name
        self._fixed = inputs[0].shape[0] == 1

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[typing.Any], float]:
        t0 = time.perf_counter()
        imgs = feeds[self.IMG]
        calls = [imgs[i:i + 1] for i in range(len(imgs))] if self._fixed else [imgs]
        parts = [dict(zip(EXTRACTED, self.session.run(list(EXTRACTED), {self._input: c}), strict=True))
                 for c in calls]
        got = {k: np.concatenate([np.asarray(p[k], np.float32) for p in parts]) for k in EXTRACTED}
        bins = np.stack([got["pitch"], got["yaw"], got["roll"]], axis=1)  # [B, 3, 66]
        e = np.exp(bins - bins.max(axis=2, keepdims=True))
        pose = (e / e.sum(axis=2, keepdims=True)) @ np.arange(bins.shape[2], dtype=np.float32) * 3.0 - 97.5
        packed = np.concatenate([pose, got["t"], got["exp"], got["scale"][:, :1]], axis=1)
        return [packed.astype(np.float32)], time.perf_counter() - t0

    def example_item(self) -> dict[str, np.ndarray]:
        return {self.IMG: np.full((3, EXTRACTOR_SIDE, EXTRACTOR_SIDE), 0.5, np.float32)}


def relative(driver: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The 70-value motion (relative to the source) of a driver whose extracted motion is
    ``driver``, as far as they moved from ``reference`` (LivePortrait's relative driving:
    expression, translation and pose differences, the scale's ratio)."""
    mo = np.zeros(MOTION, np.float32)
    mo[:63] = driver[EXP] - reference[EXP]
    mo[63] = driver[SCALE] / reference[SCALE] - 1.0 if reference[SCALE] > 1e-6 else 0.0
    mo[64:67] = driver[T] - reference[T]
    mo[67:70] = driver[POSE] - reference[POSE]
    return mo


AUDIO = AudioRole("features float32 [B, 16, 1024]", lambda shape: shape == AUDIO_SHAPE)


class Runtime:
    """LivePortrait on one worker: the folder's audio-to-motion, stitching and warping,
    shared by its avatars; each avatar brings its source's features and keypoints."""

    name = "liveportrait"

    def __init__(self, ctx: WorkerContext, spec: LivePortraitSpec) -> None:
        self._ctx = ctx
        self.spec = spec
        self.a2m = AudioToMotion(ctx.load(f"{spec.name}-a2m", spec.audio_to_motion))
        self.stitching = Stitching(ctx.load(f"{spec.name}-stitching", spec.stitching))
        self.warping = load_warping(ctx.load, f"{spec.name}-warping", spec.warping)
        self.keys = (BatchKey(f"{spec.name}-a2m"), BatchKey(f"{spec.name}-stitching"),
                     BatchKey(f"{spec.name}-warping", self.warping.side))
        # Reads camera drivers' faces (camera rooms); the same model avatars are prepared with.
        self.extractor = MotionExtractor(ctx.load(f"{spec.name}-motion", spec.motion))
        self.motion_key = BatchKey(f"{spec.name}-motion", EXTRACTOR_SIDE)
        self._extractors = keypoints.model_id(spec.appearance.read_bytes(), spec.motion.read_bytes())

    def served(self) -> list[Served]:
        a2m_key, stitch_key, warp_key = self.keys
        return [Served(a2m_key, self.a2m), Served(stitch_key, self.stitching), Served(warp_key, self.warping),
                Served(self.motion_key, self.extractor)]

    def refusal(self, avatar_id: str, manifest: Manifest) -> str | None:
        if self._ctx.features is None or self._ctx.features.kind.name != "hubert":
            return (f"avatar {avatar_id!r} is a LivePortrait avatar and this worker's model folder "
                    "has no HuBERT feature model (hubert.onnx) to drive its audio-to-motion model")
        if manifest.vae_encoder != self._extractors:
            return (f"avatar {avatar_id!r} was prepared with other appearance and motion "
                    "extractors than this worker's: its keypoints would not match; prepare it "
                    "again with this folder's")
        return None

    def family(self, bundle: Bundle) -> FaceFamily:
        features = self._ctx.features
        assert features is not None
        engine, timed = self._ctx.engine, self._ctx.timed
        a2m_key, stitch_key, warp_key = self.keys
        source = bundle.source()
        kp_c, pose, exp = source["kp"], source["pose"], source["exp"]
        scale, t = float(source["scale"].reshape(-1)[0]), source["t"].reshape(-1)
        kp_source = transform(kp_c, pose, exp, scale, t)
        feature_3d = np.ascontiguousarray(source["feature_3d"], np.float32)
        feature_3d.flags.writeable = False  # every room's warping input: stacked once a batch
        rows = features.grid(AUDIO_SHAPE)

        def speech(fps: int, priority: int, on_seconds: Callable[[float], None]) -> RowStream:
            return RowStream(fps, rows, features.silence, self._ctx.submit_features, priority, on_seconds)

        def due(deadline: float) -> tuple[float, float]:
            """When the stitching and the motion before it must be done."""
            if not math.isfinite(deadline):
                return deadline, deadline
            warp_due = deadline - engine.curve(warp_key).seconds(1)
            return warp_due, warp_due - engine.curve(stitch_key).seconds(1)

        async def posed(mo: np.ndarray, deadline: float, priority: int) -> tuple[np.ndarray, float, int]:
            """The source posed by a motion vector, stitched and warped: (face, seconds,
            the warping's batch size)."""
            warp_due, _ = due(deadline)
            driving = transform(kp_c, pose + mo[67:70], exp + mo[:63], scale * (1.0 + float(mo[63])),
                                t + mo[64:67])
            stitch_in = np.concatenate([kp_source.reshape(-1), driving.reshape(-1)])
            s = await engine.infer(stitch_key, {Stitching.INPUT: stitch_in}, warp_due, priority)
            delta = s.outputs[0]
            driving = driving + delta[:3 * N_KP].reshape(N_KP, 3)
            driving[:, :2] += delta[3 * N_KP:3 * N_KP + 2]
            w = await engine.infer(warp_key, {Warping.FEATURE: feature_3d, Warping.DRIVING: driving,
                                              Warping.SOURCE: kp_source}, deadline, priority)
            return w.outputs[0], s.seconds + w.seconds, w.batch_size

        async def redraw(audio: np.ndarray, face: typing.Any, index: int, deadline: float,
                         priority: int) -> typing.Any:
            m = await engine.infer(a2m_key, {AudioToMotion.FEATURES: audio}, due(deadline)[1], priority)
            out, seconds, batch = await posed(m.outputs[0], deadline, priority)
            return timed(out, m.seconds + seconds, batch)

        async def drive(motion: np.ndarray, face: typing.Any, index: int, deadline: float,
                        priority: int) -> typing.Any:
            out, seconds, batch = await posed(motion_of(motion), deadline, priority)
            return timed(out, seconds, batch)

        async def read(crop: np.ndarray, deadline: float, priority: int) -> typing.Any:
            m = await engine.infer(self.motion_key, {MotionExtractor.IMG: crop}, due(deadline)[1], priority)
            return timed(m.outputs[0], m.seconds, m.batch_size)

        async def drive_camera(mo: np.ndarray, face: typing.Any, index: int, deadline: float,
                               priority: int) -> typing.Any:
            out, seconds, batch = await posed(mo, deadline, priority)
            return timed(out, seconds, batch)

        camera = CameraReading(EXTRACTOR_SIDE, read, relative, drive_camera, motion_of)
        return FaceFamily(self.name, warp_key, WAV2LIP_LAYOUT, AUDIO, speech, redraw, drive, camera)

    def renders(self) -> list[str]:
        features = self._ctx.features
        return ["liveportrait"] if features is not None and features.kind.name == "hubert" else []

    def release(self, key: BatchKey) -> bool:
        return False  # the folder's models serve every avatar of the family

    def face_keys(self) -> list[BatchKey]:
        return [self.keys[2]]

    def face_profile(self, key: BatchKey) -> tuple[str, Points] | None:
        if key not in self.keys:
            return None
        a2m, stitch, warp = (self._ctx.engine.curve(k) for k in self.keys)
        return (f"liveportrait/{self.spec.name}",
                tuple((b, s + a2m.seconds(b) + stitch.seconds(b)) for b, s in warp.points))


def load(folder: ModelFolder, ctx: WorkerContext) -> Runtime | None:
    """The folder's LivePortrait models (its ``"liveportrait"`` entry)."""
    return Runtime(ctx, folder.liveportrait) if folder.liveportrait is not None else None
