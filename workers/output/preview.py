"""A camera room's preview for its driver: the avatar they drive, as the room encodes it,
over WebRTC to a browser with a fraction of a second's delay (the room's own output
goes to a platform's ingest and reaches viewers seconds later).

`PreviewTap` takes each frame the room's encoder has just encoded (on the encoder's
thread) and keeps only the latest: a preview that falls behind skips frames, it never
queues them, and a room no one watches pays nothing. `PreviewTrack` is an aiortc video
track of those frames for one viewer (`workers.ingest.webrtc` answers the viewer's offer).

With ``clock``, each frame carries the worker's wall clock when it was encoded, in
milliseconds, as 32 black or white blocks along its top edge (`stamp`/`read_stamp`), so
a viewer can measure how late the preview reaches them (the preview page does, when
asked to report).
"""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

CLOCK_BITS = 32
BLOCK = 8  # pixels per bit, square: survives compression


class PreviewTap:
    """The latest frame a room encoded, for its previews (made on the event loop)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.viewers = 0
        self._seq = 0
        self._latest: tuple[np.ndarray, float] | None = None  # the frame, when it was encoded
        self._next: asyncio.Future[None] = self._loop.create_future()
        self.closed = False

    def offer(self, rgb: np.ndarray) -> None:
        """A frame just encoded ([h, w, 3] uint8); from the encoder's thread."""
        if self.viewers > 0 and not self.closed:
            self._loop.call_soon_threadsafe(self._publish, rgb, time.time())

    def _publish(self, rgb: np.ndarray, encoded: float) -> None:
        self._seq += 1
        self._latest = (rgb, encoded)
        self._wake()

    def close(self) -> None:
        """The room ended: viewers' tracks end."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if not self._next.done():
            self._next.set_result(None)
        self._next = self._loop.create_future()

    async def after(self, seq: int) -> tuple[int, np.ndarray, float] | None:
        """The first frame after ``seq``: its number, pixels and wall-clock time encoded;
        None once the room ended."""
        while self._seq <= seq or self._latest is None:
            if self.closed:
                return None
            await asyncio.shield(self._next)
        return self._seq, *self._latest


def stamp(rgb: np.ndarray, ms: int) -> np.ndarray:
    """A copy of ``rgb`` with ``ms`` (mod 2**32) in blocks along its top-left edge."""
    out = rgb.copy()
    for bit in range(CLOCK_BITS):
        value = 255 if (ms >> (CLOCK_BITS - 1 - bit)) & 1 else 0
        out[:BLOCK, bit * BLOCK:(bit + 1) * BLOCK] = value
    return out


def read_stamp(rgb: np.ndarray) -> int:
    """The clock `stamp` burned into a (decoded) frame."""
    ms = 0
    for bit in range(CLOCK_BITS):
        block = rgb[2:BLOCK - 2, bit * BLOCK + 2:(bit + 1) * BLOCK - 2]
        ms = (ms << 1) | int(block.mean() > 127)
    return ms


class PreviewTrack(MediaStreamTrack):
    """One viewer's video of a room's `PreviewTap`."""

    kind = "video"

    def __init__(self, tap: PreviewTap, clock: bool = False) -> None:
        super().__init__()
        self._tap, self._clock = tap, clock
        self._seq = 0
        self._start: float | None = None
        tap.viewers += 1

    async def recv(self) -> av.VideoFrame:
        got = await self._tap.after(self._seq)
        if got is None:
            self.stop()
            raise MediaStreamError("the room has ended")
        self._seq, rgb, encoded = got
        if self._clock and rgb.shape[1] >= CLOCK_BITS * BLOCK:
            rgb = stamp(rgb, int(encoded * 1000) % 2**CLOCK_BITS)
        now = time.monotonic()
        if self._start is None:
            self._start = now
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = round((now - self._start) * 90_000), fractions.Fraction(1, 90_000)
        return frame

    def stop(self) -> None:
        if self.readyState != "ended":
            self._tap.viewers -= 1
        super().stop()
