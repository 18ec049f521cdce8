"""The scheduler's core: one asyncio loop owning sessions, workers and tenants.

Tenant calls and worker reports change state here; the policies it applies are
pure and live in their own modules (placement, ladder, tenants, admission,
ledger). Every state change is written to the store in the current event-loop
turn's transaction and committed once per turn before the calls that made it
are answered (group commit: concurrent calls share one sync). Progress, which
arrives every second for every room, is kept in memory and written with the
usage ledger once per tick; a lost tick is recovered from the workers' next
cumulative report.

A placement pass runs on every event that could let a waiting room move and on
each tick; rooms wait in a fair queue across tenants. Rooms guaranteed by a
reservation reclaim capacity from borrowers when none is free.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Concatenate, NoReturn, ParamSpec, TypeVar

from avatarfarm.avatars import list_avatars
from avatarfarm.domain import (
    DriveMode,
    InvalidRequest,
    OutputKind,
    Progress,
    Quality,
    ScriptSegment,
    SessionSpec,
    SessionState,
    Tier,
    validate_script,
)
from avatarfarm.egress import EgressPolicy, ForbiddenTarget
from scheduler.config import SchedulerConfig
from scheduler.decisions import Decisions, Dispatcher
from scheduler.errors import AlreadyExists, BudgetExceeded, FailedPrecondition, NotFound, PermissionDenied
from scheduler.metrics import SchedulerMetrics
from scheduler.policy import placement, platforms, tenants
from scheduler.policy.admission import FairQueue
from scheduler.policy.cost import CostBook
from scheduler.policy.ladder import Ladder
from scheduler.policy.ledger import Dimension, UsageRow
from scheduler.policy.licences import Refusal
from scheduler.policy.placement import ActionKind, Fleet, RoomReq, WorkerState
from scheduler.state.avatars import AuditAction, AvatarRegistry, RegisteredAvatar
from scheduler.state.commit import GroupCommit
from scheduler.state.metering import Metering
from scheduler.state.sessions import EventKind, InvalidTransition, Session, SessionEvent, plus
from scheduler.state.snapshot import ClusterSnapshot, Waiting, WorkerView
from scheduler.state.store import Store
from scheduler.state.table import SessionTable
from scheduler.state.worker_conn import (
    AssignCmd,
    ReconfigureCmd,
    ReleaseCmd,
    ScriptCmd,
    WorkerConn,
    WorkerResources,
)

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _carried_out(operation: Callable[Concatenate[Scheduler, _P], _R]
                 ) -> Callable[Concatenate[Scheduler, _P], _R]:
    """Marks an operation of the core: what it decided is carried out when it returns
    (or raises), in one place (`Dispatcher.apply`). Operations may call each other;
    each hands over what was decided so far."""

    @functools.wraps(operation)
    def run(self: Scheduler, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return operation(self, *args, **kwargs)
        finally:
            self._carry_out()

    return run

_LIVE = (SessionState.PLACED, SessionState.RUNNING)
# What a snapshot holds besides every live session and worker (the status page shows no more).
SNAPSHOT_QUEUE = 200
SNAPSHOT_RECENT_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class TenantStatus:
    tenant: str
    config: tenants.TenantConfig
    units_in_use: float
    spent: float
    reserved_in_use: float
    pending: int
    running: int


class Scheduler:
    def __init__(self, store: Store, config: SchedulerConfig,
                 metrics: SchedulerMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics or SchedulerMetrics(
            tenants=tuple(config.tenants) if config.tenant_metrics else ())
        self.clock = clock
        self.egress = EgressPolicy.from_config(config.rtmp_allowed_hosts, config.rtmp_forbidden_hosts,
                                               config.rtmp_allowed_ports)
        self.ladder = Ladder.parse(config.degradation_ladder, config.step_up_margin,
                                   config.step_dwell)
        self.fleet = Fleet(config.utilisation_target, premium_spread=config.premium_spread)
        self.metering = Metering(config.price, self.metrics, config.tenants)
        self.ledger = self.metering.ledger
        self.queue = FairQueue()
        self.sessions = SessionTable()
        self.workers: dict[str, WorkerConn] = {}
        self._watchers: dict[str, set[asyncio.Queue[SessionEvent]]] = collections.defaultdict(set)
        self._wake = asyncio.Event()
        self._started_at = clock()
        self._stopping = False
        self._seq = 0
        # Indexes, kept with every commit, so a call costs the same at 10 or 10,000 rooms.
        self._orphans: set[str] = set()
        self._progress_dirty: dict[str, Session] = {}
        self._exhausted: dict[str, float] = {}  # tenant -> when its spend budget ran out
        self._avatars: tuple[float, frozenset[str]] = (-1.0, frozenset())
        self._worker_avatars: collections.Counter[str] = collections.Counter()
        self.commits = GroupCommit(store)
        self.latest: ClusterSnapshot | None = None  # taken by the last tick
        # What the operation under way decided; carried out when it returns.
        self._decided = Decisions()
        self.dispatcher = Dispatcher(store, self.commits, self.workers, self._watchers)
        self._scripts: dict[str, list[ScriptSegment]] = {}  # live text rooms' scripts
        self._unit_profile: placement.WorkerProfile | None = None
        self._units_cache: dict[tuple[Quality, str], float] = {}
        self._why_cache: dict[tuple[object, ...], tuple[float, str]] = {}
        self._next_usage_flush = 0.0
        self._capacity_changed = True
        self._epoch = 0  # bumped whenever capacity may have been freed
        self._nofit: dict[tuple[object, ...], tuple[int, str]] = {}
        self._unit_device = ""
        # Assignment epochs come from one counter, so they increase per room and across
        # rooms: an output reused by a later session is claimed by a higher epoch than
        # any earlier writer's fence.
        self._last_assignment = 0
        ivs, cursors = store.load_usage()
        self.ledger.load(ivs, cursors)
        self.avatars = AvatarRegistry(store)
        # Rooms whose avatar's licence ended, winding down on their worker: session ->
        # (when the scheduler ends it itself, why). They are never placed again.
        self._licence_ending: dict[str, tuple[float, str]] = {}
        # Handovers off draining workers: session -> (old worker, old epoch). The old
        # assignment stops at a clean point and reports its final progress; the next one
        # starts exactly there.
        self._handovers: dict[str, tuple[str, int]] = {}
        self._pending_since: dict[str, float] = {}
        for s in store.load_sessions():
            self._seq = max(self._seq, s.seq)
            self._last_assignment = max(self._last_assignment, s.epoch)
            self.sessions.put(s)
            if s.state is SessionState.PENDING:
                self._enqueue(s)
            elif not s.state.terminal:
                self._orphans.add(s.session_id)
            if not s.state.terminal and s.spec.drive_mode is DriveMode.TEXT:
                self._scripts[s.session_id] = store.script(s.session_id)
        self.metrics.session_counts(self.sessions.counts)

    # -- durability ---------------------------------------------------------------

    async def durable(self) -> None:
        """Returns once everything changed so far is committed to the store."""
        await self.commits.durable()

    # -- tenant API ------------------------------------------------------------

    def known_avatars(self) -> frozenset[str]:
        at, names = self._avatars
        now = self.clock()
        if now - at > 1.0 or at < 0:
            names = frozenset(list_avatars(self.config.avatar_dir))
            self._avatars = (now, names)
        return names | self._worker_avatars.keys()

    def platform(self, name: str) -> platforms.PlatformPolicy:
        return self.config.platforms.get(name, platforms.DEFAULT_POLICY)

    def tenant(self, name: str) -> tenants.TenantConfig:
        t = self.config.tenants.get(name)
        if t is not None:
            return t
        if not self.config.allow_unknown_tenants:
            raise tenants_error(name)
        return tenants.UNLIMITED

    def units_of(self, quality: Quality, mode: DriveMode) -> float:
        key = (quality, mode.value)
        units = self._units_cache.get(key)
        if units is None:
            measured = self._unit_profile.units(quality, mode) if self._unit_profile else None
            units = measured if measured is not None else placement.nominal_units(quality, mode)
            self._units_cache[key] = units
        return units

    @_carried_out
    def create(self, spec: SessionSpec, request_id: str = "") -> Session:
        try:
            self.egress.check(spec.output)
            platforms.check_room(spec.platform, self.platform(spec.platform), spec.drive_mode)
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
        other = self.sessions.live_rooms.get((spec.tenant, spec.room_id))
        if other is not None:
            raise AlreadyExists(f"room {spec.room_id!r} already streams as session {other}")
        if spec.output in self.sessions.outputs:
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
        refusal, _ = self.avatars.admit(spec, now, require_licence=self.config.require_licence)
        if refusal is not None:
            self._refuse_likeness(spec, refusal, now)
        guaranteed = tenants.guaranteed(t, spec.tier, units, self.sessions.reserved[spec.tenant])
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

    def get(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise NotFound(f"session {session_id!r} not found")
        return s

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

    @_carried_out
    def end(self, session_id: str, reason: str = "") -> Session:
        s = self.get(session_id)
        if s.state.terminal:
            return s
        reason = reason or "ended by tenant"
        if s.worker_id and s.worker_id in self.workers:
            self._decided.send(s.worker_id, ReleaseCmd(session_id, reason))
        s = s.moved(SessionState.ENDED, self.clock(), reason=reason)
        self._commit(s)
        self.kick()
        return s

    @_carried_out
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
        if s.worker_id in self.workers and s.state in _LIVE:
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
                running += s.state in _LIVE
        return TenantStatus(name, t, self.sessions.units[name], self.spent(name, self.clock()),
                            self.sessions.reserved[name], pending, running)

    def spent(self, tenant: str, now: float) -> float:
        return self.metering.spent(tenant, now)

    # -- avatars ------------------------------------------------------------------

    def claim_avatar(self, avatar_id: str, tenant: str, *, operator: bool) -> None:
        """Refuses an avatar id `tenant` may not register (asked again on registration:
        the image is processed in between)."""
        self.tenant(tenant)
        self.avatars.claim(avatar_id, tenant, local=self.known_avatars(), operator=operator)

    @_carried_out
    def register_avatar(self, avatar: RegisteredAvatar, *, operator: bool) -> RegisteredAvatar:
        self.claim_avatar(avatar.avatar_id, avatar.tenant, operator=operator)
        a = self.avatars.register(avatar, self.clock())
        self.commits.schedule()
        self.enforce_licences()  # a new licence may no longer allow rooms running under the old
        return a

    @_carried_out
    def revoke_licence(self, avatar_id: str, reason: str) -> RegisteredAvatar:
        a = self.avatars.revoke(avatar_id, reason, self.clock())
        self.commits.schedule()
        self.enforce_licences()
        return a

    def avatar_images_changed(self) -> None:
        """An image was written to avatar_dir: the next look at the folder is fresh."""
        self._avatars = (-1.0, frozenset())

    def _refuse_likeness(self, spec: SessionSpec, refusal: Refusal, now: float) -> NoReturn:
        self.metrics.licence_refusals.labels(refusal.clause).inc()
        message = refusal.explain(spec.avatar_id)
        self.avatars.audit(AuditAction.REFUSED, spec.avatar_id, spec.tenant, now,
                           room_id=spec.room_id, platform=spec.platform, clause=refusal.clause,
                           detail=message)
        self.commits.schedule()
        raise PermissionDenied(message)

    def _audit_room(self, action: AuditAction, s: Session, now: float, detail: str = "") -> None:
        refusal, clause = self.avatars.admit(s.spec, now, require_licence=False)
        self.avatars.audit(action, s.spec.avatar_id, s.spec.tenant, now, session_id=s.session_id,
                           room_id=s.spec.room_id, platform=s.spec.platform,
                           worker_id=s.worker_id,
                           clause=refusal.clause if refusal is not None else clause, detail=detail)

    # -- worker API -------------------------------------------------------------

    @_carried_out
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
                          last_seen=now, latency_budget=latency_budget, usage_epoch=usage_epoch)
        self.workers[worker_id] = conn
        gpu = "CPU" not in provider and device_type != "cpu"
        self.fleet.add_worker(WorkerState(
            worker_id, profile, self.config.overcommit,
            cpu_capacity=float(resources.cpu_cores) if gpu else 0.0,
            memory_capacity=resources.memory_bytes, memory=resources.memory,
            device_type=device_type, warm=resources.warm_avatars))
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
                  if x.worker_id == worker_id and x.state in _LIVE and x.session_id not in kept]:
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

    def _refresh_unit_profile(self) -> None:
        # Units are measured on the most common device type (ties: by name), so they
        # stay put while workers of that type come and go.
        by_type = collections.Counter(w.device_type for w in self.workers.values())
        if not by_type:
            return
        dev = min(by_type, key=lambda d: (-by_type[d], d))
        if self._unit_profile is not None and self._unit_device == dev:
            return
        for w in self.workers.values():
            if w.device_type == dev and w.profile.units(placement.UNIT_QUALITY,
                                                        placement.UNIT_MODE) is not None:
                self._unit_profile, self._unit_device = w.profile, dev
                self._units_cache.clear()
                return

    @_carried_out
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

    def worker_seen(self, conn: WorkerConn, load: float | None = None) -> None:
        conn.last_seen = self.clock()
        if load is not None:
            conn.reported_load = load

    @_carried_out
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

    @_carried_out
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

    @_carried_out
    def shutting_down(self) -> None:
        """From now on a closing worker stream is this scheduler leaving, not the worker
        failing: its rooms keep their placement for when the scheduler is back."""
        self._stopping = True
        self.flush_progress()

    @_carried_out
    def worker_disconnected(self, conn: WorkerConn, why: str) -> None:
        if self._stopping:
            if self.workers.pop(conn.worker_id, None) is not None:
                self._worker_avatars.subtract(conn.avatars)
            return
        if self.workers.get(conn.worker_id) is conn:
            self._drop_worker(conn, why)

    def _drop_worker(self, conn: WorkerConn, why: str) -> None:
        if conn.draining_until is None:
            self.metrics.workers_lost.labels(conn.device_type).inc()
        del self.workers[conn.worker_id]
        self._worker_avatars.subtract(conn.avatars)
        self._worker_avatars += collections.Counter()  # drop avatars no worker has
        self._decided.retire(conn)
        now = self.clock()
        self.fleet.remove_worker(conn.worker_id)
        for s in [x for x in self.sessions.values()
                  if x.worker_id == conn.worker_id and not x.state.terminal]:
            self._to_pending(s, now, f"worker {conn.worker_id} lost ({why}); re-placing")
        self._why_cache.clear()
        log.warning("worker %s dropped: %s", conn.worker_id, why)
        self._refresh_unit_profile()
        self.kick()

    # -- drains -------------------------------------------------------------------

    @_carried_out
    def drain_worker(self, worker_id: str, deadline: float, why: str) -> bool:
        """Marks a worker for removal: it takes no new rooms and its rooms are handed over
        to other workers as capacity allows (see `advance_drains`). False if unknown."""
        conn = self.workers.get(worker_id)
        if conn is None:
            return False
        if conn.draining_until is None:
            conn.draining_until, conn.drain_reason = deadline, why
            self.fleet.set_accepting(worker_id, False)
            self._why_cache.clear()
            log.info("draining worker %s (%s): %d room(s) to hand over within %.0f s", worker_id,
                     why, len(self._rooms_on(worker_id)), max(0.0, deadline - self.clock()))
        else:
            conn.draining_until = min(conn.draining_until, deadline)
        self.advance_drains()
        return True

    def drained(self, worker_id: str) -> bool:
        """No room is left on the worker (a room being handed over counts until its old
        assignment has stopped). An unknown (gone) worker is drained."""
        return worker_id not in self.workers or not self._rooms_on(worker_id)

    def _rooms_on(self, worker_id: str) -> list[str]:
        w = self.fleet.workers.get(worker_id)
        return list(w.rooms) if w is not None else []

    @_carried_out
    def advance_drains(self) -> None:
        """Hands rooms over from draining workers where capacity allows; counts a drain
        completed or past its deadline once."""
        now = self.clock()
        for conn in [c for c in self.workers.values() if c.draining_until is not None]:
            for sid in self._rooms_on(conn.worker_id):
                s = self.sessions.get(sid)
                if s is not None and s.state in _LIVE and sid not in self._licence_ending \
                        and sid not in self._handovers:
                    self._hand_over(s, conn, now)
            if conn.drain_outcome:
                continue
            if self.drained(conn.worker_id):
                conn.drain_outcome = "completed"
                log.info("worker %s drained", conn.worker_id)
            elif now >= (conn.draining_until or now):
                conn.drain_outcome = "deadline"
                log.warning("worker %s still has %d room(s) at its drain deadline", conn.worker_id,
                            len(self._rooms_on(conn.worker_id)))
            if conn.drain_outcome:
                self.metrics.drains.labels(conn.drain_outcome).inc()

    def _hand_over(self, s: Session, old: WorkerConn, now: float) -> None:
        """Moves a room off a draining worker, once another worker can take it. A running
        room stays on the air: its worker stops at a clean point (an HLS room finishes
        and publishes the segment it is writing), leaves the output open and reports its
        final progress; the next assignment continues the output from exactly there
        (`_continue_elsewhere`). A room not running yet is simply placed again."""
        if self.fleet.choose(self._req(s), self._rungs) is None:
            return  # waits for capacity (the autoscaler is adding it) or the deadline
        why = f"worker {old.worker_id} is draining ({old.drain_reason})"
        if s.state is SessionState.RUNNING:
            self._handovers[s.session_id] = (old.worker_id, s.epoch)
            self._decided.send(old.worker_id, ReleaseCmd(s.session_id, f"{why}; handing over",
                                             handover=True))
            return
        self._decided.send(old.worker_id, ReleaseCmd(s.session_id, f"{why}; moving to another worker"))
        self._to_pending(s, now, f"{why}; moving to another worker")
        self._try_place(self.sessions[s.session_id], {})

    def _continue_elsewhere(self, s: Session, old: WorkerConn, progress: Progress | None) -> None:
        """The old side of a handover stopped: its final progress is counted and the room
        goes on on another worker from exactly there, without leaving the air."""
        del self._handovers[s.session_id]
        now = self.clock()
        if progress is not None:
            s = self._progress(s, progress, now, notify=False)
        limit = s.spec.max_duration_seconds
        if limit > 0 and s.progress.stream_seconds >= limit - 1e-3:
            self._commit(s.moved(SessionState.ENDED, now, reason="reached max duration"))
            self.kick()
            return
        self.fleet.release(s.session_id)
        self.ledger.close(s.session_id, now)
        choice = self.fleet.choose(self._req(s), self._rungs)
        if choice is None or not self._protected_ok(s, choice.demand.compute):
            self._to_pending(s, now, f"handed over by {old.worker_id}; waiting for capacity")
            return
        kind = "restart" if s.spec.output.kind is OutputKind.RTMP else "seamless"
        self.metrics.handovers.labels(kind).inc()
        self._assign(dataclasses.replace(s, reason=f"handed over by {old.worker_id}"), choice,
                     SessionState.RUNNING)

    def waiting(self) -> Waiting:
        """The rooms waiting for a worker: how many, their compute units, and how many are
        guaranteed by a reservation (a breach of the guarantee while they wait)."""
        units, guaranteed, n = 0.0, 0, 0
        for sid in self.queue.waiting():
            s = self.sessions.get(sid)
            if s is not None and s.state is SessionState.PENDING:
                n += 1
                units += s.units
                guaranteed += s.guaranteed
        return Waiting(n, units, guaranteed)

    # -- placement ---------------------------------------------------------------

    def kick(self) -> None:
        """Something may have freed capacity: the loop runs a pass over the queue."""
        self._capacity_changed = True
        self._epoch += 1
        self._wake.set()

    def _req(self, s: Session) -> RoomReq:
        return RoomReq(s.session_id, s.spec.tenant, s.spec.avatar_id, s.quality,
                       s.spec.drive_mode, s.spec.tier, s.seq,
                       (s.spec.quality.width, s.spec.quality.height), s.step)

    def _rungs(self, room: RoomReq) -> list[tuple[int, Quality]]:
        s = self.sessions[room.session_id]
        if s.spec.tier is Tier.STANDARD:
            return self.ladder.qualities(s.spec.quality)
        return [(0, s.spec.quality)]

    def _lowest(self, room: RoomReq) -> RoomReq | None:
        s = self.sessions[room.session_id]
        step, q = self.ladder.lowest(s.spec.quality)
        if step <= room.step:
            return None
        return dataclasses.replace(room, quality=q, step=step)

    def _enqueue(self, s: Session) -> None:
        self._pending_since.setdefault(s.session_id, self.clock())
        t = self.config.tenants.get(s.spec.tenant, tenants.UNLIMITED)
        self.queue.push(s.session_id, s.spec.tenant, s.spec.tier, s.units, t.weight, s.guaranteed)

    @_carried_out
    def place_pending(self, limit: int = 512) -> int:
        """One pass over the queue in fair order; returns the number of rooms placed."""
        self._capacity_changed = False
        placed = 0
        failed: dict[tuple[object, ...], str] = {}
        for sid in self.queue.ordered(limit):
            s = self.sessions.get(sid)
            if s is None or s.state is not SessionState.PENDING:
                self.queue.remove(sid)
                continue
            placed += self._try_place(s, failed)
        return placed

    def _try_place(self, s: Session, failed: dict[tuple[object, ...], str]) -> int:
        """Place one pending room if anything fits (reclaiming capacity for guaranteed
        rooms); otherwise record why it waits. `failed` memoises shapes that did not fit
        in this pass, so a long queue costs one look per shape."""
        shape = (s.spec.quality, s.step, s.spec.drive_mode, s.spec.tier, s.guaranteed,
                 s.spec.avatar_id if s.guaranteed else "")
        if shape in failed:
            self._wait(s, failed[shape])
            return 0
        known = self._nofit.get(shape)
        if known is not None and known[0] == self._epoch:
            # This shape found no room since capacity last changed: it waits, at no cost.
            self._wait(s, known[1])
            return 0
        room = self._req(s)
        choice = self.fleet.choose(room, self._rungs)
        if choice is not None and not self._protected_ok(s, choice.demand.compute):
            choice = None
        if choice is None and s.guaranteed:
            plan = self.fleet.reclaim(room, self._lowest)
            if plan is not None:
                self._apply_reclaim(plan, s)
                choice = self.fleet.choose(room)
        if choice is None:
            why = self._why_not(shape, room)
            if s.spec.tier is Tier.PREMIUM and not s.guaranteed and self.fleet.workers:
                why += "; premium rooms beyond the tenant's reservation may not take capacity " \
                       "other tenants have reserved"
            failed[shape] = why
            self._nofit[shape] = (self._epoch, why)
            self._wait(s, why)
            return 0
        self._assign(s, choice)
        return 1

    def _why_not(self, shape: tuple[object, ...], room: RoomReq) -> str:
        # Saying why costs a look at many workers: once per shape per heartbeat interval.
        now = self.clock()
        at, why = self._why_cache.get(shape, (-1.0, ""))
        if at < 0 or now - at >= self.config.heartbeat_interval:
            why = self.fleet.why_not(room)
            self._why_cache[shape] = (now, why)
        return why

    def _protected_ok(self, s: Session, compute: float) -> bool:
        """Rooms that cannot be preempted later must leave others' reservations reclaimable."""
        if s.spec.tier is not Tier.PREMIUM or s.guaranteed or not self.config.tenants:
            return True
        unit = self._unit_load()
        unused = sum(max(0.0, t.reserved_units - self.sessions.reserved[name])
                     for name, t in self.config.tenants.items()) * unit
        if unused <= 0:
            return True
        return tenants.may_take_protected(units_needed=compute, free=self.fleet.free_total,
                                          preemptible=self.sessions.preemptible,
                                          unused_reservations=unused)

    def _unit_load(self) -> float:
        p = self._unit_profile
        load = p.room_load(placement.UNIT_QUALITY, placement.UNIT_MODE) if p else None
        return load or 1.0

    def _wait(self, s: Session, why: str) -> None:
        if s.reason != why:
            self._commit(s.moved(s.state, self.clock(), reason=why), EventKind.QUEUED, why)

    def _assign(self, s: Session, choice: placement.Choice,
                state: SessionState = SessionState.PLACED) -> None:
        now = self.clock()
        conn = self.workers[choice.worker_id]
        self.queue.served(s.session_id)
        since = self._pending_since.pop(s.session_id, None)
        if since is not None:
            self.metrics.pending_wait.labels(s.spec.tier.value).observe(max(0.0, now - since))
        step_changed = choice.step != s.step
        rendering = None if choice.step == 0 else choice.quality
        units = self.units_of(choice.quality, s.spec.drive_mode)
        # A new assignment: the room continues from what earlier ones delivered.
        continuation, base = s.assignments, s.progress
        self._last_assignment += 1
        s = s.moved(state, now, worker_id=conn.worker_id,
                    epoch=self._last_assignment, assignments=s.assignments + 1, base=base,
                    input_endpoint=conn.input_endpoint, provider=conn.provider,
                    device_type=conn.device_type, load=choice.demand.compute,
                    step=choice.step, rendering=rendering, units=units,
                    step_changed_at=now if step_changed else s.step_changed_at,
                    reason=f"placed on {conn.worker_id}" + (
                        f" at {choice.quality} (degradation step {choice.step})"
                        if choice.step else ""))
        self.fleet.assign(self._req(s), conn.worker_id)
        self._commit(s, EventKind.DEGRADED if step_changed and choice.step else EventKind.STATE,
                     f"placed at {choice.quality}, step {choice.step}" if choice.step else "")
        if step_changed and choice.step:
            self.metrics.degradations.labels(s.spec.tier.value, "down").inc()
        self._audit_room(AuditAction.ROOM_STARTED, s, now, f"assignment {s.assignments}")
        self._open_interval(s, now)
        script = tuple(self._scripts.get(s.session_id, ()))[base.script_segments_done:]
        limit = s.spec.max_duration_seconds
        spec = dataclasses.replace(
            s.spec, script=script,
            max_duration_seconds=max(1e-3, limit - base.stream_seconds) if limit > 0 else 0.0)
        self._decided.send(conn.worker_id, AssignCmd(s.session_id, spec, s.epoch, continuation,
                                         base.stream_seconds,
                                         self.platform(s.spec.platform).label_for()))
        if rendering is not None:
            self._decided.send(conn.worker_id, ReconfigureCmd(s.session_id, rendering, choice.step,
                                                  "placed degraded: capacity is short"))
        self.metrics.placements.labels(s.spec.tier.value).inc()

    def _apply_reclaim(self, plan: placement.Reclaim, beneficiary: Session) -> None:
        now = self.clock()
        for a in plan.actions:
            victim = self.sessions[a.session_id]
            if a.kind is ActionKind.PREEMPT:
                why = (f"preempted on {victim.worker_id} to reclaim capacity reserved by tenant "
                       f"{beneficiary.spec.tenant!r}; re-queued")
                conn = self.workers.get(victim.worker_id)
                if conn is not None:
                    self._decided.send(conn.worker_id, ReleaseCmd(victim.session_id, why))
                self.metrics.preemptions.labels(victim.spec.tier.value).inc()
                self._to_pending(victim, now, why, EventKind.PREEMPTED)
            else:
                self._restep(victim, a.step, now,
                             f"capacity reclaimed for a reserved room of tenant "
                             f"{beneficiary.spec.tenant!r}")

    def _restep(self, s: Session, step: int, now: float, why: str) -> Session:
        """Move a placed room to another ladder step on its worker, live."""
        quality = self.ladder.at(s.spec.quality, step)
        down = step > s.step
        s = dataclasses.replace(s, step=step, rendering=None if step == 0 else quality,
                                units=self.units_of(quality, s.spec.drive_mode),
                                step_changed_at=now, updated_at=now)
        if s.worker_id in self.fleet.workers:
            d = self.fleet.assign(self._req(s), s.worker_id)
            s = dataclasses.replace(s, load=d.compute)
        message = f"{'stepped down' if down else 'stepped back up'} to {quality} " \
                  f"(step {step}): {why}"
        self._commit(s, EventKind.DEGRADED if down else EventKind.RESTORED, message)
        self.metrics.degradations.labels(s.spec.tier.value, "down" if down else "up").inc()
        conn = self.workers.get(s.worker_id)
        if conn is not None:
            self._decided.send(conn.worker_id, ReconfigureCmd(s.session_id, quality, step, message))
        self._open_interval(s, now)
        return s

    @_carried_out
    def step_up(self) -> int:
        """Degraded rooms go back up one step where their worker has room to spare (with
        hysteresis), unless rooms are waiting for capacity."""
        if len(self.queue):
            return 0
        now = self.clock()
        raised = 0
        for sid in sorted(self.sessions.degraded):
            s = self.sessions[sid]
            if s.state not in _LIVE or s.spec.tenant in self._exhausted:
                continue
            up = self.ladder.next_up(s.spec.quality, s.step)
            w = self.fleet.workers.get(s.worker_id)
            if up is None or w is None:
                continue
            # Asked of the worker itself without the room, then the room put back (remove
            # and add are exact inverses): no copy of the worker per degraded room.
            here = w.remove(sid)
            try:
                d = w.demand(dataclasses.replace(self._req(s), quality=up[1], step=up[0]))
                after = 1e9 if d is None else (w.compute_load + d.compute) / w.compute_capacity
                if d is not None and w.cpu_capacity > 0:
                    after = max(after, (w.cpu_load + d.cpu) / w.cpu_capacity)
            finally:
                if here is not None:
                    w.add(here)
            if d is None:
                continue
            if self.ladder.may_step_up(after, self.fleet.target, now - s.step_changed_at):
                self._restep(s, up[0], now, "capacity returned")
                raised += 1
        return raised

    @_carried_out
    def enforce_budgets(self) -> None:
        """Tenants whose spend ran out this period: degrade, warn, or stop, per policy."""
        now = self.clock()
        for name, t in self.config.tenants.items():
            if t.spend_budget <= 0:
                continue
            spent = self.spent(name, now)
            action = tenants.budget_action(t, spent, self._exhausted.get(name), now)
            if action is tenants.BudgetAction.NONE:
                self._exhausted.pop(name, None)
                continue
            first = name not in self._exhausted
            self._exhausted.setdefault(name, now)
            rooms = [self.sessions[sid] for (tenant, _), sid in self.sessions.live_rooms.items()
                     if tenant == name]
            msg = (f"tenant {name!r} spent {spent:.2f} of its {t.spend_budget:.2f} spend budget "
                   f"this period")
            for s in rooms:
                if action is tenants.BudgetAction.STOP:
                    self.end(s.session_id, f"{msg}; stopped after the "
                                           f"{t.grace_seconds:.0f} s grace period")
                elif action is tenants.BudgetAction.WARN and first:
                    self._commit(s.moved(s.state, now), EventKind.BUDGET,
                                 f"{msg}; the room stops in {t.grace_seconds:.0f} s")
                elif action is tenants.BudgetAction.DEGRADE and s.state in _LIVE:
                    step, _ = self.ladder.lowest(s.spec.quality)
                    if step > s.step:
                        self._restep(s, step, now, f"{msg}; degraded by the tenant's policy")

    @_carried_out
    def enforce_licences(self) -> None:
        """Rooms whose avatar's licence was revoked, ran out, or was replaced by one that no
        longer allows them end at their next script boundary: the worker finishes the
        segment being spoken and reports the room ended. A room with no worker ends at
        once, and one its worker has not ended within licence_end_grace is ended here."""
        now = self.clock()
        due = self.avatars.due(now)
        if due:
            for sid in [sid for sid in self.sessions.live_rooms.values()
                        if self.sessions[sid].spec.avatar_id in due and sid not in self._licence_ending]:
                s = self.sessions[sid]
                refusal, _ = self.avatars.admit(s.spec, now, require_licence=False)
                if refusal is not None:
                    self._end_for_licence(s, refusal, now)
        for sid, (deadline, why) in list(self._licence_ending.items()):
            if now >= deadline:
                self.end(sid, f"{why}; the worker did not end it within "
                              f"{self.config.licence_end_grace:g} s")

    def _end_for_licence(self, s: Session, refusal: Refusal, now: float) -> None:
        why = refusal.explain(s.spec.avatar_id)
        self.metrics.licence_endings.labels(refusal.clause).inc()
        self.avatars.audit(AuditAction.LICENCE_ENDED, s.spec.avatar_id, s.spec.tenant, now,
                           session_id=s.session_id, room_id=s.spec.room_id,
                           platform=s.spec.platform, worker_id=s.worker_id,
                           clause=refusal.clause, detail=why)
        if s.state is SessionState.PENDING or not s.worker_id:
            why += "; the room is ended"
            self._commit(s.moved(s.state, now, reason=why), EventKind.LICENCE, why)
            self.end(s.session_id, why)
            return
        why += "; the room ends at its next script boundary"
        self._licence_ending[s.session_id] = (now + self.config.licence_end_grace, why)
        conn = self.workers.get(s.worker_id)
        if conn is not None:
            self._decided.send(conn.worker_id, ReleaseCmd(s.session_id, why, at_script_boundary=True))
        self._commit(s.moved(s.state, now, reason=why), EventKind.LICENCE, why)

    @_carried_out
    def check_heartbeats(self) -> None:
        deadline = self.clock() - self.config.worker_timeout
        for conn in list(self.workers.values()):
            if conn.last_seen < deadline:
                self._drop_worker(conn, f"no heartbeat for {self.config.worker_timeout:.0f}s")

    @_carried_out
    def check_orphans(self) -> None:
        """After a restart, rooms whose worker has not come back within the grace period."""
        if not self._orphans or self.clock() < self._started_at + self.config.orphan_grace:
            return
        now = self.clock()
        for sid in list(self._orphans):
            s = self.sessions[sid]
            self._orphans.discard(sid)
            if not s.state.terminal and s.worker_id not in self.workers:
                self._to_pending(s, now, f"worker {s.worker_id} did not come back; re-placing")

    @_carried_out
    def tick(self) -> None:
        self._epoch += 1  # once a second everything is looked at afresh
        self.check_heartbeats()
        self.check_orphans()
        self.enforce_budgets()
        self.enforce_licences()
        self.place_pending()
        self.advance_drains()
        self.step_up()
        if self.clock() >= self._next_usage_flush:
            self._next_usage_flush = self.clock() + self.config.usage_flush_interval
            self.flush_progress()
        self.metering.publish()
        snap = self.latest = self.snapshot()
        self.metrics.fleet(snap.fleet)
        self.metrics.pending_load.set(snap.waiting.units * self._unit_load())
        self.metrics.guaranteed_pending.set(snap.waiting.guaranteed)

    def snapshot(self, *, queue_limit: int = SNAPSHOT_QUEUE,
                 recent_seconds: float = SNAPSHOT_RECENT_SECONDS) -> ClusterSnapshot:
        """The cluster as of now, for readers off the core (`latest` holds the one the
        last tick took)."""
        now = self.clock()
        since = now - recent_seconds
        groups: dict[SessionState, list[Session]] = {}
        for s in self.sessions.values():
            if not s.state.terminal or s.updated_at >= since:
                groups.setdefault(s.state, []).append(s)
        workers: dict[str, WorkerView] = {}
        for wid in sorted(self.workers):
            conn, ws = self.workers[wid], self.fleet.workers.get(wid)
            rooms = tuple(ws.rooms) if ws is not None else ()
            units = sum(self.sessions[sid].units for sid in rooms if sid in self.sessions)
            workers[wid] = WorkerView(
                wid, conn.device_type, conn.provider, conn.last_seen,
                ws is not None and ws.accepting, conn.draining_until, conn.drain_reason, rooms,
                units, ws.compute_load if ws else 0.0, ws.compute_capacity if ws else 0.0,
                ws.utilisation() if ws else 0.0,
                ws.unit_capacity(self.fleet.target) if ws else 0.0)
        book = self.metering.costs
        costs = CostBook(book.price, dict(book.stream_seconds), dict(book.device_seconds))
        return ClusterSnapshot(now, {k: tuple(v) for k, v in groups.items()}, recent_seconds,
                               workers, tuple(self.queue.ordered(queue_limit)),
                               len(self.queue), self.waiting(), self.fleet.totals(), costs)

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

    # -- internals ----------------------------------------------------------------

    def _to_pending(self, s: Session, now: float, why: str,
                    kind: EventKind = EventKind.STATE) -> None:
        if s.session_id in self._licence_ending:
            self.end(s.session_id, f"{why}; not re-placed: {self._licence_ending[s.session_id][1]}")
            return
        self._handovers.pop(s.session_id, None)
        self.fleet.release(s.session_id)
        self.ledger.close(s.session_id, now)
        s = s.moved(SessionState.PENDING, now, worker_id="", input_endpoint="", reason=why)
        self._commit(s, kind, why)
        self._enqueue(s)

    def _open_interval(self, s: Session, now: float) -> None:
        self.ledger.open(s.session_id, tenant=s.spec.tenant, avatar_id=s.spec.avatar_id,
                         platform=s.spec.platform,
                         tier=s.spec.tier, quality=str(s.quality), worker_id=s.worker_id,
                         device_type=s.device_type or "unknown", units=s.units, now=now,
                         epoch=s.epoch)

    def _progress(self, s: Session, progress: Progress, now: float, *,
                  notify: bool = True) -> Session:
        """Progress of `s`'s current assignment (cumulative over it): usage accounted, and
        the room's total (what earlier assignments delivered plus this) kept in memory,
        written with the next tick or the next change of the room, whichever is first.
        Returns the session as it now stands."""
        self.metering.account(s, progress)
        total = plus(s.base, progress)
        if total.stream_seconds < s.progress.stream_seconds:
            return s
        s = s.with_progress(total, now)
        self.sessions.progressed(s)
        self._progress_dirty[s.session_id] = s
        if notify and s.session_id in self._watchers:
            self._notify(SessionEvent(s))
        return s

    @_carried_out
    def flush_progress(self) -> None:
        """Progress and the usage ledger since the last tick, in one transaction; workers
        are acknowledged their reports once it is on disk."""
        for s in self._progress_dirty.values():
            self._decided.store(s)
        self._progress_dirty.clear()
        ivs, cursors = self.ledger.take_dirty()
        self._decided.usage(ivs, cursors)
        self._decided.commit = True

    def _commit(self, s: Session, kind: EventKind = EventKind.STATE, message: str = "") -> None:
        self._decided.store(s)
        self._progress_dirty.pop(s.session_id, None)
        prev = self.sessions.put(s)
        if s.state.terminal:
            self._pending_since.pop(s.session_id, None)
            self._handovers.pop(s.session_id, None)
        if s.state.terminal and (prev is None or not prev.state.terminal):
            self._scripts.pop(s.session_id, None)
            self.queue.remove(s.session_id)
            self.fleet.release(s.session_id)
            self.ledger.close(s.session_id, s.updated_at)
            self._licence_ending.pop(s.session_id, None)
            if s.assignments:
                self._audit_room(AuditAction.ROOM_ENDED, s, s.updated_at, s.reason)
        if prev is None or prev.state is not s.state:
            self.metrics.session_moved(None if prev is None else (prev.state, prev.spec.tier),
                                       (s.state, s.spec.tier), self.sessions.counts)
        self._notify(SessionEvent(s, kind, message))

    def _notify(self, ev: SessionEvent) -> None:
        self._decided.notify(ev)

    def _carry_out(self) -> None:
        out = self._decided.take()
        if out:
            self.dispatcher.apply(out)


def tenants_error(name: str) -> Exception:
    return PermissionDenied(f"tenant {name!r} is not configured on this scheduler")
