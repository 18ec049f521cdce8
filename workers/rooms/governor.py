"""A worker past what its host can do: fewer frames for the lowest tier, at once.

When the host (event loop, encoders) cannot keep up, every room's frames come late
together, and shedding device work does not help: each frame still costs its producer
and its encoder. What does is fewer frames. Every half second the worker reads its
rooms' frames and late frames; when a tick's late share stays over `late_share` for
`ticks` in a row (and `cooldown` has passed since the last step), it halves the frame
rate of the rooms that give way until the frames saved cover the frames lost: best
effort first, then standard, premium never; within a tier the fastest first (losses
spread), then the newest. After `recover_after` quiet ticks one room steps back up
(the highest tier first, then the oldest), so rates come back as the load allows. A
room's first `settle` seconds are not counted: a room starting (its encoder opening, its
first sentence being voiced, many rooms at once after a placement burst) makes a host
late for a moment that is not overload, and a rate halved for it comes back only slowly.
The scheduler sees the late share in the rooms' progress and moves or degrades rooms for
good (``scheduler.policy.overload``); this acts within a second, before it can.

Pure: `Governor.tick` takes the rooms as values and returns the steps to take.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from avatarfarm.domain import Tier
from workers.rooms.room import InvalidQuality, RoomState

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5
ORDER = {Tier.BEST_EFFORT: 0, Tier.STANDARD: 1}  # who gives way; premium never


@dataclass(frozen=True, slots=True)
class GovernorPolicy:
    late_share: float = 0.02
    ticks: int = 2
    cooldown: float = 2.5  # a step shows its effect after a second or two: no overshoot
    recover_after: int = 6  # quiet ticks before one room steps back up (3 s)
    min_fps: int = 5
    settle: float = 1.0  # seconds from a room's start before its frames are counted


@dataclass(frozen=True, slots=True)
class RoomTick:
    """One room over the last tick."""

    session_id: str
    tier: Tier
    seq: int  # start order
    fps: int  # its rate now
    full_fps: int  # its spec's rate
    frames: int  # emitted in the tick
    late: int  # of which late
    age: float = math.inf  # seconds since the governor first saw it


@dataclass(frozen=True, slots=True)
class Step:
    session_id: str
    fps: int


@dataclass
class Governor:
    policy: GovernorPolicy = field(default_factory=GovernorPolicy)
    over: int = 0
    quiet: int = 0
    acted_at: float = -math.inf

    def tick(self, rooms: Sequence[RoomTick], now: float) -> list[Step]:
        """The frame-rate steps to take after a tick (empty: none)."""
        p = self.policy
        settled = [r for r in rooms if r.age >= p.settle]
        frames = sum(r.frames for r in settled)
        late = sum(r.late for r in settled)
        if frames == 0:
            return []
        if late / frames <= p.late_share:
            self.over, self.quiet = 0, self.quiet + 1
            if self.quiet < p.recover_after:
                return []
            self.quiet = 0
            slowed = [r for r in rooms if r.fps < r.full_fps]
            if not slowed:
                return []
            r = min(slowed, key=lambda r: (r.tier.priority, r.seq))  # highest tier, oldest
            return [Step(r.session_id, min(r.full_fps, r.fps * 2))]
        self.over, self.quiet = self.over + 1, 0
        if self.over < p.ticks or now - self.acted_at < p.cooldown:
            return []
        # Frames lost per second, saved by halving rates: the lowest tier down to the floor
        # before the next tier loses a frame; within a tier the fastest first.
        missing = late / frames * sum(r.fps for r in rooms)
        fps = {r.session_id: r.fps for r in rooms}
        able = [r for r in rooms if r.tier in ORDER]
        while missing > 0:
            left = [r for r in able if fps[r.session_id] > p.min_fps]
            if not left:
                break
            r = min(left, key=lambda r: (ORDER[r.tier], -fps[r.session_id] / r.full_fps, -r.seq))
            new = max(p.min_fps, fps[r.session_id] // 2)
            missing -= fps[r.session_id] - new
            fps[r.session_id] = new
        steps = [Step(r.session_id, fps[r.session_id]) for r in rooms if fps[r.session_id] != r.fps]
        if steps:
            self.acted_at = now
        return steps


class RoomGovernor:
    """Runs a Governor over live rooms: reads their counters each tick, applies its steps
    (``Room.reconfigure`` at the new rate, same size and step)."""

    def __init__(self, policy: GovernorPolicy = GovernorPolicy()) -> None:
        self.governor = Governor(policy)
        self._seen: dict[str, tuple[int, int]] = {}
        self._seq: dict[str, int] = {}
        self._since: dict[str, float] = {}  # when each room was first seen
        # Rooms this governor slowed: the rate it took each from (its ceiling when stepping
        # back up) and the rate it set last. A rate set by anyone else (the scheduler's
        # degradation ladder) is that room's own again: the governor lets go of it.
        self._from: dict[str, int] = {}
        self._set: dict[str, int] = {}
        self.steps_taken = 0

    def tick(self, rooms: Sequence[typing.Any], now: float) -> list[Step]:
        ticks = []
        live = {r.session_id: r for r in rooms}
        for sid, room in live.items():
            frames, late = room.stats.frames_rendered, room.stats.late_frames
            f0, l0 = self._seen.get(sid, (frames, late))
            self._seen[sid] = (frames, late)
            self._seq.setdefault(sid, len(self._seq))
            since = self._since.setdefault(sid, now)
            fps = room.rendering.fps
            if sid in self._set and self._set[sid] != fps:
                del self._set[sid], self._from[sid]  # someone else set its rate since
            ticks.append(RoomTick(sid, room.spec.tier, self._seq[sid], fps,
                                  self._from.get(sid, fps), frames - f0, late - l0, now - since))
        for gone in set(self._seen) - set(live):
            del self._seen[gone], self._since[gone]
            self._from.pop(gone, None)
            self._set.pop(gone, None)
        steps = self.governor.tick(ticks, now)
        if log.isEnabledFor(logging.DEBUG):  # not built every tick for nothing
            log.debug("tick: %d frames, %d late, rates %s; steps %s",
                      sum(t.frames for t in ticks), sum(t.late for t in ticks),
                      sorted(t.fps for t in ticks), [(s.session_id, s.fps) for s in steps])
        for step in steps:
            room = live[step.session_id]
            before = room.rendering.fps
            try:
                room.reconfigure(replace(room.rendering, fps=step.fps), room.degradation_step,
                                 "the worker is over its capacity" if step.fps < before
                                 else "the worker has room again")
            except InvalidQuality as e:
                log.warning("room %s: frame rate step refused: %s", step.session_id, e)
                continue
            self.steps_taken += 1
            self._from.setdefault(step.session_id, before)
            self._set[step.session_id] = step.fps
            if step.fps >= self._from[step.session_id]:  # back where the governor found it
                del self._from[step.session_id], self._set[step.session_id]
        return steps

    async def run(self, rooms: typing.Callable[[], Sequence[typing.Any]],
                  clock: typing.Callable[[], float] = time.monotonic) -> None:
        """Ticks every TICK_SECONDS until cancelled."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self.tick([r for r in rooms() if r.state is RoomState.RUNNING], clock())
