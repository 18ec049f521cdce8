"""The worker agent: takes the scheduler's assignments, runs them as rooms, reports on them.

Rooms keep rendering while the scheduler is away (the link, `workers.agent.link`, comes
back on its own); on reconnect the worker registers again with the rooms it still
renders and the assignment epoch of each, and the scheduler answers with those it
keeps here (`workers.rooms.registry`). Progress and final states go in numbered usage
reports held until acknowledged (`workers.agent.usage`); other state changes (placed,
running) go as single `SessionUpdate`s.

A worker that stalled past the scheduler's worker timeout (its rooms notice,
see `Room`) holds their output and registers again at once, so the scheduler
says which rooms are still its own before another frame is written.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import typing
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from avatarfarm import convert
from avatarfarm.domain import InvalidRequest, SessionSpec, Stage, Tier
from avatarfarm.egress import EgressPolicy
from avatarfarm.live_driver import DriverPolicy
from avatarfarm.v1 import types_pb2, workers_pb2
from workers.agent.link import SchedulerLink
from workers.agent.usage import UsageReports
from workers.device.engine import BatchKey, KeyStats
from workers.device.pipeline import AUDIO_TO_MOTION_KEY, AVATAR_BYTES_PER_PIXEL, LIPSYNC_KEY, Pipeline
from workers.device.profile import LatencyProfile
from workers.families.features import FEATURES_KEY
from workers.families.musetalk import WHISPER_KEY
from workers.ingest.registry import DriverRooms
from workers.media.alignment import SyncEstimate
from workers.media.breaker import BreakerState
from workers.media.label import LabelSpec
from workers.metrics import WorkerMetrics
from workers.output.encode import EncoderSettings
from workers.output.targets import OutputError, OutputTarget, tenant_root
from workers.rooms.governor import RoomGovernor
from workers.rooms.registry import RoomRegistry
from workers.rooms.room import (
    InvalidQuality,
    Pacing,
    Room,
    RoomRefused,
    RoomState,
    RoomStats,
    check_renderable,
    frame_buffer_bytes_per_pixel,
)

log = logging.getLogger(__name__)

_ROOM_STATE_PB = {
    RoomState.STARTING: types_pb2.SESSION_STATE_PLACED,
    RoomState.RUNNING: types_pb2.SESSION_STATE_RUNNING,
    RoomState.ENDED: types_pb2.SESSION_STATE_ENDED,
    RoomState.FAILED: types_pb2.SESSION_STATE_FAILED,
}


def profile_to_pb(p: LatencyProfile) -> workers_pb2.LatencyProfile:
    return workers_pb2.LatencyProfile(
        stage=convert.stage_to_pb(p.stage), model=p.model, width=p.width, height=p.height,
        latencies=[workers_pb2.BatchLatency(batch_size=b, seconds=s) for b, s in p.latencies])


@dataclass(frozen=True, slots=True)
class Assignment:
    """A room as the scheduler's Assign asks for it."""

    spec: SessionSpec
    target: OutputTarget
    label: LabelSpec | None
    driver: DriverPolicy | None = None  # camera rooms: the platform's rules for their driver
    voice: str = ""  # the avatar's voice ("": the worker's default)
    voice_rate: float = 0.0


def assignment_from_pb(msg: workers_pb2.Assign, output_dir: Path,
                       egress: EgressPolicy) -> Assignment:
    """Decodes an Assign, trusting its spec: the scheduler validated it against the tenant
    edge's limits when the session was created, and a limit changed on one side must not
    fail rooms on the other. What this worker cannot do is still refused: a frame it
    cannot make (InvalidQuality), a label that does not fit (InvalidRequest), an output
    outside its folder or an ingest its egress policy forbids (OutputError)."""
    spec = convert.spec_from_trusted(msg.spec)
    check_renderable(spec.quality)
    label = None
    if msg.HasField("label"):
        try:
            label = LabelSpec(msg.label.text, msg.label.position, msg.label.size)
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
    driver = None
    if msg.HasField("driver_policy"):
        try:
            driver = convert.driver_policy_from_pb(msg.driver_policy)
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
    target = OutputTarget.resolve(spec.output.kind, spec.output.target,
                                  tenant_root(output_dir, spec.tenant), egress)
    if not (math.isfinite(msg.voice_rate) and 0 <= msg.voice_rate <= 1000):
        raise InvalidRequest(f"voice rate {msg.voice_rate} is not words a minute")
    return Assignment(spec, target, label, driver, msg.voice, msg.voice_rate)


class WorkerAgent:
    """Runs the rooms the scheduler assigns to this worker and reports on them.

    The scheduler's peer on the link (`workers.agent.link.LinkPeer`): it says what the
    worker registers with, takes commands, and turns its rooms' changes into session
    updates and numbered usage reports (`workers.agent.usage`) and into the worker's
    metrics.
    """

    def __init__(self, worker_id: str, scheduler_address: str, pipeline: Pipeline,
                 profiles: list[LatencyProfile], input_endpoint: str, device_type: str,
                 output_dir: Path, *, pacing: Pacing = Pacing.REALTIME,
                 latency_budget: float = 0.5, output_margin: float = 0.1,
                 sync_interval: float = 10.0, video_drift_ppm: float = 0.0, encoder: EncoderSettings = EncoderSettings(),
                 metrics: WorkerMetrics | None = None, progress_interval: float = math.inf,
                 cpu_cores: int = 0, memory_bytes: int = 0, usage_epoch: int | None = None,
                 usage_history: int = 600,
                 scheduler_credentials: grpc.ChannelCredentials | None = None,
                 scheduler_token_file: Path | None = None,
                 egress: EgressPolicy | None = None, driver_ingest: str = "", driver_whip: str = "",
                 drivers: DriverRooms | None = None) -> None:
        self.worker_id = worker_id
        # The RTMP ingest camera drivers publish to (host:port; "": none) and the rooms
        # it opens by their keys.
        self.driver_ingest = driver_ingest
        self.driver_whip = driver_whip
        self.drivers = drivers
        self.egress = egress or EgressPolicy()
        self.scheduler_address = scheduler_address
        self.pipeline = pipeline
        self.profiles = profiles
        # Face models the scheduler has a profile of: those the start-up profile measured.
        registered = {p.model for p in profiles if p.stage is Stage.FACE}
        self._voices_reported = {p.model for p in self.profiles if p.stage is Stage.TTS}
        self._faces_reported: set[BatchKey] = {
            k for k in pipeline.face_keys()
            if (face := pipeline.face_profile(k)) is not None and face[0] in registered}
        self.input_endpoint = input_endpoint
        self.device_type = device_type
        self.output_dir = output_dir
        self.pacing = pacing
        self.latency_budget = latency_budget
        self.output_margin = output_margin
        self.sync_interval = sync_interval
        self.video_drift_ppm = video_drift_ppm  # fault injection (see Room)
        self.cpu_cores = cpu_cores
        self.memory_bytes = memory_bytes
        self.encoder = encoder
        self.metrics = metrics or WorkerMetrics()
        self.rooms = RoomRegistry()
        self.governor = RoomGovernor()
        self._reported: dict[str, RoomStats] = {}  # each room's counters when last accounted
        self._engine_reported: dict[BatchKey, KeyStats] = {}
        self._services_reported: dict[str, tuple[int, int]] = {}  # TTS service: ok, failed
        self._corrections: dict[str, int] = {}
        self.usage = UsageReports(usage_epoch if usage_epoch is not None else time.time_ns(),
                                  usage_history)
        self.link = SchedulerLink(scheduler_address, self, progress_interval=progress_interval,
                                  credentials=scheduler_credentials,
                                  token_file=scheduler_token_file)
        self.worker_timeout = 5.0  # the scheduler's; it says so when the worker registers
        self._draining: tuple[float, str] | None = None  # (loop time of the deadline, why)
        self._room_ended = asyncio.Event()
        self.metrics.info.labels(pipeline.provider, device_type).set(1)

    @property
    def connected(self) -> asyncio.Event:
        """Set while the worker is registered with the scheduler."""
        return self.link.connected

    async def run(self) -> None:
        """Keeps the scheduler link up until cancelled; meanwhile the governor steps the
        lowest tiers' frame rates down while the host cannot keep up (and back up)."""
        governor = asyncio.create_task(self.governor.run(lambda: list(self.rooms.values())),
                                       name="governor")
        try:
            await self.link.run()
        finally:
            governor.cancel()

    # -- the scheduler's side of the link (LinkPeer)

    def register(self) -> workers_pb2.WorkerMessage:
        return workers_pb2.WorkerMessage(register=workers_pb2.Register(
            worker_id=self.worker_id,
            device=workers_pb2.Device(provider=self.pipeline.provider, device_type=self.device_type,
                                      name=self.pipeline.renderer_model.name,
                                      cpu_cores=self.cpu_cores,
                                      latency_budget_seconds=self.latency_budget,
                                      memory_bytes=self.memory_bytes),
            models=self.pipeline.model_names,
            profiles=[profile_to_pb(p) for p in self.profiles],
            input_endpoint=self.input_endpoint,
            active_rooms=[workers_pb2.ActiveRoom(session_id=sid, epoch=epoch) for sid, epoch
                          in {**self.usage.ending(), **self.rooms.active()}.items()],
            avatars=self.pipeline.folder.avatar_ids(),
            memory=workers_pb2.MemoryProfile(
                models_bytes=self.pipeline.models_bytes,
                avatar_bytes_per_pixel=AVATAR_BYTES_PER_PIXEL,
                room_bytes_per_pixel=frame_buffer_bytes_per_pixel(self.latency_budget)),
            warm_avatars=self.pipeline.warm_avatars(),
            face_families=self.pipeline.face_families(),
            driver_ingest=self.driver_ingest, driver_whip=self.driver_whip,
            voices=self.pipeline.voice_names(),
            usage_epoch=self.usage.epoch))

    def registered(self, reg: workers_pb2.Registered) -> list[workers_pb2.WorkerMessage]:
        self.worker_timeout = reg.worker_timeout_seconds or self.worker_timeout
        for r in self.rooms.values():
            r.stall_seconds = self.worker_timeout
        self.rooms.confirm({r.session_id: r.epoch for r in reg.confirmed_rooms})
        # Before anything new: reports sent on a lost link, or never sent.
        first = [workers_pb2.WorkerMessage(usage_report=report)
                 for report in self.usage.unapplied(reg.last_usage_seq)]
        if self._draining is not None:  # a new link: the scheduler must hear it again
            first.append(self._drain_message())
        log.info("registered with scheduler %s as %s", self.link.address, self.worker_id)
        return first

    def tick(self) -> list[workers_pb2.WorkerMessage]:
        # A usage report is proof of life too: a heartbeat only when there is none, so
        # a fleet's scheduler handles one message per worker per interval.
        report = self._usage_report()
        if report is not None:
            out = [workers_pb2.WorkerMessage(usage_report=report)]
        else:
            out = [workers_pb2.WorkerMessage(heartbeat=workers_pb2.Heartbeat(
                active_sessions=len(self.rooms), load=self.rooms.load()))]
        self._account_engine()
        drifted = self.pipeline.engine.drifted()
        # An avatar's own face model loaded since the last report: the scheduler places that
        # avatar's rooms by its measured cost from now on.
        loaded = [k for k in self.pipeline.face_keys() if k not in self._faces_reported]
        self._faces_reported.update(loaded)
        # A registered voice loaded since: the scheduler counts its measured device time.
        voices = [LatencyProfile(Stage.TTS, name, 0, 0, points)
                  for name, points in self.pipeline.voice_costs.items()
                  if name not in self._voices_reported]
        self._voices_reported.update(p.model for p in voices)
        self.profiles = self.profiles + voices  # and in a later Register's
        if drifted or loaded or voices:
            fresh = self.corrected_profiles(drifted + loaded) + voices
            log.info("latency drifted for %s, face models loaded: %s; re-reporting profiles",
                     ", ".join(map(str, drifted)) or "none", ", ".join(map(str, loaded)) or "none")
            out.append(workers_pb2.WorkerMessage(profile_update=workers_pb2.ProfileUpdate(
                profiles=[profile_to_pb(p) for p in fresh])))
        return out

    def receive(self, msg: workers_pb2.SchedulerMessage) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "assign":
            self._assign(msg.assign)
        elif kind == "release":
            room = self.rooms.get(msg.release.session_id)
            if room is not None and msg.release.handover:
                room.hand_over(msg.release.reason or "handed over")
            elif room is not None and msg.release.at_script_boundary:
                room.stop_at_script_boundary(msg.release.reason or "released")
            elif room is not None:
                room.stop(msg.release.reason or "released by scheduler")
        elif kind == "script":
            room = self.rooms.get(msg.script.session_id)
            if room is not None:
                room.append_script(convert.segments_from_pb(msg.script.segments))
        elif kind == "reconfigure":
            self._reconfigure(msg.reconfigure)
        elif kind == "usage_ack":
            self.usage.acknowledged(msg.usage_ack.seq)

    # -- rooms

    def room(self, session_id: str) -> Room | None:
        return self.rooms.get(session_id)

    def _assign(self, msg: workers_pb2.Assign) -> None:
        sid = msg.session_id
        if not self.rooms.admit(sid, msg.epoch):
            return  # a repeated assignment after a reconnect
        try:
            assigned = assignment_from_pb(msg, self.output_dir, self.egress)
            spec, target = assigned.spec, assigned.target
            room = Room(sid, spec, target, self.pipeline, pacing=self.pacing,
                        latency_budget_seconds=self.latency_budget,
                        output_margin_seconds=self.output_margin, encoder=self.encoder,
                        on_change=self._room_changed, on_sync=self._room_synced,
                        sync_interval_seconds=self.sync_interval,
                        video_drift_ppm=self.video_drift_ppm, epoch=msg.epoch,
                        continuation=msg.continuation, stall_seconds=self.worker_timeout,
                        label=assigned.label, on_stall=self._room_stalled, egress=self.egress,
                        input_key=msg.input_key, drivers=self.drivers,
                        on_driver_latency=self._driver_latency, driver_policy=assigned.driver,
                        voice=assigned.voice, voice_rate=assigned.voice_rate)
        except (InvalidRequest, InvalidQuality, OutputError, RoomRefused) as e:
            self._report([self._update_pb(sid, types_pb2.SESSION_STATE_FAILED,
                                          f"bad assignment: {e}", None, msg.epoch)])
            return
        self.rooms.add(room)
        room.start()
        log.info("room %s (%s, %s, %s) started -> %s%s", sid, spec.room_id,
                 spec.drive_mode.value, spec.quality, target.location,
                 f" (assignment {msg.epoch}, resumed at {msg.resumed_at_seconds:.1f}s)"
                 if msg.continuation else "")
        self._update_room_gauge()

    def _reconfigure(self, msg: workers_pb2.Reconfigure) -> None:
        room = self.rooms.get(msg.session_id)
        if room is None:
            log.warning("reconfigure for unknown room %s ignored", msg.session_id)
            return
        try:
            room.reconfigure(convert.quality_from_pb(msg.quality), msg.step, msg.reason)
        except InvalidQuality as e:
            log.warning("room %s: reconfigure to step %d refused: %s", msg.session_id, msg.step, e)
            return
        self.metrics.reconfigurations.labels(room.spec.tier.value).inc()
        self._update_room_gauge()

    def _room_changed(self, room: Room) -> None:
        state = _ROOM_STATE_PB[room.state]
        self._account(room)
        final = room.state in (RoomState.ENDED, RoomState.FAILED)
        if room.superseded:
            pass  # moved elsewhere: nothing it says counts any more
        elif final:
            self._report([self._update_pb(room.session_id, state, room.reason, room)])
        else:
            self._send_update(room.session_id, state, room.reason, room)
        if final:
            self._room_ended.set()
            self.rooms.remove(room)
            self._reported.pop(room.session_id, None)
            self._corrections.pop(room.session_id, None)
            if room.state is RoomState.FAILED and not room.superseded:
                self.metrics.failures.labels(room.spec.tier.value).inc()
            self._account_engine()
            log.info("room %s %s: %s", room.session_id, room.state.value, room.reason)
            self._update_room_gauge()

    def _driver_latency(self, room: Room, seconds: float) -> None:
        self.metrics.driver_latency.labels(room.spec.tier.value).observe(seconds)

    def _room_synced(self, room: Room, est: SyncEstimate | None) -> None:
        if est is None:
            return
        tier = room.spec.tier.value
        self.metrics.av_offset.labels(tier).observe(est.offset_frames / room.rendering.fps)
        if room.stats.sync_corrections > self._corrections.get(room.session_id, 0):
            self.metrics.sync_corrections.labels(tier).inc()
            self._corrections[room.session_id] = room.stats.sync_corrections

    def _progress_pb(self, room: Room) -> types_pb2.SessionProgress:
        st = room.stats
        return types_pb2.SessionProgress(
            frames_rendered=st.frames_rendered, late_frames=st.late_frames,
            stream_seconds=st.stream_seconds,
            device_seconds=st.device_seconds, stage_seconds=dict(st.stage_seconds),
            av_offset_seconds=st.av_offset_seconds, av_correction_seconds=st.av_correction_seconds,
            sync_checks=st.sync_checks, script_segments_done=room.script.segments_done,
            voice_unavailable=room.script.unavailable, **self._driver_pb(room))

    @staticmethod
    def _driver_pb(room: Room) -> dict[str, typing.Any]:
        """A camera room's driver, for its progress (nothing for other rooms)."""
        cam = room.camera
        if cam is None:
            return {}
        return {"driver_state": convert.DRIVER_STATES_PB[cam.state],
                "driven_seconds": cam.driven_seconds,
                "driver": str(cam.publisher) if cam.publisher is not None else ""}

    def _update_pb(self, sid: str, state: int, reason: str, room: Room | None,
                   epoch: int = 0) -> workers_pb2.SessionUpdate:
        update = workers_pb2.SessionUpdate(session_id=sid, state=state, reason=reason,  # type: ignore[arg-type]
                                           epoch=room.epoch if room is not None else epoch)
        if room is not None:
            update.progress.CopyFrom(self._progress_pb(room))
        return update

    def _send_update(self, sid: str, state: int, reason: str,
                     room: Room | None) -> workers_pb2.SessionUpdate:
        update = self._update_pb(sid, state, reason, room)
        self.link.send(workers_pb2.WorkerMessage(session_update=update))
        return update

    def _account(self, room: Room) -> None:
        st, before = room.stats, self._reported.get(room.session_id) or RoomStats()
        tier = room.spec.tier.value
        self.metrics.frames.labels(tier).inc(st.frames_rendered - before.frames_rendered)
        self.metrics.late.labels(tier).inc(st.late_frames - before.late_frames)
        self.metrics.given_up.labels(tier).inc(st.skipped_frames - before.skipped_frames)
        self.metrics.held.labels(tier).inc(st.merged_frames - before.merged_frames)
        for stage, secs in st.stage_seconds.items():
            self.metrics.stage_seconds.labels(stage).inc(
                max(0.0, secs - before.stage_seconds.get(stage, 0.0)))
        self._reported[room.session_id] = replace(st, stage_seconds=dict(st.stage_seconds))

    def _account_engine(self) -> None:
        engine = self.pipeline.engine
        for key, st in engine.stats().items():
            before = self._engine_reported.get(key, KeyStats())
            model = str(key)
            for size, calls in st.batch_sizes.items():
                if calls > before.batch_sizes[size]:
                    self.metrics.batches.labels(model, str(size)).inc(calls - before.batch_sizes[size])
            self.metrics.batch_items.labels(model).inc(st.items - before.items)
            self.metrics.dropped.labels(model).inc(st.dropped - before.dropped)
            self.metrics.shed.labels(model).inc(st.shed - before.shed)
            if engine.serves(key):
                self.metrics.capacity.labels(model).set(
                    engine.curve(key).throughput(self.latency_budget)[1])
            else:  # an avatar's own model, unloaded: no capacity while it is not served
                self.metrics.capacity.labels(model).set(0)
            self._engine_reported[key] = st
        for name, service in self.pipeline.services.items():
            ok, failed = service.requests - service.failures, service.failures
            was_ok, was_failed = self._services_reported.get(name, (0, 0))
            self.metrics.tts_service_requests.labels(name, "ok").inc(ok - was_ok)
            self.metrics.tts_service_requests.labels(name, "failed").inc(failed - was_failed)
            self.metrics.tts_service_open.labels(name).set(service.state is not BreakerState.CLOSED)
            self._services_reported[name] = (ok, failed)

    def corrected_profiles(self, keys: list[BatchKey]) -> list[LatencyProfile]:
        """The profiles of `keys` with the curves the batcher now plans with."""
        out = []
        for key in keys:
            points = self.pipeline.engine.curve(key).points
            if key == AUDIO_TO_MOTION_KEY:
                out.append(LatencyProfile(Stage.AUDIO_TO_MOTION, key.model, 0, 0, points))
            elif key == LIPSYNC_KEY:
                out.append(LatencyProfile(Stage.ALIGNMENT, key.model, 0, 0, points))
            elif (face := self.pipeline.face_profile(key)) is not None:
                out.append(LatencyProfile(Stage.FACE, face[0], key.side, key.side, face[1]))
            elif key in (FEATURES_KEY, WHISPER_KEY):
                continue  # audio features of the face families: part of no profile placed by
            else:
                out.append(LatencyProfile(Stage.RENDER, key.model, key.side, key.side, points))
        # One per stage, model and size (MuseTalk's two stages make one face profile).
        out = list({(p.stage, p.model, p.width): p for p in out}.values())
        fresh = {(p.stage, p.model, p.width) for p in out}
        self.profiles = [p for p in self.profiles if (p.stage, p.model, p.width) not in fresh] + out
        return out

    def _update_room_gauge(self) -> None:
        counts: dict[Tier, int] = collections.Counter(r.spec.tier for r in self.rooms.values())
        degraded: dict[Tier, int] = collections.Counter(
            r.spec.tier for r in self.rooms.values() if r.rendering != r.spec.quality)
        self.metrics.room_counts(counts, degraded)

    def _usage_report(self) -> workers_pb2.UsageReport | None:
        """The next numbered report of every running room's progress (None: no room runs)."""
        updates = []
        for room in self.rooms.running():
            self._account(room)
            updates.append(self._update_pb(room.session_id, types_pb2.SESSION_STATE_RUNNING,
                                           "", room))
        if not updates:
            return None
        return self.usage.next(updates)

    def _report(self, updates: list[workers_pb2.SessionUpdate]) -> None:
        """A numbered report now (a room's final state): sent if connected, resent on
        reconnect until the scheduler has it durably."""
        self.link.send(workers_pb2.WorkerMessage(usage_report=self.usage.next(updates)))

    def _room_stalled(self, room: Room, behind: float) -> None:
        """The worker stalled long enough for the scheduler to have moved its rooms: hold
        every room's output and register again, so the scheduler says which are ours."""
        self.rooms.hold_all()
        if self.link.restart():
            log.warning("stalled %.1fs (past the scheduler's %.1fs worker timeout): rooms "
                        "held until the scheduler confirms them", behind, self.worker_timeout)

    def _drain_message(self) -> workers_pb2.WorkerMessage:
        assert self._draining is not None
        deadline, why = self._draining
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        return workers_pb2.WorkerMessage(drain=workers_pb2.Drain(deadline_seconds=left, reason=why))

    async def drain(self, timeout: float, reason: str = "the worker is stopping") -> bool:
        """Asks the scheduler to hand this worker's rooms over to other workers and waits
        until none is left here (True) or `timeout` passes (False). New rooms stop coming
        at once; the rooms themselves run on until their new worker has taken over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._draining = (deadline, reason)
        self.link.send(self._drain_message())
        if self.rooms:
            log.info("draining: %d room(s) to hand over within %.0f s", len(self.rooms), timeout)
        while self.rooms:
            left = deadline - loop.time()
            if left <= 0:
                log.warning("drain deadline passed with %d room(s) still here", len(self.rooms))
                return False
            self._room_ended.clear()
            try:
                await asyncio.wait_for(self._room_ended.wait(), left)
            except TimeoutError:
                pass
        log.info("drained: no room left on this worker")
        return True

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Ends every room cleanly (outputs closed) and reports it."""
        for room in self.rooms.values():
            room.stop("worker shutting down")
        tasks = [r.task for r in self.rooms.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        await self.pipeline.aclose()
