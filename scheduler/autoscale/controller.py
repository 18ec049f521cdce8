"""The autoscaler at work: reads the scheduler's state, asks the policy
(`scheduler.policy.autoscaler`) how many workers each pool needs, and carries that out
through a provisioner — starting workers at once, removing them only after the
scheduler has drained them.

`step` runs on the scheduler's event loop (it reads and changes the core's state)
and returns the provisioner calls to make; `run` makes them on a thread, since a
process spawn or an API call may block. A simulator calls `step` and applies the
calls itself, at simulated time.

Which workers leave: booting ones first (nothing to hand over), then the ready
workers with the fewest rooms, in the order the provisioner can remove them (a
StatefulSet only its highest ordinals), and only those whose rooms the other workers
can take now (`placement.drainable`): a drain whose rooms found no worker by its
deadline would take them off the air. A worker being drained counts as gone for
the policy but stays in the engine's replica count until it is removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler.autoscale.provisioners import Instance, Provisioner, ProvisionerKind
from scheduler.core import Scheduler
from scheduler.policy import placement, tenants
from scheduler.policy.autoscaler import Autoscaler, AutoscalerConfig, PoolDecision, PoolSignals, Signals
from scheduler.state.snapshot import ClusterSnapshot

log = logging.getLogger(__name__)

# Workers at least this full show what the pool's rooms, as they are mixed, fill a
# worker with (an emptier one's ratio is mostly its first room's batch overhead).
FILLED = 0.5


@dataclass(frozen=True, slots=True)
class ScaleCall:
    """One provisioner call: the pool's new replica count, and who leaves."""

    pool: str
    replicas: int
    remove: tuple[str, ...] = ()
    direction: str = "up"  # up | down | replace (a worker that never came up)

    def apply(self, provisioner: Provisioner) -> None:
        provisioner.scale(self.pool, self.replicas, self.remove)


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    at: float
    pool: str
    direction: str
    workers: int  # how many started or left
    reason: str


@dataclass(frozen=True, slots=True)
class PoolRow:
    """One pool as SREs see it (status page, metrics)."""

    name: str
    device_type: str
    desired: int
    ready: int
    booting: int
    draining: int
    reason: str


@dataclass(slots=True)
class _Pool:
    instances: list[Instance] = field(default_factory=list)
    requested: int = 0  # replicas last asked of the engine (its listing may lag)
    requested_at: float = -1e18
    listed_at: float = -1e18  # the engine's last listing
    first_seen: dict[str, float] = field(default_factory=dict)  # worker -> when it appeared
    draining: dict[str, float] = field(default_factory=dict)  # worker -> drain deadline


class AutoscalingController:
    def __init__(self, core: Scheduler, config: AutoscalerConfig,
                 provisioner: Provisioner | None,
                 clock: Callable[[], float] = time.time, history: int = 200) -> None:
        self.core = core
        self.config = config
        self.provisioner = provisioner
        self.clock = clock
        self.policy = Autoscaler(config)
        self._pools = {name: _Pool() for name in config.pools}
        self._pool_of_device = {p.device_type: name for name, p in config.pools.items()}
        self.decisions: list[PoolDecision] = []
        self.events: deque[ScaleEvent] = deque(maxlen=history)

    # -- what the engine has -----------------------------------------------------

    def set_instances(self, pool: str, instances: list[Instance]) -> None:
        """The engine's listing of a pool (from `refresh`, or a simulator)."""
        p = self._pools[pool]
        p.instances = list(instances)
        now = self.clock()
        ids = {i.worker_id for i in instances}
        # An instance first listed after a request has been booting since that request.
        since = p.requested_at if p.requested_at >= p.listed_at else now
        p.listed_at = now
        for wid in ids - p.first_seen.keys():
            p.first_seen[wid] = since
        for wid in list(p.first_seen):
            if wid not in ids:
                del p.first_seen[wid]
                p.draining.pop(wid, None)

    async def refresh(self) -> None:
        if self.provisioner is None:
            return
        for name in self._pools:
            try:
                found = await asyncio.to_thread(self.provisioner.instances, name)
            except Exception as e:  # noqa: BLE001 -- an unreachable engine must not stop scheduling
                log.warning("autoscaler: cannot list pool %s: %s", name, e)
                continue
            self.set_instances(name, found)

    # -- decisions -------------------------------------------------------------------

    def signals(self, cluster: ClusterSnapshot | None = None) -> Signals:
        cluster = cluster or self.core.snapshot()
        ready = dict.fromkeys(self._pools, 0)
        load = dict.fromkeys(self._pools, 0.0)
        capacity: dict[str, list[float]] = {name: [] for name in self._pools}
        # What well-filled workers really carry: units per share of a worker used. A
        # worker's unit capacity assumes full batches of one shape; a mix of shapes and
        # sizes (1080p, vertical) fills it with fewer units, and a pool sized on the
        # former runs full at the evening ramp, where reserved rooms then preempt others.
        carried = dict.fromkeys(self._pools, 0.0)
        used = dict.fromkeys(self._pools, 0.0)
        for w in cluster.workers.values():
            pool = self._pool_of_device.get(w.device_type)
            if pool is None or w.draining:
                continue
            ready[pool] += 1
            load[pool] += w.room_units
            if w.unit_capacity > 0:
                capacity[pool].append(w.unit_capacity)
            if w.utilisation >= FILLED:
                carried[pool] += w.room_units
                used[pool] += w.utilisation
        # Reservations are not tied to a device type: the first (preferred) pool holds them.
        # One whose hours start within a boot and a decision (ramp_seconds) counts now, so
        # its workers are up when it opens.
        configs, now, lead = self.core.config.tenants, self.clock(), self.config.ramp_seconds
        reserved = sum(t.reserved_within(now, lead) for t in configs.values())
        free = tenants.unused_reservations(configs, self.core.sessions.reserved, now, lead)
        pools = {}
        target = self.core.fleet.target
        for i, name in enumerate(self._pools):
            per = sum(capacity[name]) / len(capacity[name]) if capacity[name] else 0.0
            if per > 0 and used[name] > 0:
                per = min(per, carried[name] / used[name] * target)
            pools[name] = PoolSignals(ready=ready[name], booting=self._booting(name, cluster),
                                      load_units=load[name], units_per_worker=per,
                                      reserved_units=reserved if i == 0 else 0.0,
                                      reserved_free=free if i == 0 else 0.0)
        return Signals(cluster.waiting.units, pools, cluster.waiting.stuck_units)

    def _unregistered(self, p: _Pool, now: float, cluster: ClusterSnapshot
                      ) -> tuple[list[str], list[str]]:
        """The pool's instances not registered (and not draining): those still within
        their boot timeout, and those past it — not coming: replaced, not waited for."""
        booting: list[str] = []
        stuck: list[str] = []
        for i in p.instances:
            w = i.worker_id
            if w in cluster.workers or w in p.draining:
                continue
            late = now - p.first_seen.get(w, now) > self.config.boot_timeout_seconds
            (stuck if late else booting).append(w)
        return booting, stuck

    def _booting(self, pool: str, cluster: ClusterSnapshot) -> int:
        """Started and not registered yet, counting replicas asked for that the engine
        does not list yet."""
        p = self._pools[pool]
        return len(self._unregistered(p, self.clock(), cluster)[0]) + self._lag(p)

    def _lag(self, p: _Pool) -> int:
        return max(0, p.requested - len(p.instances)) if self._recent(p) else 0

    def _recent(self, p: _Pool) -> bool:
        return self.clock() - p.requested_at < self.config.boot_timeout_seconds

    def step(self) -> list[ScaleCall]:
        """One decision: drains started, finished drains and stuck boots turned into
        removals, and new workers requested. Runs on the scheduler's loop."""
        now = self.clock()
        cluster = self.core.snapshot()
        self.decisions = self.policy.decide(self.signals(cluster), now)
        calls: list[ScaleCall] = []
        for d in self.decisions:
            p = self._pools[d.pool]
            total = len(p.instances) + self._lag(p)
            booting, stuck = self._unregistered(p, now, cluster)
            # Drained workers (or past their deadline) leave the engine; stuck boots too
            # (the policy asks for their replacements).
            leaving = stuck + [w for w, deadline in p.draining.items()
                               if cluster.drained(w) or now >= deadline]
            if d.delta < 0:
                n = -d.delta
                quick = booting[:n]  # nothing to hand over
                leaving += quick
                n -= len(quick)
                if n > 0:
                    n = self._start_drains(cluster, d.pool, n, now)
                if quick or n:
                    self._record(now, d.pool, "down", len(quick) + n, d.reason)
            # Removals before additions: raising a count removes nothing on some engines.
            if leaving and self.provisioner is not None:
                total -= len(leaving)
                calls.append(ScaleCall(d.pool, total, tuple(leaving),
                                       "replace" if stuck else "down"))
            for w in leaving:
                p.draining.pop(w, None)
            if d.delta > 0 and self.provisioner is not None:
                total += d.delta
                calls.append(ScaleCall(d.pool, total, (), "up"))
                self._record(now, d.pool, "up", d.delta, d.reason)
            if calls and calls[-1].pool == d.pool:
                p.requested, p.requested_at = calls[-1].replicas, now
        self.publish(self.core.snapshot())  # with the drains it just started
        return calls

    def _start_drains(self, cluster: ClusterSnapshot, pool: str, n: int, now: float) -> int:
        """Drains up to `n` of the pool's workers; returns how many it started."""
        p = self._pools[pool]
        mine = {i.worker_id for i in p.instances}
        candidates = [w for w in cluster.workers.values()
                      if w.worker_id in mine and not w.draining
                      and self._pool_of_device.get(w.device_type) == pool]
        preferred = [w.worker_id for w in sorted(candidates, key=lambda w: (len(w.rooms),
                                                                            w.worker_id))]
        order = self.provisioner.removable(pool, preferred) if self.provisioner else preferred
        # Only workers whose rooms the others can take now: a drain whose rooms find no
        # worker by its deadline would take them off the air.
        order = placement.drainable(self.core.fleet, order, n)
        deadline = now + self.config.drain_deadline_seconds
        started = 0
        for wid in order[:n]:
            if self.core.drain_worker(wid, deadline, f"scale-down of pool {pool}"):
                p.draining[wid] = deadline
                started += 1
        return started

    def _record(self, now: float, pool: str, direction: str, n: int, reason: str) -> None:
        self.events.append(ScaleEvent(now, pool, direction, n, reason))
        self.core.metrics.scale_events.labels(pool, direction).inc(n)
        log.info("autoscaler: pool %s %s by %d (%s)", pool, direction, n, reason)

    def rows(self, cluster: ClusterSnapshot | None = None) -> list[PoolRow]:
        cluster = cluster or self.core.snapshot()
        by = {d.pool: d for d in self.decisions}
        out = []
        for name in self._pools:
            d = by.get(name)
            ready = draining = 0
            for w in cluster.workers.values():
                if self._pool_of_device.get(w.device_type) == name:
                    if not w.draining:
                        ready += 1
                    else:
                        draining += 1
            out.append(PoolRow(name, self.config.pools[name].device_type,
                               d.desired if d else ready, ready, self._booting(name, cluster),
                               draining,
                               d.reason if d else ""))
        return out

    def publish(self, cluster: ClusterSnapshot | None = None) -> None:
        self.core.metrics.pools({r.name: (r.desired, r.booting, r.ready, r.draining)
                                 for r in self.rows(cluster)})

    # -- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Decides every interval_seconds; provisioner calls run on a thread."""
        while True:
            try:
                await self.refresh()
                for call in self.step():
                    if self.provisioner is None:
                        continue
                    try:
                        await asyncio.to_thread(call.apply, self.provisioner)
                    except Exception as e:  # noqa: BLE001 -- logged; the next step retries
                        log.warning("autoscaler: %s of pool %s to %d failed: %s", call.direction,
                                    call.pool, call.replicas, e)
            except Exception:  # a bad step must not end autoscaling; the next one retries
                log.exception("autoscaler step failed")
            await asyncio.sleep(self.config.interval_seconds)


def make_provisioner(config: AutoscalerConfig, scheduler_address: str,
                     log_dir: str = "var/logs") -> Provisioner | None:
    """The configured engine's provisioner (imported only when chosen: Ray and the
    Kubernetes client are optional)."""
    kind = config.provisioner
    if kind is ProvisionerKind.NONE or not config.pools:
        return None
    if kind is ProvisionerKind.LOCAL:
        from scheduler.autoscale.provisioners.local import LocalProvisioner
        return LocalProvisioner(config, scheduler_address, log_dir)
    if kind is ProvisionerKind.RAY:
        from scheduler.autoscale.provisioners.ray_cluster import RayProvisioner
        return RayProvisioner(config, scheduler_address)
    from scheduler.autoscale.provisioners.kubernetes_api import KubernetesProvisioner
    return KubernetesProvisioner(config)
