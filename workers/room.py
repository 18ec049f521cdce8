"""One room on a worker: its drivers, motion, rendering, pacing, alignment and encoder.

A room runs two asyncio tasks joined by a bounded queue of frames in flight:

* the producer releases frame n at its capture time (t0 + n/fps in real-time
  pacing), takes its audio from the driver, and starts the frame on the device:
  audio-to-motion (unless mocap drives it), idle motion composed in, render.
  Each of those is one item in the worker's cross-room batcher, with the
  frame's deadline: its presentation time (capture time plus the latency
  budget, the stream's buffer) minus the output margin left for encoding.
  Several frames of a room are in flight at once, so one frame's motion is
  computed while another renders.
* the emitter takes frames in order. A frame the batcher dropped, or one not
  back by its deadline, is replaced by the last good frame, so the stream keeps
  its timing and the audio its sync; each replacement is counted late. The
  frame and its audio pass the lip-sync monitor and the A/V delay that
  corrects drift, then go to the encoder thread.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from avatarfarm.domain import DriveMode, ScriptSegment, SessionSpec
from workers.alignment import (
    AvDelay,
    DriftPolicy,
    MouthCrop,
    SyncEstimate,
    SyncMonitor,
    estimate,
)
from workers.audio import SAMPLE_RATE, MelStream
from workers.drivers import LiveAudio, LiveMotion, ScriptPlayer
from workers.encode import EncoderSettings, EncoderThread, OutputTarget, StreamEncoder
from workers.engine import DeadlineMissed
from workers.motion import IdleAnimator, compose
from workers.pipeline import Pipeline, to_canvas

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

    @property
    def mean_batch(self) -> float:
        return self.batch_size_sum / self.batched_items if self.batched_items else 0.0

    def stream_seconds(self, fps: int) -> float:
        return self.frames_rendered / fps

    @property
    def device_seconds(self) -> float:
        return sum(self.stage_seconds.values())


@dataclass(slots=True)
class _InFlight:
    n: int
    audio: np.ndarray
    speaking: bool
    deadline: float
    task: asyncio.Task[np.ndarray]


class Room:
    def __init__(self, session_id: str, spec: SessionSpec, target: OutputTarget, pipeline: Pipeline,
                 *, pacing: Pacing = Pacing.REALTIME, latency_budget_seconds: float = 0.5,
                 output_margin_seconds: float = 0.1, encoder: EncoderSettings = EncoderSettings(),
                 on_change: Callable[[Room], None] = lambda room: None,
                 on_sync: Callable[[Room, SyncEstimate | None], None] = lambda room, est: None,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None,
                 live_input_wait: float = 10.0, sync_interval_seconds: float = 10.0,
                 video_lag_frames: int = 0) -> None:
        self.session_id = session_id
        self.spec = spec
        self.target = target
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
        self.state = RoomState.STARTING
        self.reason = ""
        self.stats = RoomStats()
        q = spec.quality
        self.priority = spec.tier.priority
        self.script = ScriptPlayer(self._synthesize)
        self.script.append(spec.script)
        self.audio_in = LiveAudio()
        self.motion_in = LiveMotion()
        rng = np.random.default_rng(seed if seed is not None else abs(hash(session_id)) % 2**32)
        self.idle = IdleAnimator(q.fps, rng)
        self.mel = MelStream()
        self.av_delay = AvDelay()
        self.drift = DriftPolicy()
        shape = pipeline.sync_shape
        self.sync: SyncMonitor | None = None
        if shape is not None and spec.drive_mode.uses_audio_to_motion:
            self.sync = SyncMonitor(shape.window, MouthCrop(*shape.crop),
                                    max(1, round(sync_interval_seconds * q.fps)))
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

    def append_script(self, segments: list[ScriptSegment]) -> None:
        self.script.append(segments)

    @property
    def total_frames(self) -> int | None:
        d = self.spec.max_duration_seconds
        return math.ceil(d * self.spec.quality.fps - 1e-9) if d > 0 else None

    # -- the frame loop

    async def _synthesize(self, text: str) -> tuple[np.ndarray, float]:
        r = await self.pipeline.synthesize(text)
        self.stats.stage_seconds["tts"] += r.seconds
        return r.value, r.seconds

    async def run(self) -> None:
        q = self.spec.quality
        try:
            avatar = await self.pipeline.avatar_tensor(self.spec.avatar_id, q.render_side)
            self._encoder = EncoderThread(
                StreamEncoder(self.target, q.width, q.height, q.fps, self.encoder_settings),
                prepare=lambda frame: to_canvas(frame, q.width, q.height))
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
        if self.state not in (RoomState.FAILED,):
            self._set(RoomState.ENDED, self._stop_reason or "reached max duration")

    async def _frames(self, avatar: np.ndarray) -> None:
        q = self.spec.quality
        if self.pacing is Pacing.REALTIME:
            depth = math.ceil(self.latency_budget * q.fps) + 2
        else:
            depth = 6
            await self._wait_for_live_input()
        inflight: asyncio.Queue[_InFlight | None] = asyncio.Queue(maxsize=depth)
        producer = asyncio.create_task(self._produce(avatar, inflight),
                                       name=f"room-{self.session_id}-frames")
        try:
            await self._emit(avatar, inflight)
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
        source = self.audio_in.attached if mode is DriveMode.VOICE else self.motion_in.attached
        waits = [asyncio.ensure_future(source.wait()), asyncio.ensure_future(self._stopped.wait())]
        await asyncio.wait(waits, timeout=self.live_input_wait, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if not source.is_set() and not self._stopped.is_set():
            log.warning("room %s: no live input after %.0fs; rendering idle", self.session_id,
                        self.live_input_wait)

    async def _produce(self, avatar: np.ndarray, inflight: asyncio.Queue[_InFlight | None]) -> None:
        q = self.spec.quality
        mode = self.spec.drive_mode
        total = self.total_frames
        render_key = self.pipeline.render_key(avatar.shape[-1])
        # The audio-to-motion result must leave time for the render after it.
        render_reserve = self.pipeline.engine.curve(render_key).seconds(1)
        lagged: collections.deque[np.ndarray] = collections.deque(maxlen=self.video_lag_frames + 1)
        t0 = self.clock()
        n = 0
        while self._stop_reason is None and (total is None or n < total):
            if self.pacing is Pacing.REALTIME:
                release = t0 + n / q.fps
                deadline = release + self.latency_budget - self.output_margin
                wait = release - self.clock()
                if wait > 0:
                    await asyncio.sleep(wait)
            else:
                deadline = math.inf
            k = round((n + 1) * SAMPLE_RATE / q.fps) - round(n * SAMPLE_RATE / q.fps)
            audio, speaking = await self._audio(mode, k)
            idle = self.idle.step()
            mel: np.ndarray | None = None
            driven: np.ndarray | None = None
            if mode.uses_audio_to_motion:
                lagged.append(self.mel.push(audio))
                mel = lagged[0]
            else:
                if self.pacing is Pacing.FAST:
                    await self.motion_in.wait_for_frame()
                driven = self.motion_in.take()
            task = asyncio.create_task(self._render(avatar, idle, mel, driven, deadline,
                                                    deadline - render_reserve))
            await inflight.put(_InFlight(n, audio, speaking, deadline, task))
            n += 1
        await inflight.put(None)

    async def _render(self, avatar: np.ndarray, idle: np.ndarray, mel: np.ndarray | None,
                      driven: np.ndarray | None, deadline: float, motion_deadline: float
                      ) -> np.ndarray:
        st = self.stats.stage_seconds
        if mel is not None:
            r = await self.pipeline.audio_to_motion(mel, motion_deadline, self.priority)
            st["audio_to_motion"] += r.seconds
            driven = r.value
        motion = compose(idle, driven, mouth_only=mel is not None)
        r = await self.pipeline.render(avatar, motion, deadline, self.priority)
        st["render"] += r.seconds
        self.stats.batched_items += 1
        self.stats.batch_size_sum += r.batch_size
        return r.value

    async def _emit(self, avatar: np.ndarray, inflight: asyncio.Queue[_InFlight | None]) -> None:
        enc = self._encoder
        assert enc is not None
        last_good = avatar  # before the first frame, the still portrait stands in
        while True:
            f = await inflight.get()
            if f is None:
                return
            if enc.error is not None:
                f.task.cancel()
                raise OutputFailed(self.target, enc.error)
            frame = await self._settle(f)
            if frame is None:
                self.stats.late_frames += 1
                frame = last_good
            else:
                last_good = frame
            frame, audio = self.av_delay.process(frame, f.audio)
            if self.sync is not None:
                self.sync.push(audio, frame)
                if self.sync.due() and self._sync_task is None:
                    self._sync_task = asyncio.create_task(self._check_sync(*self.sync.take()))
            if not enc.try_submit(frame, audio):
                await asyncio.to_thread(enc.submit, frame, audio, 30.0)
            self.stats.frames_rendered += 1
            self.stats.speech_frames += int(f.speaking)
            self.stats.stage_seconds["encode"] = enc.encode_seconds
            if f.n == 0:
                self._set(RoomState.RUNNING, "")

    async def _settle(self, f: _InFlight) -> np.ndarray | None:
        """The frame's render, or None when it missed its deadline."""
        if f.deadline != math.inf and not f.task.done():
            await asyncio.wait([f.task], timeout=max(f.deadline - self.clock(), 0.0))
            if not f.task.done():
                f.task.cancel()
                return None
        try:
            return await f.task
        except (DeadlineMissed, asyncio.CancelledError):
            return None

    async def _check_sync(self, audio: np.ndarray, mouth: np.ndarray) -> None:
        fps = self.spec.quality.fps
        try:
            r = await self.pipeline.sync_scores(audio, mouth, self.clock() + 2.0, self.priority)
        except DeadlineMissed:
            return
        finally:
            self._sync_task = None
        st = self.stats
        st.stage_seconds["alignment"] += r.seconds
        st.sync_checks += 1
        est = estimate(r.value)
        if est is not None:
            st.av_offset_seconds = est.offset_frames / fps
            correct = self.drift.correction(est)
            if correct:
                self.av_delay.correct(correct)
                st.sync_corrections += 1
                st.av_correction_seconds = self.av_delay.net_frames / fps
                assert self.sync is not None
                self.sync.restart()  # frames before the correction no longer describe the stream
                log.info("room %s: video %s audio by %d frame(s); correction now %+d",
                         self.session_id, "behind" if correct > 0 else "ahead of",
                         abs(correct), self.av_delay.net_frames)
        try:
            self.on_sync(self, est)
        except Exception:  # a reporting problem must not kill the stream
            log.exception("room %s: sync callback failed", self.session_id)

    async def _audio(self, mode: DriveMode, k: int) -> tuple[np.ndarray, bool]:
        if mode is DriveMode.TEXT:
            return await self.script.take(k)
        if self.pacing is Pacing.FAST:
            await self.audio_in.wait_for(k)
        had = self.audio_in.buffered
        return self.audio_in.take(k), had > 0 and mode is DriveMode.VOICE

    async def _close_encoder(self) -> None:
        enc = self._encoder
        if enc is None:
            return
        await asyncio.to_thread(enc.close)
        self.stats.stage_seconds["encode"] = enc.encode_seconds
        if enc.error is not None and self.state is not RoomState.FAILED:
            self._set(RoomState.FAILED, str(OutputFailed(self.target, enc.error)))

    def _set(self, state: RoomState, reason: str) -> None:
        if self.state in (RoomState.ENDED, RoomState.FAILED):
            return
        self.state, self.reason = state, reason
        try:
            self.on_change(self)
        except Exception:  # a reporting problem must not kill the stream
            log.exception("room %s: state callback failed", self.session_id)


class OutputFailed(RuntimeError):
    def __init__(self, target: OutputTarget, cause: BaseException) -> None:
        super().__init__(f"output {target.kind.value} {target.location} failed: "
                         f"{type(cause).__name__}: {cause}")
