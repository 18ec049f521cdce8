"""A camera room's driver stream, decoded: the FLV tags the RTMP ingest hands over (on
the event loop) are muxed into an FLV byte stream that PyAV demuxes and decodes on a
thread of its own, and come out as the driver's frames (RGB, with the stream time they
were captured at, the moment their data arrived, for the room's latency, and their
liveness signature) and their sound (16 kHz mono float32), both handed back to the
event loop.

A decoder that falls behind by more than `MAX_QUEUED` tags closes the feed (a live
driver is never replayed late); a stream PyAV cannot decode closes it with the reason.
"""

from __future__ import annotations

import asyncio
import io
import logging
import queue
import struct
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np

from workers.camera.liveness import Signature, Signer
from workers.media.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

# How much of the stream the demuxer reads before it decodes: enough to find both the
# audio and the video stream of an FLV whose tags interleave, little enough to start fast.
# (What it reads is kept and decoded: the stream's first key frame is among it.)
ANALYZE_US = "300000"
MAX_QUEUED = 500  # tags (~10 s of a 25 fps stream with its audio)
FLV_HEADER = b"FLV\x01\x05\x00\x00\x00\x09" + b"\x00\x00\x00\x00"


@dataclass(frozen=True, slots=True)
class DriverFrame:
    """One decoded frame of the driver's camera."""

    t: float  # stream time, seconds (the publisher's timestamp)
    received: float  # time.monotonic() when its data arrived at the worker
    rgb: np.ndarray  # [h, w, 3] uint8
    signature: Signature  # what the room's liveness monitor keeps of it


@dataclass(frozen=True, slots=True)
class DriverCallbacks:
    """Where a driver's stream goes (a camera room), called on its event loop: each
    decoded ``frame``; ``sound(t, samples)`` (16 kHz mono float32, ``t`` the stream time
    of the first sample); ``ended(reason)`` once, after everything was handed over; and
    ``motion(t, face)``: face motion their own tracker sent with the stream (a face
    motion vector, `avatarfarm.face_motion`), where it sends any."""

    frame: Callable[[DriverFrame], None]
    sound: Callable[[float, np.ndarray], None]
    ended: Callable[[str], None] = lambda reason: None
    motion: Callable[[float, np.ndarray], None] = lambda t, face: None


def flv_tag(kind: int, timestamp_ms: int, payload: bytes) -> bytes:
    """One FLV tag (header, body, and the size of both that follows every tag)."""
    ts = timestamp_ms & 0xFFFFFFFF
    head = bytes((kind,)) + len(payload).to_bytes(3, "big") + (ts & 0xFFFFFF).to_bytes(3, "big") \
        + bytes((ts >> 24,)) + b"\x00\x00\x00"
    return head + payload + struct.pack(">I", len(head) + len(payload))


class _TagReader(io.RawIOBase):
    """The FLV byte stream, read by the decoder thread as the tags arrive."""

    def __init__(self, chunks: queue.Queue[bytes | None]) -> None:
        self._chunks = chunks
        self._pending = memoryview(FLV_HEADER)
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: typing.Any) -> int:
        while not self._pending and not self._eof:
            chunk = self._chunks.get()
            if chunk is None:
                self._eof = True
            else:
                self._pending = memoryview(chunk)
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class DriverFeed:
    """A `DriverSink` (`workers.ingest.rtmp`) that decodes the driver's RTMP stream into
    their `DriverCallbacks` (on the event loop the feed was made on); it ends when the
    stream ends or fails."""

    def __init__(self, to: DriverCallbacks) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_frame, self._on_audio, self._on_end = to.frame, to.sound, to.ended
        self._chunks: queue.Queue[bytes | None] = queue.Queue()
        self._arrived: dict[int, float] = {}  # video timestamp (ms) -> when it arrived
        self._lock = threading.Lock()
        self._ended = False  # no more tags are taken
        self._reason = "the publisher stopped"
        self._sign = Signer()  # on the decoder thread, frame after frame
        self._thread = threading.Thread(target=self._decode, name="driver-decode", daemon=True)
        self._thread.start()

    # -- DriverSink, on the event loop

    def tag(self, kind: int, timestamp_ms: int, payload: bytes) -> None:
        if self._ended:
            return
        if self._chunks.qsize() > MAX_QUEUED:
            self._finish("the driver's stream arrives faster than it can be decoded")
            return
        if kind == 9:
            with self._lock:
                self._arrived.setdefault(timestamp_ms, time.monotonic())
        self._chunks.put(flv_tag(kind, timestamp_ms, payload))

    def closed(self, reason: str) -> None:
        self._finish(reason)

    @property
    def wanted(self) -> bool:
        return not self._ended

    def _finish(self, reason: str) -> None:
        """Takes no more tags; the decoder hands over what it holds, then the feed ends."""
        if not self._ended:
            self._ended, self._reason = True, reason
            self._chunks.put(None)

    # -- the decoder thread

    def _decode(self) -> None:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        try:
            with av.open(_TagReader(self._chunks), format="flv", mode="r",
                         options={"probesize": "262144",
                                  "analyzeduration": ANALYZE_US}) as c:
                for packet in c.demux():
                    if packet.stream.type == "video":
                        for frame in packet.decode():
                            self._frame(typing.cast(av.VideoFrame, frame))
                    elif packet.stream.type == "audio":
                        for decoded in packet.decode():
                            frame = typing.cast(av.AudioFrame, decoded)
                            t = float(frame.time) if frame.time is not None else 0.0
                            for out in resampler.resample(frame):
                                samples = out.to_ndarray().reshape(-1).astype(np.float32)
                                self._post(self._on_audio, t, samples)
        except (av.FFmpegError, ValueError) as e:
            log.info("driver stream could not be decoded: %s", e)
            self._post(self._failed, f"the driver's stream could not be decoded: {e}")
            return
        self._post(self._done)

    def _post(self, fn: Callable[..., None], *args: typing.Any) -> None:
        """Calls ``fn(*args)`` on the feed's event loop, from the decoder thread; once the
        loop has closed (the worker stopped) there is no one left to tell."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    def _failed(self, reason: str) -> None:
        self._finish(reason)
        self._reason = reason
        self._on_end(reason)

    def _done(self) -> None:
        self._ended = True
        self._on_end(self._reason)

    def _frame(self, frame: av.VideoFrame) -> None:
        t = float(frame.time) if frame.time is not None else 0.0
        ms = round(t * 1000)
        with self._lock:
            received = self._arrived.pop(ms, time.monotonic())
            for old in [k for k in self._arrived if k < ms]:
                del self._arrived[old]
        rgb = frame.to_ndarray(format="rgb24")
        self._post(self._on_frame, DriverFrame(t, received, rgb, self._sign(rgb)))
