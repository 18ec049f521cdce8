"""The degradation ladder: how a standard room steps down (render size and/or
frame rate) when capacity is short, and when it may step back up. Pure policy.

A ladder is a list of rungs ``scale@fps`` applied to a room's own quality: rung
``0.75@25`` renders the portrait at 75% of the spec's side and at most 25 fps.
Step 0 is always the spec itself; rungs that change nothing for a room (its fps
is already lower, the side would fall below the minimum) are skipped, so every
step really saves compute. The output keeps the spec's frame size: the worker
scales the smaller portrait up, and players and ingests never re-initialise.

Stepping up is held back by hysteresis: a room goes back up one step only when,
after the step, its worker would still be below the utilisation target minus a
margin, and only after it has stayed at its step for a dwell time, so a noisy
load does not flap a stream between qualities.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from avatarfarm.domain import LIMITS, Quality


@dataclass(frozen=True, slots=True)
class Rung:
    scale: float  # of the spec's render side
    fps: int  # at most

    @classmethod
    def parse(cls, text: str) -> Rung:
        try:
            scale, fps = text.split("@")
            rung = cls(float(scale), int(fps))
        except ValueError as e:
            raise ValueError(f"ladder rung {text!r} must look like 0.75@25 (scale@fps)") from e
        if not 0.1 <= rung.scale <= 1.0 or not LIMITS.min_fps <= rung.fps <= LIMITS.max_fps:
            raise ValueError(f"ladder rung {text!r}: scale must be in 0.1..1, fps in "
                             f"{LIMITS.min_fps}..{LIMITS.max_fps}")
        return rung


def _even(x: float) -> int:
    return max(2, round(x / 2) * 2)


@functools.lru_cache(maxsize=1024)
def _qualities(rungs: tuple[Rung, ...], spec: Quality) -> tuple[tuple[int, Quality], ...]:
    # Asked at every placement of a standard room, for the few qualities tenants use.
    out = [(0, spec)]
    for i, rung in enumerate(rungs, start=1):
        scale = rung.scale
        w, h = _even(spec.width * scale), _even(spec.height * scale)
        if min(w, h) < LIMITS.min_side:
            continue
        q = Quality(w, h, min(spec.fps, rung.fps))
        prev = out[-1][1]
        cheaper = q.render_side ** 2 * q.fps < prev.render_side ** 2 * prev.fps
        if cheaper and q.render_side <= prev.render_side and q.fps <= prev.fps:
            out.append((i, q))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Ladder:
    rungs: tuple[Rung, ...] = ()
    step_up_margin: float = 0.15
    dwell_seconds: float = 30.0

    @classmethod
    def parse(cls, rungs: Sequence[str], step_up_margin: float = 0.15,
              dwell_seconds: float = 30.0) -> Ladder:
        return cls(tuple(Rung.parse(r) for r in rungs), step_up_margin, dwell_seconds)

    def qualities(self, spec: Quality) -> tuple[tuple[int, Quality], ...]:
        """(step, quality) for every step that lowers cost, step 0 = the spec itself."""
        return _qualities(self.rungs, spec)

    def at(self, spec: Quality, step: int) -> Quality:
        """The quality of `step` (the nearest defined step at or below it)."""
        best = spec
        for s, q in self.qualities(spec):
            if s <= step:
                best = q
        return best

    def lowest(self, spec: Quality) -> tuple[int, Quality]:
        return self.qualities(spec)[-1]

    def next_down(self, spec: Quality, step: int) -> tuple[int, Quality] | None:
        for s, q in self.qualities(spec):
            if s > step:
                return s, q
        return None

    def next_up(self, spec: Quality, step: int) -> tuple[int, Quality] | None:
        ups = [(s, q) for s, q in self.qualities(spec) if s < step]
        return ups[-1] if ups else None

    def may_step_up(self, utilisation_after: float, target: float, since_change: float) -> bool:
        """Hysteresis: room left below target minus the margin, and the dwell time passed."""
        return (since_change >= self.dwell_seconds
                and utilisation_after <= target - self.step_up_margin)
