"""The audio feature model a worker's folder names, of whichever kind: HuBERT (a
waveform in, `workers.families.hubert`) or a WeNet streaming encoder (Kaldi fbank
chunks and caches in, `workers.families.wenet`), told apart by the graph's inputs.

Either runs on the device under `FEATURES_KEY`, batched across rooms, on chunks of a
room's audio (`workers.families.rows`); the families fed by it read its rows through
`AudioFeatures.grid` and check a face model's audio input against its `FeatureKind`.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import numpy as np

from workers.device.engine import BatchKey

if typing.TYPE_CHECKING:
    from workers.device.onnx import OrtModel
    from workers.families.rows import RowGrid

FEATURES_KEY = BatchKey("audio-features")


@dataclass(frozen=True, slots=True)
class FeatureKind:
    """How a feature model's rows fold into a face model's audio input ``[C, H, W]``:
    ``H * W`` is one row's values, ``C`` counts rows, ``frame_rows`` to a video frame at
    the family's own rate (HuBERT: 2 rows of 1024 at 25 fps; wenet: 16 rows of 512, one
    encoder step, at 20 fps)."""

    name: str
    row: int
    frame_rows: int

    def frames(self, shape: tuple[int, ...]) -> int:
        """Video frames of rows an audio input of ``shape`` holds (0: not whole frames)."""
        if len(shape) != 3:
            return 0
        c, h, w = shape
        return c // self.frame_rows if h * w == self.row and c % self.frame_rows == 0 else 0

    def example(self, frames: int = 8) -> list[int]:
        """The audio input holding ``frames`` video frames, folded as Ultralight folds it."""
        h = 2 ** int(math.log2(math.isqrt(self.row)))
        return [frames * self.frame_rows, h, self.row // h]


WENET = FeatureKind("wenet", 512, 16)


class AudioFeatures(typing.Protocol):
    """A feature model as the engine runs it (`DeviceModel`: per-item feed ``INPUT``, a
    chunk of waveform) and as the families read it."""

    INPUT: typing.ClassVar[str]
    name: str
    provider: str
    kind: FeatureKind
    silence: np.ndarray  # [rows a chunk, values a row]: a silent chunk's rows

    def grid(self, audio_shape: tuple[int, ...]) -> RowGrid:
        """How its chunks are fed and a frame's window of ``audio_shape`` is read."""
        ...

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[typing.Any], float]: ...

    def example_item(self) -> dict[str, np.ndarray]: ...


def open_features(model: OrtModel, normalize: bool = False) -> AudioFeatures:
    """The feature model in ``model``, by its inputs: one waveform input is HuBERT (each
    chunk normalised first where ``normalize``); ``chunk``/``offset``/caches is WeNet."""
    from workers.families import hubert, wenet

    names = {i.name for i in model.session.get_inputs()}
    if wenet.is_wenet(names):
        return wenet.WenetFeatures(model)
    return hubert.FeatureModel(model, normalize)
