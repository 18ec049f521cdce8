"""How often workers report to the scheduler, chosen by the scheduler for its fleet.

Every worker sends one message per interval (its usage report, or a heartbeat when it
renders nothing), and at a large fleet receiving them is most of the scheduler's work:
1,000 workers at one a second are 1,000 messages, each with every room's progress. The
interval therefore grows with the fleet, so that the reports stay within a rate the
scheduler can take (progress is cumulative: fewer reports lose no usage, they only
make it later), and never past a third of the worker timeout, so a live worker is
always heard several times before it would be taken for lost. It changes in steps and
shortens only once the fleet has clearly shrunk, so that a fleet at a boundary does not
send every worker a new interval each tick.

The scheduler writes what the reports carried (progress, usage) in parts as well: each
tick writes one part of the workers' (`flush_part`), so every worker's is on disk once
per flush interval and acknowledged then, and no tick writes and acknowledges the whole
fleet's at once (at 1,000 workers, a flush of everything held calls for 100-200 ms)."""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

STEP = 0.5  # seconds: intervals are multiples of this above the base


@dataclass(frozen=True, slots=True)
class ReportPacing:
    base: float = 1.0  # the interval of a small fleet (the configured heartbeat interval)
    reports_per_second: float = 500.0  # what the scheduler aims to receive at most
    ceiling: float = 5.0  # never longer (a third of the worker timeout)
    shrink_margin: float = 0.9  # shorten once the fleet fits the shorter step with this to spare

    def __post_init__(self) -> None:
        if not (self.base > 0 and self.reports_per_second > 0 and self.ceiling > 0):
            raise ValueError("report pacing needs a positive base, rate and ceiling")

    @classmethod
    def of(cls, heartbeat_interval: float, reports_per_second: float,
           worker_timeout: float) -> ReportPacing:
        return cls(heartbeat_interval, reports_per_second,
                   max(heartbeat_interval, worker_timeout / 3.0))

    def interval(self, workers: int, current: float) -> float:
        """The interval for `workers` workers, now reporting every `current` seconds."""
        need = workers / self.reports_per_second
        steps = math.ceil(max(0.0, need - self.base) / STEP - 1e-9)
        target = min(self.base + steps * STEP, max(self.ceiling, self.base))
        if target < current and need > (current - STEP) * self.shrink_margin:
            return current  # not clearly smaller yet
        return target


def flush_parts(flush_interval: float, tick_interval: float) -> int:
    """Into how many parts the workers' progress and usage are written: one a tick."""
    return max(1, round(flush_interval / tick_interval))


@functools.lru_cache(maxsize=16384)
def flush_part(worker_id: str, parts: int) -> int:
    """Which of `parts` flushes writes the progress and usage a worker reported (the same
    one every time; rooms on no worker go with worker id "")."""
    return zlib.crc32(worker_id.encode()) % parts if parts > 1 else 0
