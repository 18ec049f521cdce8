"""Enforcement while rooms run: a tenant's spend budget running out (degrade, warn
then stop, per its policy) and an avatar's licence ending (rooms end at their next
script boundary)."""

from __future__ import annotations

import logging

from avatarfarm.domain import SessionState
from scheduler.core.drains import Drains
from scheduler.core.machine import carried_out
from scheduler.policy import tenants
from scheduler.policy.licences import Refusal
from scheduler.state.avatars import AuditAction
from scheduler.state.sessions import EventKind, Session
from scheduler.state.table import LIVE
from scheduler.state.worker_conn import ReleaseCmd

log = logging.getLogger(__name__)


class Enforcement(Drains):
    """Budgets and licences enforced on rooms already running."""

    @carried_out
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
                elif action is tenants.BudgetAction.DEGRADE and s.state in LIVE:
                    step, _ = self.ladder.lowest(s.spec.quality)
                    if step > s.step:
                        self._restep(s, step, now, f"{msg}; degraded by the tenant's policy")

    @carried_out
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
                refused = self.avatars.refusal(s.spec, now, require_licence=False)
                if refused is not None:
                    self._end_for_licence(s, *refused, now)
        for sid, (deadline, why) in list(self._licence_ending.items()):
            if now >= deadline:
                self.end(sid, f"{why}; the worker did not end it within "
                              f"{self.config.licence_end_grace:g} s")

    def _end_for_licence(self, s: Session, kind: str, likeness_id: str, refusal: Refusal,
                         now: float) -> None:
        why = refusal.explain(likeness_id, kind)
        self.metrics.licence_endings.labels(refusal.clause).inc()
        self.avatars.audit(AuditAction.LICENCE_ENDED, likeness_id, s.spec.tenant, now,
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
