"""The Ultralight / Duix family's adapter: HuBERT features on the device, a per-person UNet.

Audio: the feature model (HuBERT as the family exports it: ``input`` [B, N] 16 kHz
waveform -> ``output`` [B, T, F], one row per 20 ms, each reading 25 ms) runs on the
device, batched across rooms, on chunks of two rows (720 samples, every 640: 40 ms of
stream). A chunk with no sound in it is not run: it takes the rows the model gives
silence, computed once at load. Video frame ``i`` at ``fps`` takes the window of rows
centred on row ``round(50 * i / fps)`` (two rows a frame at the family's 25 fps, so a
window of 8 frames is ``[16, 32, 32]`` and of 16 frames ``[32, 32, 32]``: read from the
UNet's audio input), rows before the stream's start read as silence. A frame therefore
waits for half its window of audio (160 ms for 8 frames), as Wav2Lip waits for its
200 ms.

Faces: ``input`` [B, 6, 160, 160] is the real crop then the masked one (the rectangle
(5, 5, 150, 145) blacked out), BGR / 255: `LAYOUT`. Each avatar has its own UNet,
carried in its bundle (`avatarfarm.preparation.bundle`); the feature model is the
worker's, in its model folder.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from workers.device.binding import AudioRole, ChannelOrder, ColourOrder, FaceLayout, InputScale
from workers.device.engine import BatchKey
from workers.device.onnx import ModelInterfaceError, OrtModel
from workers.families.base import FaceFamily, FrameAudio

log = logging.getLogger(__name__)

ROWS_PER_SECOND = 50
ROW_STRIDE = 320
ROW_WINDOW = 400
CHUNK_ROWS = 2
CHUNK_HOP = ROW_STRIDE * CHUNK_ROWS  # 640 samples: 40 ms
CHUNK_SAMPLES = ROW_STRIDE * (CHUNK_ROWS - 1) + ROW_WINDOW  # 720
SILENCE_RMS = 10 ** (-60 / 20)  # a chunk quieter than -60 dBFS is silence
LAYOUT = FaceLayout(ChannelOrder.UNMASKED_FIRST, ColourOrder.BGR, InputScale.UNIT, mask=(5, 5, 150, 145))
FEATURES_KEY = BatchKey("audio-features")

Features = Callable[[np.ndarray, float, int], Awaitable[typing.Any]]  # -> pipeline.Timed


def audio_role(width: int) -> AudioRole:
    """The UNet's audio input: a window of whole video frames of ``width``-wide rows."""
    return AudioRole(
        f"audio float32 [B, C, H, W] holding whole video frames of feature rows (2 rows of "
        f"{width} a frame, e.g. [16, 32, 32] for 8 frames)",
        lambda shape: len(shape) == 3 and math.prod(shape) % (CHUNK_ROWS * width) == 0)


class FeatureModel:
    """The audio feature model as the engine runs it (`DeviceModel`): per-item feed
    ``input`` [720] float32 -> [B, 2, F]. ``normalize``: each chunk to zero mean and unit
    variance first, as exports fed by Wav2Vec2FeatureExtractor expect."""

    INPUT = "input"

    def __init__(self, model: OrtModel, normalize: bool = False) -> None:
        self.name = model.name
        self.provider = model.provider
        self.session = model.session
        self.normalize = normalize
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        expected = "expected input float32 [B, N] (16 kHz waveform), output float32 [B, T, F]"
        if len(inputs) != 1 or len(inputs[0].shape) != 2 or inputs[0].type != "tensor(float)":
            raise ModelInterfaceError(
                f"feature model {self.name}: {expected}; it has inputs "
                + ", ".join(f"{a.name} {a.type} {a.shape}" for a in inputs))
        self._input = inputs[0].name
        self._output = outputs[0].name
        probe = self._call(np.zeros((1, CHUNK_SAMPLES), np.float32))
        if probe.ndim != 3 or probe.shape[1] != CHUNK_ROWS:
            raise ModelInterfaceError(
                f"feature model {self.name}: {CHUNK_SAMPLES} samples gave output {self._output} "
                f"{list(probe.shape)}, not [1, {CHUNK_ROWS}, F] (one row per {ROW_STRIDE} samples, "
                f"each reading {ROW_WINDOW}); {expected}")
        self.width = int(probe.shape[2])
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


@dataclass(frozen=True, slots=True)
class FeatureWindow:
    chunks: tuple[typing.Any, ...]  # futures or [2, F] arrays, one per chunk, in order
    skip: int  # rows of the first chunk before the window
    rows: int
    shape: tuple[int, ...]
    silent: bool

    async def value(self) -> np.ndarray:
        parts = [c if isinstance(c, np.ndarray) else await c for c in self.chunks]
        rows = np.concatenate(parts)[self.skip:self.skip + self.rows]
        return np.ascontiguousarray(rows.reshape(self.shape), dtype=np.float32)


class UltralightSpeech:
    """A room's audio -> feature chunks submitted as the audio arrives -> each frame's
    window of rows, once the window's last chunk is submitted."""

    def __init__(self, fps: int, shape: tuple[int, ...], width: int, silence: np.ndarray,
                 features: Features, priority: int,
                 on_seconds: Callable[[float], None] = lambda s: None) -> None:
        self.fps = fps
        self.shape = shape
        self.rows = math.prod(shape) // width
        self.silence = silence
        self.features = features
        self.priority = priority
        self.on_seconds = on_seconds
        self._audio = np.zeros(0, np.float32)  # samples from chunk `_next_chunk`'s start
        self._received = 0
        self._next_chunk = 0
        self._chunks: dict[int, typing.Any] = {}
        self._silent: dict[int, bool] = {}
        self._next_frame = 0

    @property
    def frames_emitted(self) -> int:
        return self._next_frame

    def push(self, samples: np.ndarray, deadline: float) -> list[FrameAudio]:
        self._audio = np.concatenate([self._audio, np.asarray(samples, np.float32)])
        self._received += len(samples)
        while len(self._audio) >= CHUNK_SAMPLES:
            self._submit(self._audio[:CHUNK_SAMPLES], deadline)
            self._audio = self._audio[CHUNK_HOP:]
        return self._emit(None)

    def finish(self, n_frames: int) -> list[FrameAudio]:
        if self._audio.size and np.sqrt(np.mean(self._audio ** 2)) >= SILENCE_RMS:
            tail = np.zeros(CHUNK_SAMPLES, np.float32)
            tail[:self._audio.size] = self._audio[:CHUNK_SAMPLES]
            self._submit(tail, math.inf)
        self._audio = np.zeros(0, np.float32)
        return self._emit(n_frames)

    def _submit(self, chunk: np.ndarray, deadline: float) -> None:
        c = self._next_chunk
        self._next_chunk += 1
        if np.sqrt(np.mean(chunk ** 2)) < SILENCE_RMS:
            self._chunks[c], self._silent[c] = self.silence, True
            return
        task = asyncio.ensure_future(self.features(chunk.copy(), deadline, self.priority))
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()

        def done(t: asyncio.Future[typing.Any]) -> None:
            if t.cancelled():
                future.cancel()
            elif t.exception() is not None:
                future.set_exception(t.exception())  # type: ignore[arg-type]
                future.exception()  # retrieved: a frame that never awaits it is not an error
            else:
                self.on_seconds(t.result().seconds)
                future.set_result(t.result().value)

        task.add_done_callback(done)
        self._chunks[c], self._silent[c] = future, False

    def _emit(self, until: int | None) -> list[FrameAudio]:
        out: list[FrameAudio] = []
        half = self.rows // 2
        while until is None or self._next_frame < until:
            centre = round(ROWS_PER_SECOND * self._next_frame / self.fps)
            first, last = centre - half, centre + half - 1  # rows of the window
            if until is None and last // CHUNK_ROWS >= self._next_chunk:
                break
            c0, c1 = first // CHUNK_ROWS, last // CHUNK_ROWS
            chunks = tuple(self._chunks.get(c, self.silence) if c >= 0 else self.silence
                           for c in range(c0, c1 + 1))
            silent = all(self._silent.get(c, True) for c in range(c0, c1 + 1))
            out.append(FeatureWindow(chunks, first - c0 * CHUNK_ROWS, self.rows, self.shape, silent))
            self._next_frame += 1
        if out:  # chunks no later window reads
            low = (round(ROWS_PER_SECOND * self._next_frame / self.fps) - half) // CHUNK_ROWS
            for c in [c for c in self._chunks if c < low]:
                del self._chunks[c], self._silent[c]
        return out


def family(key: BatchKey, audio_shape: tuple[int, ...], features: FeatureModel,
           submit: Features) -> FaceFamily:
    """The family of one avatar's UNet (its key), fed by the worker's feature model."""
    role = audio_role(features.width)

    def speech(fps: int, priority: int, on_seconds: Callable[[float], None]) -> UltralightSpeech:
        return UltralightSpeech(fps, audio_shape, features.width, features.silence, submit, priority,
                                on_seconds)

    return FaceFamily("ultralight", key, LAYOUT, role, speech)
