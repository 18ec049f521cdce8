"""Per-tenant rate limits on session calls: a token bucket per tenant. Pure policy
with an injected clock; the gRPC edge (scheduler.api.gate) asks before each call and
answers RESOURCE_EXHAUSTED with the limit and when to retry.

A bucket holds up to `burst` calls and refills at `per_second`; it starts full, so a
tenant that was quiet may make `burst` calls at once, and over any stretch of t
seconds no more than ``burst + per_second * t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# Refill arithmetic in floating point: a retry at exactly the advised moment must pass.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Rate:
    per_second: float  # 0: unlimited
    burst: float

    def __post_init__(self) -> None:
        if self.per_second < 0:
            raise ValueError("a rate limit must not be negative (0: unlimited)")
        if self.per_second > 0 and self.burst < 1:
            raise ValueError("a rate limit's burst must be at least 1 call")

    @property
    def unlimited(self) -> bool:
        return self.per_second == 0

    def __str__(self) -> str:
        return f"{self.per_second:g} calls/s (bursts of {self.burst:g})"


UNLIMITED = Rate(0.0, 0.0)


@dataclass(frozen=True, slots=True)
class Bucket:
    tokens: float
    at: float

    @staticmethod
    def full(rate: Rate, now: float) -> Bucket:
        return Bucket(rate.burst, now)


def take(rate: Rate, bucket: Bucket, now: float, calls: int = 1) -> tuple[Bucket, float]:
    """`calls` calls (a batch counts each of its items) against `bucket` at `now`: the
    bucket after them, and 0 if they are admitted or else the seconds until they would
    be (infinite for more than the burst: they never are)."""
    tokens = min(rate.burst, bucket.tokens + max(0.0, now - bucket.at) * rate.per_second)
    at = max(now, bucket.at)
    if tokens >= calls - _EPSILON:
        return Bucket(tokens - calls, at), 0.0
    if calls > rate.burst + _EPSILON:
        return Bucket(tokens, at), math.inf
    return Bucket(tokens, at), (calls - tokens) / rate.per_second


@dataclass(frozen=True, slots=True)
class Throttled:
    tenant: str
    rate: Rate
    retry_after: float
    calls: int = 1

    @property
    def message(self) -> str:
        if math.isinf(self.retry_after):
            return (f"a batch of {self.calls} is more than tenant {self.tenant!r}'s rate limit "
                    f"of {self.rate} admits at once; send it in batches of at most "
                    f"{int(self.rate.burst)}")
        return (f"tenant {self.tenant!r} is over its rate limit of {self.rate}; "
                f"retry in {max(self.retry_after, 0.001):.3f} s")


class RateLimiter:
    """Buckets by tenant. `rate_of` says each tenant's limit (a configured override or
    the default); tenants are only those that authenticated, so the table stays small."""

    def __init__(self, rate_of: Callable[[str], Rate], clock: Callable[[], float]) -> None:
        self._rate_of = rate_of
        self._clock = clock
        self._buckets: dict[str, Bucket] = {}

    def admit(self, tenant: str, calls: int = 1) -> Throttled | None:
        rate = self._rate_of(tenant)
        if rate.unlimited:
            return None
        now = self._clock()
        bucket, wait = take(rate, self._buckets.get(tenant) or Bucket.full(rate, now), now, calls)
        self._buckets[tenant] = bucket
        return Throttled(tenant, rate, wait, calls) if wait > 0 else None
