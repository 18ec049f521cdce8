"""The scheduler's state as data: sessions, the transitions between them, and
the events watchers see."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from avatarfarm.domain import TRANSITIONS, Progress, Quality, SessionSpec, SessionState


class InvalidTransition(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    spec: SessionSpec
    state: SessionState
    seq: int  # admission order, also the list order
    created_at: float
    updated_at: float
    request_id: str = ""
    reason: str = ""
    worker_id: str = ""
    input_endpoint: str = ""
    progress: Progress = Progress()
    provider: str = ""
    device_type: str = ""
    load: float = 0.0  # device-seconds per second it added to its worker
    units: float = 0.0  # compute units at the quality it renders at
    step: int = 0  # degradation step (0: the spec's quality)
    rendering: Quality | None = None  # None: spec.quality
    guaranteed: bool = False  # premium within its tenant's reservation
    step_changed_at: float = 0.0
    # The current assignment: increases with every placement. Worker reports name it,
    # and outputs are fenced by it, so a worker the room was moved away from can
    # neither bill for it nor write into its output.
    epoch: int = 0
    # What earlier assignments delivered; workers count from zero on each assignment.
    base: Progress = Progress()
    assignments: int = 0  # placements so far (a resumed room's output continues)

    @property
    def quality(self) -> Quality:
        """The quality the room renders at now."""
        return self.rendering or self.spec.quality

    def with_progress(self, progress: Progress, now: float) -> Session:
        """This session with newer progress (the hot path: every room, every second)."""
        return Session(self.session_id, self.spec, self.state, self.seq, self.created_at, now,
                       self.request_id, self.reason, self.worker_id, self.input_endpoint,
                       progress, self.provider, self.device_type, self.load, self.units,
                       self.step, self.rendering, self.guaranteed, self.step_changed_at,
                       self.epoch, self.base, self.assignments)

    def moved(self, state: SessionState, now: float, **changes: object) -> Session:
        """This session in ``state``; raises InvalidTransition if the table forbids it."""
        if state is not self.state and state not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"session {self.session_id}: {self.state.value} -> {state.value}")
        return dataclasses.replace(self, state=state, updated_at=now, **changes)  # type: ignore[arg-type]


def plus(a: Progress, b: Progress) -> Progress:
    """Progress of two stretches of one room's stream, one after the other: counters
    add up; the latest-value sync fields are b's, once b has checked (a stretch that has
    not yet checked keeps a's last offset)."""
    stages = dict(a.stage_seconds)
    for k, v in b.stage_seconds:
        stages[k] = stages.get(k, 0.0) + v
    latest = b if b.sync_checks else a
    driver = b if b.driver_state is not None else a  # the driver as last seen
    return Progress(a.frames_rendered + b.frames_rendered, a.late_frames + b.late_frames,
                    a.stream_seconds + b.stream_seconds, a.device_seconds + b.device_seconds,
                    tuple(sorted(stages.items())),
                    a.script_segments_done + b.script_segments_done,
                    latest.av_offset_seconds, latest.av_correction_seconds,
                    a.sync_checks + b.sync_checks, driver.driver_state,
                    a.driven_seconds + b.driven_seconds, driver.driver,
                    b.voice_unavailable)  # as the current assignment finds its voice


class EventKind(enum.Enum):
    STATE = "state"
    DEGRADED = "degraded"
    RESTORED = "restored"
    PREEMPTED = "preempted"
    BUDGET = "budget"
    QUEUED = "queued"
    LICENCE = "licence"  # the avatar's licence expired or was revoked
    SYNC = "sync"  # lips and voice stayed out of sync, or came back together
    DRIVER = "driver"  # a camera room's driver went live, or stopped being live
    VOICE = "voice"  # a text room's voice failed (the room holds), or speaks again


@dataclass(frozen=True, slots=True)
class SessionEvent:
    session: Session
    kind: EventKind = EventKind.STATE
    message: str = ""
