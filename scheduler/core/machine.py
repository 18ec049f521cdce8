"""The core's state and its state machine: what every part of the core shares.

One asyncio loop owns the sessions (`SessionTable`, written only by `_commit` and
`_progress` here), the connected workers, the fleet's placement state, the
admission queue and the ledger. Every operation records what it decided (worker
commands, watcher events, rows) and `carried_out` hands that to the `Dispatcher`
when the operation returns. Session rows are written in the current event-loop
turn's transaction and committed once per turn before the calls that made them are
answered (group commit). Progress, which arrives every second for every room, is
kept in memory and written with the usage ledger once per tick; a lost tick is
recovered from the workers' next cumulative report.

The layers above add, each in its own module: placement (`placing`), drains,
handovers and lost workers (`drains`), budget and licence enforcement
(`enforcement`), and the API the servicers call with the tick (`scheduler`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Concatenate, ParamSpec, TypeVar

from avatarfarm.avatars import VideoAvatarFace, list_avatars, list_video_avatars, video_avatar_face
from avatarfarm.domain import DriveMode, Progress, Quality, ScriptSegment, SessionState
from avatarfarm.egress import EgressPolicy
from scheduler.config import SchedulerConfig
from scheduler.decisions import Decisions, Dispatcher
from scheduler.errors import NotFound, PermissionDenied
from scheduler.metrics import SchedulerMetrics
from scheduler.policy import pacing, placement, platforms, tenants
from scheduler.policy.admission import FairQueue
from scheduler.policy.cost import CostBook
from scheduler.policy.drivers import driver_change
from scheduler.policy.ladder import Ladder
from scheduler.policy.overload import OverloadPolicy
from scheduler.policy.pacing import ReportPacing
from scheduler.policy.placement import Fleet, RoomReq
from scheduler.policy.sync import SyncWatch
from scheduler.policy.voices import voice_change
from scheduler.state.avatars import AuditAction, AvatarRegistry, VoiceKind
from scheduler.state.commit import GroupCommit
from scheduler.state.metering import Metering
from scheduler.state.sessions import EventKind, Session, SessionEvent, plus
from scheduler.state.snapshot import STUCK_SECONDS, ClusterSnapshot, Waiting, WorkerView
from scheduler.state.store import Store
from scheduler.state.table import SessionTable
from scheduler.state.worker_conn import ReleaseCmd, WorkerConn

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")
_M = TypeVar("_M", bound="SessionMachine")
# What a snapshot holds besides every live session and worker (the status page shows no more).
SNAPSHOT_QUEUE = 200
SNAPSHOT_RECENT_SECONDS = 3600.0
# Assignment epochs per scheduler incarnation (an epoch is incarnation << this | count).
ASSIGNMENT_BITS = 32
# A worker's figures in a snapshot: its rooms' units, compute load and capacity,
# utilisation and unit capacity; and what a snapshot keeps of them for the next one.
_Figures = tuple[float, float, float, float, float]
_NO_FIGURES: _Figures = (0.0, 0.0, 0.0, 0.0, 0.0)
_KeptFigures = tuple[placement.WorkerState, tuple[object, ...], tuple[str, ...], _Figures]


def carried_out(operation: Callable[Concatenate[_M, _P], _R]) -> Callable[Concatenate[_M, _P], _R]:
    """Marks an operation of the core: what it decided is carried out when it returns
    (or raises), in one place (`Dispatcher.apply`). Operations may call each other:
    what the inner ones decide is carried out with the outermost's (`batch` makes one
    of many calls)."""

    @functools.wraps(operation)
    def run(self: _M, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.batch():
            return operation(self, *args, **kwargs)

    return run


def tenants_error(name: str) -> Exception:
    return PermissionDenied(f"tenant {name!r} is not configured on this scheduler")


class SessionMachine:
    """The state every layer shares and the only writer of the session table (`_commit`,
    `_progress`)."""

    def __init__(self, store: Store, config: SchedulerConfig,
                 metrics: SchedulerMetrics | None = None,
                 clock: Callable[[], float] = time.time, *, incarnation: int = 0) -> None:
        """`incarnation`: a number the store raises each time a scheduler takes it over
        (the lead's epoch); assignment epochs are numbered within it."""
        self.store = store
        self.config = config
        self.metrics = metrics or SchedulerMetrics(
            tenants=tuple(config.tenants) if config.tenant_metrics else ())
        self.clock = clock
        # Policies, configured once.
        self.egress = EgressPolicy.from_config(config.rtmp_allowed_hosts, config.rtmp_forbidden_hosts,
                                               config.rtmp_allowed_ports)
        self.ladder = Ladder.parse(config.degradation_ladder, config.step_up_margin,
                                   config.step_dwell)
        self.overload_policy = OverloadPolicy()
        self.pacing = ReportPacing.of(config.heartbeat_interval, config.worker_reports_per_second,
                                      config.worker_timeout)
        self.report_interval = config.heartbeat_interval  # what workers were last told
        # What the core knows: sessions, workers and their placement state, the queue,
        # usage. Readers off the core use `latest` (taken by the last tick) instead.
        self.sessions = SessionTable()
        self.workers: dict[str, WorkerConn] = {}
        self.fleet = Fleet(config.utilisation_target, premium_spread=config.premium_spread)
        self.queue = FairQueue()
        self.metering = Metering(config.price, self.metrics, config.tenants)
        self.ledger = self.metering.ledger
        self.latest: ClusterSnapshot | None = None
        self._worker_figures: dict[str, _KeptFigures] = {}  # what the last snapshot derived
        # Carrying decisions out: what the operation under way decided, the one place
        # that carries it out when the operation returns, and the store's group commit.
        self._watchers: dict[str, set[asyncio.Queue[SessionEvent]]] = collections.defaultdict(set)
        self.commits = GroupCommit(store)
        self._decided = Decisions()
        self._depth = 0  # operations under way (`carried_out`)
        self.dispatcher = Dispatcher(store, self.commits, self.workers, self._watchers)
        self._progress_dirty: dict[str, Session] = {}  # progress not written yet
        self._next_usage_flush = 0.0
        self._flush_part = 0  # the part of the workers the next flush writes
        # The placement loop: woken by `kick`; shapes that found no worker since capacity
        # last changed (`_epoch`) wait at no cost; why a shape waits, said once a second.
        self._wake = asyncio.Event()
        self._capacity_changed = True
        self._epoch = 0
        self._nofit: dict[tuple[object, ...], tuple[int, str]] = {}
        self._why_cache: dict[tuple[object, ...], tuple[float, str]] = {}
        self._pending_since: dict[str, float] = {}
        # Compute units are measured on the most common device type.
        self._unit_profile: placement.WorkerProfile | None = None
        self._unit_device = ""
        # Whether the unit device encodes (a CPU worker) or its host does (a GPU without
        # NVENC): units count device time the way workers' capacity in units does.
        self._unit_encodes = True
        self._units_cache: dict[tuple[Quality, str], float] = {}
        # Avatars: the image folder (looked at once a second) and what workers hold.
        # (when read, avatars in avatar_dir, the video avatars among them)
        self._avatars: tuple[float, frozenset[str], frozenset[str]] = (-1.0, frozenset(), frozenset())
        # Video avatars' face models, read from their bundles when first placed; forgotten
        # when the folder's video avatars change or one is registered.
        self._face_models: dict[str, VideoAvatarFace] = {}
        self._worker_avatars: collections.Counter[str] = collections.Counter()
        # Voices workers have named since start (neural, or a TTS service's): a text room
        # whose avatar speaks one is placed only where it is spoken, and waits while no
        # such worker is connected; any other voice is espeak-ng's, which all speak.
        self.fleet_voices: frozenset[str] = frozenset()
        self._sync_watch: dict[str, SyncWatch] = {}  # live rooms' lip-sync checks out of bounds
        self._scripts: dict[str, list[ScriptSegment]] = {}  # live text rooms' scripts
        self._exhausted: dict[str, float] = {}  # tenant -> when its spend budget ran out
        self._started_at = clock()
        self._stopping = False
        self._orphans: set[str] = set()  # rooms whose worker has not come back since a restart
        self._seq = 0
        # Assignment epochs come from one counter, so they increase per room and across
        # rooms: an output reused by a later session is claimed by a higher epoch than
        # any earlier writer's fence. Commands reach workers before their turn's commit,
        # so a scheduler that dies between the two leaves assignments the store never saw:
        # each incarnation numbers its own above every earlier one's, so none is issued
        # twice (to two workers sharing an output's fence, or as a different run under
        # the number a worker already runs).
        self._last_assignment = incarnation << ASSIGNMENT_BITS
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
        self.sessions.order_ended()
        self.metrics.session_counts(self.sessions.counts)

    async def durable(self) -> None:
        """Returns once everything changed so far is committed to the store."""
        await self.commits.durable()

    def _avatar_folder(self) -> tuple[frozenset[str], frozenset[str]]:
        at, names, videos = self._avatars
        now = self.clock()
        if now - at > 1.0 or at < 0:
            names = frozenset(list_avatars(self.config.avatar_dir))
            fresh = frozenset(list_video_avatars(self.config.avatar_dir))
            if fresh != videos:
                self._face_models.clear()
            self._avatars = (now, names, fresh)
            videos = fresh
        return names, videos

    def known_avatars(self) -> frozenset[str]:
        return self._avatar_folder()[0] | self._worker_avatars.keys()

    def video_avatars(self) -> frozenset[str]:
        """Avatars prepared from a video (a face family renders them)."""
        return self._avatar_folder()[1]

    def face_model(self, avatar_id: str) -> VideoAvatarFace:
        """The face model a video avatar's rooms need ("" for a portrait), the bytes of the
        avatar's own model (0 where its family's models are shared), and the family a
        worker must render for it."""
        if avatar_id not in self.video_avatars():
            return VideoAvatarFace("", 0, "")
        found = self._face_models.get(avatar_id)
        if found is None:
            found = self._face_models[avatar_id] = video_avatar_face(self.config.avatar_dir, avatar_id)
        return found

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
            measured = self._unit_profile.units(quality, mode, self._unit_encodes) \
                if self._unit_profile else None
            units = measured if measured is not None else placement.nominal_units(quality, mode)
            self._units_cache[key] = units
        return units

    def spent(self, tenant: str, now: float) -> float:
        return self.metering.spent(tenant, now)

    def get(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise NotFound(f"session {session_id!r} not found")
        return s

    @carried_out
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

    def _audit_room(self, action: AuditAction, s: Session, now: float, detail: str = "") -> None:
        """In the avatar's log, and in its registered voice's where the room speaks with it."""
        refusal, clause = self.avatars.admit(s.spec, now, require_licence=False)
        self.avatars.audit(action, s.spec.avatar_id, s.spec.tenant, now, session_id=s.session_id,
                           room_id=s.spec.room_id, platform=s.spec.platform,
                           worker_id=s.worker_id,
                           clause=refusal.clause if refusal is not None else clause, detail=detail)
        voice, refusal, clause = self.avatars.admit_voice(s.spec, now)
        if voice is not None:
            self.avatars.audit(action, voice.voice_id, s.spec.tenant, now, session_id=s.session_id,
                               room_id=s.spec.room_id, platform=s.spec.platform,
                               worker_id=s.worker_id,
                               clause=refusal.clause if refusal is not None else clause,
                               detail=f"{detail}; avatar {s.spec.avatar_id}".lstrip("; "))

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
                ws = self.fleet.workers.get(w.worker_id)
                self._unit_encodes = ws.encode_on_device if ws is not None else True
                self._units_cache.clear()
                return

    def worker_seen(self, conn: WorkerConn, load: float | None = None) -> None:
        conn.last_seen = self.clock()
        if load is not None:
            conn.reported_load = load

    def drained(self, worker_id: str) -> bool:
        """No room is left on the worker (a room being handed over counts until its old
        assignment has stopped). An unknown (gone) worker is drained."""
        return worker_id not in self.workers or not self._rooms_on(worker_id)

    def _rooms_on(self, worker_id: str, handed: Sequence[str] | None = None) -> list[str]:
        """The rooms placed on the worker, and those it still renders while they are
        handed over (their place is already held on the worker taking them; `handed`:
        those rooms, where the caller has them already)."""
        w = self.fleet.workers.get(worker_id)
        placed = list(w.rooms) if w is not None else []
        if handed is None:
            handed = [sid for sid, (old, _) in self._handovers.items() if old == worker_id]
        return placed + [sid for sid in handed if sid not in placed]

    def waiting(self) -> Waiting:
        """The rooms waiting for a worker: how many, their compute units, and how many are
        guaranteed by a reservation (a breach of the guarantee while they wait)."""
        units, guaranteed, n, stuck = 0.0, 0, 0, 0.0
        now = self.clock()
        for sid in self.queue.waiting():
            s = self.sessions.get(sid)
            if s is not None and s.state is SessionState.PENDING:
                n += 1
                units += s.units
                guaranteed += s.guaranteed
                if now - self._pending_since.get(sid, now) >= STUCK_SECONDS:
                    stuck += s.units
        return Waiting(n, units, guaranteed, stuck)

    def kick(self) -> None:
        """Something may have freed capacity: the loop runs a pass over the queue."""
        self._capacity_changed = True
        self._epoch += 1
        self._wake.set()

    def _req(self, s: Session) -> RoomReq:
        return RoomReq(s.session_id, s.spec.tenant, s.spec.avatar_id, s.quality,
                       s.spec.drive_mode, s.spec.tier, s.seq,
                       (s.spec.quality.width, s.spec.quality.height), s.step,
                       s.spec.avatar_id in self.video_avatars(), *self.face_model(s.spec.avatar_id),
                       *self._fleet_voice(s))

    def _fleet_voice(self, s: Session) -> tuple[str, bool]:
        """The room's neural voice as placement needs it, and whether every worker loads
        it (a Piper voice registered in the avatar folder); ("", False): espeak-ng's or a
        registered service voice's, which any worker speaks."""
        if not s.spec.drive_mode.uses_tts:
            return "", False
        registered = self.avatars.voice_of(s.spec.avatar_id)
        if registered is not None:
            return (registered.voice_id, True) if registered.kind is VoiceKind.PIPER else ("", False)
        a = self.avatars.get(s.spec.avatar_id)
        voice = a.voice.voice if a is not None else ""
        return (voice, False) if voice in self.fleet_voices else ("", False)

    def _enqueue(self, s: Session) -> None:
        self._pending_since.setdefault(s.session_id, self.clock())
        t = self.config.tenants.get(s.spec.tenant, tenants.UNLIMITED)
        self.queue.push(s.session_id, s.spec.tenant, s.spec.tier, s.units, t.weight, s.guaranteed)

    def _unit_load(self) -> float:
        p = self._unit_profile
        load = p.room_load(placement.UNIT_QUALITY, placement.UNIT_MODE, self._unit_encodes) if p else None
        return load or 1.0

    def snapshot(self, *, queue_limit: int = SNAPSHOT_QUEUE,
                 recent_seconds: float = SNAPSHOT_RECENT_SECONDS) -> ClusterSnapshot:
        """The cluster as of now, for readers off the core (`latest` holds the one the
        last tick took). Every tick takes one while no call is answered, so it copies what
        the indexes hold, sorts nothing, and derives a worker's figures again only where
        its rooms changed."""
        now = self.clock()
        since = now - recent_seconds
        groups: dict[SessionState, tuple[Session, ...]] = {}
        for state, in_state in self.sessions.by_state.items():
            if not state.terminal:
                group = tuple(in_state.values())
            else:  # newest first, back to the first that ended before `since`
                group = tuple(itertools.takewhile(lambda s: s.updated_at >= since,
                                                  reversed(in_state.values())))
            if group:
                groups[state] = group
        # Rooms still rendered by the worker they are being handed over from.
        handing: dict[str, list[str]] = collections.defaultdict(list)
        for sid, (old, _) in self._handovers.items():
            handing[old].append(sid)
        workers: dict[str, WorkerView] = {}
        kept, self._worker_figures = self._worker_figures, {}
        for wid in sorted(self.workers):
            conn, ws = self.workers[wid], self.fleet.workers.get(wid)
            rooms, figures = self._figures(ws, tuple(handing.get(wid, ())), kept.get(wid)) \
                if ws is not None else ((), _NO_FIGURES)
            workers[wid] = WorkerView(
                wid, conn.device_type, conn.provider, conn.last_seen,
                ws is not None and ws.accepting, conn.draining_until, conn.drain_reason, rooms,
                *figures)
        book = self.metering.costs
        costs = CostBook(book.price, dict(book.stream_seconds), dict(book.device_seconds))
        return ClusterSnapshot(now, groups, recent_seconds,
                               workers, tuple(self.queue.ordered(queue_limit)),
                               len(self.queue), self.waiting(), self.fleet.totals(), costs)

    def _figures(self, ws: placement.WorkerState, handed: tuple[str, ...],
                 kept: _KeptFigures | None) -> tuple[tuple[str, ...], _Figures]:
        """A worker's rooms (those handed over from it included) and its figures for a
        snapshot: what the last snapshot derived, if nothing they depend on changed since
        (most workers, most ticks), else derived again and kept for the next."""
        # The rooms' units change only with an add or remove on their worker, except those
        # of rooms handed over from it: theirs are part of the key.
        key = (ws.changes, ws.compute_capacity, self.fleet.target, handed,
               tuple(map(self.sessions.unit_of.get, handed)))
        if kept is not None and kept[0] is ws and kept[1] == key:
            self._worker_figures[ws.worker_id] = kept
            return kept[2], kept[3]
        rooms = tuple(self._rooms_on(ws.worker_id, handed))
        figures = (sum(map(self.sessions.unit_of.get, rooms, itertools.repeat(0.0))),
                   ws.compute_load, ws.compute_capacity, ws.utilisation(),
                   ws.unit_capacity(self.fleet.target))
        self._worker_figures[ws.worker_id] = (ws, key, rooms, figures)
        return rooms, figures

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
        voice = self.avatars.voice_of(s.spec.avatar_id) if s.spec.drive_mode.uses_tts else None
        self.ledger.open(s.session_id, tenant=s.spec.tenant, avatar_id=s.spec.avatar_id,
                         platform=s.spec.platform, voice=voice.voice_id if voice else "",
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
        conn = self.workers.get(s.worker_id)
        if conn is not None:  # the worker's late share, for scheduler.policy.overload
            conn.frames_since += max(0, total.frames_rendered - s.progress.frames_rendered)
            conn.late_since += max(0, total.late_frames - s.progress.late_frames)
        watch, told = self._sync_watch.get(s.session_id, SyncWatch()).after(
            s.progress, total, s.quality.fps)
        self._sync_watch[s.session_id] = watch
        driver = driver_change(s.progress, total)
        voice = voice_change(s.progress, total)
        s = s.with_progress(total, now)
        if driver is not None:  # who drove the avatar, from when to when
            log.info("session %s: %s", s.session_id, driver.message)
            self._audit_room(AuditAction.DRIVER_LIVE if driver.live else AuditAction.DRIVER_NOT_LIVE,
                             s, now, driver.message)
        if told or driver is not None or voice is not None:
            if told:
                log.info("session %s: %s", s.session_id, told)
                self._commit(s, EventKind.SYNC, told)
            if driver is not None:
                self._commit(s, EventKind.DRIVER, driver.message)
            if voice is not None:
                log.info("session %s: %s", s.session_id, voice)
                self._commit(s, EventKind.VOICE, voice)
            return s
        self.sessions.progressed(s)
        self._progress_dirty[s.session_id] = s
        if notify and s.session_id in self._watchers:
            self._notify(SessionEvent(s))
        return s

    @carried_out
    def flush_progress(self, part: int = 0, parts: int = 1) -> None:
        """Progress and the usage ledger not written yet, in one transaction; workers are
        acknowledged their reports once it is on disk. With `parts`, only the workers of
        that part (`pacing.flush_part`) and their rooms."""
        if parts <= 1:
            rooms = list(self._progress_dirty.values())
            self._progress_dirty.clear()
            taken = self.ledger.take_dirty()
        else:
            def ours(worker_id: str) -> bool:
                return pacing.flush_part(worker_id, parts) == part

            rooms = [s for s in self._progress_dirty.values() if ours(s.worker_id)]
            for s in rooms:
                del self._progress_dirty[s.session_id]
            taken = self.ledger.take_dirty(ours)
        for s in rooms:
            self._decided.store(s)
        self._decided.usage(*taken)
        self._decided.commit = True

    def _commit(self, s: Session, kind: EventKind = EventKind.STATE, message: str = "") -> None:
        self._decided.store(s)
        self._progress_dirty.pop(s.session_id, None)
        prev = self.sessions.put(s)
        if s.state.terminal:
            self._pending_since.pop(s.session_id, None)
            self._handovers.pop(s.session_id, None)
            self._sync_watch.pop(s.session_id, None)
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

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Operations in the block are carried out together when it ends (one row write,
        one commit and one pass over the workers' streams for a batch of rooms)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                self._carry_out()

    def _carry_out(self) -> None:
        out = self._decided.take()
        if out:
            self.dispatcher.apply(out)
