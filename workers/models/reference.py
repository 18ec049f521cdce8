"""Reference ONNX models, built from numpy with fixed seeds (no weights to download).

Two models with the interfaces a real avatar stack has:

* ``audio_to_motion``: log-mel window ``mel`` [B, 80, 16] -> ``motion`` [B, 8].
  A 1-D conv encoder over time (the cost and shape of a Wav2Lip-style audio
  encoder) plus an analytic energy head: voiced, loud audio opens the jaw,
  silence closes it, spectral tilt picks wide vs round lips. The conv features
  add small speech-driven head motion.
* ``renderer``: ``avatar`` [B, 3, S, S] in [0, 1] and ``motion`` [B, 8] ->
  ``frame`` [B, 3, S, S]. A low-resolution flow field (one basis field per
  motion coefficient, mixed by the motion) is upsampled and applied with
  GridSample (the warping idea of LivePortrait-style renderers), the mouth
  cavity is shaded by jaw opening, and a stack of 3x3 convolutions refines the
  frame at full resolution. Width and depth of that stack set the cost per
  frame, so the same graph stands in for a cheap CPU model or a realistic GPU
  one (tens of GMAC per 256x256 frame).

Any user model with the same input and output names and shapes loads the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from workers.media.audio import LOG_FLOOR, MEL_WINDOW, N_MELS
from workers.media.motion import MOTION_DIM, Coef
from workers.models.template import TEMPLATE, FaceTemplate

OPSET = 17
FLOW_GRID = 64


@dataclass(frozen=True, slots=True)
class RendererSize:
    """Width and depth of the refinement stack: the knob for cost per frame."""

    channels: int
    depth: int

    def gmac_per_frame(self, side: int) -> float:
        c, d = self.channels, self.depth
        macs_per_pixel = 9 * (3 * c + max(d - 2, 0) * c * c + c * 3)
        return side * side * macs_per_pixel / 1e9


RENDERER_PRESETS: dict[str, RendererSize] = {
    # Cheap enough for a 2-core laptop to stream a few rooms in real time.
    "lite": RendererSize(channels=8, depth=3),
    # ~22 GMAC per 256x256 frame, between Wav2Lip-256 and Wav2Lip-384.
    "standard": RendererSize(channels=96, depth=6),
}


def _const(name: str, arr: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))


def _conv_weight(rng: np.random.Generator, c_out: int, c_in: int, *k: int) -> np.ndarray:
    fan_in = c_in * int(np.prod(k))
    return (rng.standard_normal((c_out, c_in, *k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def build_audio_to_motion(channels: int = 128, layers: int = 4, seed: int = 7) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    # Conv encoder over time: [B, 80, T] -> [B, C, T] -> mean over T -> [B, C].
    # Input is shifted so silence is exactly zero: with zero biases, silence then
    # gives zero features and a still head.
    nodes.append(_const("mel.floor", np.array(LOG_FLOOR, np.float32)))
    nodes.append(helper.make_node("Sub", ["mel", "mel.floor"], ["mel.c"]))
    x, c_in = "mel.c", N_MELS
    for i in range(layers):
        w = numpy_helper.from_array(_conv_weight(rng, channels, c_in, 3), f"enc{i}.w")
        b = numpy_helper.from_array(np.zeros(channels, np.float32), f"enc{i}.b")
        inits += [w, b]
        nodes.append(helper.make_node("Conv", [x, w.name, b.name], [f"enc{i}"], pads=[1, 1]))
        nodes.append(helper.make_node("Relu", [f"enc{i}"], [f"enc{i}.r"]))
        x, c_in = f"enc{i}.r", channels
    nodes.append(helper.make_node("ReduceMean", [x], ["feat"], axes=[2], keepdims=0))
    # Speech-driven head motion, small (at most 0.15) by construction.
    w_head = (rng.standard_normal((channels, 3)) * 0.02).astype(np.float32)
    inits.append(numpy_helper.from_array(w_head, "head.w"))
    nodes.append(helper.make_node("MatMul", ["feat", "head.w"], ["head.raw"]))
    nodes.append(helper.make_node("Tanh", ["head.raw"], ["head.t"]))
    nodes.append(_const("head.scale", np.array(0.15, np.float32)))
    nodes.append(helper.make_node("Mul", ["head.t", "head.scale"], ["head"]))

    # Energy head: recent-weighted log-mel per band -> speech energy and tilt.
    tw = np.exp(np.linspace(-2.0, 0.0, MEL_WINDOW)).astype(np.float32)
    tw /= tw.sum()
    inits.append(numpy_helper.from_array(tw.reshape(MEL_WINDOW, 1), "time.w"))
    nodes.append(helper.make_node("MatMul", ["mel", "time.w"], ["band3d"]))
    nodes.append(_const("band.shape", np.array([-1, N_MELS], np.int64)))
    nodes.append(helper.make_node("Reshape", ["band3d", "band.shape"], ["band"]))
    bands = np.zeros((N_MELS, 3), np.float32)
    bands[5:60, 0] = 1.0 / 55  # speech band
    bands[5:25, 1] = 1.0 / 20  # low
    bands[40:75, 2] = 1.0 / 35  # high
    inits.append(numpy_helper.from_array(bands, "bands.w"))
    nodes.append(helper.make_node("MatMul", ["band", "bands.w"], ["e3"]))
    # Affine per output: jaw = sig(1.8 (e + 2.2)); tiltgate = sig(1.2 ((hi - lo) + 2.1));
    # brow = sig(2.0 (e + 1.0)).
    mix = np.array([[1.8, 0.0, 2.0], [0.0, -1.2, 0.0], [0.0, 1.2, 0.0]], np.float32)
    bias = np.array([1.8 * 2.2, 1.2 * 2.1, 2.0 * 1.0], np.float32)
    inits += [numpy_helper.from_array(mix, "gate.w"), numpy_helper.from_array(bias, "gate.b")]
    nodes.append(helper.make_node("Gemm", ["e3", "gate.w", "gate.b"], ["gate.raw"]))
    nodes.append(helper.make_node("Sigmoid", ["gate.raw"], ["gate"]))
    nodes.append(helper.make_node("Split", ["gate"], ["jaw", "tilt", "brow.g"], axis=1))
    nodes.append(helper.make_node("Mul", ["tilt", "jaw"], ["wide"]))
    nodes.append(_const("one", np.array(1.0, np.float32)))
    nodes.append(helper.make_node("Sub", ["one", "tilt"], ["untilt"]))
    nodes.append(helper.make_node("Mul", ["untilt", "jaw"], ["round.r"]))
    nodes.append(_const("round.scale", np.array(0.6, np.float32)))
    nodes.append(helper.make_node("Mul", ["round.r", "round.scale"], ["round"]))
    nodes.append(_const("brow.scale", np.array(0.35, np.float32)))
    nodes.append(helper.make_node("Mul", ["brow.g", "brow.scale"], ["brow"]))
    # Blink is idle's business: zero column shaped like jaw.
    nodes.append(helper.make_node("Sub", ["jaw", "jaw"], ["blink"]))
    order = {Coef.JAW_OPEN: "jaw", Coef.MOUTH_WIDE: "wide", Coef.MOUTH_ROUND: "round",
             Coef.BLINK: "blink", Coef.BROW_RAISE: "brow"}
    assert len(order) + 3 == MOTION_DIM
    nodes.append(helper.make_node("Concat", [order[Coef(i)] for i in range(5)] + ["head"],
                                  ["motion"], axis=1))

    graph = helper.make_graph(
        nodes, "audio_to_motion",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["B", N_MELS, MEL_WINDOW])],
        [helper.make_tensor_value_info("motion", TensorProto.FLOAT, ["B", MOTION_DIM])],
        inits,
    )
    return finish_model(graph, "avatarfarm reference audio-to-motion")


def _gauss(u: np.ndarray, v: np.ndarray, c: tuple[float, float], r: tuple[float, float]) -> np.ndarray:
    return np.exp(-(((u - c[0]) / r[0]) ** 2) - ((v - c[1]) / r[1]) ** 2)


def flow_basis(t: FaceTemplate = TEMPLATE, g: int = FLOW_GRID) -> tuple[np.ndarray, np.ndarray]:
    """One displacement field per coefficient, [MOTION_DIM, 2, g, g], in GridSample's
    normalised units (backward warp: output(p) = input(p + flow(p))), and the
    mouth-cavity mask [g, g]."""
    v, u = np.meshgrid(np.linspace(0, 1, g), np.linspace(0, 1, g), indexing="ij")
    basis = np.zeros((MOTION_DIM, 2, g, g), np.float32)
    mx, my = t.mouth_center
    below = 1.0 / (1.0 + np.exp(-(v - my) / 0.008))
    lower = _gauss(u, v, (mx, (my + t.chin_v) / 2), (0.16, 0.11)) * below
    upper = _gauss(u, v, (mx, my - 0.02), (0.08, 0.03)) * (1 - below)
    basis[Coef.JAW_OPEN, 1] = -0.09 * lower + 0.015 * upper
    mouth = _gauss(u, v, (mx, my), (0.10, 0.05))
    basis[Coef.MOUTH_WIDE, 0] = -0.35 * (u - mx) * 2 * mouth
    basis[Coef.MOUTH_ROUND, 0] = 0.30 * (u - mx) * 2 * mouth
    # Blink samples the lid skin just above each eye over the eye.
    eyes = sum(_gauss(u, v, e, (t.eye_radii[0] * 1.5, t.eye_radii[1] * 1.3))
               for e in (t.eye_left, t.eye_right))
    basis[Coef.BLINK, 1] = -1.2 * t.eye_radii[1] * 2 * np.minimum(eyes, 1.0)
    brows = sum(_gauss(u, v, (e[0], t.brow_v), (0.06, 0.03)) for e in (t.eye_left, t.eye_right))
    basis[Coef.BROW_RAISE, 1] = 0.03 * np.minimum(brows, 1.0)
    head = _gauss(u, v, t.head_center, (t.head_radii[0] * 1.5, t.head_radii[1] * 1.4))
    basis[Coef.HEAD_YAW, 0] = -0.05 * head
    basis[Coef.HEAD_PITCH, 1] = -0.035 * head
    pivot = (t.head_center[0], t.chin_v + 0.05)
    basis[Coef.HEAD_ROLL, 0] = -0.12 * (v - pivot[1]) * 2 * head
    basis[Coef.HEAD_ROLL, 1] = 0.12 * (u - pivot[0]) * 2 * head
    cavity = _gauss(u, v, (mx, my + 0.025), (t.mouth_half_width * 0.8, 0.028)).astype(np.float32)
    return basis, cavity


def build_renderer(size: RendererSize = RENDERER_PRESETS["lite"], seed: int = 11,
                   template: FaceTemplate = TEMPLATE) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    g = FLOW_GRID
    basis, cavity = flow_basis(template, g)
    lin = np.linspace(-1.0, 1.0, g, dtype=np.float32)
    ident = np.stack([np.broadcast_to(lin[None, :], (g, g)), np.broadcast_to(lin[:, None], (g, g))])
    nodes: list[onnx.NodeProto] = []
    inits = [
        numpy_helper.from_array(basis.reshape(MOTION_DIM, -1), "flow.basis"),
        numpy_helper.from_array(ident.reshape(1, -1).astype(np.float32), "flow.identity"),
        numpy_helper.from_array(cavity.reshape(1, -1), "cavity.mask"),
    ]
    # Output size (N, C, S, S) of an upsampled low-res map: [B, C] from the map, [S, S] from avatar.
    nodes += [
        helper.make_node("Shape", ["avatar"], ["av.shape"]),
        _const("i2", np.array([2], np.int64)), _const("i4", np.array([4], np.int64)),
        _const("i0", np.array([0], np.int64)), _const("i1", np.array([1], np.int64)),
        helper.make_node("Slice", ["av.shape", "i2", "i4"], ["hw"]),
        helper.make_node("Slice", ["av.shape", "i0", "i1"], ["bdim"]),
        _const("two", np.array([2], np.int64)),
        helper.make_node("Concat", ["bdim", "two", "hw"], ["flow.size"], axis=0),
        helper.make_node("Concat", ["bdim", "i1", "hw"], ["mask.size"], axis=0),
        _const("flow.lowres", np.array([-1, 2, g, g], np.int64)),
        _const("mask.lowres", np.array([-1, 1, g, g], np.int64)),
    ]
    # Flow: identity + motion @ basis, upsampled; align_corners keeps identity exact.
    nodes += [
        helper.make_node("MatMul", ["motion", "flow.basis"], ["flow.mix"]),
        helper.make_node("Add", ["flow.mix", "flow.identity"], ["grid.flat"]),
        helper.make_node("Reshape", ["grid.flat", "flow.lowres"], ["grid.low"]),
        helper.make_node("Resize", ["grid.low", "", "", "flow.size"], ["grid.up"], mode="linear",
                         coordinate_transformation_mode="align_corners"),
        helper.make_node("Transpose", ["grid.up"], ["grid"], perm=[0, 2, 3, 1]),
        helper.make_node("GridSample", ["avatar", "grid"], ["warped"], mode="bilinear",
                         padding_mode="border", align_corners=1),
    ]
    # Mouth cavity: shade towards a dark red, in proportion to jaw opening.
    nodes += [
        _const("jaw.start", np.array([0], np.int64)), _const("jaw.end", np.array([1], np.int64)),
        helper.make_node("Slice", ["motion", "jaw.start", "jaw.end", "i1"], ["jaw"]),
        _const("zero", np.array(0.0, np.float32)),
        helper.make_node("Max", ["jaw", "zero"], ["jaw.pos"]),
        helper.make_node("MatMul", ["jaw.pos", "cavity.mask"], ["cav.flat"]),
        helper.make_node("Reshape", ["cav.flat", "mask.lowres"], ["cav.low"]),
        helper.make_node("Resize", ["cav.low", "", "", "mask.size"], ["cav"], mode="linear",
                         coordinate_transformation_mode="align_corners"),
        _const("cav.depth", np.array(0.9, np.float32)),
        helper.make_node("Mul", ["cav", "cav.depth"], ["cav.a"]),
        _const("one", np.array(1.0, np.float32)),
        helper.make_node("Sub", ["one", "cav.a"], ["keep"]),
        helper.make_node("Mul", ["warped", "keep"], ["shaded.base"]),
        _const("cav.color", np.array([0.32, 0.06, 0.08], np.float32).reshape(1, 3, 1, 1)),
        helper.make_node("Mul", ["cav.a", "cav.color"], ["cav.tint"]),
        helper.make_node("Add", ["shaded.base", "cav.tint"], ["shaded"]),
    ]
    # Refinement: a residual conv stack at full resolution (the cost knob).
    x, c_in = "shaded", 3
    for i in range(size.depth):
        c_out = 3 if i == size.depth - 1 else size.channels
        w = _conv_weight(rng, c_out, c_in, 3, 3)
        if c_out == 3:
            w *= 0.1
        inits += [numpy_helper.from_array(w, f"ref{i}.w"),
                  numpy_helper.from_array(np.zeros(c_out, np.float32), f"ref{i}.b")]
        nodes.append(helper.make_node("Conv", [x, f"ref{i}.w", f"ref{i}.b"], [f"ref{i}"],
                                      pads=[1, 1, 1, 1]))
        if c_out != 3:
            nodes.append(helper.make_node("Relu", [f"ref{i}"], [f"ref{i}.r"]))
            x = f"ref{i}.r"
        c_in = c_out
    nodes += [
        helper.make_node("Tanh", [f"ref{size.depth - 1}"], ["resid.t"]),
        _const("resid.scale", np.array(0.02, np.float32)),
        helper.make_node("Mul", ["resid.t", "resid.scale"], ["resid"]),
        helper.make_node("Add", ["shaded", "resid"], ["frame.raw"]),
        helper.make_node("Clip", ["frame.raw", "zero", "one"], ["frame"]),
    ]
    graph = helper.make_graph(
        nodes, "renderer",
        [helper.make_tensor_value_info("avatar", TensorProto.FLOAT, ["B", 3, "S", "S"]),
         helper.make_tensor_value_info("motion", TensorProto.FLOAT, ["B", MOTION_DIM])],
        [helper.make_tensor_value_info("frame", TensorProto.FLOAT, ["B", 3, "S", "S"])],
        inits,
    )
    return finish_model(graph, f"avatarfarm reference renderer c{size.channels} d{size.depth}")


SYNC_WINDOW = 48  # video frames per lip-sync check (~2 s at 25 fps)
SYNC_MAX_LAG = 8  # frames either way (+-320 ms at 25 fps)
MOUTH_CROP = (16, 24)  # height, width of the mouth crop the check reads


def build_lipsync(window: int = SYNC_WINDOW, max_lag: int = SYNC_MAX_LAG,
                  crop: tuple[int, int] = MOUTH_CROP) -> onnx.ModelProto:
    """Lip-sync check (the role SyncNet plays): per-frame audio features ``audio``
    [B, T, 80] (mean log-mel of each video frame's audio) and the mouth region of
    each rendered frame ``mouth`` [B, T, 3, H, W] -> ``scores`` [B, 2L+1], the
    normalised correlation of speech energy with mouth opening when the video is
    shifted by -L..L frames. A peak at lag d > 0 means the mouth moves d frames
    after the sound that drives it: the video lags the audio."""
    t, lags = window, 2 * max_lag + 1
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    band = np.zeros((N_MELS, 1), np.float32)
    band[5:60, 0] = 1.0 / 55  # the speech band, as the audio-to-motion energy head reads it
    inits.append(numpy_helper.from_array(band, "sync.band"))
    nodes.append(helper.make_node("MatMul", ["audio", "sync.band"], ["energy3"]))
    nodes.append(_const("sync.bt", np.array([-1, t], np.int64)))
    nodes.append(helper.make_node("Reshape", ["energy3", "sync.bt"], ["energy"]))
    # Mouth opening: the crop darkens as the jaw opens (cavity shading and lips parting).
    nodes.append(helper.make_node("ReduceMean", ["mouth"], ["rgb5"], axes=[3, 4], keepdims=0))
    luma = np.array([[-0.299], [-0.587], [-0.114]], np.float32)
    inits.append(numpy_helper.from_array(luma, "sync.luma"))
    nodes.append(helper.make_node("MatMul", ["rgb5", "sync.luma"], ["dark3"]))
    nodes.append(helper.make_node("Reshape", ["dark3", "sync.bt"], ["dark"]))

    def standardise(x: str, eps: float) -> str:
        nodes.append(helper.make_node("ReduceMean", [x], [f"{x}.mean"], axes=[1], keepdims=1))
        nodes.append(helper.make_node("Sub", [x, f"{x}.mean"], [f"{x}.c"]))
        nodes.append(helper.make_node("Mul", [f"{x}.c", f"{x}.c"], [f"{x}.sq"]))
        nodes.append(helper.make_node("ReduceMean", [f"{x}.sq"], [f"{x}.var"], axes=[1], keepdims=1))
        nodes.append(_const(f"{x}.eps", np.array(eps, np.float32)))
        nodes.append(helper.make_node("Add", [f"{x}.var", f"{x}.eps"], [f"{x}.vare"]))
        nodes.append(helper.make_node("Sqrt", [f"{x}.vare"], [f"{x}.std"]))
        nodes.append(helper.make_node("Div", [f"{x}.c", f"{x}.std"], [f"{x}.z"]))
        return f"{x}.z"

    # The floors keep silence (flat energy) and a still face from scoring noise.
    a = standardise("energy", 0.02)
    m = standardise("dark", 1e-5)
    nodes.append(_const("sync.pads", np.array([0, max_lag, 0, max_lag], np.int64)))
    nodes.append(helper.make_node("Pad", [m, "sync.pads"], ["dark.pad"]))
    idx = (np.arange(t)[None, :] + np.arange(lags)[:, None]).astype(np.int64)  # lag l-L at row l
    inits.append(numpy_helper.from_array(idx, "sync.idx"))
    nodes.append(helper.make_node("Gather", ["dark.pad", "sync.idx"], ["shifted"], axis=1))
    nodes.append(_const("sync.axis1", np.array([1], np.int64)))
    nodes.append(helper.make_node("Unsqueeze", [a, "sync.axis1"], ["a3"]))
    nodes.append(helper.make_node("Mul", ["shifted", "a3"], ["prod"]))
    # Sum over time, normalised by the overlap at each lag.
    nodes.append(_const("sync.axis2", np.array([2], np.int64)))
    nodes.append(helper.make_node("ReduceSum", ["prod", "sync.axis2"], ["prod.sum"], keepdims=0))
    overlap = (t - np.abs(np.arange(lags) - max_lag)).astype(np.float32)
    inits.append(numpy_helper.from_array(overlap, "sync.overlap"))
    nodes.append(helper.make_node("Div", ["prod.sum", "sync.overlap"], ["scores"]))
    h, w = crop
    graph = helper.make_graph(
        nodes, "lipsync",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", t, N_MELS]),
         helper.make_tensor_value_info("mouth", TensorProto.FLOAT, ["B", t, 3, h, w])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", lags])],
        inits,
    )
    return finish_model(graph, "avatarfarm reference lip-sync check")


def finish_model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    """The project's ONNX model around `graph`: its opset and IR version, checked."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="avatarfarm", doc_string=doc)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
