"""The load test's phases, each against the running scheduler, each printing its figures
and putting them into the ``Report``:

  [1] burst   ``phase_burst``: CreateSession as fast as answers come back (placements/s)
  [1b] batch  ``phase_batch``: the burst in CreateSessions calls of many rooms
  [2] rate    ``phase_rate``: CreateSession open loop at a fixed rate (p50/p99/max latency)
  [3] trace   ``phase_trace``: the day replayed, the clock held at the evening peak while
              ``hold_at_peak`` measures the scheduler's CPU, utilisation and sessions by tier
  [4] metrics ``final_metrics``: metered stream time, cost per stream-hour, premium
              guarantees kept, what the workers saw
  [5] costs   ``compare_costs``: the packing simulator on this run's trace and fleet

Every phase ends the rooms it created (burst and rate) or that the trace ends, so the
next one starts from an idle scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from avatarfarm.v1 import sessions_pb2, types_pb2
from loadtests.measure import CpuMeter, ms, msum, pct, scrape
from loadtests.report import Report
from loadtests.scheduler_process import SchedulerProcess
from loadtests.sim_worker import Fleet
from loadtests.tenant_client import Call, Tenants, bounded, codes, end_leftovers
from loadtests.trace import DAY, HOUR, TIERS, Room, Tenant, peak_of
from loadtests.wire import STATE_NAME, TIER_NAME, spec_pb
from loadtests.worker_specs import WorkerSpec, compute_units


@dataclass
class _Burst:
    """Rooms created as fast as answers come back, as seen from both sides."""

    calls: list[Call]  # one per room
    wall: float
    placed: int  # placed in the answer
    assigned: int  # Assign messages the simulated workers received meanwhile
    sched_cpu: float
    gen_cpu: float

    @property
    def rate(self) -> float:
        return self.placed / self.wall


async def _burst(fleet: Fleet, sched_pid: int, send: Callable[[], Awaitable[list[Call]]]) -> _Burst:
    before = await fleet.stats()
    sched = CpuMeter([sched_pid])
    gen = CpuMeter([os.getpid(), *fleet.pids])
    t0 = time.perf_counter()
    calls = await send()
    wall = time.perf_counter() - t0
    s_cpu, g_cpu = sched.share(), gen.share()
    placed = sum(c.state in (types_pb2.SESSION_STATE_PLACED, types_pb2.SESSION_STATE_RUNNING) for c in calls)
    await asyncio.sleep(1.0)  # the last Assign messages
    after = await fleet.stats()
    assigned = sum(after["assigns"].values()) - sum(before["assigns"].values())
    return _Burst(calls, wall, placed, assigned, s_cpu, g_cpu)


def _print_burst(b: _Burst, latencies: list[float], what: str) -> None:
    print(f"  {b.placed}/{len(b.calls)} placed in the answer in {b.wall:.2f}s = {b.rate:.0f} placements/s "
          f"({b.assigned} Assign messages reached the workers); errors: {codes(b.calls)}")
    print(f"  {what} p50 {ms(pct(latencies, 0.5))} p99 {ms(pct(latencies, 0.99))} (closed loop); CPU: "
          f"scheduler {b.sched_cpu:.0%} of a core, generator {b.gen_cpu:.0%}", flush=True)


async def phase_burst(tc: Tenants, fleet: Fleet, rooms: list[Room], concurrency: int,
                      sched_pid: int, rep: Report, time_limit: float) -> None:
    print(f"\n[1] burst: {len(rooms)} CreateSession calls, {concurrency} in flight", flush=True)

    async def send() -> list[Call]:
        results = await bounded(rooms, concurrency, lambda r: tc.create(spec_pb(r), r.room_id),
                                time_limit)
        return [c for c in results if c is not None]

    b = await _burst(fleet, sched_pid, send)
    if len(b.calls) < len(rooms):
        rep.note(f"burst stopped at its {time_limit:.0f}s limit after {len(b.calls)}/{len(rooms)} calls")
    _print_burst(b, [c.latency for c in b.calls if c.code == "OK"], "latency")
    rep.values.update(burst_rate=b.rate, burst_placed=b.placed, burst_sched_cpu=b.sched_cpu,
                      burst_gen_cpu=b.gen_cpu)
    t1 = time.perf_counter()
    ids = [c.session_id for c in b.calls if c.session_id]
    ends = await bounded(ids, concurrency, tc.end)
    print(f"  ended {len(ids)} in {time.perf_counter() - t1:.2f}s "
          f"({len(ids) / max(time.perf_counter() - t1, 1e-9):.0f}/s); errors: {codes(ends)}", flush=True)
    if len(ids) < len(rooms):
        print(f"  ended {await end_leftovers(tc, 'b')} more created by calls that timed out", flush=True)


async def phase_batch(tc: Tenants, fleet: Fleet, rooms: list[Room], batch: int, in_flight: int,
                      sched_pid: int, rep: Report, time_limit: float) -> None:
    """[1b] The burst again as a vendor opening a wave of rooms sends it: CreateSessions
    calls of `batch` rooms, `in_flight` calls at a time."""
    print(f"\n[1b] batched burst: {len(rooms)} rooms in CreateSessions calls of {batch}, "
          f"{in_flight} calls in flight", flush=True)
    chunks = [rooms[i:i + batch] for i in range(0, len(rooms), batch)]
    latencies: list[float] = []

    async def send() -> list[Call]:
        results = await bounded(chunks, in_flight, lambda c: tc.create_many(
            [(spec_pb(r), r.room_id) for r in c]), time_limit)
        latencies.extend(done[0].latency for done in results if done)
        return [c for done in results if done is not None for c in done]

    b = await _burst(fleet, sched_pid, send)
    _print_burst(b, latencies, "call latency")
    rep.values.update(batch_rate=b.rate, batch_size=batch, batch_sched_cpu=b.sched_cpu)
    ids = [c.session_id for c in b.calls if c.session_id]
    ends = await bounded(ids, 128, tc.end)
    print(f"  ended {len(ids)}; errors: {codes(ends)}", flush=True)


async def phase_rate(tc: Tenants, fleet: Fleet, rooms: list[Room], rate: float, max_in_flight: int,
                     sched_pid: int, rep: Report) -> None:
    n = len(rooms)
    print(f"\n[2] rate: open-loop CreateSession at {rate:.0f}/s for {n / rate:.1f}s "
          f"({n} calls, at most {max_in_flight} in flight)", flush=True)
    calls: list[Call] = []
    lags: list[float] = []
    skipped = 0
    in_flight: set[asyncio.Task[Call]] = set()
    sched = CpuMeter([sched_pid])
    gen = CpuMeter([os.getpid(), *fleet.pids])
    t0 = time.perf_counter()
    i = 0
    while i < n:
        now = time.perf_counter()
        due = min(n, int((now - t0) * rate) + 1)
        while i < due:
            if len(in_flight) >= max_in_flight:
                skipped += 1
            else:
                lags.append(time.perf_counter() - (t0 + i / rate))
                r = rooms[i]
                task = asyncio.create_task(tc.create(spec_pb(r), r.room_id))
                in_flight.add(task)
                task.add_done_callback(lambda t: (in_flight.discard(t), calls.append(t.result())))
            i += 1
        await asyncio.sleep(max(0.0, min(0.002, t0 + i / rate - time.perf_counter())))
    sent_wall = time.perf_counter() - t0
    if in_flight:
        await asyncio.wait(in_flight, timeout=tc.timeout + 5)
    wall = time.perf_counter() - t0
    s_cpu, g_cpu = sched.share(), gen.share()
    ok = [c for c in calls if c.code == "OK"]
    lat = [c.latency for c in ok]
    placed = sum(c.state in (types_pb2.SESSION_STATE_PLACED, types_pb2.SESSION_STATE_RUNNING) for c in ok)
    achieved = len(ok) / wall
    print(f"  sent {n - skipped} in {sent_wall:.2f}s (generator lag p99 {ms(pct(lags, 0.99))}, "
          f"{skipped} not sent: in-flight cap); {len(ok)} answered OK in {wall:.2f}s = {achieved:.0f}/s, "
          f"{placed} placed; errors: {codes(calls)}")
    print(f"  CreateSession latency: p50 {ms(pct(lat, 0.5))}  p99 {ms(pct(lat, 0.99))}  "
          f"max {ms(max(lat) if lat else math.nan)}")
    by_second: dict[int, list[float]] = collections.defaultdict(list)
    for c in ok:
        by_second[int(c.started - t0)].append(c.latency)
    print("  p99 by second sent: " + " ".join(
        f"{ms(pct(v, 0.99))}" for _, v in sorted(by_second.items())))
    print(f"  CPU: scheduler {s_cpu:.0%} of a core, generator {g_cpu:.0%} (main + worker processes)",
          flush=True)
    rep.values.update(rate_target=rate, rate_achieved=achieved, rate_p50=pct(lat, 0.5),
                      rate_p99=pct(lat, 0.99), rate_sched_cpu=s_cpu, rate_gen_cpu=g_cpu,
                      rate_skipped=skipped)
    ids = [c.session_id for c in calls if c.session_id]
    t1 = time.perf_counter()
    ends = await bounded(ids, 128, tc.end)
    print(f"  ended {len(ids)} in {time.perf_counter() - t1:.2f}s; errors: {codes(ends)}", flush=True)
    if len(ok) < n:
        print(f"  ended {await end_leftovers(tc, 'q')} more created by calls that timed out", flush=True)


async def phase_trace(tc: Tenants, fleet: Fleet, sched: SchedulerProcess, trace: list[Room],
                      tenants: dict[str, Tenant], ref: WorkerSpec, args: argparse.Namespace,
                      rep: Report) -> dict[str, Call]:
    scale = args.day_seconds / DAY
    t_peak, n_peak = peak_of(trace)
    print(f"\n[3] trace: {len(trace)} rooms over a day in {args.day_seconds:.0f}s "
          f"(1 h = {HOUR * scale:.1f}s); the clock holds {args.hold_seconds:.0f}s at the peak "
          f"({t_peak / HOUR:05.2f}h, {n_peak} rooms live)", flush=True)
    events: list[tuple[float, int, Room]] = []
    for r in trace:
        events.append((r.arrival_s, 1, r))
        events.append((min(r.end_s, DAY), 0, r))  # ends before arrivals at the same instant
    events.sort(key=lambda e: (e[0], e[1]))
    created: dict[str, Call] = {}
    pending_create: dict[str, asyncio.Task[Call]] = {}
    end_calls: list[Call] = []
    within: dict[str, bool] = {}
    prem_units: dict[str, float] = collections.Counter()
    sem = asyncio.Semaphore(args.concurrency)
    tasks: set[asyncio.Task[Any]] = set()
    max_lag = 0.0
    held = False
    deadline = time.perf_counter() + args.day_seconds * 3 + args.hold_seconds + 60

    async def create(r: Room) -> Call:
        async with sem:
            c = await tc.create(spec_pb(r), r.room_id)
        created[r.room_id] = c
        return c

    async def end(r: Room) -> None:
        t = pending_create.pop(r.room_id, None)
        c = await t if t is not None else created.get(r.room_id)
        if c is None or not c.session_id:
            return
        async with sem:
            end_calls.append(await tc.end(c.session_id))

    def spawn(coro: Any) -> asyncio.Task[Any]:
        t = asyncio.create_task(coro)
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        return t

    t0 = time.perf_counter()
    offset = 0.0
    next_print = 0.0
    for sim_t, kind, room in events:
        if not held and sim_t >= t_peak:
            held = True
            offset += await hold_at_peak(tc, fleet, sched, t_peak, n_peak, ref, args, rep,
                                         set(pending_create.values()))
        wall_at = t0 + sim_t * scale + offset
        delay = wall_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            max_lag = max(max_lag, -delay)
        if time.perf_counter() > deadline:
            rep.note("trace phase ran past its time limit; remaining events skipped")
            break
        if kind == 1:
            if room.tier == "premium":
                t = tenants.get(room.tenant)
                u = compute_units(ref, room.quality, room.drive)
                prem_units[room.tenant] += u
                within[room.room_id] = bool(t and t.reserved_units > 0
                                            and prem_units[room.tenant] <= t.reserved_units + 1e-9)
            pending_create[room.room_id] = spawn(create(room))
        else:
            if room.tier == "premium":
                prem_units[room.tenant] -= compute_units(ref, room.quality, room.drive)
            spawn(end(room))
        if sim_t >= next_print:
            next_print += 3 * HOUR
            st = await fleet.stats()
            print(f"  {sim_t / HOUR:05.2f}h  rooms on workers {st['rooms']:6d}  "
                  f"creates answered {len(created):6d}  lag {max_lag:.2f}s", flush=True)
    if tasks:
        await asyncio.wait(set(tasks), timeout=tc.timeout + 10)
    unanswered = sum(1 for r in trace if r.room_id not in created)
    if unanswered:
        rep.note(f"{unanswered}/{len(trace)} trace rooms never got a CreateSession answer (queued "
                 f"behind {args.concurrency} calls in flight when the day ended): the scheduler "
                 "fell behind the trace")
    print(f"  {len(created)}/{len(trace)} creates answered, {unanswered} never sent or answered")
    print(f"  day done in {time.perf_counter() - t0:.1f}s; max lag behind the trace {max_lag:.2f}s; "
          f"create errors: {codes(created.values())}; end errors: {codes(end_calls)}", flush=True)
    rep.values.update(trace_max_lag=max_lag, within=within,
                      create_errors=collections.Counter(c.code for c in created.values() if c.code != "OK"))
    return created


async def hold_at_peak(tc: Tenants, fleet: Fleet, sched: SchedulerProcess, t_peak: float, n_peak: int,
                       ref: WorkerSpec, args: argparse.Namespace, rep: Report,
                       creates: set[asyncio.Task[Call]]) -> float:
    t_hold = time.perf_counter()
    # Let queued creates land first, so the window measures reporting, not placement.
    waiting = {t for t in creates if not t.done()}
    if waiting:
        await asyncio.wait(waiting, timeout=max(3.0, args.call_timeout))
    backlog = sum(not t.done() for t in creates)
    if backlog:
        rep.note(f"the CPU window at the peak began with {backlog} CreateSession calls still queued "
                 "(the scheduler could not keep up with the trace): it measures placement too")
    await asyncio.sleep(1.0)
    st = await fleet.stats()
    print(f"  -- peak {t_peak / HOUR:05.2f}h: holding; {st['rooms']} rooms on {st['registered']} "
          f"workers; measuring CPU for {args.hold_seconds:.0f}s", flush=True)
    s_meter = CpuMeter([sched.pid])
    g_meter = CpuMeter([os.getpid(), *fleet.pids])
    r0 = st["reports"]
    await asyncio.sleep(args.hold_seconds)
    s_cpu, g_cpu = s_meter.share(), g_meter.share()
    st2 = await fleet.stats()
    msgs = (st2["reports"] - r0) / args.hold_seconds
    print(f"  scheduler CPU {s_cpu:.1%} of one core with {st2['rooms']} rooms, {st2['registered']} workers "
          f"({msgs:.0f} reports/s + heartbeats: each worker every "
          f"{st2['registered'] / msgs if msgs else math.inf:.1f} s, as the scheduler paces them); "
          f"generator {g_cpu:.0%}", flush=True)
    m = scrape(sched.metrics_port)
    load = msum(m, "avatarfarm_worker_load_device_seconds_per_second")
    cap = msum(m, "avatarfarm_worker_capacity_device_seconds_per_second")
    util = load / cap if cap else math.nan
    by_dev = {lab["device_type"]: v for lab, v in m.get("avatarfarm_worker_load_device_seconds_per_second", [])}
    caps = {lab["device_type"]: v for lab, v in m.get("avatarfarm_worker_capacity_device_seconds_per_second", [])}
    print(f"  GPU utilisation (placed load / capacity): {util:.1%}  "
          + "  ".join(f"{d} {by_dev.get(d, 0) / c:.1%}" for d, c in caps.items() if c))
    live = await tc.list_live()
    by = collections.Counter((TIER_NAME.get(s.spec.tier, "?"), STATE_NAME.get(s.state, "?")) for s in live)
    for tier in TIERS:
        print(f"    {tier:12s} " + "  ".join(f"{st_}={by[(tier, st_)]:5d}"
                                              for st_ in ("pending", "placed", "running")))
    degraded = sum(1 for s in live if getattr(s, "degradation_step", 0) > 0)
    rep.values.update(peak_cpu=s_cpu, peak_gen_cpu=g_cpu, peak_rooms=st2["rooms"],
                      peak_workers=st2["registered"], peak_util=util, peak_live=len(live),
                      peak_pending=sum(v for (_, s_), v in by.items() if s_ == "pending"),
                      peak_degraded_sessions=degraded, peak_by=by)
    return time.perf_counter() - t_hold


async def final_metrics(tc: Tenants, fleet: Fleet, sched: SchedulerProcess, trace: list[Room],
                        created: dict[str, Call], rep: Report) -> None:
    print("\n[4] metrics and guarantees", flush=True)
    m = scrape(sched.metrics_port)
    stream_s = msum(m, "avatarfarm_stream_seconds_total")
    device_s = msum(m, "avatarfarm_attributed_device_seconds_total")
    print(f"  metered: {stream_s / 3600:.1f} stream-hours, {device_s / 3600:.2f} device-hours; "
          f"placements_total {msum(m, 'avatarfarm_placements_total'):.0f}")
    cost = {lab.get("tier", ""): v for lab, v in m.get("avatarfarm_cost_per_stream_hour", [])}
    print("  cost per stream-hour: " + ", ".join(f"{t} {cost.get(t, 0):.3f}" for t in TIERS))
    if stream_s == 0:
        rep.note("the scheduler metered no stream time: progress reports were not accounted "
                 "(cost per stream-hour unavailable)")
    rep.values.update(cost=cost, stream_hours=stream_s / 3600)
    try:
        usage = await tc.stubs[0].GetUsage(sessions_pb2.GetUsageRequest(
            group_by=[sessions_pb2.USAGE_DIMENSION_TIER]), timeout=30)
        for row in usage.rows:
            print(f"  GetUsage {TIER_NAME.get(row.tier, '?'):12s} sessions {row.sessions:6d} "
                  f"stream-h {row.stream_seconds / 3600:8.1f} cost {row.cost:9.2f} "
                  f"per stream-hour {row.cost_per_stream_hour:.3f}")
    except grpc.aio.AioRpcError as e:
        rep.note(f"GetUsage: {e.code().name} (usage ledger API not implemented yet)")
    st = await fleet.stats()
    records = await fleet.records()
    within: dict[str, bool] = rep.values.get("within", {})
    premium = [r for r in trace if r.tier == "premium"]
    eligible = [r for r in premium if within.get(r.room_id)] or premium
    kept = 0
    never = sum(1 for r in eligible if r.room_id not in created)
    for r in eligible:
        c = created.get(r.room_id)
        if c is None or c.state not in (types_pb2.SESSION_STATE_PLACED, types_pb2.SESSION_STATE_RUNNING):
            continue
        assigns, foreign, reconf = records.get(c.session_id, [0, 0, 0])
        if assigns == 1 and foreign == 0 and reconf == 0:
            kept += 1
    print(f"  premium guarantees kept: {kept}/{len(eligible)} premium rooms "
          f"{'within their tenant reservation' if eligible is not premium else '(no reservations known)'}"
          f"{'' if rep.values.get('tenants') else ' (reservations not configured in this scheduler)'} "
          f"placed at once, never moved, preempted or degraded ({never} of them never created)")
    print(f"  worker side: assigns {dict(st['assigns'])}, releases {st['releases']} "
          f"({st['foreign_releases']} not requested by the tenant), reconfigures {st['reconfigures']}, "
          f"stream errors {st['stream_errors']} {dict(st['errors']) or ''}")
    rep.values.update(premium_kept=kept, premium_eligible=len(eligible), degradations=st["reconfigures"],
                      foreign_releases=st["foreign_releases"], stream_errors=st["stream_errors"])


def compare_costs(trace: Sequence[Room], worker_profiles: Sequence[WorkerSpec]) -> Any:
    """Hook for loadtests/packing_sim.py: batch-aware vs round-robin vs least-loaded packing and
    the lower bound, on this run's trace and fleet (a pure simulation, no scheduler)."""
    try:
        from loadtests.packing_sim import compare  # type: ignore[import-not-found]
    except ImportError:
        print("cost comparison: not available (loadtests/packing_sim.py is not there yet)")
        return None
    try:
        result = compare(trace, worker_profiles)
    except Exception as e:  # noqa: BLE001 - a simulator bug must not lose the figures
        print(f"cost comparison failed: {type(e).__name__}: {e}")
        return None
    if result is not None:
        print(result)
    return result
