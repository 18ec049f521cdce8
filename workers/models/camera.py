"""The reference face reader: what a camera room of the reference family reads from its
driver's face, built from numpy with fixed seeds (no weights to download).

``face`` float32 [B, 3, 128, 128] (the driver's face box, RGB / 255, as the frontal-face
detector frames it) -> ``measures`` float32 [B, 3]: how much darker than the cheeks
the mouth is, and the left and right eye (the performer's; on the viewer's right and
left of a camera image). An open mouth is dark inside; a closed eye is lid skin where
an open one shows its dark iris and lashes: the room turns these into blendshapes
against the driver's own resting face (`workers.camera.motion`).

The regions are shares of the face box (where the detector puts the mouth and eyes of a
frontal face); a small convolution stack over the face adds a bounded, near-zero term,
so the graph costs what a small landmark network does and is batched like one.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from workers.models.reference import finish_model
from workers.models.wav2lip import Graph

SIDE = 128
# (x0, x1, y0, y1) shares of the face box.
MOUTH = (0.40, 0.60, 0.76, 0.87)
CHEEKS = ((0.18, 0.32, 0.55, 0.68), (0.68, 0.82, 0.55, 0.68))
EYE_LEFT = (0.62, 0.84, 0.31, 0.44)  # the performer's left eye: the viewer's right
EYE_RIGHT = (0.16, 0.38, 0.30, 0.43)
LUMA = (0.299, 0.587, 0.114)


def _region(box: tuple[float, float, float, float]) -> np.ndarray:
    """[SIDE, SIDE] weights averaging the box's pixels."""
    w = np.zeros((SIDE, SIDE), np.float32)
    x0, x1, y0, y1 = (round(v * SIDE) for v in box)
    w[y0:y1, x0:x1] = 1.0
    return w / w.sum()


def build_face_reader(*, width: int = 16, seed: int = 53) -> onnx.ModelProto:
    g = Graph(np.random.default_rng(seed))
    luma = g.op("Conv", ["face", g.init("luma", np.array(LUMA, np.float32).reshape(1, 3, 1, 1))], "luma",
                kernel_shape=[1, 1])  # [B, 1, S, S]
    cheeks = 0.5 * (_region(CHEEKS[0]) + _region(CHEEKS[1]))
    # One weight map per measure: the cheeks' mean less the region's.
    maps = np.stack([cheeks - _region(MOUTH), cheeks - _region(EYE_LEFT), cheeks - _region(EYE_RIGHT)])
    flat = g.op("Flatten", [luma], "flat", axis=1)  # [B, S*S]
    measures = g.op("MatMul", [flat, g.init("regions", maps.reshape(3, -1).T.copy())], "measures.raw")
    # The cost of a small landmark network: strided convolutions over the face, pooled,
    # projected to a term of at most 1e-3 (bounded: it never moves a measure).
    x = g.conv("face", 3, width, stride=(2, 2), stem="c1")
    x = g.conv(x, width, 2 * width, stride=(2, 2), stem="c2")
    x = g.conv(x, 2 * width, 4 * width, stride=(2, 2), stem="c3")
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x], "pool")], "pooled", axis=1)
    w = g.rng.standard_normal((4 * width, 3), np.float32) * np.float32(0.1 / np.sqrt(4 * width))
    term = g.op("Mul", [g.op("Tanh", [g.op("MatMul", [pooled, g.init("proj", w)], "proj")], "bounded"),
                        g.init("small", np.array(1e-3, np.float32))], "term")
    g.nodes.append(helper.make_node("Add", [measures, term], ["measures"], name="measures"))
    graph = helper.make_graph(
        g.nodes, "face_reader",
        [helper.make_tensor_value_info("face", TensorProto.FLOAT, ["B", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("measures", TensorProto.FLOAT, ["B", 3])],
        g.used_inits())
    return finish_model(graph, "avatarfarm reference face reader")
