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

    python loadtests/packing_sim.py --day all   # every day shape of loadtests/trace.py
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
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
    ConsolidationConfig,
    Fleet,
    MemoryProfile,
    MoveBudget,
    RoomReq,
    StageCost,
    Strategy,
    WorkerProfile,
    WorkerState,
    consolidation_moves,
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
    moves: int = 0  # rooms moved by consolidation


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
                f"{r.mean_gpu_utilisation:.0%}, unplaced {r.unplaced}"
                + (f", {r.moves} moves ({r.moves / r.stream_hours * 4:.2f} per room per 4 h)"
                   if r.strategy.endswith("consolidate") else ""))
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
             memory: MemoryProfile | None = None, consolidate: ConsolidationConfig | None = None,
             interval: float = 300.0) -> StrategyCost:
    """One strategy over the trace; with ``consolidate``, under-filled workers are emptied
    into fuller ones every ``interval`` simulated seconds (rooms moved at once)."""
    fleet = Fleet(TARGET, strategy=strategy)
    price = {w.worker_id: w.price_per_hour for w in workers}
    for spec in workers:
        fleet.add_worker(worker_state(spec, memory))
    events: list[tuple[float, int, int]] = []  # (time, 0 = end before 1 = arrival, index)
    for i, r in enumerate(trace):
        heapq.heappush(events, (r.arrival_s, 1, i))
    if consolidate is not None and trace:
        heapq.heappush(events, (trace[0].arrival_s + interval, 2, -1))
    budget = MoveBudget()
    moves = 0
    history: collections.deque[tuple[float, float]] = collections.deque()  # (time, fleet load)
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
        if kind == 2:
            assert consolidate is not None
            while history and history[0][0] < t - consolidate.window_seconds:
                history.popleft()
            peak_load = max((x for _, x in history), default=fleet.load_total)
            for m in consolidation_moves(fleet, t, budget, consolidate, recent_peak=peak_load):
                req = fleet.room(m.session_id)
                assert req is not None
                fleet.assign(req, m.target)
                placed[m.session_id] = m.target
                if not fleet.workers[m.source].rooms:
                    busy_price -= price[m.source]
                budget.spend((m,), t)
                moves += 1
            if any(e[1] != 2 for e in events):
                heapq.heappush(events, (t + interval, 2, -1))
            continue
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
            history.append((t, fleet.load_total))
        else:
            wid = placed.pop(room.room_id)
            fleet.release(room.room_id)
            budget.forget(room.room_id)
            if not fleet.workers[wid].rooms:
                busy_price -= price[wid]
    hours = stream_secs / 3600.0
    name = strategy.value + ("+consolidate" if consolidate is not None else "")
    return StrategyCost(name, busy_cost / hours if hours else 0.0, busy_secs / 3600.0,
                        hours, unplaced, peak, util_secs / busy_secs if busy_secs else 0.0, moves)


def _device_types(workers: Sequence[Any]) -> dict[str, tuple[float, WorkerState, int]]:
    """Each device type in the fleet: its price per hour, one worker's state and how many."""
    types: dict[str, tuple[float, WorkerState, int]] = {}
    for spec in workers:
        price, state, n = types.get(spec.device_type, (spec.price_per_hour, worker_state(spec), 0))
        types[spec.device_type] = (price, state, n + 1)
    return types


def _demand_events(trace: Sequence[Any], types: dict[str, tuple[float, WorkerState, int]]
                   ) -> list[tuple[float, int, dict[str, float]]]:
    """(time, +1 arrival or -1 end, the room's share of one worker of each device type),
    in time order, ends before arrivals at the same moment."""
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
    return events


def lower_bound(trace: Sequence[Any], workers: Sequence[Any]) -> float:
    """Cost per stream-hour at perfect packing: at every moment the rooms' demand, as
    fractions of a worker, is served by the device types cheapest for it first, each up to
    the number of workers the fleet has of it."""
    types = _device_types(workers)
    events = _demand_events(trace, types)
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


def peak_demand(trace: Sequence[Any], workers: Sequence[Any]) -> float:
    """The most workers of the fleet's most common device type the live rooms fill at any
    moment at perfect packing: what a fleet must have at least to place the whole day."""
    types = _device_types(workers)
    main = max(types, key=lambda n: types[n][2])
    demand = peak = 0.0
    for _, sign, shares in _demand_events(trace, types):
        demand += sign * shares[main]
        peak = max(peak, demand)
    return peak


def compare(trace: Sequence[Any], workers: Sequence[Any],
            memory: MemoryProfile | None = None) -> CostComparison:
    """Each strategy on the same trace and fleet (rooms that fit nowhere are not placed),
    packing also with consolidation."""
    results = (simulate(trace, workers, Strategy.PACK, memory, ConsolidationConfig()),
               *(simulate(trace, workers, s, memory)
                 for s in (Strategy.PACK, Strategy.LEAST_LOADED, Strategy.ROUND_ROBIN)))
    return CostComparison(lower_bound(trace, workers), results)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import random
    import time

    from loadtests.trace import DAYS, make_day, make_tenants
    from loadtests.worker_specs import make_workers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--day", default="all", help=f"day shape: {', '.join(DAYS)} or all (default)")
    ap.add_argument("--peak-rooms", type=int, default=2000, help="rooms live at the day's peak")
    ap.add_argument("--workers", type=int, default=0,
                    help="workers in the fleet (default: twice the day's peak demand at "
                         "perfect packing, at least one per five rooms at the peak)")
    ap.add_argument("--l4-share", type=float, default=0.1, help="fraction of L4 workers")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    names = list(DAYS) if args.day == "all" else [args.day]
    for name in names:
        shape = DAYS[name]
        tenants = make_tenants(shape=shape)
        trace = make_day(args.peak_rooms, tenants, args.seed, shape)
        avatars = sorted({a for t in tenants for a in t.avatars})
        n = args.workers
        if not n:
            # Sized by what the day's rooms need, not by their count: a 1080p-heavy day
            # fills several times the workers of the default mix at the same peak.
            sample = make_workers(max(10, round(2 / args.l4_share)) if args.l4_share else 10,
                                  args.l4_share, avatars, random.Random(args.seed))
            n = max(10, args.peak_rooms // 5, math.ceil(2 * peak_demand(trace, sample)))
        workers = make_workers(n, args.l4_share, avatars, random.Random(args.seed))
        t0 = time.perf_counter()
        result = compare(trace, workers)
        print(f"== {name}: {shape.description} ({len(trace)} rooms, {n} workers, "
              f"{time.perf_counter() - t0:.0f} s)")
        print(result, flush=True)


if __name__ == "__main__":
    main()
