"""The scheduler's core as the servicers see it: tenants' calls (create, end, list,
watch, scripts, usage), avatars and licences, workers' registrations and reports,
and the tick that runs every pass once per heartbeat interval."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn

from avatarfarm.avatars import MOTION_FAMILIES, no_motion_input
from avatarfarm.domain import (
    DriveMode,
    InvalidRequest,
    Progress,
    ScriptSegment,
    SessionSpec,
    SessionState,
    output_scope,
    validate_script,
)
from avatarfarm.egress import ForbiddenTarget
from scheduler.core.enforcement import Enforcement
from scheduler.core.machine import carried_out
from scheduler.errors import AlreadyExists, BudgetExceeded, FailedPrecondition, NotFound, PermissionDenied
from scheduler.policy import pacing, placement, platforms, tenants
from scheduler.policy.ledger import Dimension, UsageRow
from scheduler.policy.licences import Refusal
from scheduler.policy.placement import WorkerState
from scheduler.state.avatars import (
    AuditAction,
    RegisteredAvatar,
    RegisteredVoice,
    VoiceSettings,
    taken_message,
)
from scheduler.state.sessions import InvalidTransition, Session, SessionEvent
from scheduler.state.table import LIVE
from scheduler.state.worker_conn import PaceCmd, ReleaseCmd, ScriptCmd, WorkerConn, WorkerResources

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TenantStatus:
    tenant: str
    config: tenants.TenantConfig
    units_in_use: float
    spent: float
    reserved: float  # the units of its reservation in force now (its hours)
    reserved_in_use: float
    pending: int
    running: int


class Scheduler(Enforcement):
    """The core the servicers call; `run` is its loop."""

    @carried_out
    def create(self, spec: SessionSpec, request_id: str = "") -> Session:
        try:
            self.egress.check(spec.output)
            platforms.check_room(spec.platform, self.platform(spec.platform), spec.drive_mode,
                                 spec.voice_conversion)
        except (ForbiddenTarget, platforms.PolicyRefused) as e:
            raise PermissionDenied(str(e)) from e
        if request_id:
            existing = self.sessions.requests.get((spec.tenant, request_id))
            if existing is not None:
                s = self.sessions[existing]
                if s.spec != spec:
                    raise AlreadyExists(f"request_id {request_id!r} was already used for session "
                                        f"{existing} with a different spec")
                return s
        t = self.tenant(spec.tenant)
        if spec.avatar_id not in self.known_avatars():
            raise NotFound(f"avatar {spec.avatar_id!r} is not registered")
        if spec.drive_mode.motion_driven and spec.avatar_id in self.video_avatars():
            family = self.face_model(spec.avatar_id).family.partition("/")[0]
            if family not in MOTION_FAMILIES:
                raise InvalidRequest(no_motion_input(spec.avatar_id, family))
        other = self.sessions.live_rooms.get((spec.tenant, spec.room_id))
        if other is not None:
            raise AlreadyExists(f"room {spec.room_id!r} already streams as session {other}")
        if output_scope(spec.tenant, spec.output) in self.sessions.outputs:
            # Two streams muxed into one file or playlist would corrupt both.
            raise AlreadyExists(f"output {spec.output.target!r} is in use by another live session")
        now = self.clock()
        units = self.units_of(spec.quality, spec.drive_mode)
        over = tenants.check_admission(spec.tenant, t, units=units,
                                       units_in_use=self.sessions.units[spec.tenant],
                                       spent=self.spent(spec.tenant, now))
        if over is not None:
            self.metrics.budget_refusals.labels(over.kind.value).inc()
            raise BudgetExceeded(over.message)
        refused = self.avatars.refusal(spec, now, require_licence=self.config.require_licence)
        if refused is not None:
            self._refuse_likeness(spec, *refused, now)
        if spec.voice_conversion:
            raise FailedPrecondition(
                "the platform and the licence allow converting the speaker's voice, but no "
                "worker on this farm serves a voice-conversion model; stream the speaker's own "
                "voice")
        guaranteed = tenants.guaranteed(t, spec.tier, units, self.sessions.reserved[spec.tenant], now)
        self._seq += 1
        s = Session(uuid.uuid4().hex, spec, SessionState.PENDING, self._seq, now, now, request_id,
                    reason="waiting for placement", units=units, guaranteed=guaranteed)
        self._commit(s)
        if spec.script:
            self.store.append_script(s.session_id, list(spec.script))
        if spec.drive_mode is DriveMode.TEXT:
            self._scripts[s.session_id] = list(spec.script)
        self._enqueue(s)
        # Place now, so the answer already says where the room goes or why it waits. Rooms
        # already waiting did not fit as they are; when capacity frees up, the queue's
        # order decides who gets it (`place_pending`).
        self._try_place(self.sessions[s.session_id], {})
        return self.sessions[s.session_id]

    def queue_position(self, session_id: str) -> int:
        return self.queue.position(session_id)

    def list_sessions(self, tenant: str = "", states: frozenset[SessionState] = frozenset(),
                      page_size: int = 0, after_seq: int = 0) -> tuple[list[Session], int]:
        size = page_size or self.config.list_page_size
        rows = [s for s in sorted(self.sessions.values(), key=lambda s: s.seq)
                if s.seq > after_seq and (not tenant or s.spec.tenant == tenant)
                and (not states or s.state in states)]
        page = rows[:size]
        return page, (page[-1].seq if len(rows) > size else 0)

    @carried_out
    def append_script(self, session_id: str, segments: list[ScriptSegment]) -> int:
        s = self.get(session_id)
        if s.spec.drive_mode is not DriveMode.TEXT:
            raise FailedPrecondition(f"session {session_id} is {s.spec.drive_mode.value}-driven; "
                                     "script segments are only for text-driven rooms")
        if s.state.terminal:
            raise FailedPrecondition(f"session {session_id} has {s.state.value}")
        if not segments:
            raise InvalidRequest("no segments given")
        validate_script(segments)
        self.store.append_script(session_id, segments)
        self._scripts.setdefault(session_id, []).extend(segments)
        self.commits.schedule()
        if s.worker_id in self.workers and s.state in LIVE:
            self._decided.send(s.worker_id, ScriptCmd(session_id, tuple(segments)))
        return len(segments)

    async def watch(self, session_id: str) -> AsyncIterator[SessionEvent]:
        """The session now, then each change, until it ends."""
        s = self.get(session_id)
        q: asyncio.Queue[SessionEvent] = asyncio.Queue()
        self._watchers[session_id].add(q)
        try:
            yield SessionEvent(s)
            while not s.state.terminal:
                ev = await q.get()
                s = ev.session
                yield ev
        finally:
            self._watchers[session_id].discard(q)
            if not self._watchers[session_id]:
                del self._watchers[session_id]

    def usage(self, *, tenant: str = "", group_by: tuple[Dimension, ...] = (),
              start: float | None = None, end: float | None = None) -> list[UsageRow]:
        if start is not None and end is not None and end <= start:
            raise InvalidRequest("end must be after start")
        return self.ledger.report(self.clock(), tenant=tenant, group_by=group_by, start=start,
                                  end=end)

    def tenant_status(self, name: str) -> TenantStatus:
        if name not in self.config.tenants and not any(
                k[0] == name for k in self.sessions.live_rooms) and not self.sessions.units.get(name):
            raise NotFound(f"tenant {name!r} is not configured and has no rooms")
        t = self.config.tenants.get(name, tenants.UNLIMITED)
        pending = running = 0
        for s in self.sessions.values():
            if s.spec.tenant == name:
                pending += s.state is SessionState.PENDING
                running += s.state in LIVE
        now = self.clock()
        return TenantStatus(name, t, self.sessions.units[name], self.spent(name, now),
                            t.reserved_at(now), self.sessions.reserved[name], pending, running)

    def check_voice_settings(self, voice: VoiceSettings, tenant: str) -> None:
        """An avatar may speak with its own tenant's registered voices, not another's."""
        v = self.avatars.voice(voice.voice)
        if v is not None and v.tenant != tenant:
            raise PermissionDenied(f"voice {voice.voice!r} is another tenant's registered voice; "
                                   "an avatar may speak with its own tenant's voices")

    def claim_avatar(self, avatar_id: str, tenant: str, *, operator: bool) -> None:
        """Refuses an avatar id `tenant` may not register (asked again on registration:
        the image is processed in between)."""
        self.tenant(tenant)
        self.avatars.claim(avatar_id, tenant, local=self.known_avatars(), operator=operator)

    @carried_out
    def register_avatar(self, avatar: RegisteredAvatar, *, operator: bool) -> RegisteredAvatar:
        self.claim_avatar(avatar.avatar_id, avatar.tenant, operator=operator)
        self.check_voice_settings(avatar.voice, avatar.tenant)
        a = self.avatars.register(avatar, self.clock())
        self.commits.schedule()
        self.enforce_licences()  # a new licence may no longer allow rooms running under the old
        return a

    def claim_voice(self, voice_id: str, tenant: str) -> None:
        """Refuses a voice id `tenant` may not register (asked again on registration)."""
        self.tenant(tenant)
        if voice_id in self.known_avatars():
            raise AlreadyExists(taken_message(voice_id))
        self.avatars.claim_voice(voice_id, tenant)

    @carried_out
    def register_voice(self, voice: RegisteredVoice) -> RegisteredVoice:
        self.claim_voice(voice.voice_id, voice.tenant)
        v = self.avatars.register_voice(voice, self.clock())
        self.commits.schedule()
        self.enforce_licences()  # rooms speaking with it run under its new licence
        return v

    @carried_out
    def revoke_voice_licence(self, voice_id: str, reason: str) -> RegisteredVoice:
        v = self.avatars.revoke_voice(voice_id, reason, self.clock())
        self.commits.schedule()
        self.enforce_licences()
        return v

    @carried_out
    def revoke_licence(self, avatar_id: str, reason: str) -> RegisteredAvatar:
        a = self.avatars.revoke(avatar_id, reason, self.clock())
        self.commits.schedule()
        self.enforce_licences()
        return a

    def avatar_images_changed(self) -> None:
        """An image or a video avatar was written to avatar_dir: the next look at the
        folder is fresh."""
        self._avatars = (-1.0, frozenset(), frozenset())
        self._face_models.clear()

    def _refuse_likeness(self, spec: SessionSpec, kind: str, likeness_id: str, refusal: Refusal,
                         now: float) -> NoReturn:
        self.metrics.licence_refusals.labels(refusal.clause).inc()
        message = refusal.explain(likeness_id, kind)
        self.avatars.audit(AuditAction.REFUSED, likeness_id, spec.tenant, now,
                           room_id=spec.room_id, platform=spec.platform, clause=refusal.clause,
                           detail=message)
        self.commits.schedule()
        raise PermissionDenied(message)

    @carried_out
    def register_worker(self, worker_id: str, *, device_type: str, provider: str,
                        profile: placement.WorkerProfile, input_endpoint: str,
                        avatars: frozenset[str], active: dict[str, int],
                        latency_budget: float = 0.0,
                        resources: WorkerResources = WorkerResources(),
                        usage_epoch: int = 0) -> WorkerConn:
        old = self.workers.get(worker_id)
        if old is not None:
            # A reconnect that overtook the old stream's end: retire the old stream only;
            # the rooms are the same worker's.
            self._decided.retire(old)
            self._worker_avatars.subtract(old.avatars)
        self._worker_avatars.update(avatars)
        now = self.clock()
        conn = WorkerConn(worker_id, device_type, provider, profile, input_endpoint, avatars, now,
                          driver_ingest=resources.driver_ingest, driver_whip=resources.driver_whip,
                          last_seen=now,
                          latency_budget=latency_budget, usage_epoch=usage_epoch)
        self.workers[worker_id] = conn
        gpu = "CPU" not in provider and device_type != "cpu"
        self.fleet.add_worker(WorkerState(
            worker_id, profile, self.config.overcommit,
            cpu_capacity=float(resources.cpu_cores) if gpu else 0.0,
            memory_capacity=resources.memory_bytes, memory=resources.memory,
            device_type=device_type, warm=resources.warm_avatars, families=resources.face_families,
            driver_ingest=bool(resources.driver_ingest or resources.driver_whip),
            voices=resources.voices))
        self.fleet_voices |= resources.voices
        self._refresh_unit_profile()
        self._why_cache.clear()
        confirmed: list[tuple[str, int]] = []
        for sid, epoch in active.items():
            s = self.sessions.get(sid)
            if s is None or s.state.terminal or s.epoch != epoch:
                continue  # moved (a newer assignment renders it) or over: released below
            mine = s.worker_id == worker_id
            orphaned = s.state is SessionState.PENDING and not s.worker_id
            if mine or orphaned:
                # Still rendering here under its current assignment (after a scheduler
                # restart or a dropped stream): no other worker was given this epoch, so
                # keep it here rather than start it again elsewhere.
                confirmed.append((sid, epoch))
                self._orphans.discard(sid)
                self.queue.remove(sid)
                d = self.fleet.assign(self._req(s), worker_id)
                state = SessionState.PLACED if s.state is SessionState.PENDING else s.state
                s = s.moved(state, now, worker_id=worker_id, input_endpoint=input_endpoint,
                            provider=provider, device_type=device_type, load=d.compute,
                            reason=f"re-adopted by {worker_id}" if orphaned else s.reason)
                self._commit(s)
                if orphaned:
                    self._open_interval(s, now)
                if sid in self._licence_ending:  # its licence ended while the worker was away
                    self._decided.send(conn.worker_id, ReleaseCmd(sid, self._licence_ending[sid][1],
                                                      at_script_boundary=True))
        kept = {sid for sid, _ in confirmed}
        for s in [x for x in self.sessions.values()
                  if x.worker_id == worker_id and x.state in LIVE and x.session_id not in kept]:
            self._to_pending(s, now, f"worker {worker_id} restarted without the room")
        for sid in active:
            if sid not in kept:
                self.metrics.usage_reports.labels("stale").inc()
                self._decided.send(conn.worker_id, ReleaseCmd(sid, "the room was moved to another worker "
                                                       "while this one was away"))
        conn.confirmed = tuple(confirmed)
        log.info("worker %s registered (%s, %s) at %s", worker_id, device_type, provider,
                 input_endpoint)
        self.kick()
        return conn

    @carried_out
    def worker_profile_changed(self, conn: WorkerConn, update: placement.WorkerProfile) -> None:
        """A worker re-measured (or corrected from live timings) some of its costs: they
        replace the old ones for new placements; rooms already placed keep their load."""
        self.worker_seen(conn)
        conn.profile = conn.profile.merged(update)
        self._why_cache.clear()
        ws = self.fleet.workers.get(conn.worker_id)
        if ws is not None:
            fresh = WorkerState(ws.worker_id, conn.profile, ws.compute_capacity, ws.cpu_capacity,
                                ws.memory_capacity, ws.memory, ws.device_type, ws.warm,
                                ws.accepting)
            for room in ws.rooms.values():
                fresh.add(room)
            self.fleet.add_worker(fresh)
        log.info("worker %s updated its profile: %s", conn.worker_id,
                 ", ".join(f"{c.stage.value}@{c.width}x{c.height}={c.seconds * 1000:.2f}ms"
                           for c in update.costs))
        self.kick()

    @carried_out
    def worker_usage(self, conn: WorkerConn, seq: int,
                     updates: list[tuple[str, int, SessionState, str, Progress]]) -> bool:
        """A sequence-numbered batch of (room, assignment epoch, state, reason, progress
        cumulative over that assignment); False if it was a retry. Progress of running
        rooms every interval, and rooms' final states."""
        self.worker_seen(conn)
        if not self.metering.accept_report(conn.worker_id, conn.usage_epoch, seq).apply:
            return False
        now = self.clock()
        with self.metering.report():
            for sid, epoch, state, reason, progress in updates:
                s = self.sessions.get(sid)
                if s is not None and state is s.state is SessionState.RUNNING and \
                        s.worker_id == conn.worker_id and s.epoch == epoch:
                    self._progress(s, progress, now)  # the common case, kept lean
                else:
                    self.worker_update(conn, sid, epoch, state, reason, progress)
        return True

    @carried_out
    def worker_update(self, conn: WorkerConn, session_id: str, epoch: int, state: SessionState,
                      reason: str, progress: Progress | None) -> None:
        """A room's state (and progress, cumulative over assignment `epoch`) from its worker.
        Refused unless the worker holds the room's current assignment: a worker the room
        was moved away from is told to release it, and nothing it reports counts."""
        self.worker_seen(conn)
        s = self.sessions.get(session_id)
        if self._handovers.get(session_id) == (conn.worker_id, epoch) and s is not None and \
                state in (SessionState.ENDED, SessionState.FAILED):
            self._continue_elsewhere(s, conn, progress)
            return
        if s is None or s.worker_id != conn.worker_id or s.epoch != epoch:
            self.metrics.usage_reports.labels("stale").inc()
            log.warning("worker %s reported on session %s (assignment %d) it does not hold",
                        conn.worker_id, session_id, epoch)
            self._decided.send(conn.worker_id, ReleaseCmd(session_id, "not assigned to this worker"))
            return
        now = self.clock()
        target = state if state in (SessionState.RUNNING, SessionState.ENDED,
                                    SessionState.FAILED) else s.state
        progress_only = s.state.terminal or (target is s.state and not reason)
        if progress is not None:
            s = self._progress(s, progress, now, notify=progress_only)
        if progress_only:
            return
        try:
            s = s.moved(target, now, reason=reason if target is not s.state or reason else s.reason)
        except InvalidTransition:
            log.warning("ignored %s report for session %s in state %s", state.value, session_id,
                        s.state.value)
            return
        self._commit(s)
        if s.state.terminal:
            self.kick()

    @carried_out
    def shutting_down(self) -> None:
        """From now on a closing worker stream is this scheduler leaving, not the worker
        failing: its rooms keep their placement for when the scheduler is back."""
        self._stopping = True
        self.flush_progress()

    @carried_out
    def worker_disconnected(self, conn: WorkerConn, why: str) -> None:
        if self._stopping:
            if self.workers.pop(conn.worker_id, None) is not None:
                self._worker_avatars.subtract(conn.avatars)
            return
        if self.workers.get(conn.worker_id) is conn:
            self._drop_worker(conn, why)

    @carried_out
    def tick(self) -> None:
        self._epoch += 1  # once a second everything is looked at afresh
        self.check_heartbeats()
        self.check_orphans()
        self.enforce_budgets()
        self.enforce_licences()
        self.place_pending()
        self.advance_drains()
        self.relieve_overloads()
        self.step_up()
        self.pace_workers()
        if self.clock() >= self._next_usage_flush:
            # A part of the workers each tick (scheduler.policy.pacing): each worker's
            # progress and usage are written once per usage_flush_interval.
            parts = pacing.flush_parts(self.config.usage_flush_interval,
                                       self.config.heartbeat_interval)
            self._next_usage_flush = self.clock() + self.config.usage_flush_interval / parts
            self.flush_progress(self._flush_part % parts, parts)
            self._flush_part += 1
        self.metering.publish()
        snap = self.latest = self.snapshot()
        self.metrics.fleet(snap.fleet)
        self.metrics.pending_load.set(snap.waiting.units * self._unit_load())
        self.metrics.guaranteed_pending.set(snap.waiting.guaranteed)

    def pace_workers(self) -> None:
        """Tells every worker a new report interval where the fleet's size calls for one
        (scheduler.policy.pacing)."""
        interval = self.pacing.interval(len(self.workers), self.report_interval)
        if interval == self.report_interval:
            return
        log.info("%d workers: each reports every %.2f s (was %.2f s)", len(self.workers),
                 interval, self.report_interval)
        self.report_interval = interval
        for worker_id in self.workers:
            self._decided.send(worker_id, PaceCmd(interval))

    async def run(self) -> None:
        """The placement loop: on every kick, and at least once per heartbeat interval."""
        next_tick = self.clock()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.heartbeat_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if self.clock() >= next_tick:
                    next_tick = self.clock() + self.config.heartbeat_interval
                    self.tick()
                elif self._capacity_changed and len(self.queue):
                    self.place_pending()
            except Exception:  # the loop must survive a bad pass; the next one retries
                log.exception("placement pass failed")
