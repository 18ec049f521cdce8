"""A camera room's driver, on the worker: their frames and sound as the ingest decodes
them, their face read into face motion for the frame that plays their sound, and
whether they are live, with what the platform's rules make of that.

* Pairing: the room plays the driver's sound as it comes; the camera frame shown with
  a stretch of it is the one of the same stream time (`stream_time`), or the mouth
  would run frames behind the voice.
* Reading: a frame's face is found on the room's own tracking thread (in order: the
  tracker follows the face from frame to frame) and read on the device, batched across
  rooms, while the room goes on to its next frame: by the worker's face reader into
  blendshapes against the driver's resting face, or, for a family that reads faces with
  a model of its own (LivePortrait's motion extractor, `CameraReading`), into motion
  relative to the first frame of the driver's read. A driver whose own face tracker
  sends blendshapes with the stream (a WebRTC data channel) drives with those instead:
  no read on the device, their camera frames still judged for liveness.
* Liveness: every frame's signature goes to the room's `LivenessMonitor`; once per
  output frame `step` applies the `DriverPolicy` (drive, hold on the idle loop in
  silence, end) and counts the stream seconds driven live.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import typing
from collections.abc import Callable

import numpy as np

from avatarfarm.live_driver import DriverAction, DriverPolicy, DriverState
from avatarfarm.preparation.faces import with_chin
from workers.camera.liveness import LivenessMonitor
from workers.camera.motion import Calibration, FaceTracker, driver_detector, face_crop
from workers.device.engine import DeadlineMissed
from workers.device.pipeline import Pipeline
from workers.families.base import CameraReading
from workers.ingest.feed import DriverCallbacks, DriverFrame
from workers.ingest.rtmp import Publisher
from workers.media.audio import SAMPLE_RATE
from workers.rooms.drivers import LiveAudio

log = logging.getLogger(__name__)

DRIVER_GONE_SECONDS = 0.5  # past a departed driver's last frame, the avatar goes idle
PUSHED_SECONDS = 0.5  # face motion their tracker sent this recently drives (else the camera)

Motion = asyncio.Future[np.ndarray | None]  # one frame's face motion, being read


class CameraDriver:
    """The driver of one camera room (made only for camera rooms)."""

    def __init__(self, session_id: str, audio: LiveAudio, pipeline: Pipeline, *,
                 policy: DriverPolicy, priority: int, offline: bool,
                 account: Callable[[float], None] = lambda seconds: None) -> None:
        self.session_id = session_id
        self.audio = audio  # the room's live audio: the driver's sound goes there
        self.pipeline = pipeline
        self.policy = policy
        self.priority = priority
        self.offline = offline  # the room renders as fast as it can, following its driver
        self._account = account  # device seconds of face reads, the room's motion stage
        # Live, 2 s of frames; offline (the room may fall behind its driver while it
        # renders as fast as it can), 10 s.
        self._frames: collections.deque[DriverFrame] = collections.deque(maxlen=250 if offline else 50)
        # (stream time, samples taken from the room's audio before it): the driver's first
        # sound, to tell the stream time of the sound a frame plays.
        self._audio_t0: tuple[float, int] | None = None
        self._read: tuple[DriverFrame | None, np.ndarray | None] = (None, None)
        self._new = asyncio.Event()  # a driver frame came (or the driver left)
        self._tracking = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="face-tracking")
        self._tracker = FaceTracker(driver_detector())
        self._calibration = Calibration()
        self.liveness = LivenessMonitor()
        # The avatar's family's own face reading (set once the room has loaded its face);
        # None: the worker's face reader.
        self.reading: CameraReading | None = None
        self._reference: np.ndarray | None = None  # the driver's first motion read
        # Face motion the driver's own tracker sent (stream time, face motion vector).
        self._pushed: collections.deque[tuple[float, np.ndarray]] = collections.deque(maxlen=100)
        self.publisher: Publisher | None = None
        self.state = DriverState.WAITING
        self.action = DriverAction.HOLD
        self.driven_seconds = 0.0  # stream seconds the driver drove live
        # Grace periods run in stream time (the room's clock, live or rendering offline).
        self._stream_seconds = 0.0
        self._lost_since: float | None = None

    # -- the ingest's side

    def feed(self, publisher: Publisher) -> DriverCallbacks:
        """Where the stream of a driver an ingest took for this room goes: their frames
        and sound."""
        log.info("room %s: driver %s publishing", self.session_id, publisher)
        self.publisher = publisher
        self.audio.attach()
        self._frames.clear()  # a new stream, with times of its own
        self._audio_t0 = None
        self._reference = None
        self._pushed.clear()
        self.liveness.connected()

        def frame(f: DriverFrame) -> None:
            self._frames.append(f)
            self.liveness.frame(f.t, f.signature)
            self._new.set()

        def sound(t: float, samples: np.ndarray) -> None:
            if self._audio_t0 is None:  # their stream's time at the sample taken next after these
                self._audio_t0 = (t, self.audio.taken_samples + self.audio.buffered)
            self.audio.offer(samples)

        def ended(reason: str) -> None:
            log.info("room %s: driver gone (%s)", self.session_id, reason)
            self.audio.producer_closed()
            self.liveness.disconnected()
            self._new.set()

        def motion(t: float, face: np.ndarray) -> None:
            self._pushed.append((t, face))
            self.liveness.face(t, True)  # their tracker follows a face

        return DriverCallbacks(frame, sound, ended, motion)

    @property
    def connected(self) -> bool:
        return self.audio.producers > 0

    # -- once per output frame

    def step(self, seconds: float) -> DriverAction:
        """The driver's state and what the room does with them for its next frame, which
        lasts ``seconds`` of stream."""
        state = self.liveness.state
        if state is DriverState.ABSENT and self.audio.buffered > 0:
            state = self.state  # what they sent before they left is still playing
        if state is not self.state:
            log.info("room %s: %s", self.session_id, state.describe())
            self.state = state
        now = self._stream_seconds
        self._stream_seconds += seconds
        if self.policy.lost(state):
            self._lost_since = now if self._lost_since is None else self._lost_since
        else:
            self._lost_since = None
        self.action = self.policy.action(state, 0.0 if self._lost_since is None
                                         else now - self._lost_since)
        if state.live:
            self.driven_seconds += seconds
        return self.action

    @property
    def why_ended(self) -> str:
        return (f"{self.state.describe()} for {self.policy.grace_seconds:g} s: the room ends, "
                "as its platform requires of a live driver")

    def stream_time(self, k: int) -> float:
        """The driver's stream time of the frame whose ``k`` samples of their sound were
        just taken (its middle): the camera frame to pair with it."""
        if self._audio_t0 is None:
            return math.inf  # no sound yet: their latest frame
        t0, first = self._audio_t0
        return t0 + (self.audio.taken_samples - first - k / 2) / SAMPLE_RATE

    async def motion(self, deadline: float, at: float) -> tuple[Motion, float]:
        """The face motion for the next frame, to await (None: idle takes over: the room
        holds, no driver, or none in view), read from the camera frame at stream time
        ``at`` (the frame's sound's), and when that frame arrived (nan: none)."""
        if self.offline and math.isfinite(at):
            # Offline rendering follows its driver: wait for their frame of this time.
            while (not self._frames or self._frames[-1].t < at) and self.connected:
                self._new.clear()
                await self._new.wait()
        frame = None
        for f in self._frames:
            if f.t <= at or frame is None:
                frame = f
        if frame is not None and not self.connected and at - frame.t > DRIVER_GONE_SECONDS:
            frame = None  # the driver left and their last frame is behind us
        # A held room still reads its driver's face (liveness must see it come back),
        # but the face does not drive the avatar.
        drive = self.action is DriverAction.DRIVE
        arrived = frame.received if frame is not None and drive else math.nan
        pushed = self._pushed_at(at)
        if pushed is not None:
            done: Motion = asyncio.get_running_loop().create_future()
            done.set_result(pushed if drive else None)
            return done, arrived
        return asyncio.ensure_future(self._face(frame, deadline, drive)), arrived

    def _pushed_at(self, at: float) -> np.ndarray | None:
        """The face motion the driver's tracker sent for stream time ``at``, in what the
        room's drive takes (None: none recently: the camera is read)."""
        face = None
        for t, f in self._pushed:
            if t <= at or face is None:
                face, when = f, t
        if face is None or (math.isfinite(at) and abs(at - when) > PUSHED_SECONDS):
            return None
        return self.reading.from_face(face) if self.reading is not None else face

    async def _face(self, frame: DriverFrame | None, deadline: float,
                    drive: bool = True) -> np.ndarray | None:
        """A camera frame read into face motion (returned if it is to ``drive``): the face
        tracked (CPU work, on the room's tracking thread), its crop read on the device,
        calibrated to the driver's resting face. A frame is read once; a frame with no
        face gives none."""
        if frame is None:
            return None
        if self._read[0] is not frame:
            await self._read_face(frame, deadline)
        return self._read[1] if drive else None

    async def _read_face(self, frame: DriverFrame, deadline: float) -> None:
        reading = self.reading

        def find() -> tuple[np.ndarray, typing.Any] | None:
            rgb = frame.rgb
            box = self._tracker.track(rgb)
            if box is None or box.w < 8:
                return None
            if reading is None:
                return face_crop(rgb, box), box
            # Framed as the family's avatars are: the chin margin below the box.
            return face_crop(rgb, with_chin(box).clipped(rgb.shape[1], rgb.shape[0]), reading.side), box

        found = await asyncio.get_running_loop().run_in_executor(self._tracking, find)
        self.liveness.face(frame.t, found is not None)
        motion: np.ndarray | None = None
        if found is not None:
            try:
                if reading is None:
                    r = await self.pipeline.read_face(found[0], deadline, self.priority)
                else:
                    r = await reading.read(found[0], deadline, self.priority)
            except DeadlineMissed:  # the device is behind: this frame keeps the last motion
                return
            self._account(r.seconds)
            if reading is None:
                motion = self._calibration.face_motion(r.value, found[1])
            else:
                if self._reference is None:
                    self._reference = r.value
                motion = reading.relative(r.value, self._reference)
        self._read = (frame, motion)

    def close(self) -> None:
        self._tracking.shutdown(wait=False, cancel_futures=True)
