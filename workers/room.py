"""One room on a worker: its drivers, motion, rendering, pacing and encoder.

A room is one asyncio task. Per video frame it takes the frame's audio from
its driver, turns audio into motion (unless mocap drives it), adds idle
motion, renders, and hands the frame and its audio to its encoder thread. In
real-time pacing a frame is due at its presentation time; one finished later
than that plus the latency budget is counted late.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from avatarfarm.domain import DriveMode, ScriptSegment, SessionSpec
from workers.audio import SAMPLE_RATE, MelStream
from workers.drivers import LiveAudio, LiveMotion, ScriptPlayer
from workers.encode import EncoderSettings, EncoderThread, OutputTarget, StreamEncoder
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
        default_factory=lambda: {"tts": 0.0, "audio_to_motion": 0.0, "render": 0.0, "encode": 0.0})

    def stream_seconds(self, fps: int) -> float:
        return self.frames_rendered / fps

    @property
    def device_seconds(self) -> float:
        return sum(self.stage_seconds.values())


class Room:
    def __init__(self, session_id: str, spec: SessionSpec, target: OutputTarget, pipeline: Pipeline,
                 *, pacing: Pacing = Pacing.REALTIME, latency_budget_seconds: float = 0.5,
                 encoder: EncoderSettings = EncoderSettings(),
                 on_change: Callable[[Room], None] = lambda room: None,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None,
                 live_input_wait: float = 10.0) -> None:
        self.session_id = session_id
        self.spec = spec
        self.target = target
        self.pipeline = pipeline
        self.pacing = pacing
        self.latency_budget = latency_budget_seconds
        self.encoder_settings = encoder
        self.on_change = on_change
        self.clock = clock
        self.live_input_wait = live_input_wait
        self.state = RoomState.STARTING
        self.reason = ""
        self.stats = RoomStats()
        q = spec.quality
        self.script = ScriptPlayer(self._synthesize)
        self.script.append(spec.script)
        self.audio_in = LiveAudio()
        self.motion_in = LiveMotion()
        rng = np.random.default_rng(seed if seed is not None else abs(hash(session_id)) % 2**32)
        self.idle = IdleAnimator(q.fps, rng)
        self.mel = MelStream()
        self._stop_reason: str | None = None
        self._stopped = asyncio.Event()
        self._encoder: EncoderThread | None = None
        self.task: asyncio.Task[None] | None = None

    # -- control

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.run(), name=f"room-{self.session_id}")
        return self.task

    def stop(self, reason: str = "ended by request") -> None:
        """Asks the room to finish its current frame, close its output and end."""
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
            self._encoder = EncoderThread(StreamEncoder(self.target, q.width, q.height, q.fps,
                                                        self.encoder_settings))
            await self._frames(avatar)
        except asyncio.CancelledError:
            self._set(RoomState.FAILED, "worker shutting down")
            raise
        except Exception as e:
            log.exception("room %s failed", self.session_id)
            self._set(RoomState.FAILED, f"{type(e).__name__}: {e}")
        finally:
            await self._close_encoder()
        if self.state not in (RoomState.FAILED,):
            self._set(RoomState.ENDED, self._stop_reason or "reached max duration")

    async def _frames(self, avatar: np.ndarray) -> None:
        q = self.spec.quality
        mode = self.spec.drive_mode
        enc = self._encoder
        assert enc is not None
        total = self.total_frames
        if self.pacing is Pacing.FAST and mode is not DriveMode.TEXT:
            # Offline rendering follows its input: wait for the live client to connect
            # rather than race ahead through idle frames.
            source = self.audio_in.attached if mode is DriveMode.VOICE else self.motion_in.attached
            waits = [asyncio.ensure_future(source.wait()), asyncio.ensure_future(self._stopped.wait())]
            await asyncio.wait(waits, timeout=self.live_input_wait,
                               return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if not source.is_set() and not self._stopped.is_set():
                log.warning("room %s: no live input after %.0fs; rendering idle", self.session_id,
                            self.live_input_wait)
        t0 = self.clock()
        n = 0
        while self._stop_reason is None and (total is None or n < total):
            if enc.error is not None:
                raise OutputFailed(self.target, enc.error)
            due = t0 + n / q.fps
            if self.pacing is Pacing.REALTIME:
                ahead = due - self.clock() - 1.0 / q.fps
                if ahead > 0:
                    await asyncio.sleep(ahead)
            k = round((n + 1) * SAMPLE_RATE / q.fps) - round(n * SAMPLE_RATE / q.fps)
            audio, speaking = await self._audio(mode, k)
            driven: np.ndarray | None
            if mode.uses_audio_to_motion:
                r = await self.pipeline.audio_to_motion(self.mel.push(audio))
                self.stats.stage_seconds["audio_to_motion"] += r.seconds
                driven = r.value
            else:
                if self.pacing is Pacing.FAST:
                    await self.motion_in.wait_for_frame()
                driven = self.motion_in.take()
            motion = compose(self.idle.step(), driven, mouth_only=mode.uses_audio_to_motion)
            r = await self.pipeline.render(avatar, motion)
            self.stats.stage_seconds["render"] += r.seconds
            rgb = to_canvas(r.value, q.width, q.height)
            if self.pacing is Pacing.REALTIME and self.clock() > due + self.latency_budget:
                self.stats.late_frames += 1
            if not enc.try_submit(rgb, audio):
                await asyncio.to_thread(enc.submit, rgb, audio, 30.0)
            self.stats.frames_rendered += 1
            self.stats.speech_frames += int(speaking)
            self.stats.stage_seconds["encode"] = enc.encode_seconds
            n += 1
            if n == 1:
                self._set(RoomState.RUNNING, "")

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
