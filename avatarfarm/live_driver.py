"""A camera room's driver, as the scheduler and the workers speak of it: whether they
are live (`DriverState`, judged on the worker: `workers.camera.liveness`), and what the
platform's rules make the room do about it (`DriverPolicy` -> `DriverAction`).

Platforms that require a live human driver count a room as driven only while a person
drives it in real time; a feed that is frozen, looped or shows no face is not one.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class DriverState(enum.Enum):
    WAITING = "waiting"  # no driver has published yet
    LIVE = "live"
    FROZEN = "frozen"  # the same picture over and over
    LOOPED = "looped"  # a recording played again and again
    NO_FACE = "no_face"
    ABSENT = "absent"  # the driver left (or their stream ended)

    @property
    def live(self) -> bool:
        return self is DriverState.LIVE

    def describe(self) -> str:
        """What a watcher is told of a driver in this state."""
        return _TOLD[self]


_TOLD = {
    DriverState.WAITING: "waiting for the driver to publish",
    DriverState.LIVE: "the driver is live",
    DriverState.FROZEN: "the driver's feed is frozen (the same picture over and over)",
    DriverState.LOOPED: "the driver's feed is a recording played in a loop",
    DriverState.NO_FACE: "no face in the driver's feed",
    DriverState.ABSENT: "the driver left",
}


class DriverAction(enum.Enum):
    DRIVE = "drive"  # the driver's face and voice drive the avatar
    HOLD = "hold"  # the idle loop, in silence
    END = "end"  # the room ends


@dataclass(frozen=True, slots=True)
class DriverPolicy:
    """A camera room's platform's rules for its driver.

    require_live: only a live driver drives the avatar (a frozen, looped or faceless
    feed is held on the idle loop, voice muted). end_when_lost: a room whose driver has
    not been live for ``grace_seconds`` (they left, or their feed is not live where
    that is required) ends; otherwise it holds on the idle loop until they are back. A
    room whose first driver has not come yet waits on the idle loop.
    """

    require_live: bool = False
    end_when_lost: bool = False
    grace_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.grace_seconds) and 0 <= self.grace_seconds <= 3600):
            raise ValueError("a driver's grace period must be 0..3600 seconds")

    def action(self, state: DriverState, lost_for: float) -> DriverAction:
        """What the room does with its driver in ``state``, not live for ``lost_for``
        seconds (of the room's stream) so far."""
        if state is DriverState.WAITING:
            return DriverAction.HOLD
        if not self.lost(state):
            return DriverAction.DRIVE
        if self.end_when_lost and lost_for >= self.grace_seconds:
            return DriverAction.END
        return DriverAction.HOLD

    def lost(self, state: DriverState) -> bool:
        """The room has lost its driver (the grace period runs)."""
        return state is DriverState.ABSENT or (
            self.require_live and not state.live and state is not DriverState.WAITING)
