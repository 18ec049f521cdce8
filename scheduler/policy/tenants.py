"""Tenants: budgets and reservations, and what happens when a budget runs out.
Pure policy; the core feeds it what is in use and what was spent.

- Concurrency budget, in compute units (1 unit = one 512x512@25 text-driven
  room on the same device, measured from the workers' profiles): the rooms a
  tenant has admitted (pending, placed, running) may hold at most this much.
- Spend budget, in money per period (device time attributed to the tenant's
  rooms x the device type's price, from the usage ledger).
- Reservation (premium): units of capacity held for the tenant's premium rooms.
  Rooms within it are guaranteed: never degraded or preempted, and capacity is
  reclaimed for them from rooms that borrowed it (the Kueue model: nominal
  quota, borrowing of idle quota, preemption of borrowers to reclaim it).
  A reservation may hold for some hours of the day only (a brand's show hours):
  outside them no capacity is kept for it, and rooms admitted then are not
  guaranteed. A room admitted within the hours keeps its guarantee until it ends.

Creating a room past a budget is refused with the budget and the amount it
would be exceeded by. A spend budget running out mid-stream follows the
tenant's policy: ``degrade`` (its rooms go to the ladder's last rung, new rooms
are refused) or ``stop`` (a warning event, then its rooms end after the grace
period); never a silent cut.
"""

from __future__ import annotations

import enum
import functools
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo

from avatarfarm.domain import Tier


class BudgetPolicy(enum.Enum):
    DEGRADE = "degrade"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """One tenant's contract (a [tenants.NAME] table in the scheduler's config)."""

    concurrency_units: float = 0.0  # 0: unlimited
    spend_budget: float = 0.0  # money per period; 0: unlimited
    spend_period_seconds: float = 86400.0
    on_budget_exhausted: BudgetPolicy = BudgetPolicy.DEGRADE
    grace_seconds: float = 300.0
    reserved_units: float = 0.0  # premium capacity held for this tenant
    # The hours of the day the reservation holds, in `timezone`: "HH:MM-HH:MM" each, one
    # may run past midnight ("22:00-02:00"); empty: all day.
    reserved_hours: list[str] = field(default_factory=list)
    timezone: str = "UTC"  # an IANA zone name ("Asia/Shanghai"), for reserved_hours
    weight: float = 1.0  # share in the admission queue
    # Access: SHA-256 (hex) of the tenant's API keys; its session-call rate limit
    # (None: the scheduler's rate_limit_per_second / rate_limit_burst; 0: no limit).
    api_keys_sha256: list[str] = field(default_factory=list)
    rate_limit_per_second: float | None = None
    rate_limit_burst: float | None = None

    def __post_init__(self) -> None:
        for name in ("concurrency_units", "spend_budget", "reserved_units", "grace_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.spend_period_seconds <= 0:
            raise ValueError("spend_period_seconds must be positive")
        if self.weight <= 0:
            raise ValueError("weight must be positive")
        _windows(tuple(self.reserved_hours))
        _zone(self.timezone)

    def reserved_at(self, now: float) -> float:
        """The units reserved at wall-clock time `now` (seconds since the epoch)."""
        if not self.reserved_hours or not self.reserved_units:
            return self.reserved_units
        day = _second_of_day(now, self.timezone)
        return self.reserved_units if any(
            (day - start) % DAY < length for start, length in
            _windows(tuple(self.reserved_hours))) else 0.0

    def reserved_within(self, now: float, lead: float) -> float:
        """The units reserved at some time from `now` to `now + lead`: what capacity
        started now must be ready for."""
        if self.reserved_at(now) or not self.reserved_units:
            return self.reserved_units
        day = _second_of_day(now, self.timezone)
        return self.reserved_units if any(
            (start - day) % DAY <= lead for start, _ in _windows(tuple(self.reserved_hours))) else 0.0


DAY = 86400


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> tzinfo:
    if name == "UTC":
        return UTC  # needs no zone data
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r} (an IANA name such as \"Asia/Shanghai\")") from None


@functools.lru_cache(maxsize=256)
def _windows(hours: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """("19:00-23:30", "22:00-02:00", ...) as (start, length) in seconds."""
    out = []
    for text in hours:
        start, sep, end = text.partition("-")
        if not sep:
            raise ValueError(f"reserved_hours: {text!r} is not HH:MM-HH:MM")
        begin, until = _clock_time(start, text), _clock_time(end, text)
        if begin == until:
            raise ValueError(f"reserved_hours: {text!r} starts where it ends")
        out.append((begin % DAY, (until - begin) % DAY or DAY))
    return tuple(out)


def _clock_time(text: str, whole: str) -> int:
    hours, sep, minutes = text.strip().partition(":")
    if not (sep and hours.isdigit() and minutes.isdigit() and len(minutes) == 2
            and (int(hours), int(minutes)) <= (24, 0) and int(minutes) < 60):
        raise ValueError(f"reserved_hours: {whole!r} is not HH:MM-HH:MM (00:00 to 24:00)")
    return int(hours) * 3600 + int(minutes) * 60


def _second_of_day(now: float, zone: str) -> float:
    t = datetime.fromtimestamp(now, _zone(zone))
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


UNLIMITED = TenantConfig()


class BudgetKind(enum.Enum):
    CONCURRENCY = "concurrency"
    SPEND = "spend"


@dataclass(frozen=True, slots=True)
class OverBudget:
    kind: BudgetKind
    message: str


def check_admission(tenant: str, t: TenantConfig, *, units: float, units_in_use: float,
                    spent: float) -> OverBudget | None:
    """Whether a new room of `units` fits the tenant's budgets; why not if it does not."""
    if t.spend_budget > 0 and spent >= t.spend_budget:
        return OverBudget(BudgetKind.SPEND, (
            f"tenant {tenant!r} has spent {spent:.2f} of its spend budget of {t.spend_budget:.2f} "
            f"per {_period(t.spend_period_seconds)} (over by {spent - t.spend_budget:.2f}); "
            "new rooms are refused until the next period"))
    if t.concurrency_units > 0 and units_in_use + units > t.concurrency_units + 1e-9:
        over = units_in_use + units - t.concurrency_units
        return OverBudget(BudgetKind.CONCURRENCY, (
            f"tenant {tenant!r} would exceed its concurrency budget of {t.concurrency_units:.2f} "
            f"compute units by {over:.2f}: {units_in_use:.2f} in use, this room needs "
            f"{units:.2f}"))
    return None


def _period(seconds: float) -> str:
    named = {3600.0: "hour", 86400.0: "day", 7 * 86400.0: "week", 30 * 86400.0: "30 days"}
    return named.get(seconds, f"{seconds:.0f} s")


def period_start(now: float, period: float) -> float:
    return (now // period) * period


def guaranteed(t: TenantConfig, tier: Tier, units: float, reserved_in_use: float,
               now: float) -> bool:
    """A premium room is guaranteed while the tenant's guaranteed rooms fit the reservation
    in force at `now`."""
    return tier is Tier.PREMIUM and reserved_in_use + units <= t.reserved_at(now) + 1e-9


def unused_reservations(configs: Mapping[str, TenantConfig], reserved_in_use: Mapping[str, float],
                        now: float, lead: float = 0.0) -> float:
    """Units reserved (in force at `now`, or from `now + lead` at the latest) that no
    guaranteed room uses."""
    return sum(max(0.0, t.reserved_within(now, lead) - reserved_in_use[name])
               for name, t in configs.items() if t.reserved_units)


def may_take_protected(*, units_needed: float, free: float, preemptible: float,
                       unused_reservations: float) -> bool:
    """A room that cannot be preempted later (premium beyond its tenant's reservation) may
    only use capacity that leaves every tenant's unused reservation reclaimable: free
    now, or held by rooms that can be preempted."""
    return free + preemptible - units_needed >= unused_reservations - 1e-9


class BudgetAction(enum.Enum):
    NONE = "none"
    WARN = "warn"  # exhausted, within the grace period (stop policy)
    DEGRADE = "degrade"
    STOP = "stop"


def budget_action(t: TenantConfig, spent: float, exhausted_since: float | None,
                  now: float) -> BudgetAction:
    """What to do with a tenant's running rooms given its spend this period."""
    if t.spend_budget <= 0 or spent < t.spend_budget:
        return BudgetAction.NONE
    if t.on_budget_exhausted is BudgetPolicy.DEGRADE:
        return BudgetAction.DEGRADE
    since = now if exhausted_since is None else exhausted_since
    return BudgetAction.STOP if now - since >= t.grace_seconds else BudgetAction.WARN
