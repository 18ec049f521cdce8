"""Placing rooms: a pass over the fair queue on every event that could let a waiting
room move and on each tick, reclaiming capacity for rooms guaranteed by a
reservation when none is free, stepping degraded rooms back up when their
worker has room, and relieving a worker that reports it cannot keep up
(`scheduler.policy.overload`). Where a room goes is decided by the pure policy in
`scheduler.policy.placement`; this layer carries the choice into the session table
and the worker's commands."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from avatarfarm.domain import DriveMode, Quality, SessionState, Tier
from scheduler.core.machine import SessionMachine, carried_out
from scheduler.policy import overload, placement, tenants
from scheduler.policy.placement import ActionKind, RoomReq, WorkerState
from scheduler.state.avatars import AuditAction, VoiceSettings
from scheduler.state.sessions import EventKind, Session
from scheduler.state.table import LIVE
from scheduler.state.worker_conn import AssignCmd, ReconfigureCmd, ReleaseCmd, WorkerConn

log = logging.getLogger(__name__)


class Placement(SessionMachine):
    """Where waiting rooms go, and which rooms make room for a guaranteed one."""

    def _rungs(self, room: RoomReq) -> Sequence[tuple[int, Quality]]:
        s = self.sessions[room.session_id]
        if s.spec.tier is Tier.STANDARD:
            return self.ladder.qualities(s.spec.quality)
        return ((0, s.spec.quality),)

    def _lowest(self, room: RoomReq) -> RoomReq | None:
        s = self.sessions[room.session_id]
        step, q = self.ladder.lowest(s.spec.quality)
        if step <= room.step:
            return None
        return dataclasses.replace(room, quality=q, step=step)

    @carried_out
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
        # Rooms of one shape fit or not alike: a video avatar's face (its model and the
        # family a worker must render) and a voice only some workers speak are part of it.
        shape = (s.spec.quality, s.step, s.spec.drive_mode, s.spec.tier, s.guaranteed,
                 s.spec.avatar_id if s.guaranteed else "", self.face_model(s.spec.avatar_id),
                 self._fleet_voice(s))
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
        unused = tenants.unused_reservations(self.config.tenants, self.sessions.reserved,
                                             self.clock()) * unit
        if unused <= 0:
            return True
        return tenants.may_take_protected(units_needed=compute, free=self.fleet.free_total,
                                          preemptible=self.sessions.preemptible,
                                          unused_reservations=unused)

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
        platform = self.platform(s.spec.platform)
        registered = self.avatars.get(s.spec.avatar_id)
        voice = registered.voice if registered is not None else VoiceSettings()
        self._decided.send(conn.worker_id, AssignCmd(
            s.session_id, spec, s.epoch, continuation, base.stream_seconds, platform.label_for(),
            platform.driver_policy() if s.spec.drive_mode is DriveMode.CAMERA else None,
            voice.voice, voice.rate))
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

    @carried_out
    def relieve_overloads(self) -> int:
        """Each worker's late share since the last tick (from its rooms' progress): one
        that stays over the policy's share has its capacity taken down to what it
        delivers and one room stepped down; one that has been quiet gets capacity back.
        A worker whose report interval is longer than a tick is judged on the ticks its
        reports arrived in. Returns the rooms stepped down."""
        policy, now, stepped = self.overload_policy, self.clock(), 0
        for conn in list(self.workers.values()):
            frames, late = conn.frames_since, conn.late_since
            conn.frames_since = conn.late_since = 0
            w = self.fleet.workers.get(conn.worker_id)
            if w is None or frames == 0:
                continue
            if not conn.full_capacity:
                conn.full_capacity = w.compute_capacity
            late_share = late / frames
            conn.overload, act = conn.overload.after(late_share, now, policy)
            if conn.overload.quiet >= policy.recover_after and w.compute_capacity < conn.full_capacity:
                self.fleet.set_capacity(conn.worker_id, overload.recovered_capacity(
                    w.compute_capacity, conn.full_capacity, policy))
            if act:
                stepped += self._relieve(conn, w, late_share, now)
        return stepped

    def _relieve(self, conn: WorkerConn, w: WorkerState, late_share: float, now: float) -> int:
        self.fleet.set_capacity(conn.worker_id, overload.delivered_capacity(
            w.compute_capacity, w.compute_load, late_share, self.fleet.target))
        rooms = []
        for rid in w.rooms:
            r = self.sessions.get(rid)
            if r is not None and r.state in LIVE:
                rooms.append(overload.RoomOnWorker(
                    rid, r.spec.tier, r.step, self.ladder.next_down(r.spec.quality, r.step) is not None,
                    r.seq))
        chosen = overload.room_to_step_down(rooms)
        why = f"worker {conn.worker_id} is over capacity ({late_share:.1%} of its frames late)"
        if chosen is None:
            log.warning("%s and has no room left to step down", why)
            return 0
        s = self.sessions[chosen]
        down = self.ladder.next_down(s.spec.quality, s.step)
        assert down is not None
        log.info("%s: stepping down room %s", why, chosen)
        self._restep(s, down[0], now, why)
        return 1

    @carried_out
    def step_up(self) -> int:
        """Degraded rooms go back up one step where their worker has room to spare (with
        hysteresis), unless rooms are waiting for capacity."""
        if len(self.queue):
            return 0
        now = self.clock()
        raised = 0
        for sid in sorted(self.sessions.degraded):
            s = self.sessions[sid]
            if s.state not in LIVE or s.spec.tenant in self._exhausted:
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
