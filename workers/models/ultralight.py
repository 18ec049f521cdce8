"""Stand-ins for the Ultralight / Duix-style family, built from numpy with fixed seeds.

Three graphs with exactly the public signatures (MODELS.md, "Ultralight / Duix"):

* the audio feature model, HuBERT as exported to ONNX for this family:
  ``input`` float32 ``[B, N]`` (16 kHz waveform, any length N >= 400) ->
  ``output`` float32 ``[B, T, 1024]`` with ``T = (N - 400) // 320 + 1``: one feature
  row per 20 ms (HuBERT's convolutional front end is one stride-320, width-400 window);
* or the other feature model the family uses, a WeNet streaming conformer encoder as
  Ultralight exports it: ``chunk`` float32 ``[1, 67, 80]`` (Kaldi fbank,
  `workers.media.kaldi_fbank`), ``offset`` int64 ``[1]``, ``att_cache`` float32
  ``[3, 8, 16, 128]``, ``cnn_cache`` float32 ``[3, 1, 512, 14]`` -> ``output`` float32
  ``[1, 16, 512]`` (two stride-2 3x3 convolutions take 67 frames to 16), ``r_att_cache``,
  ``r_cnn_cache``; one step per 50 ms of stream;
* the per-person UNet: ``input`` float32 ``[B, 6, 160, 160]`` (the real crop, then the
  same crop with the rectangle (5, 5, 150, 145) blacked out; BGR / 255), ``audio``
  float32 ``[B, C, H, W]``: a window of feature rows centred on the frame. HuBERT: two
  rows per video frame at 25 fps, rows folded as ``[32, 32]`` (``[16, 32, 32]`` for 8
  frames, ``[32, 32, 32]`` for 16); wenet: one step ``[16, 512]`` per video frame at
  20 fps, folded as ``[16, 16, 32]`` (``[128, 16, 32]`` for 8 frames) -> ``output``
  float32 ``[B, 3, 160, 160]``, BGR 0..1.

Behaviour: each feature model puts the log10 power of 32 speech bands of its own audio
in the first 32 values of each row (HuBERT: 150 Hz to 3.5 kHz, of each 25 ms window;
wenet: pairs of fbank bands, averaged over the frames under each output row, on the
same scale), and a deep stack of convolutions (a transformer's cost, weights shared
across layers so the file stays small) in the rest, bounded. The UNet reads the band
power of the window's centre rows (the frame's own audio), opens the mouth of the real
crop in proportion, and adds the conv stack's bounded residual: real cost, visible
audio-driven output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from workers.families.features import WENET, FeatureKind
from workers.models.reference import finish_model
from workers.models.wav2lip import Graph, Wav2LipCost, conv_stack, shade_mouth

SAMPLE_RATE = 16_000
FEATURE_WIDTH = 1024
FEATURE_STRIDE = 320  # samples per feature row (20 ms)
FEATURE_WINDOW = 400  # samples each row reads (25 ms)
BANDS = 32
SIDE = 160
AUDIO_SHAPE = (16, 32, 32)  # 8 video frames x 2 rows x 1024 features
WENET_AUDIO_SHAPE = (128, 16, 32)  # 8 video frames x 1 step x [16, 512]
# The mouth opens as the mean log10 band power goes from -8.5 (quiet) to -7 (loud speech).
OPEN_FROM = -8.5
OPEN_SPAN = 1.5


@dataclass(frozen=True, slots=True)
class FeatureCost:
    """The feature model's stack: ``layers`` blocks of 1x1 convolutions ``width`` ->
    ``4 * width`` -> ``width`` (a transformer layer's feed-forward share)."""

    width: int
    layers: int


FEATURE_PRESETS: dict[str, FeatureCost] = {
    "tiny": FeatureCost(width=32, layers=1),  # tests
    # HuBERT-large: 24 layers of width 1024 (~0.2 GMAC per 20 ms row here, ~0.4 per frame).
    "hubert_large": FeatureCost(width=1024, layers=24),
}

WENET_PRESETS: dict[str, FeatureCost] = {
    "tiny": FeatureCost(width=16, layers=1),  # tests
    # Ultralight's wenet encoder: 512 channels, 3 conformer blocks (its caches' shapes);
    # ~0.9 GMAC a step here, the convolutional subsampling most of it.
    "wenet": FeatureCost(width=512, layers=3),
}


HUBERT = FeatureKind("hubert", FEATURE_WIDTH, 2)
WENET_CHUNK = (67, 80)  # fbank frames a step reads, bands
WENET_ROWS = 16  # output rows a step
WENET_CACHES = {"att_cache": (3, 8, 16, 128), "cnn_cache": (3, 1, 512, 14)}
# Kaldi's natural log of int16-scale power -> the HuBERT stand-in's log10 band power:
# int16 scale (2 log10 32768) and the FFT's gain over HuBERT's normalised band filters.
WENET_LOG10_SHIFT = 2 * np.log10(32768.0) + 3.5

UNET_PRESETS: dict[str, Wav2LipCost] = {
    "tiny": Wav2LipCost(width=8, levels=3, depth=1, max_width=32, audio_width=16),
    # Ultralight's UNet is small: ~1 GMAC per 160 px frame (conv_gmac_per_frame: 1.2).
    "ultralight": Wav2LipCost(width=16, levels=4, depth=2, max_width=128, audio_width=32),
}


def _band_filters() -> np.ndarray:
    """[2 * BANDS, 1, FEATURE_WINDOW]: a Hann-windowed cosine and sine per band."""
    t = np.arange(FEATURE_WINDOW) / SAMPLE_RATE
    hann = np.hanning(FEATURE_WINDOW)
    centres = np.geomspace(150.0, 3500.0, BANDS)
    w = np.concatenate([np.cos(2 * np.pi * centres[:, None] * t) * hann,
                        np.sin(2 * np.pi * centres[:, None] * t) * hann])
    return (w / hann.sum()).reshape(2 * BANDS, 1, FEATURE_WINDOW).astype(np.float32)


def build_hubert(cost: FeatureCost | None = None, *, seed: int = 11) -> onnx.ModelProto:
    """The HuBERT-signature feature model (module docstring)."""
    cost = cost or FEATURE_PRESETS["hubert_large"]
    g = Graph(np.random.default_rng(seed))
    wave = g.op("Unsqueeze", ["input", g.init("axis1", np.array([1], np.int64))], "wave")
    pairs = g.op("Conv", [wave, g.init("bands.w", _band_filters())], "bands",
                 kernel_shape=[FEATURE_WINDOW], strides=[FEATURE_STRIDE])  # [B, 64, T]
    sq = g.op("Mul", [pairs, pairs], "bands.sq")
    summed = np.concatenate([np.eye(BANDS), np.eye(BANDS)], axis=1).reshape(BANDS, 2 * BANDS, 1)
    power = g.op("Conv", [sq, g.init("bands.sum", summed.astype(np.float32))], "power",
                 kernel_shape=[1])  # [B, 32, T]
    logp = g.op("Div", [g.op("Log", [g.op("Add", [power, g.init("eps", np.array(1e-9, np.float32))],
                                          "power.eps")], "ln"),
                        g.init("ln10", np.array(np.log(10.0), np.float32))], "log10")
    # The cost: an input projection, then layers sharing one set of weights.
    w = cost.width

    def weight(c_out: int, c_in: int, gain: float) -> str:
        m = g.rng.standard_normal((c_out, c_in, 1), np.float32) * np.float32(np.sqrt(gain / c_in))
        return g.init("w", m)

    x = g.op("Relu", [g.op("Conv", [logp, weight(w, BANDS, 2.0)], "proj", kernel_shape=[1])], "proj.relu")
    up, down = weight(4 * w, w, 2.0), weight(w, 4 * w, 0.5)
    for _ in range(cost.layers):
        h = g.op("Relu", [g.op("Conv", [x, up], "ffn.up", kernel_shape=[1])], "ffn.relu")
        y = g.op("Conv", [h, down], "ffn.down", kernel_shape=[1])
        x = g.op("Tanh", [g.op("Add", [x, y], "ffn.add")], "ffn.norm")  # bounded like a LayerNorm
    rest = g.op("Mul", [g.op("Conv", [x, weight(FEATURE_WIDTH - BANDS, w, 1.0)], "head", kernel_shape=[1]),
                        g.init("head.scale", np.array(0.1, np.float32))], "head.scaled")
    feats = g.op("Concat", [logp, rest], "features", axis=1)  # [B, 1024, T]
    g.nodes.append(helper.make_node("Transpose", [feats], ["output"], name="rows", perm=[0, 2, 1]))
    graph = helper.make_graph(
        g.nodes, "hubert",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "samples"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", "rows", FEATURE_WIDTH])],
        g.used_inits())
    return finish_model(graph, f"avatarfarm HuBERT stand-in w{cost.width} x{cost.layers}")


def build_wenet(cost: FeatureCost | None = None, *, seed: int = 17) -> onnx.ModelProto:
    """The wenet-signature feature model (module docstring): one step, batch fixed at 1
    as Ultralight's export has it; the caches pass through (the family feeds zeros)."""
    cost = cost or WENET_PRESETS["wenet"]
    g = Graph(np.random.default_rng(seed))
    frames, bands = WENET_CHUNK
    x = g.op("Unsqueeze", ["chunk", g.init("axis1", np.array([1], np.int64))], "chunk4")  # [1, 1, 67, 80]
    # The band power: 7 fbank frames around each output row, pairs of bands 8..71, log10.
    pooled = g.op("AveragePool", [x], "pool", kernel_shape=[7, 1], strides=[4, 1])  # [1, 1, 16, 80]
    group = np.zeros((bands, BANDS), np.float32)
    for b in range(BANDS):
        group[8 + 2 * b:10 + 2 * b, b] = 0.5 / np.log(10.0)
    energy = g.op("Sub", [g.op("MatMul", [pooled, g.init("bands", group)], "bands"),
                          g.init("shift", np.array(WENET_LOG10_SHIFT, np.float32))], "log10")
    energy = g.op("Reshape", [energy, g.init("e.shape", np.array([1, WENET_ROWS, BANDS], np.int64))],
                  "energy")  # [1, 16, 32]
    # The cost: the conformer's convolutional subsampling, then blocks sharing weights.
    c = cost.width
    h = g.conv(g.op("Div", [x, g.init("fbank.scale", np.array(16.0, np.float32))], "scaled"),
               1, c, stride=(2, 2), pads=(0, 0, 0, 0), stem="sub1")
    h = g.conv(h, c, c, stride=(2, 2), pads=(0, 0, 0, 0), stem="sub2")  # [1, c, 16, 19]
    width = ((bands - 1) // 2 - 1) // 2
    seq = g.op("Reshape", [g.op("Transpose", [h], "sub.t", perm=[0, 1, 3, 2]),
                           g.init("seq.shape", np.array([1, c * width, WENET_ROWS], np.int64))], "seq")

    def weight(c_out: int, c_in: int, gain: float) -> str:
        m = g.rng.standard_normal((c_out, c_in, 1), np.float32) * np.float32(np.sqrt(gain / c_in))
        return g.init("w", m)

    y = g.op("Tanh", [g.op("Conv", [seq, weight(c, c * width, 1.0)], "proj", kernel_shape=[1])], "proj.norm")
    up, down = weight(4 * c, c, 2.0), weight(c, 4 * c, 0.5)
    for _ in range(cost.layers):
        f = g.op("Relu", [g.op("Conv", [y, up], "ffn.up", kernel_shape=[1])], "ffn.relu")
        y = g.op("Tanh", [g.op("Add", [y, g.op("Conv", [f, down], "ffn.down", kernel_shape=[1])],
                               "ffn.add")], "ffn.norm")
    rest = g.op("Mul", [g.op("Conv", [y, weight(WENET.row - BANDS, c, 1.0)], "head", kernel_shape=[1]),
                        g.init("head.scale", np.array(0.1, np.float32))], "head.scaled")  # [1, 480, 16]
    rows = g.op("Transpose", [rest], "rest.t", perm=[0, 2, 1])
    g.nodes.append(helper.make_node("Concat", [energy, rows], ["output"], name="rows", axis=2))
    for name in WENET_CACHES:
        g.nodes.append(helper.make_node("Identity", [name], [f"r_{name}"], name=f"r_{name}"))
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes, "wenet",
        [helper.make_tensor_value_info("chunk", f32, [1, frames, bands]),
         helper.make_tensor_value_info("offset", TensorProto.INT64, [1]),
         *(helper.make_tensor_value_info(n, f32, list(shape)) for n, shape in WENET_CACHES.items())],
        [helper.make_tensor_value_info("output", f32, [1, WENET_ROWS, WENET.row]),
         *(helper.make_tensor_value_info(f"r_{n}", f32, list(shape)) for n, shape in WENET_CACHES.items())],
        g.used_inits())
    return finish_model(graph, f"avatarfarm wenet stand-in w{cost.width} x{cost.layers}")


def _centre_energy(g: Graph, audio: str, shape: tuple[int, int, int], kind: FeatureKind) -> str:
    """[B, 1, 1, 1]: the mean band power of the window's centre frame's rows (the frame's
    own audio), read from each row's first BANDS values."""
    rows = int(np.prod(shape)) // kind.row
    flat = g.op("Reshape", [audio, g.init("rows.shape", np.array([0, rows, kind.row], np.int64))], "rows")
    centre = rows // kind.frame_rows // 2 * kind.frame_rows
    own = g.op("Slice", [flat, g.init("own.from", np.array([centre, 0], np.int64)),
                         g.init("own.to", np.array([centre + kind.frame_rows, BANDS], np.int64)),
                         g.init("own.axes", np.array([1, 2], np.int64))], "own")  # [B, rows, 32]
    mean = g.op("ReduceMean", [own], "own.mean", axes=[1, 2], keepdims=0)  # [B]
    return g.op("Reshape", [mean, g.init("e.shape", np.array([-1, 1, 1, 1], np.int64))], "energy")


def _audio_encoder(g: Graph, audio: str, shape: tuple[int, int, int], cost: Wav2LipCost,
                   c_out: int) -> str:
    """[B, C, H, W] features -> [B, c_out, 1, 1]: strided convs, then a global average."""
    a = cost.audio_width
    x = g.conv(audio, shape[0], a, stem="aud0")
    x = g.conv(x, a, 2 * a, stride=(2, 2), stem="aud1")
    x = g.residual(x, 2 * a, "aud1r")
    x = g.conv(x, 2 * a, 4 * a, stride=(2, 2), stem="aud2")
    x = g.op("GlobalAveragePool", [x], "aud.pool")
    return g.conv(x, 4 * a, c_out, kernel=1, pads=(0, 0, 0, 0), stem="aud3")


def build_ultralight(cost: Wav2LipCost | None = None, *, audio_shape: tuple[int, int, int] = AUDIO_SHAPE,
                     features: FeatureKind = HUBERT, seed: int = 13) -> onnx.ModelProto:
    """The per-person UNet stand-in (module docstring): ``input``, ``audio`` -> ``output``,
    batch axis dynamic; ``audio_shape`` holds ``features`` rows."""
    cost = cost or UNET_PRESETS["ultralight"]
    if not features.frames(audio_shape):
        raise ValueError(f"audio shape {list(audio_shape)} does not hold whole video frames "
                         f"of {features.name} rows ({features.frame_rows} rows of {features.row} a frame)")
    g = Graph(np.random.default_rng(seed))
    real = g.op("Slice", ["input", g.init("ch.from", np.array([0], np.int64)),
                          g.init("ch.to", np.array([3], np.int64)),
                          g.init("ch.axis", np.array([1], np.int64))], "real")
    composite = shade_mouth(g, real, _centre_energy(g, "audio", audio_shape, features), OPEN_FROM,
                            OPEN_SPAN, SIDE)
    residual = conv_stack(g, "input", cost, lambda c: _audio_encoder(g, "audio", audio_shape, cost, c))
    raw = g.op("Add", [composite, residual], "raw")
    g.nodes.append(helper.make_node("Clip", [raw, g.zero, g.one], ["output"], name="clip"))
    graph = helper.make_graph(
        g.nodes, "ultralight",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", 6, SIDE, SIDE]),
         helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", *audio_shape])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 3, SIDE, SIDE])],
        g.inits)
    return finish_model(graph, f"avatarfarm Ultralight stand-in ({features.name}) audio {list(audio_shape)} "
                               f"c{cost.width} l{cost.levels} d{cost.depth}")
