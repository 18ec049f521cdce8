"""Scheduler load test: the real scheduler process, simulated workers, a diurnal trace.

Starts ``avatarfarm scheduler`` as a subprocess and drives it with simulated
workers: real gRPC ``WorkerService.Connect`` streams that register GPU-like
batched latency profiles, report RUNNING on assignment, then once per interval
(a second, longer where the scheduler paces a large fleet) a heartbeat or one
``UsageReport`` with every room's cumulative progress, rendering nothing. A tenant client creates and ends rooms from a trace of one
livestream-commerce day (quiet night, sharp 20:00-22:00 peak; KA brands with
premium reservations, SaaS vendors with standard rooms, best-effort tenants).

One run prints, phase by phase, then as a PASS/MISS table against the goals:
  1. burst      placements per second (rooms created as fast as they are answered),
                 then again in CreateSessions calls of --batch rooms (a vendor's wave)
  2. rate       p50/p99/max CreateSession latency at a fixed open-loop rate
  3. trace      the day replayed; the clock holds at the evening peak while the
                scheduler's CPU (of one core) is measured from /proc
  4. metrics    sessions by state and tier, GPU utilisation (load / capacity),
                cost per stream-hour by tier, premium guarantees kept, degradations
  5. costs      ``compare_costs(trace, worker_specs)`` (loadtests/packing_sim.py,
                if present: batch-aware vs round-robin vs least-loaded packing)

The generator shares the machine with the scheduler: its own CPU is printed
next to the scheduler's so a reader can tell who was the bottleneck.

Data handed to the packing simulator (plain dataclasses, in loadtests/trace.py and worker_specs.py):
  Room        room_id, arrival_s / duration_s (seconds of the simulated day,
              0..86400), tenant, tier ("premium" | "standard" | "best_effort"),
              quality (width, height, fps), drive ("text" | "voice" | "mocap"), avatar
  WorkerSpec  worker_id, device_type, price_per_hour, cpu_cores, memory_bytes,
              latency_budget_seconds, profiles {(stage, width, height): [(batch, seconds per call)]}
              with stage one of "render" (square side), "encode" (frame size, host
              CPU seconds per frame), "audio_to_motion" and "tts" (0x0; tts seconds
              per second of speech)

With ``--store postgresql`` the scheduler keeps its state in a local PostgreSQL server
instead of SQLite; ``--store both`` runs the test on each, one after the other, and
prints their figures side by side.

    python loadtests/scheduler_load.py                                  # full goal scale
    python loadtests/scheduler_load.py --workers 50 --rooms 500 --day-seconds 30   # quick
    python loadtests/scheduler_load.py --store both --phases burst,batch,rate,trace
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `loadtests.*` and the packages importable
    sys.path.insert(0, str(ROOT))

# The pieces, by noun: the day's rooms and tenants, the fleet's hardware, the scheduler
# process, the simulated workers and tenants, the phases and the report.
from loadtests.phases import (  # noqa: E402
    compare_costs,
    final_metrics,
    phase_batch,
    phase_burst,
    phase_rate,
    phase_trace,
)
from loadtests.report import Report, summary  # noqa: E402
from loadtests.scheduler_process import SchedulerProcess, write_config  # noqa: E402
from loadtests.sim_worker import Fleet  # noqa: E402
from loadtests.tenant_client import Call, Tenants  # noqa: E402
from loadtests.trace import (  # noqa: E402
    HOUR,
    PNG_1X1,
    TIERS,
    Room,
    Tenant,
    live_at,
    make_day,
    make_tenants,
    peak_of,
    synthetic,
    with_reservations,
)
from loadtests.worker_specs import WorkerSpec, make_workers, room_load  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1000, help="simulated workers (default 1000)")
    ap.add_argument("--rooms", type=int, default=10000,
                    help="rooms live at the trace's evening peak (default 10000); a few more arrive "
                         "over the whole day")
    ap.add_argument("--day-seconds", type=float, default=120.0,
                    help="wall seconds one simulated day takes (default 120)")
    ap.add_argument("--hold-seconds", type=float, default=20.0,
                    help="seconds the trace holds at its peak while scheduler CPU is measured (default 20)")
    ap.add_argument("--burst", type=int, default=None,
                    help="rooms created as fast as possible in phase 1 (default 40%% of --rooms)")
    ap.add_argument("--batch", type=int, default=100,
                    help="rooms per CreateSessions call in phase 1b, the batched burst (default 100)")
    ap.add_argument("--batch-in-flight", type=int, default=4,
                    help="CreateSessions calls in flight in phase 1b (default 4)")
    ap.add_argument("--rate", type=float, default=500.0, help="CreateSession per second in phase 2 (default 500)")
    ap.add_argument("--rate-seconds", type=float, default=3.0, help="length of phase 2 (default 3)")
    ap.add_argument("--concurrency", type=int, default=128, help="calls in flight in bursts (default 128)")
    ap.add_argument("--max-in-flight", type=int, default=2000,
                    help="open-loop cap on outstanding calls in phase 2 (default 2000)")
    ap.add_argument("--l4-share", type=float, default=0.1, help="fraction of L4 workers (default 0.1)")
    ap.add_argument("--worker-procs", type=int, default=1,
                    help="processes the simulated workers are split over (default 1; the machine "
                         "has few cores and the scheduler needs one)")
    ap.add_argument("--workers-per-channel", type=int, default=100, help="worker streams per channel")
    ap.add_argument("--client-channels", type=int, default=4, help="tenant client channels (default 4)")
    ap.add_argument("--phase-timeout", type=float, default=120.0,
                    help="the burst stops starting calls after this many seconds (default 120)")
    ap.add_argument("--call-timeout", type=float, default=30.0, help="deadline of one API call (s)")
    ap.add_argument("--progress", choices=["auto", "usage_report", "session_update"], default="auto",
                    help="how workers report progress: one UsageReport per second (the contract), one "
                         "SessionUpdate per room per second (older schedulers), or auto: UsageReport "
                         "unless the scheduler logs it as unexpected")
    ap.add_argument("--no-tenants", action="store_true",
                    help="leave the [tenants] tables out of the scheduler config")
    ap.add_argument("--no-budgets", action="store_true",
                    help="no concurrency cap / spend budget on the two SaaS vendors that get one")
    ap.add_argument("--no-sync", action="store_true",
                    help="scheduler with sync_to_disk = false (no fsync per commit; with "
                         "PostgreSQL, a server without fsync)")
    ap.add_argument("--phases", default="burst,batch,rate,trace", help="which phases to run (default all)")
    ap.add_argument("--store", choices=["sqlite", "postgresql", "both"], default="sqlite",
                    help="the scheduler's store: its SQLite file (default), a local PostgreSQL "
                         "server, or both in turn, compared")
    ap.add_argument("--seed", type=int, default=7, help="trace and fleet seed (default 7)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (config, db, scheduler log)")
    ap.add_argument("--scheduler-root", type=Path, default=ROOT,
                    help="checkout whose scheduler is run (default this one), e.g. a `git archive` "
                         "of another commit to compare")
    ap.add_argument("--scheduler-log-level", default="warning", help="the scheduler's --log-level")
    return ap.parse_args(argv)


def describe(trace: list[Room], tenants: list[Tenant], avatars: list[str], workers: list[WorkerSpec],
             ref: WorkerSpec) -> None:
    """The day and the fleet in three lines, with the peak demand against the fleet's capacity."""
    t_peak, n_peak = peak_of(trace)
    live = live_at(trace, t_peak)
    demand = sum(room_load(ref, r.quality, r.drive) for r in live)
    by_dev = collections.Counter(w.device_type for w in workers)
    # Capacity in H200 terms: a worker's 1.0 device-second/s holds fewer rooms on a slower device.
    sample = live[:500]
    ref_sum = max(sum(room_load(ref, r.quality, r.drive) for r in sample), 1e-9)
    ratio = {w.device_type: sum(room_load(w, r.quality, r.drive) for r in sample) / ref_sum
             for w in {w.device_type: w for w in workers}.values()}
    capacity = sum(1.0 / ratio[w.device_type] for w in workers)
    tiers = collections.Counter(r.tier for r in trace)
    print(f"trace: {len(trace)} rooms arrive over the day ({', '.join(f'{t} {tiers[t]}' for t in TIERS)}), "
          f"{len(tenants)} tenants, {len(avatars)} avatars; peak {n_peak} live at {t_peak / HOUR:05.2f}h")
    print(f"fleet: {', '.join(f'{n} {d}' for d, n in by_dev.items())}; room load on an h200 "
          f"{min(room_load(ref, r.quality, r.drive) for r in trace):.3f}.."
          f"{max(room_load(ref, r.quality, r.drive) for r in trace):.3f} device-s/s")
    print(f"expected peak demand {demand:.0f} h200-device-s/s vs capacity {capacity:.0f} "
          f"= {demand / capacity:.0%} of capacity ({demand / (capacity * 0.9):.0%} of the 0.9 target)",
          flush=True)


def start_scheduler(args: argparse.Namespace, home: Path, tenants: list[Tenant], avatars: list[str],
                    rep: Report, cleanup: list[Any], database_url: str = "") -> SchedulerProcess:
    """The scheduler on a fresh state folder; started again without [tenants] if it refuses them."""
    avatar_dir = home / "avatars"
    avatar_dir.mkdir()
    for a in avatars:
        (avatar_dir / f"{a}.png").write_bytes(PNG_1X1)
    config = home / "scheduler.toml"
    use_tenants = not args.no_tenants
    sched: SchedulerProcess | None = None
    for attempt in (1, 2):
        store: dict[str, Any] = {"sync_to_disk": not args.no_sync}
        if database_url:
            store = {"database_url": database_url, "input_secret_file": str(home / "input-secret")}
        write_config(config, home, avatar_dir, tenants if use_tenants else None, store)
        sched = SchedulerProcess(config, home / f"scheduler-{attempt}.log", args.scheduler_log_level,
                                 args.scheduler_root.resolve())
        cleanup.append(sched.stop)
        if sched.wait_ready():
            break
        log = sched.log_text()
        sched.stop()
        if use_tenants and "tenants" in log:
            rep.note("the scheduler does not accept [tenants] in its config yet; ran without tenants "
                     "(budgets, reservations and premium guarantees per reservation not exercised)")
            use_tenants = False
            continue
        raise SystemExit(f"scheduler did not start:\n{log[-2000:]}")
    assert sched is not None
    rep.values["tenants"] = use_tenants
    print(f"scheduler pid {sched.pid} on 127.0.0.1:{sched.port}, metrics port {sched.metrics_port}; "
          f"tenants {'configured' if use_tenants else 'off'}", flush=True)
    return sched


async def start_fleet(args: argparse.Namespace, sched: SchedulerProcess, workers: list[WorkerSpec],
                      avatars: list[str], rep: Report, cleanup: list[Any]) -> Fleet:
    """The simulated workers, once all have registered and sent a couple of reports; they fall
    back to per-room SessionUpdates if the scheduler does not take UsageReport."""
    address = f"127.0.0.1:{sched.port}"
    mode = "usage_report" if args.progress == "auto" else args.progress
    fleet = Fleet(address, workers, avatars, args.worker_procs, args.workers_per_channel, mode)
    cleanup.append(fleet.stop)
    t0 = time.perf_counter()
    while True:
        st = await fleet.stats()
        if st["registered"] >= args.workers:
            break
        if time.perf_counter() - t0 > 120 or sched.proc.poll() is not None:
            raise SystemExit(f"only {st['registered']}/{args.workers} workers registered; errors "
                             f"{dict(st['errors'])}\n{sched.log_text()[-2000:]}")
        await asyncio.sleep(0.25)
    print(f"{args.workers} workers registered in {time.perf_counter() - t0:.1f}s", flush=True)
    await asyncio.sleep(2.5)  # a couple of heartbeat/usage rounds
    log = sched.log_text()
    if "unexpected usage_report" in log:
        if args.progress == "auto":
            await fleet.ask(("mode", "session_update"))
            rep.note("the scheduler does not handle UsageReport yet (logs it as unexpected); workers "
                     "fell back to one SessionUpdate per room per second")
        else:
            rep.note("the scheduler logs UsageReport as unexpected: progress is not metered")
    elif mode == "usage_report" and args.scheduler_log_level.lower() in ("debug", "info", "warning"):
        print("  UsageReport: the scheduler does not log it as unexpected")
    return fleet


async def run(args: argparse.Namespace, home: Path, rep: Report, cleanup: list[Any],
              database_url: str = "") -> None:
    rng = random.Random(args.seed)
    tenants = make_tenants()
    avatars = sorted(a for t in tenants for a in t.avatars)
    trace = make_day(args.rooms, tenants, args.seed)
    workers = make_workers(args.workers, args.l4_share, avatars, rng)
    ref = next(w for w in workers if w.device_type == "h200")
    tenants = with_reservations(tenants, trace, ref, budgets=not args.no_budgets)
    describe(trace, tenants, avatars, workers, ref)
    sched = start_scheduler(args, home, tenants, avatars, rep, cleanup, database_url)
    fleet = await start_fleet(args, sched, workers, avatars, rep, cleanup)
    tc = Tenants(f"127.0.0.1:{sched.port}", args.client_channels, args.call_timeout)
    # The generator's collector must not stall the calls it times (a full collection of
    # the day's trace took 30-70 ms): what exists now is never garbage, and the middle
    # generation is kept small, as in the scheduler (scheduler/server.py).
    gc.collect()
    gc.freeze()
    gc.set_threshold(2_000, 5, 50)

    phases = set(args.phases.split(","))
    burst_n = args.burst if args.burst is not None else int(args.rooms * 0.4)
    if "burst" in phases and burst_n > 0:
        await phase_burst(tc, fleet, synthetic(trace, burst_n, "b", rng), args.concurrency, sched.pid, rep,
                          args.phase_timeout)
    if "batch" in phases and burst_n > 0 and args.batch > 0:
        await phase_batch(tc, fleet, synthetic(trace, burst_n, "m", rng), args.batch,
                          args.batch_in_flight, sched.pid, rep, args.phase_timeout)
    if "rate" in phases and args.rate > 0:
        n = int(args.rate * args.rate_seconds)
        await phase_rate(tc, fleet, synthetic(trace, n, "q", rng), args.rate, args.max_in_flight,
                         sched.pid, rep)
    created: dict[str, Call] = {}
    if "trace" in phases:
        created = await phase_trace(tc, fleet, sched, trace, {t.name: t for t in tenants}, ref, args, rep)
        await asyncio.sleep(2.0)  # the last usage reports
        await final_metrics(tc, fleet, sched, trace, created, rep)
    print("\n[5] cost comparison")
    compare_costs(trace, workers)
    errors = [line for line in sched.log_text().splitlines() if " ERROR " in line or "Traceback" in line]
    if errors:
        rep.note(f"scheduler logged {len(errors)} error line(s), first: {errors[0][:160]}")
    await tc.close()


def run_on(args: argparse.Namespace, store: str) -> tuple[Report, int]:
    """One whole run on one store; its report and exit code."""
    home = Path(tempfile.mkdtemp(prefix="avatarfarm-load-"))
    rep = Report()
    cleanup: list[Any] = []
    code = 0
    try:
        url = ""
        if store == "postgresql":
            from farm.postgres import PostgresServer

            pg = PostgresServer().start(durable=not args.no_sync)
            cleanup.append(pg.stop)  # last: after the scheduler
            url = pg.create_database()
            print(f"store: PostgreSQL on 127.0.0.1:{pg.port}", flush=True)
        asyncio.run(run(args, home, rep, cleanup, url))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        for fn in reversed(cleanup):  # workers first, then the scheduler (then PostgreSQL)
            with contextlib.suppress(Exception):
                fn()
        if args.keep:
            print(f"kept {home}")
        else:
            import shutil
            shutil.rmtree(home, ignore_errors=True)
    return rep, code


# The figures set side by side when both stores run: (label, report key, format).
_COMPARED = (("placements/s, burst", "burst_rate", "{:.0f}"),
             ("placements/s, CreateSessions", "batch_rate", "{:.0f}"),
             ("CreateSession p50 at the rate", "rate_p50", "{:.3f} s"),
             ("CreateSession p99 at the rate", "rate_p99", "{:.3f} s"),
             ("rate achieved", "rate_achieved", "{:.0f}/s"),
             ("scheduler CPU at the peak", "peak_cpu", "{:.1%}"),
             ("rooms pending at the peak", "peak_pending", "{}"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. from `timeout`) cleans up as Ctrl-C does: workers and scheduler stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stores = ["sqlite", "postgresql"] if args.store == "both" else [args.store]
    reports: dict[str, Report] = {}
    code = 0
    for store in stores:
        print(f"\n==== the scheduler on {store} ====", flush=True)
        rep, code = run_on(args, store)
        reports[store] = rep
        code = summary(args, rep) or code
        if code == 130:
            return code
    if len(reports) > 1:
        print("\n== the stores side by side ==")
        print(f"  {'':<32}" + "".join(f"{s:>14}" for s in reports))
        for label, key, fmt in _COMPARED:
            if all(key in r.values for r in reports.values()):
                print(f"  {label:<32}" + "".join(f"{fmt.format(r.values[key]):>14}"
                                                 for r in reports.values()))
    return code


if __name__ == "__main__":
    sys.exit(main())
