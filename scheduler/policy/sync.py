"""When a room's lips and voice are out of sync for the tenant to hear about it.

Workers measure the offset and correct it (workers.media.alignment); a room whose
offset stays out of bounds check after check is one they could not correct (a
broken driver, a model that lags, a clock far off), and its tenant is told, once,
when it starts and when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from avatarfarm.domain import Progress

OUT_OF_BOUNDS_FRAMES = 2  # 80 ms at 25 fps: past what viewers tolerate when video lags
CHECKS = 2  # conclusive checks in a row out of bounds before the tenant is told


@dataclass(frozen=True, slots=True)
class SyncWatch:
    """A room's checks out of bounds in a row so far."""

    out: int = 0

    def after(self, before: Progress, now: Progress, fps: int) -> tuple[SyncWatch, str]:
        """The watch after a progress report, and what to tell the tenant ("" if nothing)."""
        if now.sync_checks <= before.sync_checks:
            return self, ""
        offset = now.av_offset_seconds
        if abs(offset) * fps >= OUT_OF_BOUNDS_FRAMES - 1e-9:
            out = self.out + 1
            if out == CHECKS:
                return SyncWatch(out), (f"lips and voice are {abs(offset) * 1000:.0f} ms apart "
                                        f"({'video behind' if offset > 0 else 'video ahead'}) "
                                        f"over {CHECKS} checks: the worker could not correct it")
            return SyncWatch(out), ""
        if self.out >= CHECKS:
            return SyncWatch(), f"lips and voice back in sync ({offset * 1000:+.0f} ms)"
        return SyncWatch(), ""
