"""A stand-in Piper voice (VITS, exported to ONNX), built from numpy with fixed seeds, with
the public signature of Piper's exports and their JSON config beside them:

* ``input`` int64 [B, T]: phoneme ids (``^`` first, ``_`` after every phoneme, ``$`` last,
  from the config's ``phoneme_id_map``), zero-padded to the batch's longest;
* ``input_lengths`` int64 [B]: each item's own count of ids;
* ``scales`` float32 [3]: noise scale, length scale (slower speech above 1), noise width;
* -> ``output`` float32 [B, 1, 1, N]: audio at the config's ``audio.sample_rate``, each
  item silent past its own end.

Behaviour: each id lasts `FRAMES_PER_ID` frames of `HOP` samples (times the length
scale); a phoneme sounds as a voiced tone whose pitch and loudness come from its id (a
table), the pads and padding are silent, so the audio rises and falls with the speech as
a voice's does and mouths driven by it move. A stack of 1-D convolutions over the frames
(bounded: it never moves a sample by more than 1e-4) costs what a medium voice's
generator does, batched like one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from workers.models.reference import finish_model
from workers.models.wav2lip import Graph

SAMPLE_RATE = 22_050
HOP = 256
FRAMES_PER_ID = 2  # ~23 ms an id: with a pad after every phoneme, ~20 phonemes a second
N_SYMBOLS = 256
# Piper's default inference scales (its configs' "inference" section).
NOISE_SCALE, LENGTH_SCALE, NOISE_W = 0.667, 1.0, 0.8
PAD, BOS, EOS = "_", "^", "$"


@dataclass(frozen=True, slots=True)
class VoiceCost:
    channels: int
    layers: int


VOICE_PRESETS = {
    "tiny": VoiceCost(channels=16, layers=1),
    # A medium Piper voice's generator: ~0.1 s of CPU per second of speech here.
    "medium": VoiceCost(channels=512, layers=8),
}


def phoneme_id_map() -> dict[str, list[int]]:
    """Ids for the padding, the ends and every character espeak-ng's IPA output uses
    (letters, IPA symbols, stress and length marks, space and punctuation)."""
    symbols = [PAD, BOS, EOS, " ", "!", "'", "(", ")", ",", "-", ".", ":", ";", "?"]
    symbols += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    symbols += list("æçðøħŋœǀǁǂǃɐɑɒɓɔɕɖɗɘəɚɛɜɝɞɟɠɡɢɣɤɥɦɧɨɪɫɬɭɮɯɰɱɲɳɴɵɶɸɹɺɻɽɾʀʁʂʃʄʈʉʊʋʌʍʎʏʐʑʒʔʕʘʙʛʜʝʟʡʢʲˈˌːˑ˞βθχᵻⱱ")
    symbols += ["\u0303", "\u0329", "\u032a", "\u0361", "ɚ", "ᵊ"]
    out: dict[str, list[int]] = {}
    for s in symbols:
        out.setdefault(s, [len(out)])
    return out


def voice_config(name: str = "avatarfarm-stand-in") -> dict[str, object]:
    """The voice's JSON config, as Piper writes one beside its export."""
    ids = phoneme_id_map()
    return {"audio": {"sample_rate": SAMPLE_RATE, "quality": "medium"},
            "espeak": {"voice": "en-us"},
            "inference": {"noise_scale": NOISE_SCALE, "length_scale": LENGTH_SCALE, "noise_w": NOISE_W},
            "phoneme_type": "espeak", "phoneme_id_map": ids, "num_symbols": N_SYMBOLS,
            "num_speakers": 1, "speaker_id_map": {}, "dataset": name}


def _tables(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per id: a tone's frequency (Hz) and loudness; the pads, ends and padding silent."""
    freq = rng.uniform(110.0, 330.0, N_SYMBOLS).astype(np.float32)
    loud = rng.uniform(0.15, 0.35, N_SYMBOLS).astype(np.float32)
    for s, (i,) in phoneme_id_map().items():
        if s in (PAD, BOS, EOS, " ") or (not s.isalpha() and s not in "ˈˌː"):
            loud[i] = 0.0
    loud[0] = 0.0  # id 0 (the pad) is also the batch's padding
    return freq, loud


def build_piper_voice(cost: VoiceCost | None = None, *, seed: int = 61) -> onnx.ModelProto:
    cost = cost or VOICE_PRESETS["medium"]
    g = Graph(np.random.default_rng(seed))
    freq_t, loud_t = _tables(g.rng)
    # Per id: [frequency, loudness], zero past each item's length.
    table = np.stack([freq_t, loud_t], axis=1)  # [S, 2]
    feats = g.op("Gather", [g.init("table", table), "input"], "feats", axis=0)  # [B, T, 2]
    t_len = g.op("Gather", [g.op("Shape", ["input"], "shape"), g.init("one", np.array(1, np.int64))],
                 "t")  # scalar T
    pos = g.op("Range", [g.init("zero64", np.array(0, np.int64)), t_len,
                         g.init("step64", np.array(1, np.int64))], "pos")  # [T]
    valid = g.op("Less", [g.op("Unsqueeze", [pos, g.init("ax0", np.array([0], np.int64))], "pos2"),
                          g.op("Unsqueeze", ["input_lengths", g.init("ax1", np.array([1], np.int64))],
                               "lens2")], "valid")  # [B, T]
    mask = g.op("Unsqueeze", [g.op("Cast", [valid], "validf", to=TensorProto.FLOAT),
                              g.init("ax2", np.array([2], np.int64))], "mask")  # [B, T, 1]
    feats = g.op("Mul", [feats, mask], "feats.masked")
    chans = g.op("Transpose", [feats], "chans", perm=[0, 2, 1])  # [B, 2, T]
    # Durations: FRAMES_PER_ID frames an id, times the length scale.
    length = g.op("Gather", ["scales", g.init("li", np.array(1, np.int64))], "length_scale")
    frame_scale = g.op("Mul", [length, g.init("fpi", np.array(float(FRAMES_PER_ID), np.float32))], "fscale")
    frames = g.op("Resize", [g.op("Unsqueeze", [chans, g.init("ax3", np.array([3], np.int64))], "c4"),
                             "", g.op("Concat", [g.init("s3", np.ones(2, np.float32)),
                                                 g.op("Unsqueeze", [frame_scale, g.init("ax0b", np.array([0], np.int64))], "fs1"),
                                                 g.init("s1", np.ones(1, np.float32))], "fscales", axis=0)],
                  "frames4", mode="nearest")  # [B, 2, F, 1]
    frames = g.op("Squeeze", [frames, g.init("sq3", np.array([3], np.int64))], "frames")  # [B, 2, F]
    # The generator's cost: 1-D convolutions over the frames, a term of at most 1e-4.
    x = g.op("Unsqueeze", [frames, g.init("ax2b", np.array([2], np.int64))], "x4")  # [B, 2, 1, F]
    x = g.conv(x, 2, cost.channels, kernel=1, pads=(0, 0, 0, 0), stem="pre")
    for i in range(cost.layers):
        w = g.rng.standard_normal((cost.channels, cost.channels, 1, 7), np.float32) \
            * np.float32(np.sqrt(1.0 / (cost.channels * 7)))
        y = g.op("Conv", [x, g.init(f"l{i}.w", w), g.init(f"l{i}.b", np.zeros(cost.channels, np.float32))],
                 f"l{i}", kernel_shape=[1, 7], pads=[0, 3, 0, 3])
        x = g.op("Add", [x, g.op("Tanh", [y], f"l{i}.act")], f"l{i}.res")
    post = g.conv(x, cost.channels, 1, kernel=1, pads=(0, 0, 0, 0), relu=False, stem="post")  # [B,1,1,F]
    term = g.op("Mul", [g.op("Tanh", [post], "post.b"), g.init("tiny", np.array(1e-4, np.float32))], "term")
    # Samples: the frames' frequency and loudness held over HOP samples, a tone's phase
    # accumulated sample by sample.
    up = g.op("Resize", [g.op("Unsqueeze", [frames, g.init("ax2c", np.array([2], np.int64))], "f4"), "",
                         g.init("hop", np.array([1, 1, 1, HOP], np.float32))], "up", mode="nearest")  # [B, 2, 1, N]
    f_hz = g.op("Slice", [up, g.init("f.from", np.array([0], np.int64)), g.init("f.to", np.array([1], np.int64)),
                          g.init("f.ax", np.array([1], np.int64))], "f_hz")  # [B, 1, 1, N]
    amp = g.op("Slice", [up, g.init("a.from", np.array([1], np.int64)), g.init("a.to", np.array([2], np.int64)),
                         g.init("a.ax", np.array([1], np.int64))], "amp")
    step = g.op("Mul", [f_hz, g.init("w", np.array(2 * np.pi / SAMPLE_RATE, np.float32))], "step")
    phase = g.op("CumSum", [step, g.init("ax.n", np.array(3, np.int64))], "phase")
    tone = g.op("Mul", [g.op("Sin", [phase], "sin"), amp], "tone")
    # The other scales are read (a real voice's noise), here to a nil term.
    noise = g.op("Mul", [g.op("ReduceSum", ["scales"], "ssum", keepdims=1), g.init("nil", np.array(0.0, np.float32))],
                 "noise")
    term_n = g.op("Resize", [term, "", g.init("hop2", np.array([1, 1, 1, HOP], np.float32))], "term.up",
                  mode="nearest")
    g.nodes.append(helper.make_node("Add", [g.op("Add", [tone, term_n], "voiced"), noise], ["output"],
                                    name="output"))
    graph = helper.make_graph(
        g.nodes, "piper_voice",
        [helper.make_tensor_value_info("input", TensorProto.INT64, ["B", "T"]),
         helper.make_tensor_value_info("input_lengths", TensorProto.INT64, ["B"]),
         helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 1, 1, "N"])],
        g.used_inits())
    return finish_model(graph, f"avatarfarm Piper voice stand-in c{cost.channels} l{cost.layers}")


def write_voice(folder: Path, name: str, preset: str = "medium") -> Path:
    """The stand-in voice as Piper ships one: ``<name>.onnx`` and ``<name>.onnx.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / f"{name}.onnx"
    model.write_bytes(build_piper_voice(VOICE_PRESETS[preset]).SerializeToString())
    (folder / f"{name}.onnx.json").write_text(json.dumps(voice_config(name), ensure_ascii=False, indent=1))
    return model
