"""What one load-test run found: the ``Report`` the phases fill (figures by name, notes on
what the scheduler does not do yet or what went wrong) and the closing summary that sets
the figures against the goals as a PASS/MISS table.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from loadtests.measure import ms
from loadtests.trace import TIERS

# The goals are stated for 1,000 workers and 10,000 rooms on one scheduler core.
GOAL_PLACEMENTS = 2000.0
GOAL_P99 = 0.005
GOAL_RATE = 500.0  # CreateSession calls per second, open loop, at which p99 is held to GOAL_P99
GOAL_CPU = 0.50


@dataclass
class Report:
    notes: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


def summary(args: argparse.Namespace, rep: Report) -> int:
    v = rep.values
    full = args.workers >= 1000 and args.rooms >= 10000
    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, value: str, goal: str, ok: bool | None) -> None:
        rows.append((name, value, goal, "-" if ok is None else ("PASS" if ok else "MISS")))

    if "burst_rate" in v:
        row("placements per second (burst)", f"{v['burst_rate']:.0f}/s", ">= 2000/s",
            v["burst_rate"] >= GOAL_PLACEMENTS)
    if "batch_rate" in v:
        row(f"placements per second (CreateSessions of {v['batch_size']})", f"{v['batch_rate']:.0f}/s",
            ">= 2000/s", v["batch_rate"] >= GOAL_PLACEMENTS)
    if "rate_p99" in v:
        at_rate = v["rate_achieved"] >= 0.95 * v["rate_target"] and v["rate_skipped"] == 0
        row(f"CreateSession p99 at {v['rate_target']:.0f}/s", f"{ms(v['rate_p99'])} "
            f"(p50 {ms(v['rate_p50'])}, achieved {v['rate_achieved']:.0f}/s)", "< 5 ms at >= 500/s",
            v["rate_p99"] < GOAL_P99 and at_rate and v["rate_target"] >= GOAL_RATE)
    if "peak_cpu" in v:
        row("scheduler CPU at the peak", f"{v['peak_cpu']:.1%} of a core ({v['peak_rooms']} rooms, "
            f"{v['peak_workers']} workers)", "< 50% (10,000 rooms, 1,000 workers)", v["peak_cpu"] < GOAL_CPU)
        row("GPU utilisation at the peak", f"{v['peak_util']:.1%}", "info", None)
        row("rooms pending at the peak", f"{v['peak_pending']}", "info", None)
    if "premium_eligible" in v:
        row("premium guarantees kept", f"{v['premium_kept']}/{v['premium_eligible']}", "all",
            v["premium_kept"] == v["premium_eligible"])
        row("degradations (Reconfigure)", f"{v['degradations']}", "info", None)
    if "cost" in v:
        row("cost per stream-hour", ", ".join(f"{t} {v['cost'].get(t, 0):.3f}" for t in TIERS), "info", None)
    print(f"\n== summary ({args.workers} workers, {args.rooms} rooms"
          f"{'' if full else '; scaled down: goals are stated for 1,000 workers and 10,000 rooms'}) ==")
    w = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    for r in rows:
        print(f"  {r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
    if rep.notes:
        print("notes (what this scheduler does not do yet, or what went wrong):")
        for n in rep.notes:
            print(f"  - {n}")
    return 0
