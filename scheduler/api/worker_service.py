"""gRPC adapter for workers: the WorkerService stream. A worker registers, then
reports progress and usage; the core's commands go back down the same stream.
It validates at the edge and holds no state of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc

from avatarfarm import convert
from avatarfarm.domain import InvalidRequest, SessionState, Stage
from avatarfarm.v1 import types_pb2, workers_pb2, workers_pb2_grpc
from scheduler.api.auth import Unauthenticated
from scheduler.api.gate import caller
from scheduler.api.input_keys import LiveInputKeys
from scheduler.api.registration import check_endpoint, check_profiles, check_register
from scheduler.core import Scheduler
from scheduler.policy import placement
from scheduler.state.worker_conn import (
    AssignCmd,
    PaceCmd,
    ReconfigureCmd,
    ReleaseCmd,
    ScriptCmd,
    UsageAckCmd,
    WorkerCommand,
    WorkerConn,
    WorkerResources,
)

log = logging.getLogger(__name__)


class Leading(Protocol):
    epoch: int

    def valid(self) -> bool: ...


class NotLeading(Exception):
    pass


EXPIRY_SLACK = 1.0  # seconds: a stream closing this close to its token's expiry ended with it


def profile_from_pb(profiles: Any, latency_budget: float = 0.0) -> placement.WorkerProfile:
    """Per-item costs from a worker's batched latency profiles (see placement.item_seconds)."""
    costs = []
    for p in profiles:
        stage = convert.STAGES.get(p.stage)
        points = [(lat.batch_size, lat.seconds) for lat in p.latencies
                  if lat.batch_size > 0 and lat.seconds > 0]
        if stage is None or not points:
            continue
        w, h = (p.width, p.height) if stage in (Stage.RENDER, Stage.ENCODE, Stage.FACE) else (0, 0)
        costs.append(placement.StageCost.measured(stage, w, h, points, latency_budget,
                                                  p.model if stage in (Stage.FACE, Stage.TTS) else ""))
    return placement.WorkerProfile(tuple(costs))


def command_to_pb(cmd: WorkerCommand, inputs: LiveInputKeys) -> workers_pb2.SchedulerMessage:
    match cmd:
        case AssignCmd(sid, spec, epoch, continuation, resumed_at, label, driver, voice, voice_rate):
            return workers_pb2.SchedulerMessage(assign=workers_pb2.Assign(
                session_id=sid, spec=convert.spec_to_pb(spec), epoch=epoch,
                continuation=continuation, resumed_at_seconds=resumed_at,
                input_key=inputs.key(sid),
                label=types_pb2.Label(text=label.text, position=label.position.value,
                                      size=label.size) if label is not None else None,
                driver_policy=convert.driver_policy_to_pb(driver) if driver is not None else None,
                voice=voice, voice_rate=voice_rate))
        case ReleaseCmd(sid, reason, at_boundary, handover):
            return workers_pb2.SchedulerMessage(release=workers_pb2.Release(
                session_id=sid, reason=reason, at_script_boundary=at_boundary,
                handover=handover))
        case ScriptCmd(sid, segments):
            return workers_pb2.SchedulerMessage(
                script=workers_pb2.Script(session_id=sid, segments=convert.segments_to_pb(segments)))
        case ReconfigureCmd(sid, quality, step, reason):
            return workers_pb2.SchedulerMessage(reconfigure=workers_pb2.Reconfigure(
                session_id=sid, quality=convert.quality_to_pb(quality), step=step, reason=reason))
        case UsageAckCmd(seq):
            return workers_pb2.SchedulerMessage(usage_ack=workers_pb2.UsageAck(seq=seq))
        case PaceCmd(interval):
            return workers_pb2.SchedulerMessage(pace=workers_pb2.Pace(
                heartbeat_interval_seconds=interval))
    raise TypeError(cmd)


class WorkerService(workers_pb2_grpc.WorkerServiceServicer):
    def __init__(self, core: Scheduler, inputs: LiveInputKeys | None = None,
                 leadership: Leading | None = None) -> None:
        self.core = core
        self.inputs = inputs or LiveInputKeys()
        self.leadership = leadership  # None: a scheduler that does not lead replicas (tests)

    def _led(self, msg: workers_pb2.SchedulerMessage) -> workers_pb2.SchedulerMessage:
        """The message stamped with this scheduler's epoch; refused (UNAVAILABLE) once it
        may no longer act as the leader, so that a scheduler that was paused past its
        lease sends nothing on waking."""
        if self.leadership is not None:
            if not self.leadership.valid():
                raise NotLeading
            msg.leader_epoch = self.leadership.epoch
        return msg

    async def Connect(self, request_iterator: AsyncIterator[workers_pb2.WorkerMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[workers_pb2.SchedulerMessage]:
        timeout = self.core.config.worker_timeout
        try:
            first = await asyncio.wait_for(anext(request_iterator), timeout)
        except (TimeoutError, StopAsyncIteration):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "send Register first")
            return
        if first.WhichOneof("kind") != "register" or not first.register.worker_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the first message must be Register with a worker_id")
            return
        reg = first.register
        try:
            check_register(reg)
            if self.core.config.worker_endpoint_check:
                await check_endpoint(reg.input_endpoint, context.peer())
        except InvalidRequest as e:
            log.warning("worker %r refused at registration: %s", reg.worker_id[:128], e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"registration refused: {e}")
            return
        mem = reg.memory
        conn = self.core.register_worker(
            reg.worker_id, device_type=reg.device.device_type or "unknown",
            provider=reg.device.provider,
            profile=profile_from_pb(reg.profiles, reg.device.latency_budget_seconds),
            input_endpoint=reg.input_endpoint, avatars=frozenset(reg.avatars),
            latency_budget=reg.device.latency_budget_seconds,
            active={r.session_id: r.epoch for r in reg.active_rooms},
            resources=WorkerResources(
                cpu_cores=reg.device.cpu_cores, memory_bytes=float(reg.device.memory_bytes),
                memory=placement.MemoryProfile(float(mem.models_bytes), mem.avatar_bytes_per_pixel,
                                               mem.room_bytes_per_pixel),
                warm_avatars=frozenset(reg.warm_avatars),
                face_families=frozenset(reg.face_families), driver_ingest=reg.driver_ingest,
                driver_whip=reg.driver_whip, voices=frozenset(reg.voices)),
            usage_epoch=reg.usage_epoch)
        await self.core.durable()
        reader = asyncio.create_task(self._read(conn, request_iterator))
        try:
            yield self._led(workers_pb2.SchedulerMessage(registered=workers_pb2.Registered(
                heartbeat_interval_seconds=self.core.report_interval,
                last_usage_seq=self.core.ledger.last_seq(conn.worker_id, conn.usage_epoch),
                worker_timeout_seconds=self.core.config.worker_timeout,
                confirmed_rooms=[workers_pb2.ActiveRoom(session_id=sid, epoch=epoch)
                                 for sid, epoch in conn.confirmed])))
            # The reader ends the outbox when the worker's side closes; the core ends it
            # when it drops the worker (heartbeats stopped) or a newer stream replaces it.
            reader.add_done_callback(lambda _: conn.outbox.put_nowait(None))
            while (cmd := await conn.outbox.get()) is not None:
                yield self._led(command_to_pb(cmd, self.inputs))
        except NotLeading:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "this scheduler no longer leads: reconnect to the leader")
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            why = "stream closed"
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                why = f"stream error: {reader.exception()}"
            try:
                expires = caller().expires_at
            except Unauthenticated:
                expires = math.inf
            if expires <= time.time() + EXPIRY_SLACK:
                # Ended with its token (avatarfarm.serving): the worker comes straight back
                # with the renewed one and keeps its rooms. It is not dropped here, which
                # would move every room it renders; a worker that does not come back is
                # dropped by the heartbeat check like any silent one.
                log.info("worker %s: stream ended with its credential; waiting for it to "
                         "reconnect", conn.worker_id)
            else:
                self.core.worker_disconnected(conn, why)

    async def _read(self, conn: WorkerConn, it: AsyncIterator[workers_pb2.WorkerMessage]) -> None:
        # No per-message timeout: a silent worker is dropped by the core's heartbeat check,
        # which closes this stream.
        async for msg in it:
            kind = msg.WhichOneof("kind")
            if kind == "heartbeat":
                self.core.worker_seen(conn, msg.heartbeat.load)
            elif kind == "drain":
                # The worker is going away (SIGTERM): hand its rooms over before its deadline.
                d = msg.drain.deadline_seconds
                d = min(max(d, 0.0), 3600.0) if math.isfinite(d) else 0.0
                self.core.drain_worker(conn.worker_id, self.core.clock() + d,
                                       msg.drain.reason[:200] or "the worker is stopping")
            elif kind == "profile_update":
                try:
                    check_profiles(msg.profile_update.profiles)
                except InvalidRequest as e:
                    log.warning("worker %s: profile update ignored: %s", conn.worker_id, e)
                    continue
                self.core.worker_profile_changed(
                    conn, profile_from_pb(msg.profile_update.profiles, conn.latency_budget))
            elif kind == "usage_report":
                r = msg.usage_report
                updates = []
                for u in r.updates:
                    try:
                        progress = convert.checked_progress_from_pb(u.progress)
                    except InvalidRequest as e:
                        log.warning("worker %s: usage of %s ignored: %s", conn.worker_id,
                                    u.session_id[:64], e)
                        continue
                    updates.append((u.session_id, u.epoch,
                                    convert.STATES.get(u.state, SessionState.RUNNING), u.reason, progress))
                self.core.worker_usage(conn, r.seq, updates)
            elif kind == "session_update":
                u = msg.session_update
                state = convert.STATES.get(u.state)
                if state is None:
                    log.warning("worker %s sent an update without a state", conn.worker_id)
                    continue
                reported = None
                if u.HasField("progress"):
                    try:
                        reported = convert.checked_progress_from_pb(u.progress)
                    except InvalidRequest as e:
                        log.warning("worker %s: progress of %s ignored: %s", conn.worker_id,
                                    u.session_id[:64], e)
                self.core.worker_update(conn, u.session_id, u.epoch, state, u.reason, reported)
            else:
                log.warning("worker %s sent unexpected %s", conn.worker_id, kind)
