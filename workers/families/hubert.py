"""The HuBERT feature model, shared by the families fed by its rows (Ultralight, the
audio-driven LivePortrait): as these families export it, ``input`` [B, N] 16 kHz
waveform -> ``output`` [B, T, F], one row per 20 ms, each reading 25 ms.

It runs on the device, batched across rooms, on chunks of two rows (720 samples, every
640: 40 ms of stream); a frame reads the window of rows centred on its own (`grid`).
"""

from __future__ import annotations

import math
import time
import typing

import numpy as np

from workers.device.binding import describe
from workers.device.onnx import ModelInterfaceError, OrtModel
from workers.families.features import FeatureKind
from workers.families.rows import ROW_STRIDE, ROW_WINDOW, RowGrid

CHUNK_ROWS = 2
CHUNK_HOP = ROW_STRIDE * CHUNK_ROWS  # 640 samples: 40 ms
CHUNK_SAMPLES = ROW_STRIDE * (CHUNK_ROWS - 1) + ROW_WINDOW  # 720


class FeatureModel:
    """The audio feature model as the engine runs it (`DeviceModel`): per-item feed
    ``input`` [720] float32 -> [B, 2, F]. ``normalize``: each chunk to zero mean and unit
    variance first, as exports fed by Wav2Vec2FeatureExtractor expect."""

    INPUT: typing.ClassVar[str] = "input"

    def __init__(self, model: OrtModel, normalize: bool = False) -> None:
        self.name = model.name
        self.provider = model.provider
        self.session = model.session
        self.normalize = normalize
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        expected = "expected input float32 [B, N] (16 kHz waveform), output float32 [B, T, F]"
        if len(inputs) != 1 or len(inputs[0].shape) != 2 or inputs[0].type != "tensor(float)":
            raise ModelInterfaceError(
                f"feature model {self.name}: {expected}; it has inputs {describe(inputs)}")
        self._input = inputs[0].name
        self._output = outputs[0].name
        probe = self._call(np.zeros((1, CHUNK_SAMPLES), np.float32))
        if probe.ndim != 3 or probe.shape[1] != CHUNK_ROWS:
            raise ModelInterfaceError(
                f"feature model {self.name}: {CHUNK_SAMPLES} samples gave output {self._output} "
                f"{list(probe.shape)}, not [1, {CHUNK_ROWS}, F] (one row per {ROW_STRIDE} samples, "
                f"each reading {ROW_WINDOW}); {expected}")
        self.width = int(probe.shape[2])
        self.kind = FeatureKind("hubert", self.width, CHUNK_ROWS)
        self.silence = probe[0]  # [2, F]: the rows of a silent chunk

    def _call(self, x: np.ndarray) -> np.ndarray:
        if self.normalize:
            x = (x - x.mean(axis=1, keepdims=True)) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-7)
        (out,) = self.session.run([self._output], {self._input: x.astype(np.float32, copy=False)})
        return np.asarray(out)

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[typing.Any], float]:
        t0 = time.perf_counter()
        out = self._call(feeds[self.INPUT])[:, :CHUNK_ROWS]
        return [out], time.perf_counter() - t0

    def example_item(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        return {self.INPUT: rng.uniform(-0.3, 0.3, CHUNK_SAMPLES).astype(np.float32)}

    def grid(self, audio_shape: tuple[int, ...]) -> RowGrid:
        """Chunks of two rows (720 samples every 640); a frame reads the window of rows of
        ``audio_shape`` centred on its own rows."""
        rows = math.prod(audio_shape) // self.width
        return RowGrid(rows=CHUNK_ROWS, left=0, right=CHUNK_SAMPLES - CHUNK_HOP, first=-(rows // 2),
                       count=rows, shape=audio_shape)
