"""A stand-in for Wav2Lip-family lip-sync models, built from numpy with fixed seeds.

The graph has exactly the public Wav2Lip ONNX signature (MODELS.md, "Wav2Lip"):

* mel ``float32 [B, 1, 80, 16]``: one 200 ms window of the normalised log-mel
  (-4 is silence, +4 the loudest), 80 bands, 16 steps of 12.5 ms;
* faces ``float32 [B, 6, S, S]``: channels 0-2 the face crop with its lower half
  zeroed, 3-5 the same crop unmasked; BGR, /255;
* output ``float32 [B, 3, S, S]``: the face with the mouth redrawn, BGR, 0..1.

Behaviour: the output is the unmasked face, except the mouth region (lower middle
of the crop), which darkens and opens (the cavity grows downwards) in proportion to
the speech energy at the start of the mel window. Video frame ``i`` takes the
window starting at mel step ``int(80 * i / fps)``, so the first ~40 ms of the
window are that frame's own audio: the energy reads mostly those steps and a
mouth-darkness-vs-energy lip-sync check finds no offset. Silence (-4) gives
exactly the unmasked face apart from the conv residual below.

Cost: an encoder-decoder of 3x3 convolutions (strided down, transposed up, skip
connections, an audio encoder added at the bottleneck, like Wav2Lip's) whose
width, depth and number of levels set the MACs per frame. Its result enters the
output as a bounded residual (at most ``RESIDUAL`` = one 8-bit step), so the cost
is real (nothing folds away) without changing what the frame shows.

Naming, batch axis and input order follow the known exports (FaceFusion's
``source``/``target``/``output``, the community ``mel_spectrogram``/
``video_frames``); binding is by shape (``workers.device.binding``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from workers.models.reference import finish_model
from workers.models.template import FaceTemplate

MEL_BANDS = 80
MEL_STEPS = 16
MEL_SILENCE = -4.0  # the normalised mel's floor
DEFAULT_SIDE = 96
RESIDUAL = 1.0 / 255  # bound on the conv stack's contribution to the output

# Where the mouth sits in a Wav2Lip face crop (detector box padded at the bottom for
# the chin): lower middle, inside the zeroed lower half. As a FaceTemplate so
# workers.media.alignment.MouthCrop cuts the same region out of the output.
MOUTH_CENTER = (0.5, 0.72)
MOUTH_HALF_WIDTH = 0.15
WAV2LIP_FACE = FaceTemplate(mouth_center=MOUTH_CENTER, mouth_half_width=0.1, chin_v=0.95)

# Energy -> opening: fully closed up to -3.5 (silence and room noise), fully open
# from -0.5 (ordinary speech in the normalised scale).
OPEN_FROM = -3.5
OPEN_SPAN = 3.0
CAVITY_DEPTH = 0.85
CAVITY_BGR = (0.08, 0.06, 0.30)  # dark red, in BGR order


@dataclass(frozen=True, slots=True)
class IoNames:
    """Tensor names of one export."""

    mel: str
    faces: str
    output: str


FACEFUSION = IoNames("source", "target", "output")
COMMUNITY = IoNames("mel_spectrogram", "video_frames", "output")


@dataclass(frozen=True, slots=True)
class Wav2LipCost:
    """The conv stack's shape, which sets the MACs per frame.

    ``levels`` strided 3x3 convs halve the side and double the width (capped at
    ``max_width``) from ``width`` channels at full resolution; each level has
    ``depth`` residual 3x3 convs on the way down and on the way up."""

    width: int
    levels: int
    depth: int
    max_width: int = 512
    audio_width: int = 64

    def channels(self, level: int) -> int:
        return min(self.width * 2 ** level, self.max_width)


WAV2LIP_PRESETS: dict[str, Wav2LipCost] = {
    # For tests: milliseconds per frame on one core.
    "tiny": Wav2LipCost(width=8, levels=3, depth=1, max_width=32, audio_width=16),
    # One family, like Wav2Lip's: 32 channels at full size doubling to 512, three
    # residual convs per level; a level more at 256. Conv GMAC per frame
    # (conv_gmac_per_frame): 3.91 at 96 (Wav2Lip-96: ~4), 28.5 at 256 (~28).
    "wav2lip_96": Wav2LipCost(width=32, levels=5, depth=3),
    "wav2lip_256": Wav2LipCost(width=32, levels=6, depth=3),
}
_PRESET_FOR_SIDE = {96: "wav2lip_96", 256: "wav2lip_256"}


class Graph:
    """Nodes and initialisers under construction, with unique names."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self.zero = self.init("zero", np.array(0.0, np.float32))
        self.one = self.init("one", np.array(1.0, np.float32))

    def used_inits(self) -> list[onnx.TensorProto]:
        """The initialisers some node reads (onnxruntime warns about the others)."""
        read = {i for n in self.nodes for i in n.input}
        return [t for t in self.inits if t.name in read]

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}.{self._n}"

    def init(self, stem: str, arr: np.ndarray) -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str, **attrs: Any) -> str:
        out = self.name(stem)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, c_in: int, c_out: int, *, stride: tuple[int, int] = (1, 1),
             pads: tuple[int, int, int, int] = (1, 1, 1, 1), kernel: int = 3, gain: float = 2.0,
             relu: bool = True, stem: str = "conv") -> str:
        fan_in = c_in * kernel * kernel
        w = self.rng.standard_normal((c_out, c_in, kernel, kernel), np.float32)
        w *= np.float32(np.sqrt(gain / fan_in))
        y = self.op("Conv", [x, self.init(f"{stem}.w", w),
                             self.init(f"{stem}.b", np.zeros(c_out, np.float32))], stem,
                    kernel_shape=[kernel, kernel], strides=list(stride), pads=list(pads))
        return self.op("Relu", [y], f"{stem}.relu") if relu else y

    def residual(self, x: str, c: int, stem: str) -> str:
        # Half gain keeps activations bounded through deep stacks of random weights.
        y = self.conv(x, c, c, relu=False, gain=0.5, stem=stem)
        return self.op("Relu", [self.op("Add", [x, y], f"{stem}.add")], f"{stem}.relu")

    def up(self, x: str, c_in: int, c_out: int, stem: str) -> str:
        # 3x3, stride 2, pads 1, output_padding 1: exactly doubles the side.
        w = self.rng.standard_normal((c_in, c_out, 3, 3), np.float32)
        w *= np.float32(np.sqrt(2.0 / (c_in * 9 / 4)))
        y = self.op("ConvTranspose", [x, self.init(f"{stem}.w", w),
                                      self.init(f"{stem}.b", np.zeros(c_out, np.float32))], stem,
                    kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
        return self.op("Relu", [y], f"{stem}.relu")


def _energy_weights() -> np.ndarray:
    """[1, 1, 80, 16] weights summing to 1: speech bands, the window's first steps."""
    bands = np.zeros(MEL_BANDS, np.float64)
    bands[:60] = 1.0  # up to ~3.5 kHz of the 55-7600 Hz range: where speech energy is
    steps = np.exp(-np.arange(MEL_STEPS) / 1.5)  # ~90% of the weight in the first 3.2 steps
    w = np.outer(bands / bands.sum(), steps / steps.sum())
    return w.reshape(1, 1, MEL_BANDS, MEL_STEPS).astype(np.float32)


def _mouth_fields(side: int) -> tuple[np.ndarray, np.ndarray]:
    """The cavity's horizontal term (du/ru)^4 (flat across the lips, steep at the
    corners, so the cheeks stay as they were) and dv^2, each [1, 1, S, S]."""
    c = (np.arange(side, dtype=np.float64) + 0.5) / side
    v, u = np.meshgrid(c, c, indexing="ij")
    mu, mv = MOUTH_CENTER
    du4 = ((u - mu) / MOUTH_HALF_WIDTH) ** 4
    # The cavity opens downwards from the lip line: above it the fall-off is steeper.
    dv = v - (mv - 0.02)
    dv2 = np.where(dv < 0, (dv * 2.5) ** 2, dv ** 2)
    return (du4.reshape(1, 1, side, side).astype(np.float32),
            dv2.reshape(1, 1, side, side).astype(np.float32))


def _mouth(g: Graph, mel: str, faces: str, side: int) -> str:
    """The analytic part: the unmasked face with the mouth shaded by the opening."""
    unmasked = g.op("Slice", [faces, g.init("ch.from", np.array([3], np.int64)),
                              g.init("ch.to", np.array([6], np.int64)),
                              g.init("ch.axis", np.array([1], np.int64))], "unmasked")
    weighted = g.op("Mul", [mel, g.init("energy.w", _energy_weights())], "energy.mul")
    energy = g.op("ReduceSum", [weighted, g.init("energy.axes", np.array([2, 3], np.int64))],
                  "energy", keepdims=1)  # [B, 1, 1, 1] in [-4, 4]
    return shade_mouth(g, unmasked, energy, OPEN_FROM, OPEN_SPAN, side)


def shade_mouth(g: Graph, face: str, energy: str, open_from: float, open_span: float,
                side: int, tint: tuple[float, ...] = CAVITY_BGR) -> str:
    """``face`` [B, C, S, S] with a mouth cavity at MOUTH_CENTER that opens as
    ``energy`` [B, 1, 1, 1] rises from ``open_from`` to ``open_from + open_span``; the
    cavity's colour is ``tint`` (one value per channel: dark red in BGR 0..1 by default)."""
    shifted = g.op("Sub", [energy, g.init("open.from", np.array(open_from, np.float32))], "open.shift")
    scaled = g.op("Div", [shifted, g.init("open.span", np.array(open_span, np.float32))], "open.scale")
    opening = g.op("Clip", [scaled, g.zero, g.one], "opening")
    # Vertical radius grows with the opening: a wider-open mouth is a taller cavity.
    rv = g.op("Add", [g.init("rv.closed", np.array(0.015, np.float32)),
                      g.op("Mul", [opening, g.init("rv.gain", np.array(0.06, np.float32))], "rv.open")],
              "rv")
    du4, dv2 = _mouth_fields(side)
    rv2 = g.op("Mul", [rv, rv], "rv2")
    q = g.op("Add", [g.init("mouth.du4", du4), g.op("Div", [g.init("mouth.dv2", dv2), rv2], "dv2.n")],
             "mouth.q")
    cavity = g.op("Exp", [g.op("Neg", [q], "mouth.negq")], "cavity")  # [B, 1, S, S]
    shade = g.op("Mul", [cavity, g.op("Mul", [opening, g.init("cavity.depth",
                                                              np.array(CAVITY_DEPTH, np.float32))],
                                      "shade.depth")], "shade")
    keep = g.op("Sub", [g.one, shade], "keep")
    colour = np.array(tint, np.float32).reshape(1, len(tint), 1, 1)
    tinted = g.op("Mul", [shade, g.init("cavity.bgr", colour)], "tint")
    return g.op("Add", [g.op("Mul", [face, keep], "base"), tinted], "composite")


def _audio_encoder(g: Graph, mel: str, cost: Wav2LipCost, c_out: int) -> str:
    """[B, 1, 80, 16] -> [B, c_out, 1, 1], strided like Wav2Lip's audio encoder."""
    a = cost.audio_width
    x = g.conv(mel, 1, a // 2, stem="aud0")  # 80 x 16
    x = g.conv(x, a // 2, a, stride=(3, 1), stem="aud1")  # 27 x 16
    x = g.residual(x, a, "aud1r")
    x = g.conv(x, a, 2 * a, stride=(3, 3), stem="aud2")  # 9 x 6
    x = g.residual(x, 2 * a, "aud2r")
    x = g.conv(x, 2 * a, 4 * a, stride=(3, 2), stem="aud3")  # 3 x 3
    return g.conv(x, 4 * a, c_out, pads=(0, 0, 0, 0), stem="aud4")  # 1 x 1


def conv_stack(g: Graph, faces: str, cost: Wav2LipCost, audio: Callable[[int], str], *,
               c_in: int = 6, c_out: int = 3, scale: float = RESIDUAL) -> str:
    """The cost: faces [B, c_in, S, S] and the audio -> a residual [B, c_out, S, S] in
    +-scale. ``audio(c)`` builds the audio encoder, [B, c, 1, 1] at the bottleneck."""
    skips: list[str] = []
    x = g.conv(faces, c_in, cost.channels(0), stem="enc0")
    for _ in range(cost.depth):
        x = g.residual(x, cost.channels(0), "enc0r")
    for level in range(1, cost.levels + 1):
        skips.append(x)
        x = g.conv(x, cost.channels(level - 1), cost.channels(level), stride=(2, 2), stem=f"enc{level}")
        for _ in range(cost.depth):
            x = g.residual(x, cost.channels(level), f"enc{level}r")
    x = g.op("Add", [x, audio(cost.channels(cost.levels))], "bottleneck")  # audio broadcast over the face features
    for level in range(cost.levels, 0, -1):
        c = cost.channels(level - 1)
        x = g.up(x, cost.channels(level), c, f"dec{level}")
        x = g.op("Concat", [x, skips[level - 1]], f"dec{level}.skip", axis=1)
        x = g.conv(x, 2 * c, c, stem=f"dec{level}.merge")
        for _ in range(cost.depth):
            x = g.residual(x, c, f"dec{level}r")
    y = g.conv(x, cost.channels(0), c_out, relu=False, gain=1.0, stem="head")
    return g.op("Mul", [g.op("Tanh", [y], "head.tanh"), g.init("head.scale", np.array(scale, np.float32))],
                "residual")


def build_wav2lip(side: int = DEFAULT_SIDE, cost: Wav2LipCost | None = None, *,
                  names: IoNames = FACEFUSION, dynamic_batch: bool = True,
                  faces_first: bool = False, seed: int = 5) -> onnx.ModelProto:
    """A Wav2Lip-signature model (module docstring). ``cost`` defaults to the preset
    for ``side`` (96 or 256); ``dynamic_batch=False`` fixes the batch axis at 1 as some
    exports do; ``faces_first`` puts the faces input before the mel input."""
    if cost is None:
        if side not in _PRESET_FOR_SIDE:
            raise ValueError(f"no cost preset for side {side}; pass one of {sorted(WAV2LIP_PRESETS)}")
        cost = WAV2LIP_PRESETS[_PRESET_FOR_SIDE[side]]
    if side % 2 ** cost.levels or side < 2 ** (cost.levels + 1):
        raise ValueError(f"side {side} must be a multiple of 2^{cost.levels} (the cost's levels) "
                         f"and at least {2 ** (cost.levels + 1)}")
    g = Graph(np.random.default_rng(seed))
    mel, faces = names.mel, names.faces
    composite = _mouth(g, mel, faces, side)
    residual = conv_stack(g, faces, cost, lambda c: _audio_encoder(g, mel, cost, c))
    raw = g.op("Add", [composite, residual], "raw")
    g.nodes.append(helper.make_node("Clip", [raw, g.zero, g.one], [names.output], name="clip"))
    batch: str | int = "B" if dynamic_batch else 1
    mel_vi = helper.make_tensor_value_info(mel, TensorProto.FLOAT, [batch, 1, MEL_BANDS, MEL_STEPS])
    faces_vi = helper.make_tensor_value_info(faces, TensorProto.FLOAT, [batch, 6, side, side])
    graph = helper.make_graph(
        g.nodes, "wav2lip", [faces_vi, mel_vi] if faces_first else [mel_vi, faces_vi],
        [helper.make_tensor_value_info(names.output, TensorProto.FLOAT, [batch, 3, side, side])],
        g.inits,
    )
    return finish_model(graph, f"avatarfarm Wav2Lip stand-in S={side} c{cost.width} "
                               f"l{cost.levels} d{cost.depth}")


def conv_gmac_per_frame(model: onnx.ModelProto) -> float:
    """GMAC of one frame's Conv and ConvTranspose nodes, from the graph's shapes (batch
    axes, fixed or symbolic, count as 1). The elementwise work is left out: it is a
    rounding error next to the convolutions."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    weights = {t.name: list(t.dims) for t in inferred.graph.initializer}
    macs = 0
    for node in inferred.graph.node:
        if node.op_type == "Conv":
            # Each output element: C_in/group x kh x kw MACs; weight [C_out, C_in/g, kh, kw].
            out = shapes[node.output[0]]
            macs += out[0] * int(np.prod(out[2:])) * int(np.prod(weights[node.input[1]]))
        elif node.op_type == "ConvTranspose":
            # Each input element scatters into C_out/group x kh x kw; weight [C_in, C_out/g, kh, kw].
            x = shapes[node.input[0]]
            macs += x[0] * int(np.prod(x[2:])) * int(np.prod(weights[node.input[1]]))
    return macs / 1e9
