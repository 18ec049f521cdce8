"""Audio feature rows computed on the device as a room's audio arrives, and each frame's
window of them: the audio side of the families fed by learnt features (Ultralight's
HuBERT rows and MuseTalk's Whisper hidden states, 50 rows a second; Ultralight's wenet
steps, 20 a second).

A feature model runs on chunks: ``rows`` rows of the chunk's own audio (``rows x
stride`` samples: 320 for 50 rows a second), read with ``left`` samples of context before and ``right`` after, so one
item is ``left + 320 rows + right`` samples and a chunk can run once the audio ``right``
samples past it has arrived. Items are batched across rooms by the engine. A chunk
whose own audio is silent is not run: it takes the rows the model gives silence,
computed once at load.

Video frame ``i`` at ``fps`` reads the rows ``first .. first + count - 1`` around its
centre row ``round(rate i / fps)`` (a frame's own audio at any rate), rows before the
stream read as silence, folded into the face model's audio input shape.
"""

from __future__ import annotations

import asyncio
import math
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from workers.families.base import FrameAudio

SAMPLE_RATE = 16_000
ROW_STRIDE = 320  # samples at 16 kHz: 50 rows a second
ROW_WINDOW = 400  # samples each row reads (HuBERT's and Whisper's front ends: 25 ms)
SILENCE_RMS = 10 ** (-60 / 20)  # a chunk quieter than -60 dBFS is silence

Submit = Callable[[np.ndarray, float, int], Awaitable[typing.Any]]  # -> pipeline.Timed of [rows, F]


@dataclass(frozen=True, slots=True)
class RowGrid:
    """How a family's feature model is fed and its rows are read (module docstring)."""

    rows: int  # rows per chunk
    left: int  # samples of context before a chunk's own audio
    right: int  # samples after it
    first: int  # a frame's first row, from its centre row
    count: int  # rows a frame reads
    shape: tuple[int, ...]  # the rows folded into the face model's audio input
    stride: int = ROW_STRIDE  # samples per row

    @property
    def hop(self) -> int:
        return self.stride * self.rows

    @property
    def rate(self) -> float:
        """Rows per second."""
        return SAMPLE_RATE / self.stride

    @property
    def item(self) -> int:
        return self.left + self.hop + self.right


@dataclass(frozen=True, slots=True)
class RowWindow:
    chunks: tuple[typing.Any, ...]  # futures or [rows, F] arrays, one per chunk, in order
    skip: int  # rows of the first chunk before the window
    count: int
    shape: tuple[int, ...]
    silent: bool

    async def value(self) -> np.ndarray:
        # Shielded: a chunk's rows are shared by every frame whose window holds it, so a
        # frame given up (its task cancelled at its deadline) must not cancel them.
        parts = [c if isinstance(c, np.ndarray) else await asyncio.shield(c) for c in self.chunks]
        rows = np.concatenate(parts)[self.skip:self.skip + self.count]
        return np.ascontiguousarray(rows.reshape(self.shape), dtype=np.float32)


class RowStream:
    """A room's audio -> feature chunks submitted as the audio arrives -> each frame's
    window of rows, once the window's last chunk is submitted (`FaceSpeech`)."""

    def __init__(self, fps: int, grid: RowGrid, silence: np.ndarray, submit: Submit, priority: int,
                 on_seconds: Callable[[float], None] = lambda s: None) -> None:
        self.fps = fps
        self.grid = grid
        self.silence = silence  # [rows, F]
        self.submit = submit
        self.priority = priority
        self.on_seconds = on_seconds
        self._audio = np.zeros(grid.left, np.float32)  # from chunk `_next_chunk`'s item start
        self._next_chunk = 0
        self._chunks: dict[int, typing.Any] = {}
        self._silent: dict[int, bool] = {}
        self._next_frame = 0

    @property
    def frames_emitted(self) -> int:
        return self._next_frame

    def push(self, samples: np.ndarray, deadline: float) -> list[FrameAudio]:
        self._audio = np.concatenate([self._audio, np.asarray(samples, np.float32)])
        g = self.grid
        while len(self._audio) >= g.item:
            self._chunk(self._audio[:g.item], deadline)
            self._audio = self._audio[g.hop:]
        return self._emit(None)

    def finish(self, n_frames: int) -> list[FrameAudio]:
        g = self.grid
        own = self._audio[g.left:g.left + g.hop]
        if own.size and np.sqrt(np.mean(own ** 2)) >= SILENCE_RMS:
            item = np.zeros(g.item, np.float32)
            item[:self._audio.size] = self._audio[:g.item]
            self._chunk(item, math.inf)
        self._audio = np.zeros(0, np.float32)
        return self._emit(n_frames)

    def _chunk(self, item: np.ndarray, deadline: float) -> None:
        g = self.grid
        c = self._next_chunk
        self._next_chunk += 1
        own = item[g.left:g.left + g.hop]
        if np.sqrt(np.mean(own ** 2)) < SILENCE_RMS:
            self._chunks[c], self._silent[c] = self.silence, True
            return
        task = asyncio.ensure_future(self.submit(item.copy(), deadline, self.priority))
        rows: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()

        def done(t: asyncio.Future[typing.Any]) -> None:
            if rows.done():
                return
            if t.cancelled():
                rows.cancel()
            elif (e := t.exception()) is not None:
                rows.set_exception(e)
                rows.exception()  # retrieved: a frame that never awaits it is not an error
            else:
                self.on_seconds(t.result().seconds)
                rows.set_result(t.result().value)

        task.add_done_callback(done)
        self._chunks[c], self._silent[c] = rows, False

    def _emit(self, until: int | None) -> list[FrameAudio]:
        g = self.grid
        out: list[FrameAudio] = []
        while until is None or self._next_frame < until:
            first = round(g.rate * self._next_frame / self.fps) + g.first
            last = first + g.count - 1
            if until is None and last // g.rows >= self._next_chunk:
                break
            c0, c1 = first // g.rows, last // g.rows
            chunks = tuple(self._chunks.get(c, self.silence) if c >= 0 else self.silence
                           for c in range(c0, c1 + 1))
            silent = all(self._silent.get(c, True) for c in range(c0, c1 + 1))
            out.append(RowWindow(chunks, first - c0 * g.rows, g.count, g.shape, silent))
            self._next_frame += 1
        if out:  # chunks no later window reads
            low = (round(g.rate * self._next_frame / self.fps) + g.first) // g.rows
            for c in [c for c in self._chunks if c < low]:
                del self._chunks[c], self._silent[c]
        return out
