"""The scheduler's Prometheus metrics, declared once. Labels are bounded:
state, tier, device type and licence clause, never a session, room or avatar
id; tenants only when the operator turns tenant metrics on, and then only the
configured tenants."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from avatarfarm.domain import SessionState, Tier
from scheduler.policy.cost import CostBook, UsageDelta
from scheduler.state.avatars import REFUSAL_CLAUSES


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 tenants: tuple[str, ...] = ()) -> None:
        self.registry = registry or CollectorRegistry()
        self.tenants = frozenset(tenants)
        r = self.registry
        self.sessions = Gauge("avatarfarm_sessions", "Sessions by state and tier",
                              ["state", "tier"], registry=r)
        self.pending = Gauge("avatarfarm_pending_sessions", "Sessions waiting for a worker",
                             registry=r)
        self.placements = Counter("avatarfarm_placements", "Rooms placed on a worker",
                                  ["tier"], registry=r)
        self.workers = Gauge("avatarfarm_workers", "Connected workers", ["device_type"], registry=r)
        self.leader_epoch = Gauge(
            "avatarfarm_scheduler_leader_epoch",
            "Epoch under which this scheduler leads (raised by every new leader and every start; "
            "only a leading scheduler serves metrics)", registry=r)
        self.capacity = Gauge("avatarfarm_worker_capacity_device_seconds_per_second",
                              "Capacity of connected workers (device-seconds per second)",
                              ["device_type"], registry=r)
        self.load = Gauge("avatarfarm_worker_load_device_seconds_per_second",
                          "Load placed on connected workers (device-seconds per second)",
                          ["device_type"], registry=r)
        self.stream_seconds = Counter("avatarfarm_stream_seconds",
                                      "Seconds of stream rendered", ["tier", "device_type"],
                                      registry=r)
        self.device_seconds = Counter("avatarfarm_attributed_device_seconds",
                                      "Device time attributed to rooms' frames",
                                      ["tier", "device_type"], registry=r)
        self.price = Gauge("avatarfarm_device_price_per_hour",
                           "Configured price of one device-hour", ["device_type"], registry=r)
        self.cost = Gauge("avatarfarm_cost_per_stream_hour",
                          "Attributed device cost per hour of stream", ["tier", "device_type"],
                          registry=r)
        self.tenant_cost = Gauge("avatarfarm_tenant_cost_per_stream_hour",
                                 "Attributed device cost per hour of stream, by configured tenant",
                                 ["tenant"], registry=r)
        self.tenant_money = Counter("avatarfarm_tenant_cost",
                                    "Attributed device cost, by configured tenant", ["tenant"],
                                    registry=r)
        self.degradations = Counter("avatarfarm_degradation_steps",
                                    "Rooms stepped down or back up the degradation ladder",
                                    ["tier", "direction"], registry=r)
        self.preemptions = Counter("avatarfarm_preemptions",
                                   "Rooms preempted to reclaim reserved capacity", ["tier"],
                                   registry=r)
        self.budget_refusals = Counter("avatarfarm_budget_refusals",
                                       "Rooms refused because a tenant budget would be exceeded",
                                       ["budget"], registry=r)
        self.licence_refusals = Counter(
            "avatarfarm_licence_refusals", "Rooms refused by their avatar's licence, by the clause "
            "that refused them", ["clause"], registry=r)
        self.licence_endings = Counter(
            "avatarfarm_licence_ended_rooms", "Running rooms ended because their avatar's licence "
            "was revoked, expired or no longer allows them, by clause", ["clause"], registry=r)
        self.usage_reports = Counter("avatarfarm_usage_reports",
                                     "Worker usage reports: applied, duplicate (a retry, ignored), "
                                     "lost (sequence gaps)", ["outcome"], registry=r)
        # Demand waiting, in the same unit as capacity and load: capacity vs demand.
        self.pending_load = Gauge("avatarfarm_pending_load_device_seconds_per_second",
                                  "Estimated load of the rooms waiting for a worker "
                                  "(device-seconds per second)", registry=r)
        self.guaranteed_pending = Gauge(
            "avatarfarm_guaranteed_pending_sessions", "Premium rooms within their tenant's "
            "reservation that are waiting for a worker (a breach of the guarantee while > 0)",
            registry=r)
        self.pending_wait = Histogram(
            "avatarfarm_pending_wait_seconds", "Time rooms waited for a worker, from admission "
            "or from losing their worker to placement", ["tier"], registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
        self.workers_lost = Counter("avatarfarm_workers_lost", "Workers dropped without being "
                                    "drained (crash, hang, lost link)", ["device_type"], registry=r)
        self.drains = Counter("avatarfarm_worker_drains", "Workers drained for removal: completed "
                              "(every room handed over) or deadline (stopped with rooms left)",
                              ["outcome"], registry=r)
        self.handovers = Counter(
            "avatarfarm_handovers", "Rooms moved off a draining worker: seamless (the new "
            "assignment started before the old one stopped) or restart (stopped, then started: "
            "RTMP allows one publisher)", ["kind"], registry=r)
        self.desired_workers = Gauge("avatarfarm_autoscaler_desired_workers",
                                     "Workers the autoscaler wants in each pool", ["pool"],
                                     registry=r)
        self.pool_workers = Gauge("avatarfarm_autoscaler_workers",
                                  "Workers of each pool by state (booting: started, not yet "
                                  "registered; ready; draining)", ["pool", "state"], registry=r)
        self.scale_events = Counter("avatarfarm_autoscaler_scale_events",
                                    "Scale decisions carried out, by pool and direction",
                                    ["pool", "direction"], registry=r)
        self._tenant_hours: dict[str, tuple[float, float]] = {}
        self._stale: set[tuple[Tier, str]] = set()
        self._stale_tenants: set[str] = set()
        self.frames = Counter("avatarfarm_frames_rendered", "Frames rendered", ["tier"], registry=r)
        self.late = Counter("avatarfarm_late_frames", "Frames finished after their deadline",
                            ["tier"], registry=r)
        for tier in Tier:
            for state in SessionState:
                self.sessions.labels(state.value, tier.value)
            for direction in ("down", "up"):
                self.degradations.labels(tier.value, direction)
            self.preemptions.labels(tier.value)
        for outcome in ("applied", "duplicate", "lost"):
            self.usage_reports.labels(outcome)
        for outcome in ("completed", "deadline"):
            self.drains.labels(outcome)
        for kind in ("seamless", "restart"):
            self.handovers.labels(kind)
        for tier in Tier:
            self.pending_wait.labels(tier.value)
        for budget in ("concurrency", "spend"):
            self.budget_refusals.labels(budget)
        for clause in REFUSAL_CLAUSES:
            self.licence_refusals.labels(clause)
            self.licence_endings.labels(clause)

    def session_counts(self, counts: Tally[tuple[SessionState, Tier]]) -> None:
        for tier in Tier:
            for state in SessionState:
                self.sessions.labels(state.value, tier.value).set(counts.get((state, tier), 0))
        self.pending.set(sum(n for (s, _), n in counts.items() if s is SessionState.PENDING))

    def session_moved(self, before: tuple[SessionState, Tier] | None,
                      after: tuple[SessionState, Tier],
                      counts: Tally[tuple[SessionState, Tier]]) -> None:
        """One session changed state: only the two label sets it touched change."""
        for state, tier in (before, after) if before is not None else (after,):
            self.sessions.labels(state.value, tier.value).set(counts.get((state, tier), 0))
        if SessionState.PENDING in (after[0], before[0] if before else None):
            self.pending.set(sum(counts.get((SessionState.PENDING, t), 0) for t in Tier))

    def usage(self, d: UsageDelta, frames: int, late: int, book: CostBook, tenant: str = "",
              money: float = 0.0, publish: bool = True) -> None:
        """Counts usage; the cost gauges follow at once, or with the next `publish_costs`
        (a fleet's reports arrive by the thousand per second: the gauges need not)."""
        self.stream_seconds.labels(d.tier.value, d.device_type).inc(d.stream_seconds)
        self.device_seconds.labels(d.tier.value, d.device_type).inc(d.device_seconds)
        self.frames.labels(d.tier.value).inc(frames)
        self.late.labels(d.tier.value).inc(late)
        self._stale.add((d.tier, d.device_type))
        if tenant in self.tenants:
            cost, hours = self._tenant_hours.get(tenant, (0.0, 0.0))
            self._tenant_hours[tenant] = (cost + money, hours + d.stream_seconds / 3600.0)
            self.tenant_money.labels(tenant).inc(money)
            self._stale_tenants.add(tenant)
        if publish:
            self.publish_costs(book)

    def publish_costs(self, book: CostBook) -> None:
        for tier, dev in self._stale:
            self.price.labels(dev).set(book.price(dev))
            self.cost.labels(tier.value, dev).set(book.per_stream_hour(tier, dev))
        for tenant in self._stale_tenants:
            cost, hours = self._tenant_hours[tenant]
            self.tenant_cost.labels(tenant).set(cost / hours if hours > 0 else 0.0)
        self._stale.clear()
        self._stale_tenants.clear()

    def pools(self, rows: Mapping[str, tuple[int, int, int, int]]) -> None:
        """Per pool: (desired, booting, ready, draining)."""
        for pool, (desired, booting, ready, draining) in rows.items():
            self.desired_workers.labels(pool).set(desired)
            for state, n in (("booting", booting), ("ready", ready), ("draining", draining)):
                self.pool_workers.labels(pool, state).set(n)
            for direction in ("up", "down"):
                self.scale_events.labels(pool, direction)

    def fleet(self, by_device: Mapping[str, tuple[int, float, float]]) -> None:
        self.workers.clear()
        self.capacity.clear()
        self.load.clear()
        for dev, (n, cap, load) in by_device.items():
            self.workers.labels(dev).set(n)
            self.capacity.labels(dev).set(cap)
            self.load.labels(dev).set(load)
