"""One room on a worker: its drivers, motion, rendering, pacing, alignment and encoder.

A room runs two asyncio tasks joined by a bounded queue of frames in flight:

* the producer releases frame n at its capture time (t0 + n/fps in real-time
  pacing), takes its audio from the driver, and starts the frame on the device:
  audio-to-motion (unless mocap drives it), idle motion composed in, render.
  A spoken frame is one chained item of the worker's cross-room batcher (its
  motion, then on the device thread its render: one hand-off each way per
  frame), with the frame's deadline: its presentation time (capture time plus
  the latency budget, the stream's buffer) minus the output margin left for
  encoding.
  Several frames of a room are in flight at once, so one frame's motion is
  computed while another renders.
* the emitter takes frames in order. A frame the batcher dropped, or one not
  back by its deadline, is replaced by the last good frame, so the stream keeps
  its timing and the audio its sync; each replacement is counted late. The
  frame and its audio pass the lip-sync monitor and the A/V delay that
  corrects drift, then go to the encoder thread.

A room can be reconfigured live (`Room.reconfigure`, a degradation step down or
back up): from the next frame the producer releases, the renderer draws the
portrait at the new quality's side (scaled up to the spec's side on the encoder
thread, so the output's frame size never changes) and frames come at the new
rate. Each frame carries the rate it was made at; stream time, audio per frame
and the encoder's timestamps all count its 1/fps, so the stream's duration stays
exact across a change.

Video avatars (face families: Wav2Lip, Ultralight, MuseTalk). A room whose avatar
is a prepared video plays its base frames as a loop and redraws the mouth with its
family's face model: the producer turns the audio into each frame's audio input
through the family's `FaceSpeech` (Wav2Lip's mel windows; Ultralight's HuBERT and
MuseTalk's Whisper rows, computed on the device as the audio arrives), which needs
some audio past its frame (0.2 s for Wav2Lip, 0.16 s for an 8-frame Ultralight
window, 0.24-0.54 s for MuseTalk's chunks of 0.32 s), so a frame starts once that
audio is in (the stream runs that much behind its driver; its timing stays exact).
A frame whose input is silent is its base frame, without the model; the others are
items of the face model in the batcher, across rooms and avatars. The emitter
carries `FaceFrame`s (base index and redrawn face); the face is pasted back on
the encoder thread. A frame the batcher dropped shows its base frame, so the
loop never stalls. The lip-sync check reads the face crop's mouth.

Failover. A room runs under an assignment epoch from the scheduler; its
output is fenced by it (see workers.output.fence), and when the room resumes on
another worker its output continues (continuation > 0). A room that finds
itself behind real time by more than `stall_seconds` (the scheduler's worker
timeout: the process was frozen or starved long enough for the scheduler to
move its rooms) skips ahead, and holds its output, writing nothing, until the
worker has re-registered and the scheduler has confirmed the room is still its
own (`release_hold`) or has moved it (`abandon`).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import math
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from avatarfarm.avatars import MOTION_FAMILIES, no_motion_input
from avatarfarm.domain import DriveMode, OutputKind, Quality, ScriptSegment, SessionSpec
from avatarfarm.egress import EgressPolicy, Resolver, check_resolved, pinned_url, system_resolver
from avatarfarm.input_tokens import driver_key
from avatarfarm.live_driver import DriverAction, DriverPolicy
from workers.device.engine import DeadlineMissed, ItemResult
from workers.device.pipeline import Pipeline, fit_canvas, to_canvas
from workers.families.base import FaceFamily, FaceSpeech, FrameAudio
from workers.ingest.registry import DriverRooms
from workers.media.alignment import (
    AvDelay,
    DriftPolicy,
    MouthCrop,
    SyncEstimate,
    SyncMonitor,
    estimate,
)
from workers.media.audio import SAMPLE_RATE, MelStream
from workers.media.label import LabelSpec, LabelStamp
from workers.media.motion import IdleAnimator, compose, reference_motion
from workers.models.wav2lip import WAV2LIP_FACE
from workers.output.encode import (
    ENCODER_QUEUE,
    Encoder,
    EncoderSettings,
    EncoderThread,
    StreamEncoder,
    shared_encoder_pool,
)
from workers.output.encoder_process import RemoteEncoder, shared_encoder_processes
from workers.output.fence import Superseded
from workers.output.preview import PreviewTap
from workers.output.targets import OutputTarget
from workers.rooms.camera import CameraDriver, Motion
from workers.rooms.drivers import LiveAudio, LiveMotion, ScriptPlayer
from workers.rooms.wav2lip_frames import FaceAvatar, FaceFrame

log = logging.getLogger(__name__)


class Pacing(enum.Enum):
    REALTIME = "realtime"  # one frame per 1/fps of wall time, as a live stream needs
    FAST = "fast"  # as fast as the device allows (tests, benchmarks, offline renders)


class RoomState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    ENDED = "ended"
    FAILED = "failed"


@dataclass(slots=True)
class RoomStats:
    frames_rendered: int = 0
    late_frames: int = 0
    # Of late_frames: already past their deadline when their turn came (a producer behind
    # real time), so given up before any work was spent on them.
    skipped_frames: int = 0
    # Emitted frames that repeated one still waiting for the encoder, and were held on it
    # rather than encoded apart (see EncoderThread): a worker behind catching up cheaply.
    merged_frames: int = 0
    speech_frames: int = 0
    stage_seconds: dict[str, float] = field(
        default_factory=lambda: {"tts": 0.0, "audio_to_motion": 0.0, "render": 0.0, "encode": 0.0,
                                 "alignment": 0.0})
    batched_items: int = 0  # render items and the batch sizes they ran in, summed
    batch_size_sum: int = 0
    av_offset_seconds: float = 0.0  # last conclusive lip-sync check
    av_correction_seconds: float = 0.0  # audio held back minus video held back
    sync_checks: int = 0
    sync_corrections: int = 0
    canvas_seconds: float = 0.0  # of stage_seconds["encode"]: render output -> RGB canvas
    # Stream time emitted, exact: the sum of each frame's 1/fps (the rate may change live).
    stream_time: Fraction = Fraction(0)

    @property
    def mean_batch(self) -> float:
        return self.batch_size_sum / self.batched_items if self.batched_items else 0.0

    @property
    def stream_seconds(self) -> float:
        return float(self.stream_time)

    @property
    def device_seconds(self) -> float:
        return sum(self.stage_seconds.values())


MIN_RENDER_SIDE = 16
# A camera driver's sound kept ahead of what a frame plays, to ride out jitter (80 ms).
CAMERA_JITTER_SAMPLES = SAMPLE_RATE * 2 // 25


class RoomRefused(ValueError):
    """An assignment this worker cannot run: a drive mode the avatar's model family has
    no input for, or a video avatar without a face model in the model folder."""


class InvalidQuality(ValueError):
    """A quality this worker cannot render: a reconfiguration the room cannot apply (the
    room keeps its quality), or a room's own quality (its assignment is refused)."""


def check_renderable(q: Quality) -> None:
    """Raises InvalidQuality for a stream this worker cannot make at all, whatever the
    tenant edge allows: a rate below 1 fps, a portrait side under MIN_RENDER_SIDE, or an
    odd width or height (H.264's 4:2:0 halves both)."""
    if q.fps < 1:
        raise InvalidQuality(f"fps {q.fps} is below 1")
    _check_side(q)
    if q.width % 2 or q.height % 2:
        raise InvalidQuality(f"{q} must have even width and height (H.264 4:2:0)")


def _check_side(q: Quality) -> None:
    if q.render_side < MIN_RENDER_SIDE:
        raise InvalidQuality(f"{q} is too small to render (side < {MIN_RENDER_SIDE})")


def frame_buffer_bytes_per_pixel(latency_budget_seconds: float, fps: int = 25) -> float:
    """Host memory a room holds per pixel of its output frame, from its real buffers.

    Float portraits ([3, S, S] float32, 12 bytes per portrait pixel, at most one per
    output pixel): the frames in flight (the producer's queue, `_frames`), the
    encoder's queue (`ENCODER_QUEUE`), and about two more held by the emitter (last
    good frame, A/V delay). Then the encoder's own frames: the RGB canvas (3 bytes), its
    YUV 4:2:0 copy (1.5) and about four YUV frames of references and look-ahead in
    the codec. The in-flight depth follows the frame rate: 25 fps is the reference.
    """
    portrait = 3 * np.dtype(np.float32).itemsize
    in_flight = math.ceil(latency_budget_seconds * fps) + 2
    return portrait * (in_flight + ENCODER_QUEUE + 2) + 3 + 1.5 * (1 + 4)


@dataclass(slots=True)
class _InFlight:
    n: int
    fps: int  # the rate this frame was made at: it lasts 1/fps
    audio: np.ndarray
    speaking: bool
    deadline: float
    # A portrait [3, S, S], a FaceFrame (video avatars), or a spoken frame's (motion,
    # render) device results (`chained`).
    task: asyncio.Future[typing.Any]
    driver: float = math.nan  # camera rooms: when the driver's frame it shows arrived (monotonic)
    chained: bool = False


T = typing.TypeVar("T")


def _given_up() -> asyncio.Future[typing.Any]:
    """A frame's work never started: the emitter replaces it (counted late)."""
    fut: asyncio.Future[typing.Any] = asyncio.get_running_loop().create_future()
    fut.cancel()
    return fut


class DelayLine:
    """Fault injection: what comes out lags what goes in by ``frames``, plus ``ppm`` parts
    per million of the stream time (whole frames). With neither, the value itself."""

    def __init__(self, frames: int = 0, ppm: float = 0.0) -> None:
        self.frames, self.ppm = frames, ppm
        self._line: collections.deque[typing.Any] = collections.deque()

    def push(self, value: T, stream_seconds: float, fps: int) -> T:
        lag = self.frames + math.floor(stream_seconds * self.ppm * 1e-6 * fps)
        self._line.append(value)
        while len(self._line) > lag + 1:
            self._line.popleft()
        return self._line[0]


class Room:
    def __init__(self, session_id: str, spec: SessionSpec, target: OutputTarget, pipeline: Pipeline,
                 *, pacing: Pacing = Pacing.REALTIME, latency_budget_seconds: float = 0.5,
                 output_margin_seconds: float = 0.1, encoder: EncoderSettings = EncoderSettings(),
                 on_change: Callable[[Room], None] = lambda room: None,
                 on_sync: Callable[[Room, SyncEstimate | None], None] = lambda room, est: None,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None,
                 live_input_wait: float = 10.0, sync_interval_seconds: float = 10.0,
                 video_lag_frames: int = 0, video_drift_ppm: float = 0.0,
                 epoch: int = 0, continuation: int = 0,
                 stall_seconds: float = math.inf,
                 on_stall: Callable[[Room, float], None] = lambda room, behind: None,
                 egress: EgressPolicy | None = None, label: LabelSpec | None = None,
                 resolve: Resolver = system_resolver, input_key: bytes = b"",
                 drivers: DriverRooms | None = None,
                 on_driver_latency: Callable[[Room, float], None] = lambda room, seconds: None,
                 driver_policy: DriverPolicy | None = None, voice: str = "",
                 voice_rate: float = 0.0) -> None:
        self.session_id = session_id
        # Live inputs are taken only with a token signed by this key (the scheduler's,
        # for this room: avatarfarm.input_tokens); none: no live input is taken.
        self.input_key = input_key
        self.egress = egress or EgressPolicy()
        self.resolve = resolve  # an RTMP ingest's host name -> its addresses
        self.spec = spec
        self.target = target
        # The avatar's voice ("": the worker's default) and pace (0: the voice's own).
        self.voice, self.voice_rate = voice, voice_rate
        self.pipeline = pipeline
        self.pacing = pacing
        self.latency_budget = latency_budget_seconds
        self.output_margin = min(output_margin_seconds, latency_budget_seconds / 2)
        self.encoder_settings = encoder
        self.on_change = on_change
        self.on_sync = on_sync
        self.clock = clock
        self.live_input_wait = live_input_wait
        # Fault injection: the motion of frame n comes from the audio of frame n - lag,
        # as a pipeline whose video drifted behind its audio would render it.
        self.video_lag_frames = video_lag_frames
        # and that lag grows by this many parts per million of stream time (a video clock
        # running slow), in whole frames: the lip-sync corrector's real work, end to end.
        self.video_drift_ppm = video_drift_ppm
        self.state = RoomState.STARTING
        self.reason = ""
        self.epoch = epoch
        self.continuation = continuation
        self.stall_seconds = stall_seconds
        self.on_stall = on_stall
        self.label = label
        self._stop_at_boundary: str | None = None
        # Handing over to another worker: stop at this stream time (the end of the HLS
        # segment being written) and leave the output open for the continuation.
        self._stop_at_time: Fraction | None = None
        self.handing_over = False
        self._handover_reason = ""
        self._t = Fraction(0)
        self.held = False  # output suspended until the scheduler confirms the room
        self.superseded = False  # moved to another worker: ends without writing more
        self.stats = RoomStats()
        q = spec.quality
        # The quality in force: the producer reads it once per frame, so a reconfiguration
        # (one assignment of an immutable value) takes effect at the next frame.
        self.rendering: Quality = q
        self.degradation_step = 0
        self.sync_interval = sync_interval_seconds
        self._portraits: dict[int, np.ndarray] = {}
        self._fps_changes = 0  # lip-sync windows taken before a rate change are discarded
        self.priority = spec.tier.priority
        # A video avatar is rendered by its family (Wav2Lip, its own Ultralight model, MuseTalk).
        self.video_avatar = pipeline.is_video_avatar(spec.avatar_id)
        if self.video_avatar:
            family = pipeline.video_avatar_family(spec.avatar_id)
            if spec.drive_mode.motion_driven and family not in MOTION_FAMILIES:
                raise RoomRefused(no_motion_input(spec.avatar_id, family))
            refusal = pipeline.video_avatar_refusal(spec.avatar_id)
            if refusal is not None:
                raise RoomRefused(refusal)
        # A camera room: its driver publishes to the worker's ingest under the room's key;
        # their latest frame is read into face motion as the room needs it.
        self.drivers = drivers
        # Camera rooms: seconds from a driver frame's arrival to the frame that shows it
        # going to the encoder, per frame (the driver watches their avatar live).
        self.on_driver_latency = on_driver_latency
        self.driver_latency: collections.deque[float] = collections.deque(maxlen=1000)
        if spec.drive_mode is DriveMode.TEXT:
            refusal = pipeline.voice_refusal(voice)
            if refusal is not None:
                raise RoomRefused(refusal)
        if spec.drive_mode is DriveMode.CAMERA:
            if drivers is None or pipeline.face_reader_model is None or not input_key:
                raise RoomRefused("this worker takes no camera drivers (no driver ingest, or no "
                                  "face reader in its model folder)")
        self.face: FaceAvatar | None = None  # loaded when the room starts
        self.family: FaceFamily | None = None  # the face model's family, with it
        self.script = ScriptPlayer(self._synthesize)
        self.script.append(spec.script)
        self.audio_in = LiveAudio()
        self.motion_in = LiveMotion()
        self.camera = CameraDriver(
            session_id, self.audio_in, pipeline, policy=driver_policy or DriverPolicy(),
            priority=self.priority,
            offline=pacing is Pacing.FAST, account=self._motion_seconds,
        ) if spec.drive_mode is DriveMode.CAMERA else None
        rng = np.random.default_rng(seed if seed is not None else abs(hash(session_id)) % 2**32)
        self.idle = IdleAnimator(q.fps, rng)
        self.mel = MelStream()
        self.av_delay = AvDelay()
        self.drift = DriftPolicy()
        shape = pipeline.sync_shape
        self.sync: SyncMonitor | None = None
        if shape is not None and spec.drive_mode.uses_audio_to_motion:
            crop = MouthCrop(*shape.crop, WAV2LIP_FACE) if self.video_avatar else MouthCrop(*shape.crop)
            self.sync = SyncMonitor(shape.window, crop, max(1, round(sync_interval_seconds * q.fps)))
        self._stop_reason: str | None = None
        self._stopped = asyncio.Event()
        self._encoder: EncoderThread | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] | None = None

    # -- control

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.run(), name=f"room-{self.session_id}")
        return self.task

    def stop(self, reason: str = "ended by request") -> None:
        """Asks the room to finish the frames in flight, close its output and end."""
        if self._stop_reason is None:
            self._stop_reason = reason
            self._stopped.set()

    def stop_at_script_boundary(self, reason: str) -> None:
        """Ends the room once the script segment being spoken has finished (at once for
        rooms without a script): a licence that ended does not cut a sentence."""
        if self.spec.drive_mode is not DriveMode.TEXT or self.script.at_boundary:
            self.stop(reason)
        else:
            self.script.finish_current()
            self._stop_at_boundary = reason

    def hand_over(self, reason: str) -> None:
        """Another worker continues this room: an HLS room ends once the segment being
        written is complete (so it is published and nothing is lost), a file or RTMP
        room at once; the output is left open (no end-of-playlist) and the final
        progress reported is exactly where the continuation starts."""
        self.handing_over = True
        if self.target.kind is OutputKind.HLS and self._encoder is not None:
            seg = Fraction(self.encoder_settings.hls_segment_seconds).limit_denominator(1000)
            self._stop_at_time = math.ceil(self._t / seg) * seg
            self._handover_reason = reason
        else:
            self.stop(reason)

    def hold(self) -> None:
        """Write nothing more to the output until `release_hold` (frames made meanwhile
        are dropped, not counted and not billed)."""
        self.held = True

    def release_hold(self) -> None:
        self.held = False

    def abandon(self, reason: str) -> None:
        """The room was moved to another worker: stop without writing another frame."""
        self.superseded = True
        self.held = True
        self.stop(reason)

    def _motion_seconds(self, seconds: float) -> None:
        """Device time of the room's motion stage: its audio feature items (a family fed by
        HuBERT rows), or reading a camera driver's face."""
        self.stats.stage_seconds["audio_to_motion"] += seconds

    def _stalled(self, behind: float) -> None:
        if not self.held:
            log.warning("room %s: %.1fs behind real time (the worker stalled); holding its "
                        "output until the scheduler confirms it", self.session_id, behind)
            self.held = True
            try:
                self.on_stall(self, behind)
            except Exception:  # a reporting problem must not kill the stream
                log.exception("room %s: stall callback failed", self.session_id)

    def append_script(self, segments: list[ScriptSegment]) -> None:
        self.script.append(segments)

    def reconfigure(self, quality: Quality, step: int = 0, reason: str = "") -> None:
        """Renders at ``quality`` from the next frame on, without restarting the stream:
        the portrait at its side, scaled up to the spec's, and frames at its rate; step 0
        with the spec's own quality restores full quality.

        Raises InvalidQuality (and changes nothing) for a quality larger than the spec's
        or a rate outside 1..spec fps. Safe from any thread: it only replaces the value
        the producer reads at each frame boundary.
        """
        spec = self.spec.quality
        if not 1 <= quality.fps <= spec.fps:
            raise InvalidQuality(f"fps {quality.fps} outside 1..{spec.fps}")
        if quality.width > spec.width or quality.height > spec.height:
            raise InvalidQuality(f"{quality} is larger than the room's {spec}")
        _check_side(quality)
        before = self.rendering
        self.rendering, self.degradation_step = quality, step
        if quality != before:
            log.info("room %s: rendering at %s (step %d, was %s)%s", self.session_id, quality,
                     step, before, f": {reason}" if reason else "")

    # -- the frame loop

    async def _synthesize(self, text: str) -> tuple[np.ndarray, float]:
        r = await self.pipeline.synthesize(text, priority=self.priority, voice_name=self.voice,
                                           rate=self.voice_rate)
        self.stats.stage_seconds["tts"] += r.seconds
        return r.value, r.seconds

    async def _portrait(self, side: int) -> np.ndarray:
        if side not in self._portraits:
            self._portraits[side] = await self.pipeline.avatar_tensor(self.spec.avatar_id, side)
        return self._portraits[side]

    async def run(self) -> None:
        q = self.spec.quality
        key = driver_key(self.input_key) if self.camera is not None else ""
        # A camera room's driver watches their avatar: its preview, as the room encodes it.
        preview = PreviewTap() if key else None
        if self.camera is not None and self.drivers is not None:
            self.drivers.open(key, self.camera.feed, preview)
        try:
            if self.video_avatar:
                self.face, self.family = await self.pipeline.hold_face(self.spec.avatar_id)
                if self.camera is not None:
                    self.camera.reading = self.family.camera
                if self.sync is not None:
                    self.sync.view = self.face.mouth_view
                avatar: typing.Any = FaceFrame(0)
            else:
                avatar = await self._portrait(q.render_side)
            connect_to = None
            if self.target.kind is OutputKind.RTMP:
                # The addresses the ingest's name has now: a name that leads to a forbidden
                # address fails the room before anything connects (the lookup runs on a
                # thread), and the encoder connects to one of those very addresses.
                addresses = await check_resolved(self.egress, self.target.location,
                                                 resolve=self.resolve)
                connect_to = pinned_url(self.target.location, addresses[0])
            stamp = LabelStamp(self.label, q.width, q.height) if self.label else None

            face = self.face

            def prepare(frame: typing.Any) -> np.ndarray:
                if face is not None:
                    rgb = fit_canvas(face.compose(frame), q.width, q.height)
                else:
                    rgb = to_canvas(frame, q.width, q.height, q.render_side)
                # to_canvas makes a new array each frame: the label is stamped into it.
                return stamp.apply(rgb) if stamp is not None else rgb

            metadata = ({"comment": f"AI-generated content (label: {self.label.text})"}
                        if self.label else {})
            settings = self.encoder_settings
            output = (self.target, q.width, q.height, q.fps, settings)
            options: dict[str, typing.Any] = dict(epoch=self.epoch, continuation=self.continuation,
                                                  metadata=metadata, connect_to=connect_to)
            encoder: Encoder
            if self.target.kind is OutputKind.RTMP:
                # An RTMP push keeps a thread of its own: a stalled ingest holds up no other room.
                encoder, pool = StreamEncoder(*output, **options), None
            elif settings.processes:  # outputs on local disk: in the encoder processes
                processes = shared_encoder_processes(settings.processes)
                encoder, pool = RemoteEncoder(processes, *output, **options), processes.pool
            else:  # or on the worker's shared encoder threads
                encoder, pool = StreamEncoder(*output, **options), shared_encoder_pool()
            self._encoder = EncoderThread(
                encoder, prepare=prepare, pool=pool, priority=self.priority,
                on_encoded=preview.offer if preview is not None else None)
            await self._frames(avatar)
        except asyncio.CancelledError:
            self._set(RoomState.FAILED, "worker shutting down")
            raise
        except Exception as e:
            log.exception("room %s failed", self.session_id)
            self._set(RoomState.FAILED, f"{type(e).__name__}: {e}")
        finally:
            if self._sync_task is not None:
                self._sync_task.cancel()
            await self._close_encoder()
            if self.family is not None:  # the avatar's own model goes with its last room
                await self.pipeline.release_face(self.family)
            if key and self.drivers is not None:
                self.drivers.close(key)
            if preview is not None:
                preview.close()
            if self.camera is not None:
                self.camera.close()
            self.script.close()
        if self.state not in (RoomState.FAILED,):
            self._set(RoomState.ENDED, self._stop_reason or "reached max duration")

    async def _frames(self, avatar: typing.Any) -> None:
        q = self.spec.quality
        if self.pacing is Pacing.REALTIME:
            depth = math.ceil(self.latency_budget * q.fps) + 2
        else:
            depth = 6
            await self._wait_for_live_input()
        inflight: asyncio.Queue[_InFlight | None] = asyncio.Queue(maxsize=depth)
        producer = asyncio.create_task(self._produce(inflight),
                                       name=f"room-{self.session_id}-frames")
        failed: list[BaseException] = []
        ending: list[asyncio.Task[None]] = []

        def ended(task: asyncio.Task[None]) -> None:
            # A producer that fails ends the stream (the room fails with its error) rather
            # than leave the emitter waiting for frames that never come.
            if not task.cancelled() and task.exception() is not None:
                failed.append(typing.cast(BaseException, task.exception()))
                ending.append(asyncio.ensure_future(inflight.put(None)))

        producer.add_done_callback(ended)
        try:
            await self._emit(avatar, inflight)
            if failed:
                raise failed[0]
        finally:
            producer.cancel()
            while not inflight.empty():
                f = inflight.get_nowait()
                if f is not None:
                    f.task.cancel()
            try:
                await producer
            except asyncio.CancelledError:
                pass

    async def _wait_for_live_input(self) -> None:
        # Offline rendering follows its input: wait for the live client to connect
        # rather than race ahead through idle frames.
        mode = self.spec.drive_mode
        if mode is DriveMode.TEXT:
            return
        source = self.audio_in.attached if mode in (DriveMode.VOICE, DriveMode.CAMERA) \
            else self.motion_in.attached
        waits = [asyncio.ensure_future(source.wait()), asyncio.ensure_future(self._stopped.wait())]
        await asyncio.wait(waits, timeout=self.live_input_wait, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if not source.is_set() and not self._stopped.is_set():
            log.warning("room %s: no live input after %.0fs; rendering idle", self.session_id,
                        self.live_input_wait)

    async def _produce(self, inflight: asyncio.Queue[_InFlight | None]) -> None:
        mode = self.spec.drive_mode
        limit = self.spec.max_duration_seconds
        lagged = DelayLine(self.video_lag_frames, self.video_drift_ppm)
        if mode is DriveMode.TEXT and self.pacing is Pacing.REALTIME:
            # The first frame cannot go before its audio: the clock starts with it, or a
            # room would start behind by its voice's time and catch up in a burst of late
            # frames (all rooms at once, where a worker starts many).
            await self.script.ready()
        t0 = self.clock()
        t = Fraction(0)  # stream time of frame n (exact, whatever rates it was made at)
        n = 0
        q: Quality | None = None
        avatar = render_reserve = None
        face = self.face
        speech: FaceSpeech | None = None  # video avatars: audio -> the face model's audio input
        waiting: collections.deque[tuple[np.ndarray, bool]] = collections.deque()  # for a window
        m = 0  # video avatars: frames started (n counts the audio chunks taken)
        deadline = math.inf
        while self._stop_reason is None and (limit <= 0 or t < limit - 1e-9):
            if q != self.rendering:
                if face is not None and speech is not None and q is not None and q.fps != self.rendering.fps:
                    # Frames of the old rate are finished at it; the new rate starts afresh.
                    m = await self._start_faces(face, _flush(speech, waiting), waiting, m, q.fps,
                                                inflight, deadline, lagged)
                q = self.rendering
                if face is None:
                    avatar = await self._portrait(q.render_side)
                    # The audio-to-motion result must leave time for the render after it.
                    render_reserve = self.pipeline.engine.curve(
                        self.pipeline.render_key(q.render_side)).seconds(1)
                else:
                    assert self.family is not None
                    if mode.uses_audio_to_motion:  # a mocap room's face is drawn from motion
                        speech = self.family.speech(q.fps, self.priority, self._motion_seconds)
                    render_reserve = 0.0
                self.idle.fps = q.fps
            if self.pacing is Pacing.REALTIME:
                release = t0 + float(t)
                behind = self.clock() - release
                if behind > self.stall_seconds:
                    # A live stream does not replay the time it missed: skip ahead.
                    t0 += behind
                    release = t0 + float(t)
                    self._stalled(behind)
                deadline = release + self.latency_budget - self.output_margin
                wait = release - self.clock()
                if wait > 0:
                    await asyncio.sleep(wait)
            else:
                deadline = math.inf
            end = t + Fraction(1, q.fps)
            k = round(end * SAMPLE_RATE) - round(t * SAMPLE_RATE)
            if self._stop_at_boundary is not None and self.script.at_boundary:
                self.stop(self._stop_at_boundary)
                break
            if self._stop_at_time is not None and t >= self._stop_at_time:
                self.stop(self._handover_reason)
                break
            self._t = t
            if self.camera is not None and \
                    self.camera.step(1 / q.fps) is DriverAction.END:
                self.stop(self.camera.why_ended)
                break
            audio, speaking = await self._audio(mode, k)
            if face is not None and not mode.uses_audio_to_motion:
                # A motion-capture room on a video avatar: each frame from the performer's
                # face motion (its family has a motion input; others were refused).
                motion, arrived = await self._face_motion(deadline, self._driver_time(k))
                drawn = asyncio.create_task(self._drive(face, face.index(n), motion, deadline))
                await inflight.put(_InFlight(n, q.fps, audio, speaking, deadline, drawn, arrived))
                n, t = n + 1, end
                continue
            if face is not None and speech is not None:
                waiting.append((audio, speaking))
                m = await self._start_faces(face, speech.push(audio, deadline), waiting, m, q.fps,
                                            inflight, deadline, lagged)
                n, t = n + 1, end
                continue
            assert avatar is not None and render_reserve is not None
            idle = self.idle.step()
            mel: np.ndarray | None = None
            driven: Motion | None = None
            arrived = math.nan
            if mode.uses_audio_to_motion:
                mel = lagged.push(self.mel.push(audio), float(t), q.fps)
            else:
                driven, arrived = await self._face_motion(deadline, self._driver_time(k))
            if self.pacing is Pacing.REALTIME and self.clock() >= deadline:
                # Past its deadline before any of its work: the device would drop it after
                # the work of submitting it, and a room that has fallen behind would spend
                # its way further behind. It is replaced at once; its audio plays.
                self.stats.skipped_frames += 1
                await inflight.put(_InFlight(n, q.fps, audio, speaking, deadline, _given_up()))
            elif mel is not None:  # one device item: its motion, then its render
                spoken = self.pipeline.speak(avatar, idle, mel, deadline - render_reserve, deadline,
                                             self.priority)
                await inflight.put(_InFlight(n, q.fps, audio, speaking, deadline,
                                             spoken, chained=True))
            else:
                task = asyncio.create_task(self._render(avatar, idle, driven, deadline))
                await inflight.put(_InFlight(n, q.fps, audio, speaking, deadline, task, arrived))
            n, t = n + 1, end
        if face is not None and speech is not None and q is not None:
            end_by = self.clock() + self.latency_budget - self.output_margin \
                if self.pacing is Pacing.REALTIME else math.inf
            await self._start_faces(face, _flush(speech, waiting), waiting, m, q.fps, inflight, end_by,
                                    lagged)
        await inflight.put(None)

    async def _start_faces(self, face: FaceAvatar, windows: list[FrameAudio],
                           waiting: collections.deque[tuple[np.ndarray, bool]], m: int, fps: int,
                           inflight: asyncio.Queue[_InFlight | None], deadline: float,
                           lagged: DelayLine) -> int:
        """Starts the video avatar's frames whose audio inputs are complete (one per input,
        in order, each with the audio taken for it); returns the frames started so far.
        (`lagged`: the fault injection's delay line, as for the reference family.)"""
        for window in windows:
            audio, speaking = waiting.popleft()
            index = face.index(m)
            task = asyncio.create_task(self._redraw(face, index, lagged.push(window, m / fps, fps),
                                                    deadline))
            await inflight.put(_InFlight(m, fps, audio, speaking, deadline, task))
            m += 1
        return m

    async def _redraw(self, face: FaceAvatar, index: int, window: FrameAudio,
                      deadline: float) -> FaceFrame:
        if window.silent:
            return FaceFrame(index)  # a pause: the base frame, no device time
        assert self.family is not None
        r = await self.family.redraw(await window.value(), face, index, deadline, self.priority)
        self.stats.stage_seconds["render"] += r.seconds
        self.stats.batched_items += 1
        self.stats.batch_size_sum += r.batch_size
        return FaceFrame(index, r.value)

    def _driver_time(self, k: int) -> float:
        """A camera room's driver's stream time of the sound just taken (inf: none)."""
        return self.camera.stream_time(k) if self.camera is not None else math.inf

    async def _face_motion(self, deadline: float, at: float = math.inf) -> tuple[Motion, float]:
        """The driver's face motion for the next frame, to await (None: none yet, or a
        gap: idle takes over), and when the camera frame it comes from arrived (nan:
        none): pushed (motion capture), or read from their camera's frame at stream time
        ``at`` (the frame's sound's; `CameraDriver.motion`)."""
        if self.camera is None:
            if self.pacing is Pacing.FAST:
                await self.motion_in.wait_for_frame()
            done: asyncio.Future[np.ndarray | None] = asyncio.get_running_loop().create_future()
            done.set_result(self.motion_in.take())
            return done, math.nan
        return await self.camera.motion(deadline, at)

    async def _drive(self, face: FaceAvatar, index: int, pending: Motion,
                     deadline: float) -> FaceFrame:
        motion = await pending
        if motion is None:
            return FaceFrame(index)  # no motion yet, or a gap longer than the hold: the base frame
        assert self.family is not None and self.family.drive is not None
        camera = self.family.camera if self.camera is not None else None
        drive = camera.drive if camera is not None else self.family.drive
        r = await drive(motion, face, index, deadline, self.priority)
        self.stats.stage_seconds["render"] += r.seconds
        self.stats.batched_items += 1
        self.stats.batch_size_sum += r.batch_size
        return FaceFrame(index, r.value)

    async def _render(self, avatar: np.ndarray, idle: np.ndarray, face: Motion | None,
                      deadline: float) -> np.ndarray:
        """A frame whose motion is not spoken: a live driver's face motion (mocap or
        camera) composed with idle, or idle alone."""
        driven: np.ndarray | None = None
        if face is not None:  # a live driver's face motion
            pending = await face
            driven = reference_motion(pending) if pending is not None else None
        r = await self.pipeline.render(avatar, compose(idle, driven, mouth_only=False), deadline,
                                       self.priority)
        self.stats.stage_seconds["render"] += r.seconds
        self.stats.batched_items += 1
        self.stats.batch_size_sum += r.batch_size
        return r.value

    def _spoken(self, done: tuple[ItemResult, ItemResult]) -> np.ndarray:
        """A spoken frame's portrait, its motion's and render's device time counted."""
        motion, render = done
        st = self.stats
        st.stage_seconds["audio_to_motion"] += motion.seconds
        st.stage_seconds["render"] += render.seconds
        st.batched_items += 1
        st.batch_size_sum += render.batch_size
        return render.outputs[0]

    async def _emit(self, avatar: typing.Any, inflight: asyncio.Queue[_InFlight | None]) -> None:
        enc = self._encoder
        assert enc is not None
        last_good = avatar  # before the first frame, the still portrait stands in
        fps = self.spec.quality.fps
        while True:
            f = await inflight.get()
            if f is None:
                return
            if f.fps != fps:
                fps = f.fps
                self._rate_changed(fps)
            if enc.error is not None:
                f.task.cancel()
                if isinstance(enc.error, Superseded):
                    self.superseded = True  # another worker took the room's output over
                    self._stop_reason = self._stop_reason or str(enc.error)
                    return
                raise OutputFailed(enc.encoder.location, enc.error)
            if f.deadline != math.inf and self.clock() - f.deadline > self.stall_seconds:
                self._stalled(self.clock() - f.deadline)
            if self.held:
                f.task.cancel()
                continue
            frame = await self._settle(f)
            if frame is None:
                self.stats.late_frames += 1
                # A video avatar's loop goes on (its base frame); a portrait holds still.
                frame = FaceFrame(self.face.index(f.n)) if self.face is not None else last_good
            else:
                last_good = frame
            pending = self.av_delay.pending_frames
            frame, audio = self.av_delay.process(frame, f.audio)
            if pending and not self.av_delay.pending_frames:
                # A correction took effect (in a pause): the window restarts from here.
                self.stats.av_correction_seconds = self.av_delay.net_frames / f.fps
                log.info("room %s: A/V correction now %+d frame(s), applied at %.3f s of stream",
                         self.session_id, self.av_delay.net_frames, float(self.stats.stream_time))
                if self.sync is not None:
                    self.sync.restart()
            if self.sync is not None:
                self.sync.push(audio, frame)
                if self.sync.due() and self._sync_task is None:
                    self._sync_task = asyncio.create_task(
                        self._check_sync(*self.sync.take(), fps, self._fps_changes))
            if not enc.try_submit(frame, audio, f.fps):
                await asyncio.to_thread(enc.submit, frame, audio, 30.0, f.fps)
            if not math.isnan(f.driver):
                latency = self.clock() - f.driver
                self.driver_latency.append(latency)
                self.on_driver_latency(self, latency)
            self.stats.frames_rendered += 1
            self.stats.stream_time += Fraction(1, f.fps)
            self.stats.speech_frames += int(f.speaking)
            self.stats.stage_seconds["encode"] = enc.encode_seconds
            self.stats.merged_frames = enc.frames_merged
            self.stats.canvas_seconds = enc.prepare_seconds
            if f.n == 0:
                self._set(RoomState.RUNNING, "")

    async def _settle(self, f: _InFlight) -> typing.Any:
        """The frame's render, or None when it missed its deadline."""
        if f.deadline != math.inf and not f.task.done():
            await asyncio.wait([f.task], timeout=max(f.deadline - self.clock(), 0.0))
            if not f.task.done():
                f.task.cancel()
                return None
        try:
            done = await f.task
        except (DeadlineMissed, asyncio.CancelledError):
            return None
        return self._spoken(done) if f.chained else done

    def _rate_changed(self, fps: int) -> None:
        """The emitted frames' rate changed: a lip-sync window mixing rates would describe
        neither, so checking starts over at the new rate (in-flight checks are discarded)."""
        self._fps_changes += 1
        self.stats.av_correction_seconds = self.av_delay.net_frames / fps  # held in frames
        if self.sync is not None:
            self.sync.restart()
            self.sync.every_frames = max(self.sync.window, round(self.sync_interval * fps))

    async def _check_sync(self, audio: np.ndarray, mouth: np.ndarray, fps: int,
                          rate_epoch: int) -> None:
        try:
            r = await self.pipeline.sync_scores(audio, mouth, self.clock() + 2.0, self.priority)
        except DeadlineMissed:
            return
        finally:
            self._sync_task = None
        st = self.stats
        st.stage_seconds["alignment"] += r.seconds
        if rate_epoch != self._fps_changes:
            return  # the window was taken at another rate
        st.sync_checks += 1
        est = estimate(r.value)
        if est is not None:
            st.av_offset_seconds = est.offset_frames / fps
            # While a correction waits for a pause, checks still see the offset it will fix.
            correct = self.drift.correction(est) if not self.av_delay.pending_frames else 0
            if correct:
                self.av_delay.correct(correct)
                st.sync_corrections += 1
                log.info("room %s: video %s audio by %d frame(s); correcting to %+d at the next "
                         "pause", self.session_id, "behind" if correct > 0 else "ahead of",
                         abs(correct), self.av_delay.net_frames + self.av_delay.pending_frames)
        try:
            self.on_sync(self, est)
        except Exception:  # a reporting problem must not kill the stream
            log.exception("room %s: sync callback failed", self.session_id)

    async def _audio(self, mode: DriveMode, k: int) -> tuple[np.ndarray, bool]:
        if mode is DriveMode.TEXT:
            return await self.script.take(k)
        if self.pacing is Pacing.FAST:
            await self.audio_in.wait_for(k)
        elif mode is DriveMode.CAMERA:
            # A camera driver's sound is played as it comes: what piled up while it arrived
            # in a burst (or the room waited for it) is dropped down to a short jitter
            # buffer, or the avatar would run late behind its driver for good.
            self.audio_in.skip(self.audio_in.buffered - k - CAMERA_JITTER_SAMPLES)
        had = self.audio_in.buffered
        audio = self.audio_in.take(k)
        if self.camera is not None and self.camera.action is not DriverAction.DRIVE:
            audio[:] = 0.0  # a held room is silent: its driver's sound is not live either
        return audio, had > 0 and mode is DriveMode.VOICE

    async def _close_encoder(self) -> None:
        enc = self._encoder
        if enc is None:
            return
        # A room that moved ends its part of the output open: the next worker continues it.
        await asyncio.to_thread(enc.close, end_output=not self.superseded,
                                leave_open=self.handing_over)
        self.stats.stage_seconds["encode"] = enc.encode_seconds
        self.stats.canvas_seconds = enc.prepare_seconds
        if isinstance(enc.error, Superseded):
            self.superseded = True
        elif enc.error is not None and self.state is not RoomState.FAILED:
            self._set(RoomState.FAILED, str(OutputFailed(enc.encoder.location, enc.error)))

    def _set(self, state: RoomState, reason: str) -> None:
        if self.state in (RoomState.ENDED, RoomState.FAILED):
            return
        self.state, self.reason = state, reason
        try:
            self.on_change(self)
        except Exception:  # a reporting problem must not kill the stream
            log.exception("room %s: state callback failed", self.session_id)


def _flush(speech: FaceSpeech, waiting: collections.deque[tuple[np.ndarray, bool]]
           ) -> list[FrameAudio]:
    """The inputs of every frame still waiting for one: the audio ends here (the end of
    the stream, or a rate change), so the last ones read the padded end."""
    return speech.finish(speech.frames_emitted + len(waiting))


class OutputFailed(RuntimeError):
    def __init__(self, location: str, cause: BaseException) -> None:
        super().__init__(f"output {location} failed: {type(cause).__name__}: {cause}")
