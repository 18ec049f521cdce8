"""Stand-ins for MuseTalk 1.5 (latent inpainting, one UNet step), built from numpy with
fixed seeds, with the public signatures (MODELS.md, "MuseTalk 1.5"):

* the Whisper-tiny encoder: ``input_features`` float32 ``[B, 80, 3000]`` (Whisper's
  log-mel of 30 s: 10 ms hop, ``(max(log10 mel, max - 8) + 4) / 4``) -> five hidden
  states ``hidden_state_0`` .. ``hidden_state_4`` float32 ``[B, 1500, 384]`` (the
  embeddings and the four layers, as ``output_hidden_states`` gives them), one row per
  20 ms;
* the UNet: ``sample`` float32 ``[B, 8, 32, 32]`` (the masked frame's latents, then the
  reference frame's), ``timestep`` float32 ``[1]`` (0: one step) and
  ``encoder_hidden_states`` float32 ``[B, 50, 384]`` (10 rows around the frame x 5
  states) -> ``latent`` float32 ``[B, 4, 32, 32]``;
* the VAE decoder (sd-vae-ft-mse): ``latent_sample`` float32 ``[B, 4, 32, 32]`` (latents
  divided by the scaling factor 0.18215) -> ``sample`` float32 ``[B, 3, 256, 256]`` RGB
  in [-1, 1];
* the VAE encoder, run only at preparation: ``sample`` ``[B, 3, 256, 256]`` RGB in
  [-1, 1] -> ``latent_sample`` ``[B, 4, 32, 32]`` (times the scaling factor for the UNet).

Behaviour: the stand-in VAE's latents are the image averaged over 8x8 blocks (RGB and
luma), and its decoder scales them back up (so decode(encode(x)) is x, blurred); the
UNet returns the reference latents with the mouth darkened in proportion to the mean
log-mel energy the encoder put in its first 8 features of the frame's own rows. Each
graph adds a deep convolution stack's bounded residual: the cost is real, the picture
is what the analytic part draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from workers.models.reference import finish_model
from workers.models.wav2lip import Graph, Wav2LipCost, conv_stack, shade_mouth

SCALING = 0.18215  # sd-vae-ft-mse's scaling factor
LATENT_SIDE = 32
SIDE = 256
HIDDEN = 384
ROWS = 1500
STATES = 5
ENERGY_FEATURES = 8  # the hidden states' first features: the row's mean log-mel
WINDOW_ROWS = 10  # rows a frame reads: 4 before its own 2, 4 after (MuseTalk's +-2 frames)
OWN_ROW = 4  # the frame's own first row in its window
# The mouth opens as the frame's mean normalised log-mel goes from -0.9 (quiet) to -0.3.
OPEN_FROM = -0.9
OPEN_SPAN = 0.6
# The cavity's colour in latent units: dark red (RGB 0.30, 0.06, 0.08 in 0..1) and its luma.
CAVITY_LATENT = tuple(float(v) * SCALING for v in (-0.40, -0.88, -0.84, -0.76))


@dataclass(frozen=True, slots=True)
class EncoderCost:
    layers: int
    width: int  # feed-forward width (Whisper-tiny: 1536)


@dataclass(frozen=True, slots=True)
class DecoderCost:
    widths: tuple[int, ...]  # channels at 32, 64, 128, 256 px
    depth: int  # residual convs per level


@dataclass(frozen=True, slots=True)
class MuseTalkCost:
    encoder: EncoderCost
    unet: Wav2LipCost
    decoder: DecoderCost


MUSETALK_PRESETS: dict[str, MuseTalkCost] = {
    "tiny": MuseTalkCost(EncoderCost(1, 64), Wav2LipCost(width=8, levels=2, depth=1, max_width=16,
                                                          audio_width=8),
                         DecoderCost((8, 8, 8, 8), 0)),
    # Whisper-tiny's 4 layers (8 GMAC a call, for 16 rows); a UNet of 17 GMAC and a
    # decoder of 107 GMAC a frame: ~250 GFLOP a frame in all, as MuseTalk's hundreds.
    "musetalk": MuseTalkCost(EncoderCost(4, 1536),
                             Wav2LipCost(width=320, levels=2, depth=3, max_width=640, audio_width=64),
                             DecoderCost((512, 512, 256, 128), 3)),
}


def build_whisper_encoder(cost: EncoderCost | None = None, *, seed: int = 17) -> onnx.ModelProto:
    cost = cost or MUSETALK_PRESETS["musetalk"].encoder
    g = Graph(np.random.default_rng(seed))
    x = "input_features"
    energy = g.op("ReduceMean", [x], "energy", axes=[1], keepdims=1)  # [B, 1, 3000]
    energy = g.op("AveragePool", [energy], "energy.rows", kernel_shape=[2], strides=[2])  # [B, 1, 1500]
    energy = g.op("Tile", [energy, g.init("energy.tile", np.array([1, ENERGY_FEATURES, 1], np.int64))],
                  "energy.feats")

    def conv1d(x: str, c_in: int, c_out: int, k: int, stride: int = 1, gain: float = 2.0) -> str:
        w = g.rng.standard_normal((c_out, c_in, k), np.float32) * np.float32(np.sqrt(gain / (c_in * k)))
        return g.op("Conv", [x, g.init("w", w)], "conv", kernel_shape=[k], strides=[stride],
                    pads=[k // 2, k // 2])

    h = g.op("Relu", [conv1d(x, 80, HIDDEN, 3)], "conv1.relu")
    h = g.op("Tanh", [conv1d(h, HIDDEN, HIDDEN, 3, stride=2)], "conv2.tanh")  # [B, 384, 1500]
    up = g.init("ffn.up", g.rng.standard_normal((cost.width, HIDDEN, 1), np.float32)
                * np.float32(np.sqrt(2.0 / HIDDEN)))
    down = g.init("ffn.down", g.rng.standard_normal((HIDDEN, cost.width, 1), np.float32)
                  * np.float32(np.sqrt(0.5 / cost.width)))
    outputs = []
    for k in range(STATES):
        if k:
            for _ in range(max(1, cost.layers // (STATES - 1))):
                f = g.op("Relu", [g.op("Conv", [h, up], "ffn.up", kernel_shape=[1])], "ffn.relu")
                h = g.op("Tanh", [g.op("Add", [h, g.op("Conv", [f, down], "ffn.down", kernel_shape=[1])],
                                       "ffn.add")], "ffn.norm")
        tail = g.op("Slice", [h, g.init("s", np.array([ENERGY_FEATURES], np.int64)),
                              g.init("e", np.array([HIDDEN], np.int64)),
                              g.init("a", np.array([1], np.int64))], "tail")
        state = g.op("Concat", [energy, g.op("Mul", [tail, g.init("k", np.array(0.1, np.float32))],
                                             "tail.scaled")], "state", axis=1)
        name = f"hidden_state_{k}"
        g.nodes.append(helper.make_node("Transpose", [state], [name], name=name, perm=[0, 2, 1]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", ROWS, HIDDEN]))
    graph = helper.make_graph(
        g.nodes, "whisper_encoder",
        [helper.make_tensor_value_info("input_features", TensorProto.FLOAT, ["B", 80, 3000])],
        outputs, g.used_inits())
    return finish_model(graph, f"avatarfarm Whisper-tiny encoder stand-in x{cost.layers} w{cost.width}")


def _window_energy(g: Graph, audio: str) -> str:
    """[B, 1, 1, 1]: the energy features of the frame's own two rows (all 5 states)."""
    own = g.op("Slice", [audio, g.init("own.from", np.array([OWN_ROW * STATES, 0], np.int64)),
                         g.init("own.to", np.array([(OWN_ROW + 2) * STATES, ENERGY_FEATURES], np.int64)),
                         g.init("own.axes", np.array([1, 2], np.int64))], "own")
    mean = g.op("ReduceMean", [own], "own.mean", axes=[1, 2], keepdims=0)
    return g.op("Reshape", [mean, g.init("e.shape", np.array([-1, 1, 1, 1], np.int64))], "energy")


def _audio_encoder(g: Graph, audio: str, cost: Wav2LipCost, c_out: int) -> str:
    """[B, 50, 384] -> [B, c_out, 1, 1]: a projection of the mean over the window."""
    pooled = g.op("ReduceMean", [audio], "aud.mean", axes=[1], keepdims=0)  # [B, 384]
    w = g.rng.standard_normal((HIDDEN, c_out), np.float32) * np.float32(np.sqrt(1.0 / HIDDEN))
    y = g.op("MatMul", [pooled, g.init("aud.w", w)], "aud.proj")
    return g.op("Reshape", [y, g.init("aud.shape", np.array([-1, c_out, 1, 1], np.int64))], "aud")


def build_musetalk_unet(cost: Wav2LipCost | None = None, *, seed: int = 19) -> onnx.ModelProto:
    cost = cost or MUSETALK_PRESETS["musetalk"].unet
    g = Graph(np.random.default_rng(seed))
    ref = g.op("Slice", ["sample", g.init("ref.from", np.array([4], np.int64)),
                         g.init("ref.to", np.array([8], np.int64)),
                         g.init("ref.axis", np.array([1], np.int64))], "reference")
    energy = _window_energy(g, "encoder_hidden_states")
    drawn = shade_mouth(g, ref, energy, OPEN_FROM, OPEN_SPAN, LATENT_SIDE, tint=CAVITY_LATENT)
    # One step at timestep 0: the input is read so that exports which take it bind the same.
    t0 = g.op("Mul", ["timestep", g.zero], "t.zero")
    residual = conv_stack(g, "sample", cost, lambda c: _audio_encoder(g, "encoder_hidden_states", cost, c),
                          c_in=8, c_out=4, scale=SCALING / 255)
    out = g.op("Add", [drawn, residual], "raw")
    g.nodes.append(helper.make_node("Add", [out, t0], ["latent"], name="latent"))
    graph = helper.make_graph(
        g.nodes, "musetalk_unet",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 8, LATENT_SIDE, LATENT_SIDE]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT,
                                       ["B", WINDOW_ROWS * STATES, HIDDEN])],
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["B", 4, LATENT_SIDE, LATENT_SIDE])],
        g.used_inits())
    return finish_model(graph, f"avatarfarm MuseTalk UNet stand-in c{cost.width} l{cost.levels}")


def build_vae_decoder(cost: DecoderCost | None = None, *, seed: int = 23) -> onnx.ModelProto:
    cost = cost or MUSETALK_PRESETS["musetalk"].decoder
    g = Graph(np.random.default_rng(seed))
    rgb = g.op("Slice", ["latent_sample", g.init("rgb.from", np.array([0], np.int64)),
                         g.init("rgb.to", np.array([3], np.int64)),
                         g.init("rgb.axis", np.array([1], np.int64))], "rgb")
    image = g.op("Resize", [rgb, "", g.init("scales", np.array([1, 1, 8, 8], np.float32))], "image",
                 mode="linear")
    x = g.conv("latent_sample", 4, cost.widths[0], stem="dec.in")
    for level, c in enumerate(cost.widths):
        if level:
            x = g.up(x, cost.widths[level - 1], c, f"dec{level}.up")
        for _ in range(cost.depth):
            x = g.residual(x, c, f"dec{level}r")
    y = g.conv(x, cost.widths[-1], 3, relu=False, gain=1.0, stem="dec.head")
    residual = g.op("Mul", [g.op("Tanh", [y], "dec.tanh"), g.init("dec.scale", np.array(2 / 255, np.float32))],
                    "dec.residual")
    raw = g.op("Add", [image, residual], "raw")
    g.nodes.append(helper.make_node("Clip", [raw, g.init("lo", np.array(-1.0, np.float32)), g.one],
                                    ["sample"], name="clip"))
    graph = helper.make_graph(
        g.nodes, "vae_decoder",
        [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["B", 4, LATENT_SIDE, LATENT_SIDE])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 3, SIDE, SIDE])],
        g.used_inits())
    return finish_model(graph, f"avatarfarm VAE decoder stand-in {list(cost.widths)} d{cost.depth}")


def build_vae_encoder() -> onnx.ModelProto:
    """``sample`` [B, 3, 256, 256] in [-1, 1] -> ``latent_sample`` [B, 4, 32, 32]: 8x8 block
    means of RGB and of their luma (unscaled, as the decoder takes them back)."""
    g = Graph(np.random.default_rng(29))
    rgb = g.op("AveragePool", ["sample"], "pooled", kernel_shape=[8, 8], strides=[8, 8])
    luma_w = np.array([0.299, 0.587, 0.114], np.float32).reshape(1, 3, 1, 1)
    luma = g.op("Conv", [rgb, g.init("luma", luma_w)], "luma", kernel_shape=[1, 1])
    g.nodes.append(helper.make_node("Concat", [rgb, luma], ["latent_sample"], name="latent", axis=1))
    graph = helper.make_graph(
        g.nodes, "vae_encoder",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["B", 4, LATENT_SIDE, LATENT_SIDE])],
        g.used_inits())
    return finish_model(graph, "avatarfarm VAE encoder stand-in")
