"""When a camera room's driver changes for the tenant to hear about it, and for the
avatar's audit log to record it: who drove the avatar, from when to when.

Workers judge the driver (`workers.camera.liveness`) and report it with the room's
progress; a change between live and not live is told once each way. A driver who has
not published yet is nothing to tell.
"""

from __future__ import annotations

from dataclasses import dataclass

from avatarfarm.domain import Progress
from avatarfarm.live_driver import DriverState


@dataclass(frozen=True, slots=True)
class DriverChange:
    live: bool  # the driver went live (else: stopped being live)
    message: str  # for watchers and the audit log


def driver_change(before: Progress, now: Progress) -> DriverChange | None:
    """What changed about the room's driver between two progress reports (None: nothing
    to tell)."""
    was, state = before.driver_state, now.driver_state
    if state is None or state is was or state is DriverState.WAITING:
        return None
    who = f" ({now.driver})" if now.driver else ""
    if state.live:
        return DriverChange(True, f"{state.describe()}{who}")
    if was is None or was is DriverState.WAITING:
        return None  # never live: nothing stopped
    return DriverChange(False, f"{state.describe()}{who}; driven live for "
                               f"{now.driven_seconds:.1f} s of stream so far")
