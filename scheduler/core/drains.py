"""Workers leaving: drained for removal (their rooms handed over without leaving the
air), lost (no heartbeat, stream gone: their rooms placed again), or not back
within the grace period after a scheduler restart."""

from __future__ import annotations

import collections
import dataclasses
import logging

from avatarfarm.domain import OutputKind, Progress, SessionState
from scheduler.core.machine import carried_out
from scheduler.core.placing import Placement
from scheduler.state.sessions import Session
from scheduler.state.table import LIVE
from scheduler.state.worker_conn import ReleaseCmd, WorkerConn

log = logging.getLogger(__name__)


class Drains(Placement):
    """Rooms leaving workers that leave: handed over, or placed again."""

    @carried_out
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

    @carried_out
    def advance_drains(self) -> None:
        """Hands rooms over from draining workers where capacity allows; counts a drain
        completed or past its deadline once."""
        now = self.clock()
        for conn in [c for c in self.workers.values() if c.draining_until is not None]:
            for sid in self._rooms_on(conn.worker_id):
                s = self.sessions.get(sid)
                if s is not None and s.state in LIVE and sid not in self._licence_ending \
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
        req = self._req(s)
        choice = self.fleet.choose(req, self._rungs)
        if choice is None:
            return  # waits for capacity (the autoscaler is adding it) or the deadline
        why = f"worker {old.worker_id} is draining ({old.drain_reason})"
        if s.state is SessionState.RUNNING:
            self._handovers[s.session_id] = (old.worker_id, s.epoch)
            # The room's place on the worker that will take it is held until the old side
            # has stopped: other rooms handed over meanwhile (a drain hands over all of a
            # worker's rooms at once) must not count on the same capacity.
            self.fleet.assign(dataclasses.replace(req, quality=choice.quality, step=choice.step),
                              choice.worker_id)
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

    @carried_out
    def check_heartbeats(self) -> None:
        deadline = self.clock() - self.config.worker_timeout
        for conn in list(self.workers.values()):
            if conn.last_seen < deadline:
                self._drop_worker(conn, f"no heartbeat for {self.config.worker_timeout:.0f}s")

    @carried_out
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
