"""A connected worker as the scheduler sees it, and the commands the core sends down
its stream (the gRPC layer turns them into SchedulerMessages)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from avatarfarm.domain import Quality, ScriptSegment, SessionSpec
from avatarfarm.live_driver import DriverPolicy
from scheduler.policy import placement
from scheduler.policy.overload import OverloadWatch
from scheduler.policy.placement import MemoryProfile
from scheduler.policy.platforms import Label


@dataclass(frozen=True, slots=True)
class AssignCmd:
    session_id: str
    spec: SessionSpec  # script: the segments still to speak; duration: what is left
    epoch: int = 1
    continuation: int = 0  # earlier assignments of the room (its output continues)
    resumed_at: float = 0.0  # stream seconds the output already holds
    label: Label | None = None  # burned into the frames, per the platform's policy
    driver: DriverPolicy | None = None  # camera rooms: the platform's rules for their driver
    voice: str = ""  # the avatar's registered voice ("": the worker's default)
    voice_rate: float = 0.0  # words per minute; 0: the voice's own


@dataclass(frozen=True, slots=True)
class ReleaseCmd:
    session_id: str
    reason: str
    # Finish the script segment being spoken, then end (the avatar's licence ended).
    at_script_boundary: bool = False
    # Stop for another worker to continue the output from exactly where this one ends.
    handover: bool = False


@dataclass(frozen=True, slots=True)
class ScriptCmd:
    session_id: str
    segments: tuple[ScriptSegment, ...]


@dataclass(frozen=True, slots=True)
class ReconfigureCmd:
    session_id: str
    quality: Quality
    step: int
    reason: str


@dataclass(frozen=True, slots=True)
class UsageAckCmd:
    seq: int  # every usage report up to seq is durable in the ledger


@dataclass(frozen=True, slots=True)
class PaceCmd:
    interval: float  # seconds between the worker's reports from now on


WorkerCommand = AssignCmd | ReleaseCmd | ScriptCmd | ReconfigureCmd | UsageAckCmd | PaceCmd


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
    driver_ingest: str = ""  # host:port of its RTMP ingest for camera drivers ("": none)
    driver_whip: str = ""  # host:port of its WHIP ingest for camera drivers ("": none)
    outbox: asyncio.Queue[WorkerCommand | None] = field(default_factory=asyncio.Queue)
    last_seen: float = 0.0
    reported_load: float = 0.0
    latency_budget: float = 0.0
    usage_epoch: int = 0
    # Its reported active rooms the scheduler kept (session id, epoch): the worker
    # stops the others without writing more output.
    confirmed: tuple[tuple[str, int], ...] = ()
    # Marked for removal: no new rooms; its rooms are handed over until this time.
    draining_until: float | None = None
    drain_reason: str = ""
    drain_outcome: str = ""  # "completed" or "deadline", once decided
    # Frames its rooms reported, and how many of them late, since the last tick; its
    # late frames over recent ticks; the compute capacity it registered with (what an
    # overload takes down and recovery brings back to).
    frames_since: int = 0
    late_since: int = 0
    overload: OverloadWatch = field(default_factory=OverloadWatch)
    full_capacity: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkerResources:
    """What a worker offers besides its latency profile (from its Register)."""

    cpu_cores: int = 0
    memory_bytes: float = 0.0
    memory: MemoryProfile = MemoryProfile()
    warm_avatars: frozenset[str] = frozenset()
    face_families: frozenset[str] = frozenset()  # video avatars' families it renders; empty: any
    driver_ingest: str = ""  # host:port of its RTMP ingest for camera rooms ("": none)
    driver_whip: str = ""  # host:port of its WHIP ingest for camera rooms ("": none)
    voices: frozenset[str] = frozenset()  # voices it speaks besides espeak-ng's
