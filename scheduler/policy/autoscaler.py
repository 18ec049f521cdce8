"""The autoscaler's policy: how many workers each pool should have. Pure: plain
signals in, a decision out; time comes in as an argument.

For each pool (one device type) the demand is what its workers carry plus the
waiting rooms it is to take, in compute units (1 unit = one 512x512@25
text-driven room), with a headroom on top so a ramp finds capacity already
booting. The target is that demand over what one worker carries, never below
what premium reservations need nor outside the pool's [min, max].

- A ramp is met ahead: the demand's rise per second over the last
  ``ramp_window_seconds``, times ``ramp_seconds`` (a boot and a decision), is started
  on top of the headroom, so a small headroom serves a flat load and a steep evening
  ramp alike.
- Up fast: a higher target is acted on at once (booting workers count as
  capacity, so a ramp is not answered twice).
- Down slowly: the target used is the highest one recommended over the last
  ``scale_down_window_seconds`` (the Kubernetes HPA's stabilisation), counted with
  ``scale_down_tolerance`` more headroom, and at most ``scale_down_step`` workers
  leave per decision; never while rooms wait. Going back up after a step down
  then takes demand above the window's peak by that tolerance, so a load that
  only wobbles never makes a pool go down and straight back up.

Premium reservations no reserved room uses now (`PoolSignals.reserved_free`) are kept
free on top of the headroom, in part (`reserved_spare`, a quarter by default): rooms
that borrow the rest step down or are preempted when a premium room within its
reservation arrives and finds no worker with room. An operator who would rather pay
for all of it than risk that keeps all of it free (1).

Rooms that have waited longer than a moment (`Signals.stuck_units`) found no worker
with room although the units may add up: spare capacity spread over workers in pieces
too small for them. They get workers of their own: a pool grows to its ready workers
plus what the stuck rooms need (booting workers count), whatever the units say.

Waiting rooms are shared out over the pools in configuration order (the first
pool that can still grow takes them), so an operator lists the pool to grow
first, e.g. the cheapest per unit.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from scheduler.autoscale.provisioners import PoolConfig, ProvisionerKind


@dataclass(frozen=True, slots=True)
class AutoscalerConfig:
    """The ``[autoscaler]`` table of the scheduler's configuration."""

    provisioner: ProvisionerKind = ProvisionerKind.NONE
    interval_seconds: float = 5.0
    headroom: float = 0.05  # spare capacity kept above demand, as a fraction of it
    # Capacity is started this far ahead of the demand's growth: a worker's boot time and
    # a decision interval. The growth is the demand's rise per second over the last
    # `ramp_window_seconds`; a flat or falling load keeps only the headroom.
    ramp_seconds: float = 120.0
    ramp_window_seconds: float = 300.0
    scale_down_window_seconds: float = 300.0
    scale_down_step: int = 1  # workers that may leave per decision
    scale_down_tolerance: float = 0.1  # extra headroom a smaller pool must still have
    # Share of the premium reservations no room uses that is kept free on top of demand
    # (1: all of it). Below 1, rooms borrow the rest, and a reserved room that arrives
    # takes it back from them (stepping them down first, preempting only where that is
    # not enough) while the autoscaler boots workers for them. A quarter kept free placed
    # every room of five simulated days at once, none stepped down or dropped, for
    # 11-20% fewer worker-hours than keeping all of it (README, Autoscaling).
    reserved_spare: float = 0.25
    drain_deadline_seconds: float = 120.0  # a draining worker is stopped by then, rooms or not
    boot_timeout_seconds: float = 600.0  # a started worker not registered by then is replaced
    # How the workers the provisioner starts reach the scheduler ("": the listen address,
    # with a wildcard host read as 127.0.0.1, which suits local workers only).
    scheduler_address: str = ""
    local_log_dir: str = "var/logs/workers"  # local: one log file per worker process
    ray_address: str = "auto"
    ray_namespace: str = "avatarfarm"
    pools: dict[str, PoolConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.interval_seconds <= 0 or self.drain_deadline_seconds <= 0 or \
                self.boot_timeout_seconds <= 0:
            raise ValueError("interval_seconds, drain_deadline_seconds and boot_timeout_seconds "
                             "must be positive")
        if self.headroom < 0 or self.scale_down_window_seconds < 0 or self.scale_down_step < 1 \
                or self.scale_down_tolerance < 0 or self.ramp_seconds < 0 \
                or self.ramp_window_seconds <= 0 or not 0 <= self.reserved_spare <= 1:
            raise ValueError("need headroom >= 0, scale_down_window_seconds >= 0, "
                             "scale_down_step >= 1, scale_down_tolerance >= 0, "
                             "ramp_seconds >= 0, ramp_window_seconds > 0 and "
                             "0 <= reserved_spare <= 1")
        devices = [p.device_type for p in self.pools.values()]
        if len(set(devices)) != len(devices):
            raise ValueError("each pool needs its own device_type (workers are matched to pools "
                             "by it)")

    @property
    def enabled(self) -> bool:
        return bool(self.pools)


@dataclass(frozen=True, slots=True)
class PoolSignals:
    """What the scheduler sees of one pool at a decision."""

    ready: int  # registered workers, not draining
    booting: int  # started, not yet registered
    load_units: float  # placed on its workers
    units_per_worker: float  # measured (0: unknown)
    reserved_units: float = 0.0  # premium reservations this pool is to hold
    # Of them, units no reserved room uses now: kept free on top of the demand, so that a
    # premium room within its reservation finds room at once instead of preempting a
    # room that borrowed the capacity.
    reserved_free: float = 0.0


@dataclass(frozen=True, slots=True)
class Signals:
    pending_units: float  # rooms waiting for a worker, any pool
    pools: Mapping[str, PoolSignals]
    # Of those, rooms that found no worker with room for long (spare capacity spread over
    # workers in pieces too small for them): they get new workers of their own.
    stuck_units: float = 0.0


@dataclass(frozen=True, slots=True)
class PoolDecision:
    pool: str
    current: int  # ready + booting
    desired: int
    reason: str

    @property
    def delta(self) -> int:
        return self.desired - self.current


@dataclass(slots=True)
class _History:
    recommendations: deque[tuple[float, int]] = field(default_factory=deque)
    demand: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, now: float, n: int, window: float) -> int:
        """Records a recommendation; returns the highest one within the window."""
        self.recommendations.append((now, n))
        while self.recommendations and self.recommendations[0][0] < now - window:
            self.recommendations.popleft()
        return max(r for _, r in self.recommendations)

    def growth(self, now: float, demand: float, window: float) -> float:
        """Records the demand; returns how fast it rises, in units per second: the
        least-squares slope over the window (a wobble averages out), 0 while flat or
        falling. What a ramp adds is at most what the window has seen it rise."""
        self.demand.append((now, demand))
        while self.demand and self.demand[0][0] < now - window:
            self.demand.popleft()
        n = len(self.demand)
        if n < 2:
            return 0.0
        mt = sum(t for t, _ in self.demand) / n
        md = sum(d for _, d in self.demand) / n
        var = sum((t - mt) ** 2 for t, _ in self.demand)
        if var <= 0:
            return 0.0
        return max(0.0, sum((t - mt) * (d - md) for t, d in self.demand) / var)

    def risen(self, demand: float) -> float:
        """How far the demand is above its lowest within the window."""
        return max(0.0, demand - min(d for _, d in self.demand)) if self.demand else 0.0


class Autoscaler:
    """Holds the recent recommendations per pool (the only state the policy needs)."""

    def __init__(self, config: AutoscalerConfig) -> None:
        self.config = config
        self._history: dict[str, _History] = {name: _History() for name in config.pools}

    def units_per_worker(self, name: str, measured: float) -> float:
        configured = self.config.pools[name].units_per_worker
        return configured if configured > 0 else measured

    def decide(self, signals: Signals, now: float) -> list[PoolDecision]:
        cfg = self.config
        share = _share_pending(cfg.pools, signals, self.units_per_worker)
        stuck = _share_pending(cfg.pools, Signals(signals.stuck_units, signals.pools),
                               self.units_per_worker)
        decisions = []
        for name, pool in cfg.pools.items():
            sig = signals.pools.get(name, PoolSignals(0, 0, 0.0, 0.0))
            current = sig.ready + sig.booting
            per_worker = self.units_per_worker(name, sig.units_per_worker)
            pending = share.get(name, 0.0)
            if per_worker <= 0:
                # Nothing measured and nothing configured: one worker to learn from
                # when rooms wait, else hold.
                raw = keep = max(current, 1 if pending > 0 else 0)
                why = "no measured capacity yet"
            else:
                demand = sig.load_units + pending
                # Spare capacity: the headroom, what the demand's growth will add while new
                # workers boot, and on top what reservations hold unused (with only the
                # larger of these, the rest of a ramp used the reserved part and premium
                # rooms preempted the rooms that borrowed it).
                history = self._history[name]
                ramp = min(history.growth(now, demand, cfg.ramp_window_seconds) * cfg.ramp_seconds,
                           history.risen(demand))
                held = sig.reserved_free * cfg.reserved_spare
                spare = demand * cfg.headroom + ramp + held
                raw = math.ceil((demand + spare) / per_worker - 1e-9)
                keep = math.ceil((demand * (1.0 + cfg.headroom) * (1.0 + cfg.scale_down_tolerance)
                                  + ramp + held) / per_worker - 1e-9)
                reserved = math.ceil(sig.reserved_units / per_worker - 1e-9)
                why = (f"demand {demand:.1f} units + {spare:.1f} spare ({cfg.headroom:.0%} headroom"
                       f"{f', {ramp:.1f} for the ramp' if ramp else ''}"
                       f"{f', {held:.1f} reserved and unused' if held else ''}) "
                       f"at {per_worker:.1f} units per worker")
                if reserved > raw:
                    raw, why = reserved, f"premium reservations need {sig.reserved_units:.1f} units"
                keep = max(keep, reserved)
                fresh = math.ceil(stuck.get(name, 0.0) / per_worker - 1e-9)
                if fresh and sig.ready + fresh > raw:
                    # Units spare on paper, in pieces no waiting room fits: the rooms that
                    # could not be placed need workers of their own (booting ones count).
                    raw = sig.ready + fresh
                    why = (f"{stuck.get(name, 0.0):.1f} units of rooms found no worker with "
                           f"room; {fresh} more worker(s) for them")
            raw = min(max(raw, pool.min_workers), pool.max_workers)
            keep = min(max(keep, pool.min_workers), pool.max_workers)
            stable = self._history[name].add(now, keep, cfg.scale_down_window_seconds)
            if raw >= current:
                desired = raw
            elif signals.pending_units > 0:
                desired, why = current, "rooms are waiting"
            else:
                # Down only to what the window's peak needs (with the tolerance), a step
                # at a time.
                desired = min(current, max(stable, current - cfg.scale_down_step, raw))
                if desired > raw:
                    why += f"; held by the {cfg.scale_down_window_seconds:g} s stabilisation window"
            decisions.append(PoolDecision(name, current, desired, why))
        return decisions


def _share_pending(pools: Mapping[str, PoolConfig], signals: Signals,
                   units_per_worker: object) -> dict[str, float]:
    """Waiting units go to the pools in configuration order, each taking what it can
    still grow by (its free capacity plus new workers up to its max); the rest goes
    to the first pool, which then shows the shortfall."""
    left = signals.pending_units
    share: dict[str, float] = {}
    names: Sequence[str] = list(pools)
    for name in names:
        if left <= 0:
            break
        sig = signals.pools.get(name, PoolSignals(0, 0, 0.0, 0.0))
        per = units_per_worker(name, sig.units_per_worker)  # type: ignore[operator]
        if per <= 0:
            share[name] = left
            return share
        room = max(0.0, pools[name].max_workers * per - sig.load_units)
        take = min(left, room)
        if take > 0:
            share[name] = take
            left -= take
    if left > 0 and names:
        share[names[0]] = share.get(names[0], 0.0) + left
    return share
