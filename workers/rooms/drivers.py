"""Drivers: where a room's audio and motion come from, frame by frame.

* ScriptPlayer: text segments, spoken by TTS sentence by sentence, then silence (idle);
  a voice that fails (its TTS service down) holds the room in silence and is tried
  again, the unspoken sentences kept in order.
* LiveAudio: PCM pushed by a client to the worker, bounded so a client faster
  than real time is pushed back instead of buffered without end.
* LiveMotion: motion-capture coefficients pushed by a client, bounded the same way
  (both are LiveBuffers: one implementation of the bounds and of closing).

The bounds are hard: what a live buffer holds never exceeds its capacity (one
oversized chunk excepted, taken only into an empty buffer), and a producer waits,
which holds its gRPC stream and so the client, until the room has consumed
enough. A buffer is closed when its room ends, which releases waiting producers.
"""

from __future__ import annotations

import asyncio
import collections
import typing
from collections.abc import Awaitable, Callable

import numpy as np

from avatarfarm.domain import ScriptSegment
from avatarfarm.face_motion import FACE_MOTION_DIM
from workers.media.audio import SAMPLE_RATE
from workers.media.piper import sentences
from workers.media.tts import VoiceUnavailable

# Live input a room buffers ahead of what it renders, at most: enough to ride out a
# client's network jitter, small enough that a client pushing faster than real time
# is held back within seconds (and the buffer's memory stays small: 10 s of 16 kHz
# float32 audio is 640 KB).
LIVE_AUDIO_BUFFER_SECONDS = 10.0
LIVE_MOTION_BUFFER_FRAMES = 250
# Stream time a room holds in silence after its voice failed before it tries again (a
# service whose circuit is open answers at once, so trying costs nothing).
VOICE_RETRY_SAMPLES = SAMPLE_RATE // 2


class InputClosed(Exception):
    """The room this live input fed has ended; nothing more is accepted."""


class ScriptPlayer:
    """Plays queued script segments as audio; silence once the queue is empty.

    A segment is spoken sentence by sentence: its first sentence is made alone (so that,
    when many rooms start segments at once, every room's first sentence goes to the device
    before anyone's second), the rest all at once as soon as it is ready (a neural voice
    batches them), and each plays as soon as it is made: a segment's first audio waits
    for its first sentence only, and later sentences are made while earlier ones play.
    The next segment is started once the current one is all made, so a room does not
    fall silent between segments.

    A sentence whose voice is unavailable (`VoiceUnavailable`) stops the making: it and
    the segment's later sentences are kept, in order, and the room plays silence (its
    idle loop) with ``unavailable`` saying why, trying again every VOICE_RETRY_SAMPLES of
    stream time; once a sentence is made, the segment goes on where it stopped.
    """

    def __init__(self, synthesize: Callable[[str], Awaitable[tuple[np.ndarray, float]]]) -> None:
        self._synthesize = synthesize
        self._segments: collections.deque[ScriptSegment] = collections.deque()
        self._audio = np.zeros(0, np.float32)
        # Runs of (samples, speech or pause) covering _audio, in order.
        self._runs: collections.deque[list[typing.Any]] = collections.deque()
        self.tts_seconds = 0.0
        self.segments_spoken = 0
        # Segments started, in order: [samples still to play, all of it made]. A segment
        # is done once all of it (its pause included) has played: where a resumed room
        # picks up.
        self._left: collections.deque[list[typing.Any]] = collections.deque()
        self.segments_done = 0
        self._start_more = True
        # The sentences of the segment being made, in order (text, its making), and its
        # pause (samples).
        self._making: collections.deque[tuple[str, asyncio.Future[tuple[np.ndarray, float]]]] = \
            collections.deque()
        self._pause = 0
        self._later: collections.deque[str] = collections.deque()  # its sentences not started yet
        self._started: collections.deque[ScriptSegment] = collections.deque(maxlen=2)
        self.unavailable = ""  # why the voice cannot speak now ("": it can)
        self.voice_failures = 0
        self._retry_in = 0  # samples of stream time until the voice is tried again

    def append(self, segments: list[ScriptSegment] | tuple[ScriptSegment, ...]) -> None:
        self._segments.extend(segments)

    @property
    def queued(self) -> int:
        return len(self._segments)

    def finish_current(self) -> None:
        """Starts no further segment: the one being spoken plays to its end, then silence
        (a next one being made, none of it played yet, is put back)."""
        self._start_more = False
        if (self._making or self._later) and self._left and self._left[-1][0] == 0 \
                and not self._left[-1][1]:
            self.close()
            self._left.pop()
            self.segments_spoken -= 1
            self._segments.appendleft(self._started[-1])

    @property
    def at_boundary(self) -> bool:
        """Every segment started has been played to its end (its pause included)."""
        return not self._left

    def _start(self) -> bool:
        """Starts making the next segment's sentences (False: none to start)."""
        if not self._segments or not self._start_more:
            return False
        seg = self._segments.popleft()
        self._started.append(seg)
        self.segments_spoken += 1
        first, *rest = sentences(seg.text) or [seg.text]
        self._make(first)
        self._later.extend(rest)
        self._pause = round(seg.pause_after_seconds * SAMPLE_RATE)
        self._left.append([0, False])
        return True

    def _make(self, text: str) -> None:
        self._making.append((text, asyncio.ensure_future(self._synthesize(text))))

    def _failed(self, text: str, why: VoiceUnavailable) -> None:
        """The voice failed on ``text``: it and every sentence after it wait, in order."""
        later = [text]
        for t, task in self._making:
            _drop(task)
            later.append(t)
        self._making.clear()
        self._later.extendleft(reversed(later))
        self.unavailable = str(why)
        self.voice_failures += 1
        self._retry_in = VOICE_RETRY_SAMPLES

    def _add(self, samples: np.ndarray, speech: bool) -> None:
        if samples.size:
            self._audio = np.concatenate([self._audio, samples.astype(np.float32)])
            self._runs.append([samples.size, speech])
            self._left[-1][0] += samples.size

    async def ready(self) -> None:
        """Returns once there is audio to play: the first sentence of the next segment is
        made (or has failed, or there is no segment). A room starts its clock here, so
        that a stream's first frames are not born late by the time its voice took."""
        if self._audio.size or (not self._making and not self._start()):
            return
        # A failed voice is `take`'s to meet and say why: only wait for the outcome here.
        await asyncio.wait([self._making[0][1]])

    async def take(self, n: int) -> tuple[np.ndarray, bool]:
        """Next ``n`` samples, and whether they start with speech."""
        self._retry_in -= n
        while self._audio.size < n:
            if not self._making:
                if self._later:  # the voice failed: the next sentence alone, once it is time
                    if self._retry_in > 0:
                        break
                    self._make(self._later.popleft())
                elif not self._start():
                    break
            text, making = self._making.popleft()
            try:
                speech, dt = await making
            except VoiceUnavailable as e:
                self._failed(text, e)
                break
            self.unavailable = ""
            self.tts_seconds += dt
            self._add(speech, True)
            while self._later:  # the segment's first sentence is made: the rest, at once
                self._make(self._later.popleft())
            if not self._making:  # the segment is all made: its pause, then the next one
                self._add(np.zeros(self._pause, np.float32), False)
                self._left[-1][1] = True
                self._start()
        speaking = bool(self._runs and self._runs[0][1])
        taken = min(n, self._audio.size)
        self._consume(taken)
        out = self._audio[:n]
        self._audio = self._audio[n:]
        if out.size < n:
            out = np.concatenate([out, np.zeros(n - out.size, np.float32)])
        return out, speaking

    def _consume(self, taken: int) -> None:
        rest = taken
        while rest and self._runs:
            used = min(rest, self._runs[0][0])
            self._runs[0][0] -= used
            rest -= used
            if self._runs[0][0] == 0:
                self._runs.popleft()
        rest = taken
        while self._left and (rest or (self._left[0][1] and self._left[0][0] == 0)):
            used = min(rest, self._left[0][0])
            self._left[0][0] -= used
            rest -= used
            if self._left[0][0] == 0 and self._left[0][1]:
                self._left.popleft()
                self.segments_done += 1
            elif used == 0:
                break

    def close(self) -> None:
        """The room ended: sentences still being made are not wanted."""
        for _, task in self._making:
            _drop(task)
        self._making.clear()
        self._later.clear()


def _drop(task: asyncio.Future[typing.Any]) -> None:
    """A sentence's making that is not wanted: cancelled, or its failure taken (so that
    it is not reported as an error no one saw)."""
    if task.done():
        if not task.cancelled():
            task.exception()
    else:
        task.cancel()


class LiveBuffer:
    """A bounded buffer of one live input of a room, between the clients that push it
    (producers, each a gRPC stream) and the room that consumes it.

    Sizes count the input's own unit (audio samples, motion frames). A push waits
    until its item fits, so the bound holds exactly; an item larger than the capacity
    waits for an empty buffer rather than forever. Closing (the room ended) releases
    every waiting producer and consumer; later pushes raise InputClosed.
    """

    def __init__(self, capacity: int) -> None:
        self._items: collections.deque[np.ndarray] = collections.deque()
        self._size = 0
        self._max = capacity
        self._space = asyncio.Event()
        self._space.set()
        self._data = asyncio.Event()
        self.producers = 0
        self.attached = asyncio.Event()  # set once a first producer has connected
        self.closed = False
        self._waiting = 0  # producers waiting for space

    @property
    def capacity(self) -> int:
        """What the buffer holds at most."""
        return self._max

    @property
    def buffered(self) -> int:
        return self._size

    def attach(self) -> None:
        self.producers += 1
        self.attached.set()

    def producer_closed(self) -> None:
        self.producers -= 1
        self._data.set()

    def close(self) -> None:
        """The room has ended: waiting and later pushes raise InputClosed."""
        self.closed = True
        self._space.set()
        self._data.set()

    @property
    def full(self) -> bool:
        """A producer waits for space no one has freed since: the buffer holds all it will
        hold until the consumer takes some."""
        return self._waiting > 0 and not self._space.is_set()

    async def _put(self, item: np.ndarray, size: int) -> None:
        """Adds an item of ``size`` units once it fits (back-pressure on the client)."""
        while not self.closed and self._size > 0 and self._size + size > self._max:
            self._space.clear()
            self._waiting += 1
            # A consumer waiting for more than is buffered must not wait for this item,
            # which waits for it (see ``full``).
            self._data.set()
            try:
                await self._space.wait()
            finally:
                self._waiting -= 1
        if self.closed:
            raise InputClosed("the room has ended")
        self._items.append(item)
        self._size += size
        self._data.set()

    async def _wait_for(self, n: int) -> None:
        """Waits until ``n`` units are buffered, the buffer is full, or no producer is
        connected."""
        while self._size < n and self.producers > 0 and not self.closed and not self.full:
            self._data.clear()
            await self._data.wait()

    def _taken(self, size: int) -> None:
        """The consumer took ``size`` units out of the items."""
        self._size -= size
        if self._size < self._max:
            self._space.set()


class LiveAudio(LiveBuffer):
    """A bounded jitter buffer of live PCM for one room, in samples at SAMPLE_RATE."""

    def __init__(self, max_seconds: float = LIVE_AUDIO_BUFFER_SECONDS) -> None:
        super().__init__(round(max_seconds * SAMPLE_RATE))
        self.underrun_samples = 0
        self.dropped_samples = 0  # offered (not pushed) samples that did not fit
        self.skipped_samples = 0  # a live source's backlog dropped to catch up
        self.taken_samples = 0  # live samples the room has consumed (not the padding)

    async def push(self, samples: np.ndarray) -> None:
        """Adds samples, waiting until they fit (back-pressure on the client); raises
        InputClosed once the room has ended."""
        await self._put(samples.astype(np.float32), samples.size)

    def offer(self, samples: np.ndarray) -> None:
        """Adds samples of a source that cannot wait (a camera driver's microphone, live
        over RTMP): what does not fit is dropped and counted."""
        if self.closed:
            return
        if self._size + samples.size > self._max:
            self.dropped_samples += samples.size
            return
        self._items.append(samples.astype(np.float32))
        self._size += samples.size
        self._data.set()

    async def wait_for(self, n: int) -> None:
        """Waits until ``n`` samples are buffered, the buffer is full, or no producer is
        connected (then ``take`` pads what is missing)."""
        await self._wait_for(n)

    def skip(self, n: int) -> None:
        """Drops the oldest ``n`` buffered samples (a live source's backlog: the room
        catches up rather than play late); they count as taken, and as skipped."""
        if n > 0:
            n = min(n, self.buffered)
            self.take(n)
            self.skipped_samples += n

    def take(self, n: int) -> np.ndarray:
        """Next ``n`` samples, padded with silence on underrun."""
        parts: list[np.ndarray] = []
        need = n
        while need > 0 and self._items:
            c = self._items[0]
            if c.size <= need:
                parts.append(self._items.popleft())
                need -= c.size
            else:
                parts.append(c[:need])
                self._items[0] = c[need:]
                need = 0
        got = n - need
        self._taken(got)
        self.taken_samples += got
        if need:
            self.underrun_samples += need
            parts.append(np.zeros(need, np.float32))
        return np.concatenate(parts) if parts else np.zeros(n, np.float32)


class LiveMotion(LiveBuffer):
    """Motion-capture frames for one room, face motion vectors (`avatarfarm.face_motion`);
    holds the last pose briefly on a gap."""

    def __init__(self, max_frames: int = LIVE_MOTION_BUFFER_FRAMES, hold_frames: int = 12) -> None:
        super().__init__(max_frames)
        self._hold = hold_frames
        self._last: np.ndarray | None = None
        self._missing = 0

    async def push(self, face: np.ndarray) -> None:
        if face.shape != (FACE_MOTION_DIM,):
            raise ValueError(f"a face motion frame has {FACE_MOTION_DIM} values, got {face.size}")
        await self._put(face.astype(np.float32), 1)

    async def wait_for_frame(self) -> None:
        await self._wait_for(1)

    def take(self) -> np.ndarray | None:
        """The next pose, the last one during a short gap, or None (idle takes over)."""
        if self._items:
            self._last = self._items.popleft()
            self._missing = 0
            self._taken(1)
            return self._last
        self._missing += 1
        return self._last if self._missing <= self._hold else None
