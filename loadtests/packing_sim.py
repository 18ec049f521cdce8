"""What placement costs: the scheduler's packing policy against round-robin and
least-loaded placement and against a lower bound, on one trace. A pure
simulation on scheduler.policy.placement (no processes, no gRPC), in simulated time.

Cost per stream-hour here is what the fleet bills when workers with no room
are released (the autoscaler's job): price x busy worker-seconds / stream-hours.
The lower bound is the demand at perfect packing, in fractions of a worker:
each room's share of a worker filled to the utilisation target with rooms of
its own shape (so batches are as large as a full worker allows; whichever of
GPU compute and CPU encode binds first), served at every moment by the device
types cheapest for it first, as many as the fleet has. It ignores that rooms
arrive and leave one by one: no online placement without moving rooms reaches
it.

    from loadtests.packing_sim import compare
    print(compare(trace, workers))      # the load test calls this with its trace
"""

from __future__ import annotations

import dataclasses
import heapq
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from avatarfarm.domain import DriveMode, Quality, Stage, Tier  # noqa: E402
from scheduler.policy.placement import (  # noqa: E402
    Fleet,
    MemoryProfile,
    RoomReq,
    StageCost,
    Strategy,
    WorkerProfile,
    WorkerState,
)

_STAGES = {"render": Stage.RENDER, "encode": Stage.ENCODE,
           "audio_to_motion": Stage.AUDIO_TO_MOTION, "tts": Stage.TTS}
TARGET = 0.9


@dataclass(frozen=True, slots=True)
class StrategyCost:
    strategy: str
    cost_per_stream_hour: float
    busy_worker_hours: float
    stream_hours: float
    unplaced: int
    peak_busy_workers: int
    mean_gpu_utilisation: float  # of busy workers, time-weighted


@dataclass(frozen=True, slots=True)
class CostComparison:
    lower_bound: float  # per stream-hour
    results: tuple[StrategyCost, ...]

    def by(self, strategy: str) -> StrategyCost:
        return next(r for r in self.results if r.strategy == strategy)

    def __str__(self) -> str:
        lines = [f"cost per stream-hour (idle workers released), lower bound "
                 f"{self.lower_bound:.4f}:"]
        for r in self.results:
            lines.append(
                f"  {r.strategy:<13} {r.cost_per_stream_hour:.4f} "
                f"({r.cost_per_stream_hour / self.lower_bound:.2f}x the bound), "
                f"{r.busy_worker_hours:.0f} busy worker-h for {r.stream_hours:.0f} stream-h, "
                f"peak {r.peak_busy_workers} busy workers, GPU utilisation of busy workers "
                f"{r.mean_gpu_utilisation:.0%}, unplaced {r.unplaced}")
        return "\n".join(lines)


def worker_state(spec: Any, memory: MemoryProfile | None = None) -> WorkerState:
    costs = tuple(StageCost.measured(_STAGES[stage], w, h, points, spec.latency_budget_seconds)
                  for (stage, w, h), points in spec.profiles.items())
    return WorkerState(spec.worker_id, WorkerProfile(costs), 1.0, price=spec.price_per_hour,
                       cpu_capacity=float(spec.cpu_cores),
                       memory_capacity=float(spec.memory_bytes) if memory else 0.0,
                       memory=memory or MemoryProfile(), device_type=spec.device_type,
                       warm=frozenset(spec.warm_avatars))


def room_req(room: Any, seq: int) -> RoomReq:
    w, h, fps = room.quality
    return RoomReq(room.room_id, room.tenant, room.avatar, Quality(w, h, fps),
                   DriveMode(room.drive), Tier(room.tier), seq)


def _shares(req: RoomReq, w: WorkerState) -> float:
    """The share of one worker (of this device type) a room takes at perfect packing:
    workers filled to the target with rooms of this one shape, so their batches are as
    large as a full worker allows (a worker of n such rooms batches n frames per call);
    whichever of GPU compute and CPU encode binds first."""
    trial = w.copy()
    n = 0
    while n < 4096:
        d = trial.demand(dataclasses.replace(req, session_id=f"x{n}"))
        if d is None:
            return float("inf")
        if not trial.fits(d, TARGET):
            # The last room's fraction that still fits, so the share is not rounded down.
            c = (w.compute_capacity * TARGET - trial.compute_load) / d.compute if d.compute \
                else 1.0
            return 1.0 / (n + max(0.0, min(1.0, c)))
        trial.add(dataclasses.replace(req, session_id=f"x{n}"))
        n += 1
    return 1.0 / n


def simulate(trace: Sequence[Any], workers: Sequence[Any], strategy: Strategy,
             memory: MemoryProfile | None = None) -> StrategyCost:
    fleet = Fleet(TARGET, strategy=strategy)
    price = {w.worker_id: w.price_per_hour for w in workers}
    for spec in workers:
        fleet.add_worker(worker_state(spec, memory))
    events: list[tuple[float, int, int]] = []  # (time, 0 = end before 1 = arrival, index)
    for i, r in enumerate(trace):
        heapq.heappush(events, (r.arrival_s, 1, i))
    placed: dict[str, str] = {}
    busy_cost = busy_secs = stream_secs = util_secs = 0.0
    unplaced = peak = 0
    busy_price = 0.0
    last = events[0][0] if events else 0.0
    while events:
        t, kind, i = heapq.heappop(events)
        dt = t - last
        if dt > 0:
            busy = fleet.busy_workers
            busy_cost += busy_price * dt / 3600.0
            busy_secs += busy * dt
            stream_secs += len(placed) * dt
            util_secs += fleet.load_total * dt  # capacity is 1.0 per worker
            last = t
        room = trace[i]
        if kind == 1:
            req = room_req(room, i)
            choice = fleet.choose(req)
            if choice is None:
                unplaced += 1
                continue
            wid = choice.worker_id
            if not fleet.workers[wid].rooms:
                busy_price += price[wid]
            fleet.assign(req, wid)
            placed[room.room_id] = wid
            heapq.heappush(events, (room.arrival_s + room.duration_s, 0, i))
            peak = max(peak, fleet.busy_workers)
        else:
            wid = placed.pop(room.room_id)
            fleet.release(room.room_id)
            if not fleet.workers[wid].rooms:
                busy_price -= price[wid]
    hours = stream_secs / 3600.0
    return StrategyCost(strategy.value, busy_cost / hours if hours else 0.0, busy_secs / 3600.0,
                        hours, unplaced, peak, util_secs / busy_secs if busy_secs else 0.0)


def lower_bound(trace: Sequence[Any], workers: Sequence[Any]) -> float:
    """Cost per stream-hour at perfect packing: at every moment the rooms' demand, as
    fractions of a worker, is served by the device types cheapest for it first, each up to
    the number of workers the fleet has of it."""
    types: dict[str, tuple[float, WorkerState, int]] = {}
    for spec in workers:
        price, state, n = types.get(spec.device_type, (spec.price_per_hour, worker_state(spec), 0))
        types[spec.device_type] = (price, state, n + 1)
    events: list[tuple[float, int, dict[str, float]]] = []
    memo: dict[tuple[object, ...], dict[str, float]] = {}
    for i, r in enumerate(trace):
        key = (r.quality, r.drive)
        if key not in memo:
            memo[key] = {t: _shares(room_req(r, i), st) for t, (_, st, _) in types.items()}
        shares = memo[key]
        events.append((r.arrival_s, 1, shares))
        events.append((r.arrival_s + r.duration_s, -1, shares))
    events.sort(key=lambda e: (e[0], e[1]))
    demand = dict.fromkeys(types, 0.0)
    money = stream = 0.0
    live = 0
    last = events[0][0] if events else 0.0
    for t, sign, shares in events:
        dt = t - last
        if dt > 0 and live:
            left = 1.0  # fraction of the demand not yet served
            for name in sorted(types, key=lambda n: types[n][0] * demand[n]):
                price, _, count = types[name]
                if demand[name] <= 0 or left <= 0:
                    continue
                f = min(left, count / demand[name])
                money += price * f * demand[name] * dt / 3600.0
                left -= f
            stream += live * dt / 3600.0
            last = t
        elif dt > 0:
            last = t
        for name, share in shares.items():
            demand[name] += sign * share
        live += sign
    return money / stream if stream else 0.0


def compare(trace: Sequence[Any], workers: Sequence[Any],
            memory: MemoryProfile | None = None) -> CostComparison:
    """Each strategy on the same trace and fleet (rooms that fit nowhere are not placed)."""
    results = tuple(simulate(trace, workers, s, memory)
                    for s in (Strategy.PACK, Strategy.LEAST_LOADED, Strategy.ROUND_ROBIN))
    return CostComparison(lower_bound(trace, workers), results)
