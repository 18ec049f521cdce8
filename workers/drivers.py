"""Drivers: where a room's audio and motion come from, frame by frame.

* ScriptPlayer: text segments, spoken by TTS, then silence (idle).
* LiveAudio: PCM pushed by a client to the worker, bounded so a client faster
  than real time is pushed back instead of buffered without end.
* LiveMotion: motion-capture coefficients pushed by a client, bounded the same way.

The bounds are hard: what a live buffer holds never exceeds its capacity (one
oversized chunk excepted, taken only into an empty buffer), and a producer waits,
which holds its gRPC stream and so the client, until the room has consumed
enough. A buffer is closed when its room ends, which releases waiting producers.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable

import numpy as np

from avatarfarm.domain import ScriptSegment
from workers.audio import SAMPLE_RATE
from workers.motion import MOTION_DIM

# Live input a room buffers ahead of what it renders, at most: enough to ride out a
# client's network jitter, small enough that a client pushing faster than real time
# is held back within seconds (and the buffer's memory stays small: 10 s of 16 kHz
# float32 audio is 640 KB).
LIVE_AUDIO_BUFFER_SECONDS = 10.0
LIVE_MOTION_BUFFER_FRAMES = 250


class InputClosed(Exception):
    """The room this live input fed has ended; nothing more is accepted."""


class ScriptPlayer:
    """Plays queued script segments as audio; silence once the queue is empty."""

    def __init__(self, synthesize: Callable[[str], Awaitable[tuple[np.ndarray, float]]]) -> None:
        self._synthesize = synthesize
        self._segments: collections.deque[ScriptSegment] = collections.deque()
        self._audio = np.zeros(0, np.float32)
        self._speech_left = 0  # samples of speech (not pause) at the head of _audio
        self.tts_seconds = 0.0
        self.segments_spoken = 0
        # Samples still to play of each segment started (speech and pause): a segment is
        # done once all of it has played, which is where a resumed room picks up.
        self._left: collections.deque[int] = collections.deque()
        self.segments_done = 0
        self._start_more = True

    def append(self, segments: list[ScriptSegment] | tuple[ScriptSegment, ...]) -> None:
        self._segments.extend(segments)

    @property
    def queued(self) -> int:
        return len(self._segments)

    def finish_current(self) -> None:
        """Starts no further segment: the one being spoken plays to its end, then silence."""
        self._start_more = False

    @property
    def at_boundary(self) -> bool:
        """Every segment started has been played to its end (its pause included)."""
        return not self._left

    async def take(self, n: int) -> tuple[np.ndarray, bool]:
        """Next ``n`` samples, and whether any of them is speech."""
        while self._audio.size < n and self._segments and self._start_more:
            seg = self._segments.popleft()
            speech, dt = await self._synthesize(seg.text)
            self.tts_seconds += dt
            self.segments_spoken += 1
            pause = np.zeros(round(seg.pause_after_seconds * SAMPLE_RATE), np.float32)
            if self._audio.size == 0:
                self._speech_left = speech.size
            self._audio = np.concatenate([self._audio, speech, pause])
            self._left.append(speech.size + pause.size)
        taken = min(n, self._audio.size)
        while self._left and taken > 0:
            used = min(taken, self._left[0])
            self._left[0] -= used
            taken -= used
            if self._left[0] == 0:
                self._left.popleft()
                self.segments_done += 1
        out = self._audio[:n]
        speaking = self._speech_left > 0
        self._speech_left = max(0, self._speech_left - n)
        self._audio = self._audio[n:]
        if out.size < n:
            out = np.concatenate([out, np.zeros(n - out.size, np.float32)])
        return out, speaking


class LiveAudio:
    """A bounded jitter buffer of live PCM for one room."""

    def __init__(self, max_seconds: float = LIVE_AUDIO_BUFFER_SECONDS) -> None:
        self._chunks: collections.deque[np.ndarray] = collections.deque()
        self._size = 0
        self._max = round(max_seconds * SAMPLE_RATE)
        self._space = asyncio.Event()
        self._space.set()
        self._data = asyncio.Event()
        self.producers = 0
        self.attached = asyncio.Event()  # set once a first producer has connected
        self.underrun_samples = 0
        self.taken_samples = 0  # live samples the room has consumed (not the padding)
        self.closed = False
        self._waiting = 0  # producers waiting for space

    @property
    def capacity(self) -> int:
        """Samples the buffer holds at most."""
        return self._max

    def attach(self) -> None:
        self.producers += 1
        self.attached.set()

    @property
    def buffered(self) -> int:
        return self._size

    async def push(self, samples: np.ndarray) -> None:
        """Adds samples, waiting until they fit (back-pressure on the client); raises
        InputClosed once the room has ended."""
        # Waits for room for the whole chunk, so the bound holds exactly; a chunk larger
        # than the capacity waits for an empty buffer rather than forever.
        while not self.closed and self._size > 0 and self._size + samples.size > self._max:
            self._space.clear()
            self._waiting += 1
            # A consumer waiting for more than is buffered must not wait for this chunk,
            # which waits for it (see ``full``).
            self._data.set()
            try:
                await self._space.wait()
            finally:
                self._waiting -= 1
        if self.closed:
            raise InputClosed("the room has ended")
        self._chunks.append(samples.astype(np.float32))
        self._size += samples.size
        self._data.set()

    @property
    def full(self) -> bool:
        """A producer waits for space no one has freed since: the buffer holds all it will
        hold until the consumer takes some."""
        return self._waiting > 0 and not self._space.is_set()

    async def wait_for(self, n: int) -> None:
        """Waits until ``n`` samples are buffered, the buffer is full, or no producer is
        connected (then ``take`` pads what is missing)."""
        while self._size < n and self.producers > 0 and not self.closed and not self.full:
            self._data.clear()
            await self._data.wait()

    def close(self) -> None:
        """The room has ended: waiting and later pushes raise InputClosed."""
        self.closed = True
        self._space.set()
        self._data.set()

    def producer_closed(self) -> None:
        self.producers -= 1
        self._data.set()

    def take(self, n: int) -> np.ndarray:
        """Next ``n`` samples, padded with silence on underrun."""
        parts: list[np.ndarray] = []
        need = n
        while need > 0 and self._chunks:
            c = self._chunks[0]
            if c.size <= need:
                parts.append(self._chunks.popleft())
                need -= c.size
            else:
                parts.append(c[:need])
                self._chunks[0] = c[need:]
                need = 0
        got = n - need
        self._size -= got
        self.taken_samples += got
        if need:
            self.underrun_samples += need
            parts.append(np.zeros(need, np.float32))
        if self._size < self._max:
            self._space.set()
        return np.concatenate(parts) if parts else np.zeros(n, np.float32)


class LiveMotion:
    """Motion-capture frames for one room; holds the last pose briefly on a gap."""

    def __init__(self, max_frames: int = LIVE_MOTION_BUFFER_FRAMES, hold_frames: int = 12) -> None:
        self._frames: collections.deque[np.ndarray] = collections.deque()
        self._max = max_frames
        self._hold = hold_frames
        self._last: np.ndarray | None = None
        self._missing = 0
        self._space = asyncio.Event()
        self._space.set()
        self._data = asyncio.Event()
        self.producers = 0
        self.attached = asyncio.Event()  # set once a first producer has connected
        self.closed = False

    @property
    def capacity(self) -> int:
        """Frames the buffer holds at most."""
        return self._max

    @property
    def buffered(self) -> int:
        return len(self._frames)

    def attach(self) -> None:
        self.producers += 1
        self.attached.set()

    async def push(self, coefficients: np.ndarray) -> None:
        if coefficients.shape != (MOTION_DIM,):
            raise ValueError(f"motion frame must have {MOTION_DIM} coefficients, got {coefficients.size}")
        while not self.closed and len(self._frames) >= self._max:
            self._space.clear()
            await self._space.wait()
        if self.closed:
            raise InputClosed("the room has ended")
        self._frames.append(np.clip(coefficients, -1.0, 1.0).astype(np.float32))
        self._data.set()

    async def wait_for_frame(self) -> None:
        while not self._frames and self.producers > 0 and not self.closed:
            self._data.clear()
            await self._data.wait()

    def close(self) -> None:
        """The room has ended: waiting and later pushes raise InputClosed."""
        self.closed = True
        self._space.set()
        self._data.set()

    def producer_closed(self) -> None:
        self.producers -= 1
        self._data.set()

    def take(self) -> np.ndarray | None:
        """The next pose, the last one during a short gap, or None (idle takes over)."""
        if self._frames:
            self._last = self._frames.popleft()
            self._missing = 0
            self._space.set()
            return self._last
        self._missing += 1
        return self._last if self._missing <= self._hold else None
