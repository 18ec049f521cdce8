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

Creating a room past a budget is refused with the budget and the amount it
would be exceeded by. A spend budget running out mid-stream follows the
tenant's policy: ``degrade`` (its rooms go to the ladder's last rung, new rooms
are refused) or ``stop`` (a warning event, then its rooms end after the grace
period); never a silent cut.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

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


def guaranteed(t: TenantConfig, tier: Tier, units: float, reserved_in_use: float) -> bool:
    """A premium room is guaranteed while the tenant's guaranteed rooms fit its reservation."""
    return tier is Tier.PREMIUM and reserved_in_use + units <= t.reserved_units + 1e-9


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
