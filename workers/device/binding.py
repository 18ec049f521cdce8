"""Binding face-redraw models (Wav2Lip, and families like it) by shape and role, not by name.

Exports of the same model name their tensors differently (FaceFusion's ``source``/
``target``, the community ``mel_spectrogram``/``video_frames``), order them either
way round and sometimes fix the batch axis at 1 (MODELS.md, "Wav2Lip"). What they
share is the shapes: mel ``[B, 1, 80, 16]`` and faces ``[B, 6, S, S]`` in,
``[B, 3, S, S]`` out. ``bind_lipsync`` finds each role from those, reads ``S`` and the
batch axis, and refuses a model that does not fit with a message naming what was
expected and what the model has. ``FaceLayout`` is the manifest's override for exports
that differ in what the six channels hold (channel order, colour order, scale);
Wav2Lip's layout is the default. Other families bind through the same code with their
own `AudioRole` (Ultralight's window of HuBERT features, ``workers.families.ultralight``)
and layout (its real crop first, a mask rectangle instead of the lower half).

``LipSyncRunner`` feeds a batch in the model's layout and runs it: in one call where
the batch axis is dynamic, in calls of the fixed size otherwise. ``make_batch_dynamic``
rewrites a fixed batch axis to a symbolic one where the graph allows, and proves it by
running the result at batch 3 against the original item by item.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from workers.device.onnx import ModelInterfaceError, OrtModel

log = logging.getLogger(__name__)

MEL_SHAPE = (1, 80, 16)  # per item
FACE_CHANNELS = 6
OUT_CHANNELS = 3
BATCH_AXIS = "batch"

Dim = int | str | None  # onnxruntime's NodeArg.shape entries: fixed, symbolic, unknown


class ModelBindingError(ModelInterfaceError):
    """A model whose inputs or outputs cannot be bound to the lip-sync roles."""


class BatchRewriteError(ModelInterfaceError):
    """A fixed batch axis that cannot be made dynamic: the graph depends on it."""


class ChannelOrder(enum.Enum):
    MASKED_FIRST = "masked_first"  # Wav2Lip: [masked face, unmasked face]
    UNMASKED_FIRST = "unmasked_first"  # Ultralight-style: [real, masked]


class ColourOrder(enum.Enum):
    BGR = "bgr"  # Wav2Lip (OpenCV frames)
    RGB = "rgb"


@dataclass(frozen=True, slots=True)
class AudioRole:
    """What a family's audio input is: which per-item shapes fit, in words for errors."""

    description: str
    fits: Callable[[tuple[int, ...]], bool]


WAV2LIP_AUDIO = AudioRole("mel float32 [B, 1, 80, 16] (80 bands x 16 steps of 12.5 ms)",
                          lambda shape: shape == MEL_SHAPE)


class InputScale(enum.Enum):
    UNIT = "0..1"  # pixels / 255 (Wav2Lip)
    SIGNED = "-1..1"  # pixels / 127.5 - 1


@dataclass(frozen=True, slots=True)
class FaceLayout:
    """What the faces input holds, and so how the output is read: an export that takes
    RGB in -1..1 is taken to give RGB in -1..1 back. Defaults are Wav2Lip's."""

    channels: ChannelOrder = ChannelOrder.MASKED_FIRST
    colour: ColourOrder = ColourOrder.BGR
    scale: InputScale = InputScale.UNIT
    # The masked copy's black rectangle (x, y, w, h in pixels, as cv2.rectangle takes it,
    # both ends included); None: the lower half, as Wav2Lip masks.
    mask: tuple[int, int, int, int] | None = None

    @staticmethod
    def from_manifest(entry: Mapping[str, str]) -> FaceLayout:
        """From a manifest's ``{"channels": ..., "colour": ..., "scale": ...}``; missing
        keys keep Wav2Lip's defaults."""
        d = FaceLayout()
        try:
            return FaceLayout(ChannelOrder(entry.get("channels", d.channels.value)),
                              ColourOrder(entry.get("colour", d.colour.value)),
                              InputScale(entry.get("scale", d.scale.value)))
        except ValueError as e:
            raise ModelBindingError(
                f"face layout {dict(entry)}: {e}; channels is one of {[c.value for c in ChannelOrder]}, "
                f"colour one of {[c.value for c in ColourOrder]}, "
                f"scale one of {[s.value for s in InputScale]}") from e


WAV2LIP_LAYOUT = FaceLayout()


@dataclass(frozen=True, slots=True)
class LipSyncBinding:
    """Which tensor plays which role, and the sizes read from the model."""

    mel: str  # the audio input: Wav2Lip's mel window, or the family's features
    faces: str
    output: str
    side: int
    batch: int | None  # None: dynamic; else the only batch size the model takes
    layout: FaceLayout = WAV2LIP_LAYOUT
    audio_shape: tuple[int, ...] = MEL_SHAPE  # per item

    @property
    def fixed_at_one(self) -> bool:
        return self.batch == 1


def _fmt(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def describe(args: Sequence[Any]) -> str:
    """onnxruntime inputs or outputs as error messages name them: ``name type [shape]``."""
    return ", ".join(f"{a.name} {a.type} {_fmt(a.shape)}" for a in args) or "none"


def _static(shape: Sequence[Dim]) -> tuple[int, ...] | None:
    return tuple(shape) if all(isinstance(d, int) for d in shape) else None  # type: ignore[arg-type]


def _is_audio(shape: Sequence[Dim], role: AudioRole) -> bool:
    item = _static(shape[1:])
    return len(shape) >= 2 and item is not None and role.fits(item)


def _is_faces(shape: Sequence[Dim]) -> bool:
    return len(shape) == 4 and shape[1] == FACE_CHANNELS


def _batch_dim(d: Dim) -> int | None:
    return d if isinstance(d, int) else None


def bind_lipsync(session: Any, layout: FaceLayout = WAV2LIP_LAYOUT, *, name: str = "lip-sync",
                 side: int | None = None, audio: AudioRole = WAV2LIP_AUDIO) -> LipSyncBinding:
    """Binds an onnxruntime ``InferenceSession`` (or anything with ``get_inputs`` and
    ``get_outputs``) to the roles by shape: faces, ``audio`` (Wav2Lip's mel window by
    default) and the redrawn face. ``side`` is needed only for an export whose spatial
    axes are symbolic. Raises ModelBindingError."""
    inputs, outputs = list(session.get_inputs()), list(session.get_outputs())
    expected = (f"expected inputs {audio.description} and faces float32 "
                f"[B, {FACE_CHANNELS}, S, S], output float32 [B, {OUT_CHANNELS}, S, S]")

    def refuse(why: str) -> ModelBindingError:
        return ModelBindingError(f"model {name}: {why}; {expected}; the model has inputs "
                                 f"{describe(inputs)} and outputs {describe(outputs)}")

    if len(inputs) != 2:
        raise refuse(f"{len(inputs)} inputs")
    faces = [a for a in inputs if _is_faces(a.shape)]
    mels = [a for a in inputs if not _is_faces(a.shape) and _is_audio(a.shape, audio)]
    if len(faces) != 1:
        raise refuse(f"{len(faces)} inputs are face stacks [B, {FACE_CHANNELS}, S, S] (need exactly one)")
    if len(mels) != 1:
        other = next(a for a in inputs if not _is_faces(a.shape))
        raise refuse(f"input {other.name} is {_fmt(other.shape)} where {audio.description} "
                     f"was expected")
    mel, face = mels[0], faces[0]
    for a in (mel, face):
        if a.type != "tensor(float)":
            raise refuse(f"input {a.name} is {a.type}, not tensor(float)")
    h, w = face.shape[2], face.shape[3]
    if isinstance(h, int) and isinstance(w, int):
        if h != w:
            raise refuse(f"faces input {face.name} is not square ({h} x {w})")
        if side is not None and side != h:
            raise refuse(f"faces input {face.name} is {h} x {w}, not the {side} x {side} asked for")
        s = h
    elif side is not None:
        s = side
    else:
        raise refuse(f"faces input {face.name} has symbolic spatial axes; give the crop side")
    outs = [o for o in outputs
            if len(o.shape) == 4 and o.shape[1] == OUT_CHANNELS
            and all(d == s or not isinstance(d, int) for d in o.shape[2:])]
    if len(outs) != 1:
        raise refuse(f"{len(outs)} outputs shaped [B, {OUT_CHANNELS}, {s}, {s}] (need exactly one)")
    batches = {_batch_dim(a.shape[0]) for a in (mel, face, outs[0])}
    fixed = {b for b in batches if b is not None}
    if len(fixed) > 1:
        raise refuse(f"batch axes disagree ({sorted(fixed)})")
    batch = next(iter(fixed)) if fixed else None
    audio_shape = _static(mel.shape[1:])
    assert audio_shape is not None
    return LipSyncBinding(mel.name, face.name, outs[0].name, s, batch, layout, audio_shape)


def make_feeds(binding: LipSyncBinding, mel: npt.NDArray[np.float32],
               faces: npt.NDArray[np.uint8]) -> dict[str, np.ndarray]:
    """Feeds for one batch: ``mel`` [B, 1, 80, 16] (normalised log-mel windows; for
    another family, its audio input per item) and ``faces`` [B, S, S, 3] uint8 BGR crops
    -> the model's two inputs, with the masked copy (lower half zeroed, as Wav2Lip's
    ``img_masked[:, S // 2:] = 0``, or the layout's rectangle: black pixels, before
    scaling) made here, in the binding's channel order, colour order and scale."""
    s = binding.side
    if mel.shape[1:] != binding.audio_shape:
        raise ValueError(f"audio inputs must be [B, {', '.join(map(str, binding.audio_shape))}], "
                         f"got {list(mel.shape)}")
    if faces.dtype != np.uint8 or faces.shape[1:] != (s, s, 3):
        raise ValueError(f"face crops must be uint8 [B, {s}, {s}, 3], got {faces.dtype} {list(faces.shape)}")
    if faces.shape[0] != mel.shape[0]:
        raise ValueError(f"{mel.shape[0]} mel windows for {faces.shape[0]} face crops")
    layout = binding.layout
    img = faces[..., ::-1] if layout.colour is ColourOrder.RGB else faces
    x = np.empty((faces.shape[0], FACE_CHANNELS, s, s), np.float32)
    unmasked = np.transpose(img, (0, 3, 1, 2))
    masked_at, real_at = ((0, 3) if layout.channels is ChannelOrder.MASKED_FIRST else (3, 0))
    x[:, real_at:real_at + 3] = unmasked
    x[:, masked_at:masked_at + 3] = unmasked
    if layout.mask is None:
        x[:, masked_at:masked_at + 3, s // 2:] = 0.0
    else:
        mx, my, mw, mh = layout.mask
        x[:, masked_at:masked_at + 3, my:my + mh + 1, mx:mx + mw + 1] = 0.0
    if layout.scale is InputScale.UNIT:
        x *= np.float32(1 / 255)
    else:
        x *= np.float32(1 / 127.5)
        x -= np.float32(1.0)
    return {binding.mel: np.ascontiguousarray(mel, dtype=np.float32), binding.faces: x}


def read_output(binding: LipSyncBinding, out: np.ndarray) -> npt.NDArray[np.float32]:
    """The model's output in the pipeline's terms: [B, 3, S, S] BGR in 0..1."""
    y = np.asarray(out, np.float32)
    if binding.layout.scale is InputScale.SIGNED:
        y = (y + 1.0) * 0.5
    if binding.layout.colour is ColourOrder.RGB:
        y = y[:, ::-1]
    return np.clip(y, 0.0, 1.0)


class LipSyncRunner:
    """One bound lip-sync session: feeds a batch in the model's layout and runs it in
    one call, or, for an export with a fixed batch axis, in calls of that size (item by
    item for the common fixed-at-1 export; said once in the log, since it costs
    throughput a dynamic export would not lose)."""

    def __init__(self, session: Any, layout: FaceLayout = WAV2LIP_LAYOUT, *,
                 name: str = "lip-sync", side: int | None = None,
                 audio: AudioRole = WAV2LIP_AUDIO) -> None:
        self.session = session
        self.name = name
        self.binding = bind_lipsync(session, layout, name=name, side=side, audio=audio)
        self._said_fixed = False

    def run(self, mel: npt.NDArray[np.float32], faces: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """[B, 1, 80, 16] mel windows and [B, S, S, 3] uint8 BGR crops -> [B, 3, S, S]
        BGR frames in 0..1."""
        b = self.binding
        feeds = make_feeds(b, mel, faces)
        n = mel.shape[0]
        if b.batch is None or b.batch == n:
            (out,) = self.session.run([b.output], feeds)
            return read_output(b, out)
        if not self._said_fixed:
            self._said_fixed = True
            log.info("model %s fixes its batch axis at %d: running batches in calls of %d%s",
                     self.name, b.batch, b.batch,
                     " (item by item); make_batch_dynamic may lift this" if b.batch == 1 else "")
        parts = []
        for i in range(0, n, b.batch):
            chunk = {k: v[i:i + b.batch] for k, v in feeds.items()}
            short = b.batch - chunk[b.mel].shape[0]
            if short:  # pad the last call to the fixed size; the padding is dropped
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in chunk.items()}
            (out,) = self.session.run([b.output], chunk)
            parts.append(out[:b.batch - short])
        return read_output(b, np.concatenate(parts))


class LipSyncDeviceModel:
    """A bound lip-sync model as the inference engine runs it
    (`workers.device.engine.DeviceModel`): per-item feeds ``mel`` [1, 80, 16] float32
    and ``faces`` [S, S, 3] uint8 BGR crops, stacked by the engine; one output, the
    redrawn faces [B, 3, S, S] BGR in 0..1. The model's own layout (names, channel
    and colour order, scale, a fixed batch axis) stays inside `LipSyncRunner`."""

    MEL = "mel"
    FACES = "faces"

    def __init__(self, model: OrtModel, layout: FaceLayout = WAV2LIP_LAYOUT,
                 audio: AudioRole = WAV2LIP_AUDIO) -> None:
        self.name = model.name
        self.provider = model.provider
        self.runner = LipSyncRunner(model.session, layout, name=model.name, audio=audio)

    @property
    def side(self) -> int:
        return self.runner.binding.side

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[Any], float]:
        t0 = time.perf_counter()
        out = self.runner.run(feeds[self.MEL], feeds[self.FACES])
        return [out], time.perf_counter() - t0

    def example_item(self) -> dict[str, np.ndarray]:
        """One item of speech-level input, for timing."""
        s = self.side
        rng = np.random.default_rng(0)
        return {self.MEL: rng.uniform(-2.0, 2.0, self.runner.binding.audio_shape).astype(np.float32),
                self.FACES: rng.integers(0, 255, (s, s, 3), np.uint8)}


# -- fixed batch axis -> dynamic


def _const_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_ints":
                    values[node.output[0]] = np.array(list(a.ints), np.int64)
    return values


def _input_derived(graph: onnx.GraphProto, inputs: set[str]) -> set[str]:
    """Tensors computed (through any path) from the graph's inputs; nodes are in
    topological order in a valid graph."""
    derived = set(inputs)
    for node in graph.node:
        if any(i in derived for i in node.input):
            derived.update(node.output)
    return derived


def _hard_coded_batch(graph: onnx.GraphProto, inputs: set[str]) -> str | None:
    """A node that writes a fixed leading size into a tensor computed from the
    inputs (a Reshape to [1, ...]), described; None if there is none. Subgraphs are
    not searched: running at batch 3 catches what this misses."""
    consts = _const_values(graph)
    derived = _input_derived(graph, inputs)
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[0] in derived and node.input[1] in consts:
            shape = consts[node.input[1]].reshape(-1)
            lead = int(shape[0]) if shape.size else 0
            if lead > 0:
                return (f"node {node.name or node.output[0]!r} (Reshape) reshapes {node.input[0]!r} "
                        f"to the constant shape {shape.tolist()}, whose leading {lead} is the batch")
    return None


def _example(vi: onnx.ValueInfoProto, batch: int, rng: np.random.Generator) -> np.ndarray:
    t = vi.type.tensor_type
    dims = [batch] + [d.dim_value if d.HasField("dim_value") else 16 for d in t.shape.dim[1:]]
    dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
    if np.issubdtype(dtype, np.floating):
        return rng.uniform(0.0, 1.0, dims).astype(dtype)
    return np.zeros(dims, dtype)


def _cpu_session(model: onnx.ModelProto) -> Any:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def make_batch_dynamic(model: onnx.ModelProto, *, check_batch: int = 3,
                       atol: float = 1e-4) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs and outputs have a symbolic leading
    (batch) axis, where they had it fixed at 1. Stale intermediate shapes are dropped;
    the result is checked (onnx.checker, strict shape inference) and run in
    onnxruntime (CPU) at batch ``check_batch`` against the original run item by item.
    Raises BatchRewriteError when the graph hard-codes the batch, naming the node or
    the failing check; an already dynamic model comes back unchanged (as a copy)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    init_names = {t.name for t in g.initializer}
    inputs = [vi for vi in g.input if vi.name not in init_names]
    fixed: list[str] = []
    for vi in [*inputs, *g.output]:
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            raise BatchRewriteError(f"{vi.name!r} has no batch axis (scalar or unknown rank)")
        lead = dims[0]
        if lead.HasField("dim_value"):
            if lead.dim_value != 1:
                raise BatchRewriteError(
                    f"{vi.name!r} has a fixed leading axis of {lead.dim_value}: only a batch "
                    "fixed at 1 is rewritten (a larger fixed axis may not be the batch)")
            lead.Clear()
            lead.dim_param = BATCH_AXIS
            fixed.append(vi.name)
    if not fixed:
        return out
    why = _hard_coded_batch(g, {vi.name for vi in inputs})
    if why:
        raise BatchRewriteError(f"cannot make the batch axis dynamic: {why}")
    del g.value_info[:]
    try:
        onnx.checker.check_model(out, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise BatchRewriteError(f"the graph with a dynamic batch axis does not check: {e}") from e
    for vi in inferred.graph.output:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            raise BatchRewriteError(f"output {vi.name!r} still infers a fixed batch of "
                                    f"{dims[0].dim_value}: the graph hard-codes it")
    rng = np.random.default_rng(0)
    feeds = {vi.name: _example(vi, check_batch, rng) for vi in inputs}
    try:
        batched = _cpu_session(out).run(None, feeds)
        original = _cpu_session(model)
        items = [original.run(None, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(check_batch)]
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise BatchRewriteError(f"the graph with a dynamic batch axis does not run at batch "
                                f"{check_batch}: {e}") from e
    for k, o in enumerate(batched):
        name = g.output[k].name
        if o.shape[:1] != (check_batch,):
            raise BatchRewriteError(f"output {name!r} has shape {list(o.shape)} at batch {check_batch}: "
                                    "the graph hard-codes the batch")
        single = np.concatenate([item[k] for item in items])
        if not np.allclose(o, single, atol=atol, rtol=1e-3):
            raise BatchRewriteError(
                f"output {name!r} at batch {check_batch} differs from the items run one by one "
                f"(max {float(np.max(np.abs(o - single))):.3g}): the graph mixes batch items")
    log.info("batch axis made dynamic on %s", ", ".join(fixed))
    return out
