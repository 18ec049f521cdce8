"""The cluster as of one moment: one read model for everything that watches the
scheduler (the status page, the autoscaler, metrics), built by the core on its loop
once per tick (`Scheduler.tick`) or on request (`Scheduler.snapshot`), and never
changed afterwards, so readers on other threads need no lock and never see the
core's working structures (Kueue's snapshot)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from avatarfarm.domain import SessionState
from scheduler.policy.cost import CostBook
from scheduler.state.sessions import Session


@dataclass(frozen=True, slots=True)
class Waiting:
    count: int
    units: float
    guaranteed: int  # rooms guaranteed by a reservation: a breach while they wait
    # Of the units, those of rooms waiting longer than STUCK_SECONDS: placement passes
    # ran and no worker had room for them (spare capacity spread thin fits no room).
    stuck_units: float = 0.0


STUCK_SECONDS = 1.0  # a pass over the queue runs on every change and every second


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    device_type: str
    provider: str
    last_seen: float
    accepting: bool  # takes new rooms (connected, measured, not draining)
    draining_until: float | None
    drain_reason: str
    rooms: tuple[str, ...]  # sessions placed on it, a room being handed over included
    room_units: float  # compute units of those rooms
    compute_load: float
    compute_capacity: float
    utilisation: float  # the highest of compute, host CPU and memory
    unit_capacity: float  # units it carries at the fleet's utilisation target (0: unmeasured)

    @property
    def draining(self) -> bool:
        return self.draining_until is not None


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    at: float
    # Sessions by state: every live one, in the order they entered their state, and the
    # terminal ones that changed within `recent_seconds` of `at`, newest first. (A reader
    # that lists them in admission order sorts them by `seq`: a tick does not.)
    by_state: Mapping[SessionState, tuple[Session, ...]]
    recent_seconds: float
    workers: Mapping[str, WorkerView]  # in order of id
    queue: tuple[str, ...]  # the first waiting sessions in the order they would be served
    queue_length: int
    waiting: Waiting
    fleet: Mapping[str, tuple[int, float, float]]  # device type -> workers, capacity, load
    costs: CostBook  # a copy: stream and device time by tier and device type, priced

    def sessions(self, state: SessionState) -> tuple[Session, ...]:
        return self.by_state.get(state, ())

    def drained(self, worker_id: str) -> bool:
        """No room is left on the worker; a worker that is gone is drained."""
        w = self.workers.get(worker_id)
        return w is None or not w.rooms
