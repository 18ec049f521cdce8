"""Stand-ins for LivePortrait (implicit keypoints, warping) and an audio-driven motion
model, built from numpy with fixed seeds, with the public signatures (MODELS.md,
"LivePortrait"):

* ``appearance_feature_extractor``: ``img`` [1, 3, 256, 256] RGB / 255 -> ``feature_3d``
  [1, 32, 16, 64, 64];
* ``motion_extractor``: ``img`` [1, 3, 256, 256] -> ``pitch``, ``yaw``, ``roll`` [1, 66]
  (bins: degrees = softmax . index * 3 - 97.5), ``t`` [1, 3], ``exp`` [1, 63], ``scale``
  [1, 1], ``kp`` [1, 63] (21 canonical keypoints);
* ``stitching``: ``input`` [B, 126] (source and driving keypoints) -> ``output`` [B, 65]
  (63 keypoint offsets, then an x and y shift);
* ``warping_spade``: ``feature_3d`` [B, 32, 16, 64, 64], ``kp_driving`` [B, 21, 3],
  ``kp_source`` [B, 21, 3] -> ``out`` [B, 3, 512, 512] RGB in 0..1;
* the audio-to-motion model (audio-driven variants): ``features`` [B, 16, 1024] (a
  window of HuBERT rows, 8 frames) -> ``motion`` [B, 70]: 63 expression offsets, a scale
  offset, 3 translation and pitch, yaw, roll in degrees, relative to the source.

Behaviour: the appearance features hold the portrait at 64 px in their first three
channels at every depth; the motion extractor reports a frontal pose and a fixed
canonical face (`KEYPOINTS`), whose mouth keypoints are LivePortrait's as its expression
editors move them: `JAW` (19) drops (+y) as the mouth opens, `LIP` (17) stays; its
expression drops the jaw keypoint as far as the face's mouth is open (dark against its
cheeks: a camera driver's face, read frame by frame, drives the avatar's mouth); the audio
model drops the jaw keypoint in proportion to the band power of the frame's own rows;
the warping shifts the feature volume by the keypoints' mean motion (a real 5-D
GridSample, the op some onnxruntime builds lacked, LivePortrait#150), scales it to
512 px and opens the mouth by how far the jaw keypoint dropped from the lip's; each adds a convolution stack's bounded
residual, at a realistic cost.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from workers.models.reference import finish_model
from workers.models.ultralight import BANDS, FEATURE_WIDTH
from workers.models.wav2lip import Graph, Wav2LipCost, conv_stack, shade_mouth

N_KP = 21
LIP, JAW = 17, 19  # mouth keypoints: JAW drops as the mouth opens
SIDE = 256
OUT_SIDE = 512
FEATURE_SHAPE = (32, 16, 64, 64)
AUDIO_ROWS = 16
MOTION = 70
# The opening's keypoint offset at full speech, and the band power that gives it.
LIP_DROP = 0.08
OPEN_FROM, OPEN_SPAN = -8.5, 1.5


def _canonical() -> np.ndarray:
    """21 keypoints of a frontal face in [-1, 1]^3 (x right, y down)."""
    rng = np.random.default_rng(31)
    kp = rng.uniform(-0.6, 0.6, (N_KP, 3)).astype(np.float32) * np.array([1, 1, 0.2], np.float32)
    kp[LIP] = (0.0, 0.40, 0.05)
    kp[JAW] = (0.0, 0.46, 0.05)
    return kp


KEYPOINTS = _canonical()


def _finish(g: Graph, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
            doc: str) -> onnx.ModelProto:
    return finish_model(helper.make_graph(g.nodes, name, inputs, outputs, g.used_inits()), doc)


def _value(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def build_appearance_extractor(*, seed: int = 37) -> onnx.ModelProto:
    g = Graph(np.random.default_rng(seed))
    small = g.op("AveragePool", ["img"], "small", kernel_shape=[4, 4], strides=[4, 4])  # [1, 3, 64, 64]
    feats = g.conv(small, 3, FEATURE_SHAPE[0] * FEATURE_SHAPE[1] - 3, stem="feat")
    scaled = g.op("Mul", [feats, g.init("feat.k", np.array(0.01, np.float32))], "feat.scaled")
    both = g.op("Concat", [small, scaled], "both", axis=1)  # [1, 512, 64, 64]
    # [1, 16 depths, 32 channels, 64, 64], then channels first: the portrait's RGB is
    # channels 0-2 of depth 0.
    vol = g.op("Reshape", [both, g.init("vol", np.array([1, 16, 32, 64, 64], np.int64))], "vol")
    g.nodes.append(helper.make_node("Transpose", [vol], ["feature_3d"], name="feature_3d",
                                    perm=[0, 2, 1, 3, 4]))
    return _finish(g, "appearance_feature_extractor", [_value("img", [1, 3, SIDE, SIDE])],
                   [_value("feature_3d", [1, *FEATURE_SHAPE])], "avatarfarm LivePortrait appearance stand-in")


# Where the mouth and cheeks are in a 256 px face crop (the detector's box with the chin
# margin below, as avatars and camera drivers are cropped), as shares of its side.
MOUTH = (0.40, 0.60, 0.68, 0.78)
CHEEKS = ((0.18, 0.32, 0.49, 0.61), (0.68, 0.82, 0.49, 0.61))
# How much darker than the cheeks a mouth is before it counts as open, and the jaw's
# expression offset per unit of darkness past that (a wide-open mouth, ~0.65: ~0.1).
MOUTH_SHUT, JAW_GAIN = 0.1, 0.18


def _regions(boxes: list[tuple[float, float, float, float]], weights: list[float]) -> np.ndarray:
    """[SIDE * SIDE, 1] weights: each box's pixels averaged, times its weight, summed."""
    w = np.zeros((SIDE, SIDE), np.float32)
    for (x0, x1, y0, y1), k in zip(boxes, weights, strict=True):
        r = np.zeros((SIDE, SIDE), np.float32)
        r[round(y0 * SIDE):round(y1 * SIDE), round(x0 * SIDE):round(x1 * SIDE)] = 1.0
        w += k * r / r.sum()
    return w.reshape(-1, 1)


def build_motion_extractor(*, width: int = 32, seed: int = 41) -> onnx.ModelProto:
    g = Graph(np.random.default_rng(seed))
    # The face reports a frontal pose, the canonical keypoints, and the jaw keypoint's drop
    # as far as the mouth is open (dark against the cheeks).
    luma = g.op("Conv", ["img", g.init("luma", np.array([0.299, 0.587, 0.114], np.float32).reshape(1, 3, 1, 1))],
                "luma", kernel_shape=[1, 1])
    flat = g.op("Flatten", [luma], "flat", axis=1)  # [1, S*S]
    dark = g.op("MatMul", [flat, g.init("mouth", _regions([*CHEEKS, MOUTH], [0.5, 0.5, -1.0]))],
                "dark")  # [1, 1]: cheeks less mouth
    jaw = g.op("Mul", [g.op("Relu", [g.op("Sub", [dark, g.init("shut", np.array(MOUTH_SHUT, np.float32))],
                                          "past")], "open"), g.init("gain", np.array(JAW_GAIN, np.float32))],
               "jaw")  # [1, 1]
    onehot = np.zeros((1, 63), np.float32)
    onehot[0, 3 * JAW + 1] = 1.0
    # The cost of a keypoint network: strided convolutions over the face, pooled, projected
    # to a term of at most 1e-6 (bounded: it never moves a value).
    x = g.conv("img", 3, width, stride=(2, 2), stem="c1")
    for i in range(2, 5):
        x = g.conv(x, width * 2 ** (i - 2), width * 2 ** (i - 1), stride=(2, 2), stem=f"c{i}")
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x], "pool")], "pooled", axis=1)
    w = g.rng.standard_normal((width * 8, 1), np.float32) * np.float32(0.1 / np.sqrt(width * 8))
    term = g.op("Mul", [g.op("Tanh", [g.op("MatMul", [pooled, g.init("proj", w)], "proj")], "bounded"),
                        g.init("tiny", np.array(1e-6, np.float32))], "term")  # [1, 1]
    bins = np.full(66, -10.0, np.float32)
    bins[32] = bins[33] = 10.0  # softmax . index * 3 - 97.5 = 0 degrees: frontal
    outs = {"pitch": bins, "yaw": bins, "roll": bins, "t": np.zeros(3, np.float32),
            "exp": np.zeros(63, np.float32), "scale": np.ones(1, np.float32),
            "kp": KEYPOINTS.reshape(-1)}
    for name, value in outs.items():
        base = g.op("Add", [g.init(f"{name}.v", value[None]), term], f"{name}.base")
        if name == "exp":
            g.nodes.append(helper.make_node("Add", [base, g.op("Mul", [jaw, g.init("jaw.at", onehot)], "exp.jaw")],
                                            [name], name=name))
        else:
            g.nodes.append(helper.make_node("Identity", [base], [name], name=name))
    return _finish(g, "motion_extractor", [_value("img", [1, 3, SIDE, SIDE])],
                   [_value(n, [1, len(v)]) for n, v in outs.items()], "avatarfarm LivePortrait motion stand-in")


def build_stitching(*, seed: int = 43) -> onnx.ModelProto:
    g = Graph(np.random.default_rng(seed))
    w1 = g.rng.standard_normal((126, 128), np.float32) * np.float32(np.sqrt(2 / 126))
    w2 = g.rng.standard_normal((128, 65), np.float32) * np.float32(1e-4)
    h = g.op("Relu", [g.op("MatMul", ["input", g.init("w1", w1)], "fc1")], "fc1.relu")
    g.nodes.append(helper.make_node("MatMul", [h, g.init("w2", w2)], ["output"], name="fc2"))
    return _finish(g, "stitching", [_value("input", ["B", 126])], [_value("output", ["B", 65])],
                   "avatarfarm LivePortrait stitching stand-in")


def build_audio_to_motion(*, seed: int = 47) -> onnx.ModelProto:
    g = Graph(np.random.default_rng(seed))
    own = g.op("Slice", ["features", g.init("own.from", np.array([AUDIO_ROWS // 2, 0], np.int64)),
                         g.init("own.to", np.array([AUDIO_ROWS // 2 + 2, BANDS], np.int64)),
                         g.init("own.axes", np.array([1, 2], np.int64))], "own")
    energy = g.op("ReduceMean", [own], "energy", axes=[1, 2], keepdims=0)  # [B]
    opening = g.op("Clip", [g.op("Div", [g.op("Sub", [energy, g.init("from", np.array(OPEN_FROM, np.float32))],
                                              "shift"), g.init("span", np.array(OPEN_SPAN, np.float32))],
                                 "scale"), g.zero, g.one], "opening")
    per = np.zeros((1, MOTION), np.float32)
    per[0, JAW * 3 + 1] = LIP_DROP  # the jaw keypoint moves down (y) as the mouth opens
    col = g.op("Unsqueeze", [opening, g.init("ax", np.array([1], np.int64))], "opening.col")
    motion = g.op("Mul", [col, g.init("lips", per)], "motion.lips")
    # The cost: a small MLP over the window (a JoyVASA-class model is small).
    flat = g.op("ReduceMean", ["features"], "pool", axes=[1], keepdims=0)  # [B, 1024]
    w1 = g.rng.standard_normal((FEATURE_WIDTH, 512), np.float32) * np.float32(np.sqrt(2 / FEATURE_WIDTH))
    w2 = g.rng.standard_normal((512, MOTION), np.float32) * np.float32(1e-5)
    h = g.op("Relu", [g.op("MatMul", [flat, g.init("w1", w1)], "fc1")], "fc1.relu")
    g.nodes.append(helper.make_node("Add", [motion, g.op("MatMul", [h, g.init("w2", w2)], "fc2")],
                                    ["motion"], name="motion"))
    return _finish(g, "audio_to_motion", [_value("features", ["B", AUDIO_ROWS, FEATURE_WIDTH])],
                   [_value("motion", ["B", MOTION])], "avatarfarm audio-to-motion (70) stand-in")


WARP_PRESETS: dict[str, Wav2LipCost] = {
    "tiny": Wav2LipCost(width=4, levels=2, depth=0, max_width=8, audio_width=4),
    # LivePortrait's warping and SPADE generator: tens of GMAC a frame (~46 here).
    "liveportrait": Wav2LipCost(width=16, levels=4, depth=2, max_width=256, audio_width=16),
}


def build_warping(cost: Wav2LipCost | None = None, *, seed: int = 53) -> onnx.ModelProto:
    cost = cost or WARP_PRESETS["liveportrait"]
    g = Graph(np.random.default_rng(seed))
    # The keypoints' mean motion shifts the volume: a grid of [B, 16, 64, 64, 3].
    motion = g.op("ReduceMean", [g.op("Sub", ["kp_driving", "kp_source"], "kp.delta")], "kp.mean",
                  axes=[1], keepdims=1)  # [B, 1, 3]
    lin = [np.linspace(-1, 1, n, dtype=np.float32) for n in (16, 64, 64)]
    z, y, x = np.meshgrid(*lin, indexing="ij")
    base = np.stack([x, y, z], axis=-1)[None]  # [1, 16, 64, 64, 3] (x, y, z)
    shift = g.op("Reshape", [motion, g.init("shift", np.array([-1, 1, 1, 1, 3], np.int64))], "shift.5d")
    grid = g.op("Sub", [g.init("grid", base), shift], "grid")
    warped = g.op("GridSample", ["feature_3d", grid], "warp", align_corners=0,
                  padding_mode="border")  # [B, 32, 16, 64, 64]
    front = g.op("Slice", [warped, g.init("d.from", np.array([0, 0], np.int64)),
                           g.init("d.to", np.array([3, 1], np.int64)),
                           g.init("d.axes", np.array([1, 2], np.int64))], "front")  # [B, 3, 1, 64, 64]
    rgb = g.op("Squeeze", [front, g.init("sq", np.array([2], np.int64))], "rgb")
    image = g.op("Resize", [rgb, "", g.init("scales", np.array([1, 1, 8, 8], np.float32))], "image",
                 mode="linear")
    # The mouth opens as the jaw keypoint dropped from the lip's.
    lips = g.op("Slice", [g.op("Sub", ["kp_driving", "kp_source"], "kp.d2"),
                          g.init("l.from", np.array([LIP, 1], np.int64)),
                          g.init("l.to", np.array([JAW + 1, 2], np.int64)),
                          g.init("l.axes", np.array([1, 2], np.int64))], "lips")  # [B, 3, 1]
    sign = np.zeros((1, JAW - LIP + 1, 1), np.float32)
    sign[0, 0, 0], sign[0, -1, 0] = -1.0, 1.0
    apart = g.op("ReduceSum", [g.op("Mul", [lips, g.init("sign", sign)], "signed"),
                               g.init("ax12", np.array([1, 2], np.int64))], "apart", keepdims=0)
    energy = g.op("Reshape", [apart, g.init("e", np.array([-1, 1, 1, 1], np.int64))], "apart.4d")
    drawn = shade_mouth(g, image, energy, 0.005, LIP_DROP * 0.8, OUT_SIDE, tint=(0.30, 0.06, 0.08))
    small = g.op("Reshape", [warped, g.init("flat", np.array([0, 512, 64, 64], np.int64))], "flat")
    head = g.conv(small, 512, 6, kernel=1, pads=(0, 0, 0, 0), stem="head.in")
    up = g.op("Resize", [head, "", g.init("up", np.array([1, 1, 8, 8], np.float32))], "head.up", mode="nearest")

    def keypoints(c: int) -> str:  # [B, c, 1, 1] from the driving keypoints, at the bottleneck
        w = g.rng.standard_normal((N_KP * 3, c), np.float32) * np.float32(np.sqrt(1 / (N_KP * 3)))
        flat_kp = g.op("Reshape", ["kp_driving", g.init("kp.flat", np.array([-1, N_KP * 3], np.int64))], "kp.flat")
        y = g.op("MatMul", [flat_kp, g.init("kp.w", w)], "kp.proj")
        return g.op("Reshape", [y, g.init("kp.shape", np.array([-1, c, 1, 1], np.int64))], "kp.vec")

    residual = conv_stack(g, up, cost, keypoints)
    raw = g.op("Add", [drawn, residual], "raw")
    g.nodes.append(helper.make_node("Clip", [raw, g.zero, g.one], ["out"], name="clip"))
    return _finish(g, "warping_spade",
                   [_value("feature_3d", ["B", *FEATURE_SHAPE]), _value("kp_driving", ["B", N_KP, 3]),
                    _value("kp_source", ["B", N_KP, 3])],
                   [_value("out", ["B", 3, OUT_SIDE, OUT_SIDE])],
                   f"avatarfarm LivePortrait warping stand-in c{cost.width} l{cost.levels}")
