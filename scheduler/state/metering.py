"""Metering: what the workers' usage reports add up to. The usage ledger, the
running cost totals by tier and device type, each tenant's spend in its current
budget period, and the usage metrics, kept together so that a report updates
them in one place. No I/O: the core persists what the ledger marks dirty.

Reports arrive by the thousand per second on a large fleet, so a numbered
report's rooms are accounted in one batch: metrics move once per label set per
report, and cost gauges once per tick (`publish`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping

from avatarfarm.domain import Progress, Tier
from scheduler.metrics import SchedulerMetrics
from scheduler.policy import tenants
from scheduler.policy.cost import CostBook, UsageDelta
from scheduler.policy.ledger import Ledger, ReportVerdict
from scheduler.state.sessions import Session

log = logging.getLogger(__name__)


class Metering:
    def __init__(self, price: Callable[[str], float], metrics: SchedulerMetrics,
                 tenant_configs: Mapping[str, tenants.TenantConfig]) -> None:
        self.price = price
        self.metrics = metrics
        self.tenants = tenant_configs
        self.costs = CostBook(price)
        self.ledger = Ledger(price)
        self._spend: dict[str, tuple[float, float]] = {}  # tenant -> (period start, money)
        self._batch: dict[tuple[Tier, str, str], list[float]] | None = None

    def accept_report(self, worker_id: str, epoch: int, seq: int) -> ReportVerdict:
        """Whether a numbered report is new (a retry is not); gaps are counted and logged."""
        verdict = self.ledger.accept_report(worker_id, epoch, seq)
        if not verdict.apply:
            self.metrics.usage_reports.labels("duplicate").inc()
            return verdict
        self.metrics.usage_reports.labels("applied").inc()
        if verdict.lost:
            self.metrics.usage_reports.labels("lost").inc(verdict.lost)
            log.warning("worker %s: %d usage report(s) lost before seq %d (the next cumulative "
                        "report carries their usage)", worker_id, verdict.lost, seq)
        return verdict

    @contextlib.contextmanager
    def report(self) -> Iterator[None]:
        """Accounts the rooms of one report as a batch for the metrics."""
        self._batch = {}
        try:
            yield
        finally:
            batch, self._batch = self._batch, None
            for (tier, dev, tenant), (stream, device, frames, late, money) in batch.items():
                self.metrics.usage(UsageDelta(tier, dev, stream, device), int(frames),
                                   int(late), self.costs, tenant, money, publish=False)

    def account(self, s: Session, progress: Progress) -> None:
        """Counts a room's progress, cumulative over its current assignment (s.epoch):
        what lies beyond the ledger's mark for that assignment, never negative, nothing
        for a repeated or stale report."""
        ds, dd = self.ledger.add(s.session_id, s.epoch, progress.stream_seconds,
                                 progress.device_seconds)
        if ds <= 0 and dd <= 0:
            return
        d = UsageDelta(s.spec.tier, s.device_type or "unknown", ds, dd)
        before = s.progress
        frames = max(0, s.base.frames_rendered + progress.frames_rendered - before.frames_rendered)
        late = max(0, s.base.late_frames + progress.late_frames - before.late_frames)
        self.costs.add(d)
        money = d.device_seconds * self.price(d.device_type) / 3600.0
        tenant = s.spec.tenant
        if tenant in self._spend:
            at, total = self._spend[tenant]
            self._spend[tenant] = (at, total + money)
        if self._batch is None:
            self.metrics.usage(d, frames, late, self.costs, tenant, money)
            return
        key = (d.tier, d.device_type, tenant if tenant in self.metrics.tenants else "")
        acc = self._batch.setdefault(key, [0.0, 0.0, 0.0, 0.0, 0.0])
        acc[0] += d.stream_seconds
        acc[1] += d.device_seconds
        acc[2] += frames
        acc[3] += late
        acc[4] += money

    def spent(self, tenant: str, now: float) -> float:
        """Money the tenant's rooms used in its current budget period (0 without a budget)."""
        t = self.tenants.get(tenant)
        if t is None or t.spend_budget <= 0:
            return 0.0
        start = tenants.period_start(now, t.spend_period_seconds)
        at, money = self._spend.get(tenant, (-1.0, 0.0))
        if at != start:  # a new period, or first use since a restart: from the ledger
            money = self.ledger.spent(tenant, start, now)
            self._spend[tenant] = (start, money)
        return money

    def publish(self) -> None:
        self.metrics.publish_costs(self.costs)
