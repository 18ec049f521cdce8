"""The scheduler's core: one asyncio loop owning sessions and workers.

Tenant calls and worker reports change state here; every change is written to
the store before it is acknowledged and published to watchers. A placement
pass runs whenever something could let a pending room move (a new room, a
worker joining, a room ending) and applies the pure placement policy.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from avatarfarm.avatars import list_avatars
from avatarfarm.domain import (
    DriveMode,
    InvalidRequest,
    Progress,
    ScriptSegment,
    SessionSpec,
    SessionState,
    validate_script,
)
from scheduler import placement
from scheduler.config import SchedulerConfig
from scheduler.cost import CostBook, usage_delta
from scheduler.errors import AlreadyExists, FailedPrecondition, NotFound
from scheduler.metrics import SchedulerMetrics
from scheduler.state import InvalidTransition, Session
from scheduler.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AssignCmd:
    session_id: str
    spec: SessionSpec


@dataclass(frozen=True, slots=True)
class ReleaseCmd:
    session_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ScriptCmd:
    session_id: str
    segments: tuple[ScriptSegment, ...]


WorkerCommand = AssignCmd | ReleaseCmd | ScriptCmd


@dataclass(slots=True)
class WorkerConn:
    """A connected worker as the scheduler sees it; ``outbox`` feeds its stream."""

    worker_id: str
    device_type: str
    provider: str
    profile: placement.WorkerProfile
    input_endpoint: str
    avatars: frozenset[str]
    connected_at: float
    outbox: asyncio.Queue[WorkerCommand | None] = field(default_factory=asyncio.Queue)
    last_seen: float = 0.0
    reported_load: float = 0.0
    latency_budget: float = 0.0


class Scheduler:
    def __init__(self, store: Store, config: SchedulerConfig,
                 metrics: SchedulerMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics or SchedulerMetrics()
        self.clock = clock
        self.costs = CostBook(config.price)
        self.sessions: dict[str, Session] = {}
        self.workers: dict[str, WorkerConn] = {}
        self._watchers: dict[str, set[asyncio.Queue[Session]]] = collections.defaultdict(set)
        self._wake = asyncio.Event()
        self._started_at = clock()
        self._stopping = False
        self._seq = 0
        for s in store.load_sessions():
            self.sessions[s.session_id] = s
            self._seq = max(self._seq, s.seq)
        self._update_gauges()

    # -- tenant API ------------------------------------------------------------

    def known_avatars(self) -> set[str]:
        names = set(list_avatars(self.config.avatar_dir))
        for w in self.workers.values():
            names |= w.avatars
        return names

    def create(self, spec: SessionSpec, request_id: str = "") -> Session:
        if request_id:
            existing = self.store.find_request(spec.tenant, request_id)
            if existing is not None:
                s = self.sessions[existing]
                if s.spec != spec:
                    raise AlreadyExists(f"request_id {request_id!r} was already used for session "
                                        f"{existing} with a different spec")
                return s
        if spec.avatar_id not in self.known_avatars():
            raise NotFound(f"avatar {spec.avatar_id!r} is not registered")
        for s in self.sessions.values():
            if s.state.terminal:
                continue
            if s.spec.tenant == spec.tenant and s.spec.room_id == spec.room_id:
                raise AlreadyExists(f"room {spec.room_id!r} already streams as session {s.session_id}")
            if s.spec.output == spec.output:
                # Two streams muxed into one file or playlist would corrupt both.
                raise AlreadyExists(f"output {spec.output.target!r} is in use by another live session")
        now = self.clock()
        self._seq += 1
        s = Session(uuid.uuid4().hex, spec, SessionState.PENDING, self._seq, now, now, request_id,
                    reason="waiting for placement")
        self._commit(s)
        if spec.script:
            self.store.append_script(s.session_id, list(spec.script))
        # Place now, so the answer already says where the room goes or why it waits.
        self.place_pending()
        return self.sessions[s.session_id]

    def get(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise NotFound(f"session {session_id!r} not found")
        return s

    def list_sessions(self, tenant: str = "", states: frozenset[SessionState] = frozenset(),
             page_size: int = 0, after_seq: int = 0) -> tuple[list[Session], int]:
        size = page_size or self.config.list_page_size
        rows = [s for s in sorted(self.sessions.values(), key=lambda s: s.seq)
                if s.seq > after_seq and (not tenant or s.spec.tenant == tenant)
                and (not states or s.state in states)]
        page = rows[:size]
        return page, (page[-1].seq if len(rows) > size else 0)

    def end(self, session_id: str, reason: str = "") -> Session:
        s = self.get(session_id)
        if s.state.terminal:
            return s
        reason = reason or "ended by tenant"
        if s.worker_id and s.worker_id in self.workers:
            self.workers[s.worker_id].outbox.put_nowait(ReleaseCmd(session_id, reason))
        s = s.moved(SessionState.ENDED, self.clock(), reason=reason)
        self._commit(s)
        self.kick()
        return s

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
        if s.worker_id in self.workers and s.state in (SessionState.PLACED, SessionState.RUNNING):
            self.workers[s.worker_id].outbox.put_nowait(ScriptCmd(session_id, tuple(segments)))
        return len(segments)

    async def watch(self, session_id: str) -> AsyncIterator[Session]:
        """The session now, then each change, until it ends."""
        s = self.get(session_id)
        q: asyncio.Queue[Session] = asyncio.Queue()
        self._watchers[session_id].add(q)
        try:
            yield s
            while not s.state.terminal:
                s = await q.get()
                yield s
        finally:
            self._watchers[session_id].discard(q)
            if not self._watchers[session_id]:
                del self._watchers[session_id]

    # -- worker API -------------------------------------------------------------

    def register_worker(self, worker_id: str, *, device_type: str, provider: str,
                        profile: placement.WorkerProfile, input_endpoint: str,
                        avatars: frozenset[str], active: frozenset[str],
                        latency_budget: float = 0.0) -> WorkerConn:
        old = self.workers.get(worker_id)
        if old is not None:
            # A reconnect that overtook the old stream's end: retire the old stream only;
            # the rooms are the same worker's.
            old.outbox.put_nowait(None)
        now = self.clock()
        conn = WorkerConn(worker_id, device_type, provider, profile, input_endpoint, avatars, now,
                          last_seen=now, latency_budget=latency_budget)
        self.workers[worker_id] = conn
        for s in list(self.sessions.values()):
            if s.state.terminal:
                continue
            mine = s.worker_id == worker_id
            orphaned = s.state is SessionState.PENDING and not s.worker_id
            if s.session_id in active and (mine or orphaned):
                # Still rendering here (after a scheduler restart or a dropped stream):
                # keep it on this worker rather than start it again elsewhere.
                load = profile.room_load(s.spec.quality, s.spec.drive_mode)
                state = SessionState.PLACED if s.state is SessionState.PENDING else s.state
                self._commit(s.moved(state, now, worker_id=worker_id, input_endpoint=input_endpoint,
                                     provider=provider, device_type=device_type,
                                     load=s.load if load is None else load,
                                     reason=f"re-adopted by {worker_id}" if orphaned else s.reason))
            elif mine and s.state in (SessionState.PLACED, SessionState.RUNNING):
                self._commit(s.moved(SessionState.PENDING, now, worker_id="", input_endpoint="",
                                     reason=f"worker {worker_id} restarted without the room"))
        for sid in active:
            s2 = self.sessions.get(sid)
            if s2 is None or s2.state.terminal or s2.worker_id != worker_id:
                conn.outbox.put_nowait(ReleaseCmd(sid, "not assigned to this worker"))
        log.info("worker %s registered (%s, %s) at %s", worker_id, device_type, provider,
                 input_endpoint)
        self._update_gauges()
        self.kick()
        return conn

    def worker_profile_changed(self, conn: WorkerConn, update: placement.WorkerProfile) -> None:
        """A worker re-measured (or corrected from live timings) some of its costs: they
        replace the old ones for new placements; rooms already placed keep their load."""
        self.worker_seen(conn)
        conn.profile = conn.profile.merged(update)
        log.info("worker %s updated its profile: %s", conn.worker_id,
                 ", ".join(f"{c.stage.value}@{c.width}x{c.height}={c.seconds * 1000:.2f}ms"
                           for c in update.costs))
        self.kick()

    def worker_seen(self, conn: WorkerConn, load: float | None = None) -> None:
        conn.last_seen = self.clock()
        if load is not None:
            conn.reported_load = load

    def worker_update(self, conn: WorkerConn, session_id: str, state: SessionState, reason: str,
                      progress: Progress | None) -> None:
        self.worker_seen(conn)
        s = self.sessions.get(session_id)
        if s is None or s.worker_id != conn.worker_id:
            log.warning("worker %s reported on session %s it does not hold", conn.worker_id, session_id)
            conn.outbox.put_nowait(ReleaseCmd(session_id, "not assigned to this worker"))
            return
        now = self.clock()
        changes: dict[str, object] = {}
        if progress is not None:
            self._account(s, progress)
            if progress.stream_seconds >= s.progress.stream_seconds:
                changes["progress"] = progress
        if s.state.terminal:
            if changes:
                self._commit(s.moved(s.state, now, **changes))
            return
        target = state if state in (SessionState.RUNNING, SessionState.ENDED,
                                    SessionState.FAILED) else s.state
        try:
            s = s.moved(target, now, reason=reason if target is not s.state or reason else s.reason,
                        **changes)
        except InvalidTransition:
            log.warning("ignored %s report for session %s in state %s", state.value, session_id,
                        s.state.value)
            return
        self._commit(s)
        if s.state.terminal:
            self.kick()

    def shutting_down(self) -> None:
        """From now on a closing worker stream is this scheduler leaving, not the worker
        failing: its rooms keep their placement for when the scheduler is back."""
        self._stopping = True

    def worker_disconnected(self, conn: WorkerConn, why: str) -> None:
        if self._stopping:
            self.workers.pop(conn.worker_id, None)
            return
        if self.workers.get(conn.worker_id) is conn:
            self._drop_worker(conn, why)

    def _drop_worker(self, conn: WorkerConn, why: str) -> None:
        del self.workers[conn.worker_id]
        conn.outbox.put_nowait(None)
        now = self.clock()
        for s in list(self.sessions.values()):
            if s.worker_id == conn.worker_id and not s.state.terminal:
                self._commit(s.moved(SessionState.PENDING, now, worker_id="", input_endpoint="",
                                     reason=f"worker {conn.worker_id} lost ({why}); re-placing"))
        log.warning("worker %s dropped: %s", conn.worker_id, why)
        self._update_gauges()
        self.kick()

    # -- placement ---------------------------------------------------------------

    def kick(self) -> None:
        self._wake.set()

    def place_pending(self) -> placement.PlacementResult:
        now = self.clock()
        orphan_deadline = self._started_at + self.config.orphan_grace
        for s in list(self.sessions.values()):
            # Rooms held by a worker that has not come back since a restart.
            if (not s.state.terminal and s.state is not SessionState.PENDING
                    and s.worker_id not in self.workers and now >= orphan_deadline):
                self._commit(s.moved(SessionState.PENDING, now, worker_id="", input_endpoint="",
                                     reason=f"worker {s.worker_id} did not come back; re-placing"))
        pending = [placement.PendingRoom(s.session_id, s.spec.quality, s.spec.drive_mode,
                                         s.spec.tier, s.seq)
                   for s in self.sessions.values() if s.state is SessionState.PENDING]
        if not pending:
            return placement.PlacementResult((), {})
        result = placement.place(pending, self._worker_views(), self.config.utilisation_target)
        for p in result.placements:
            conn = self.workers[p.worker_id]
            s = self.sessions[p.session_id]
            script = tuple(self.store.script(s.session_id))
            s = s.moved(SessionState.PLACED, now, worker_id=conn.worker_id,
                        input_endpoint=conn.input_endpoint, provider=conn.provider,
                        device_type=conn.device_type, load=p.load,
                        reason=f"placed on {conn.worker_id}")
            self._commit(s)
            conn.outbox.put_nowait(AssignCmd(s.session_id, dataclasses.replace(s.spec, script=script)))
            self.metrics.placements.labels(s.spec.tier.value).inc()
        for sid, why in result.waiting.items():
            s = self.sessions[sid]
            if s.reason != why:
                self._commit(s.moved(s.state, now, reason=why))
        return result

    def _worker_views(self) -> list[placement.WorkerView]:
        loads: dict[str, float] = collections.defaultdict(float)
        for s in self.sessions.values():
            if s.state in (SessionState.PLACED, SessionState.RUNNING):
                loads[s.worker_id] += s.load
        return [placement.WorkerView(w.worker_id, w.profile, self.config.overcommit,
                                     loads[w.worker_id]) for w in self.workers.values()]

    def check_heartbeats(self) -> None:
        deadline = self.clock() - self.config.worker_timeout
        for conn in list(self.workers.values()):
            if conn.last_seen < deadline:
                self._drop_worker(conn, f"no heartbeat for {self.config.worker_timeout:.0f}s")

    async def run(self) -> None:
        """The placement loop: on every kick, and at least once per heartbeat interval."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.heartbeat_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                self.check_heartbeats()
                self.place_pending()
            except Exception:  # the loop must survive a bad pass; the next one retries
                log.exception("placement pass failed")

    # -- internals ----------------------------------------------------------------

    def _account(self, s: Session, progress: Progress) -> None:
        d = usage_delta(s.spec.tier, s.device_type or "unknown", s.progress, progress)
        frames = max(0, progress.frames_rendered - s.progress.frames_rendered)
        late = max(0, progress.late_frames - s.progress.late_frames)
        self.costs.add(d)
        self.metrics.usage(d, frames, late, self.costs)

    def _commit(self, s: Session) -> None:
        self.store.put_session(s)
        prev = self.sessions.get(s.session_id)
        self.sessions[s.session_id] = s
        if prev is None or prev.state is not s.state:
            self._update_gauges()
        for q in self._watchers.get(s.session_id, ()):
            q.put_nowait(s)

    def _update_gauges(self) -> None:
        counts = collections.Counter((s.state, s.spec.tier) for s in self.sessions.values())
        self.metrics.session_counts(counts)
        fleet: dict[str, tuple[int, float, float]] = {}
        views = {v.worker_id: v for v in self._worker_views()}
        for w in self.workers.values():
            n, cap, load = fleet.get(w.device_type, (0, 0.0, 0.0))
            v = views[w.worker_id]
            fleet[w.device_type] = (n + 1, cap + v.capacity, load + v.load)
        self.metrics.fleet(fleet)
