"""A WeNet streaming conformer encoder as Ultralight's wenet models are fed by it:
``chunk`` [1, 67, 80] Kaldi fbank (`workers.media.kaldi_fbank`), ``offset`` int64 [1],
``att_cache`` and ``cnn_cache`` -> ``output`` [1, 16, 512] (and the caches again).

How the family feeds it: the stream is read with 32 fbank frames (320 ms) of silence
before it; every 5 fbank frames (50 ms: 20 steps a second, the family's 20 fps) a step
runs on the next 67 frames with zero caches and a fixed offset, so each step stands
alone and steps of many rooms are independent items for the batcher. One step is one
row of the stream's grid (`workers.families.rows`): its own 800 samples read with
5120 before and 5040 after (the 67 frames reach 365 ms past the step's start, so a
frame waits for that much audio past its window). A video frame at any rate reads the
window of steps centred on ``round(20 i / fps)``; Ultralight folds a step's [16, 512]
as ``[16, 16, 32]`` of the UNet's audio input (`FeatureKind` ``WENET``).

Exports fix the batch at 1: a batch of items runs as that many calls, one after the
other, within the engine's one device call (a dynamic batch axis runs them at once).
"""

from __future__ import annotations

import math
import time
import typing

import numpy as np

from workers.device.binding import describe
from workers.device.onnx import ModelInterfaceError, OrtModel
from workers.families.features import FeatureKind
from workers.families.rows import RowGrid
from workers.media import kaldi_fbank

STEP_FRAMES = 5  # fbank frames a step advances: 50 ms
LEAD_FRAMES = 32  # fbank frames of silence before the stream
OFFSET = 100  # the position offset each step is fed (with zero caches: steps stand alone)
STEP = STEP_FRAMES * kaldi_fbank.SHIFT  # 800 samples
CACHES = ("att_cache", "cnn_cache")


def is_wenet(inputs: typing.Collection[str]) -> bool:
    """Whether a graph with these input names is a WeNet streaming encoder."""
    return "chunk" in inputs and all(c in inputs for c in CACHES)


class WenetFeatures:
    """The encoder as the engine runs it (`AudioFeatures`): per-item feed ``input`` [N]
    float32, the step's samples (N = `samples`) -> [B, 1, S * D] (one row: the step)."""

    INPUT: typing.ClassVar[str] = "input"

    def __init__(self, model: OrtModel) -> None:
        self.name = model.name
        self.provider = model.provider
        self.session = model.session
        inputs = {i.name: i for i in self.session.get_inputs()}
        expected = ("expected chunk float32 [1, T, 80] (fbank), offset int64 [1], att_cache and "
                    "cnn_cache float32 of fixed shapes")
        chunk = inputs.get("chunk")
        shapes = {n: inputs[n].shape for n in CACHES if n in inputs}
        extra = set(inputs) - {"chunk", "offset", *CACHES}
        if (chunk is None or len(chunk.shape) != 3 or chunk.shape[2] != kaldi_fbank.N_MELS
                or not isinstance(chunk.shape[1], int) or "offset" not in inputs or extra
                or len(shapes) != 2 or not all(all(isinstance(d, int) for d in s) for s in shapes.values())):
            raise ModelInterfaceError(
                f"wenet feature model {self.name}: {expected}; it has inputs {describe(list(inputs.values()))}")
        self.frames = int(chunk.shape[1])
        self._fixed_batch = chunk.shape[0] == 1
        self._caches = {n: np.zeros(typing.cast(list[int], s), np.float32) for n, s in shapes.items()}
        self._output = self.session.get_outputs()[0].name
        # One step's samples: its fbank frames, read from the start of the stream's lead.
        self.samples = (self.frames - 1) * kaldi_fbank.SHIFT + kaldi_fbank.FRAME
        probe = self._step(np.zeros(self.samples, np.float32))
        if probe.ndim != 2:
            raise ModelInterfaceError(f"wenet feature model {self.name}: output {self._output} "
                                      f"is {list(probe.shape)} for one step, not [1, S, D]")
        self.kind = FeatureKind("wenet", int(probe.shape[1]), int(probe.shape[0]))  # WENET's
        self.silence = probe.reshape(1, -1)  # [1, S * D]: a silent step

    def _step(self, samples: np.ndarray) -> np.ndarray:
        """One step's output [S, D]."""
        return self._steps(samples[None])[0]

    def _steps(self, samples: np.ndarray) -> np.ndarray:
        chunks = np.stack([kaldi_fbank.fbank(s) for s in samples])  # [B, T, 80]
        if self._fixed_batch:
            return np.concatenate([self._call(c[None]) for c in chunks])
        return self._call(chunks)

    def _call(self, chunks: np.ndarray) -> np.ndarray:
        b = chunks.shape[0]
        feeds = {"chunk": chunks, "offset": np.full(1, OFFSET, np.int64), **self._caches}
        (out,) = self.session.run([self._output], feeds)
        return np.asarray(out).reshape(b, *np.asarray(out).shape[1:])

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[typing.Any], float]:
        t0 = time.perf_counter()
        out = self._steps(feeds[self.INPUT])
        return [out.reshape(out.shape[0], 1, -1)], time.perf_counter() - t0

    def example_item(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        return {self.INPUT: rng.uniform(-0.3, 0.3, self.samples).astype(np.float32)}

    def grid(self, audio_shape: tuple[int, ...]) -> RowGrid:
        """One step a chunk; a frame reads the window of steps ``audio_shape`` holds
        centred on its own."""
        steps = math.prod(audio_shape) // self.silence.shape[1]
        left = LEAD_FRAMES * kaldi_fbank.SHIFT
        return RowGrid(rows=1, left=left, right=self.samples - left - STEP, first=-(steps // 2),
                       count=steps, shape=audio_shape, stride=STEP)
