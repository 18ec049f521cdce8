"""A circuit breaker for a service the worker calls (a TTS service): pure, time passed in.

After ``failures_to_open`` failures in a row the circuit opens and calls fail at once,
without reaching the service, for ``open_seconds``; then one call is let through as a
probe (half-open): its success closes the circuit, its failure opens it again. A
service that is down thus costs each room nothing but the wait for the probe, and is
not hammered by every room's retries while it recovers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BreakerState(enum.Enum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls fail at once
    HALF_OPEN = "half_open"  # one probe is out


@dataclass(slots=True)
class CircuitBreaker:
    failures_to_open: int = 3
    open_seconds: float = 5.0
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0  # in a row
    opened_at: float = 0.0

    def allow(self, now: float) -> bool:
        """Whether a call may go to the service now (a True in OPEN past its time makes
        this call the probe)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.open_seconds:
            self.state = BreakerState.HALF_OPEN
            return True
        return False

    def retry_in(self, now: float) -> float:
        """Seconds until a call would be let through (0: now)."""
        if self.state is BreakerState.OPEN:
            return max(0.0, self.opened_at + self.open_seconds - now)
        return 0.0

    def succeeded(self) -> None:
        self.state, self.failures = BreakerState.CLOSED, 0

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.failures_to_open:
            self.state, self.opened_at = BreakerState.OPEN, now
