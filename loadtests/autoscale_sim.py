"""Autoscaling load test: the diurnal trace of the scheduler load test replayed with
the autoscaler on, in simulated time.

The real scheduler core (placement, drains and handovers, the usage ledger on
SQLite) and the real autoscaling controller and policy run in this process on a
simulated clock; the workers are simulated (they register the H200 profiles of
the scheduler load test, report a room running as soon as it is assigned, render
nothing) and are started and stopped by a simulated provisioner that takes
``--boot-seconds`` from a scale-up to a worker registering (a GPU node or pod
starting and loading models). A day of traffic runs in a few minutes.

Printed: rooms' pending time (p50/p99/max from admission to first placement),
worker-hours used against the minimum the trace needed (each moment's rooms at
perfect packing, whole workers, no boot time), scale events, handovers, and
rooms dropped (a room that failed, or that was taken off the air and not put
back on at once: must be 0). Brands reserve premium capacity for their show hours
(`trace.show_hours`; `--all-day-reservations`: all day), and each reservation is printed.

    python loadtests/autoscale_sim.py                     # 2,000 rooms at the peak
    python loadtests/autoscale_sim.py --peak-rooms 300 --hours 24 --boot-seconds 60
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from avatarfarm.domain import DriveMode, Output, OutputKind, Quality, SessionSpec, SessionState, Tier  # noqa: E402
from loadtests.measure import pct  # noqa: E402
from loadtests.packing_sim import _shares, room_req, worker_state  # noqa: E402
from loadtests.trace import (  # noqa: E402
    DAYS,
    PNG_1X1,
    DayShape,
    Room,
    make_day,
    make_tenants,
    with_reservations,
)
from loadtests.worker_specs import make_workers  # noqa: E402
from scheduler.autoscale.controller import AutoscalingController  # noqa: E402
from scheduler.autoscale.provisioners import Instance, PoolConfig, ProvisionerKind  # noqa: E402
from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.core import Scheduler  # noqa: E402
from scheduler.policy.autoscaler import AutoscalerConfig  # noqa: E402
from scheduler.policy.tenants import TenantConfig  # noqa: E402
from scheduler.state.store import SqliteStore  # noqa: E402
from scheduler.state.worker_conn import AssignCmd, ReleaseCmd, WorkerConn, WorkerResources  # noqa: E402

POOL = "h200"


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class SimProvisioner:
    """Starts simulated workers `boot_seconds` after it is asked to; removes them at once.
    What it bills: every instance from the moment it is asked for until it is removed."""

    clock: Clock
    boot_seconds: float
    booting: dict[str, float] = field(default_factory=dict)  # worker id -> ready at
    running: set[str] = field(default_factory=set)
    removed: list[str] = field(default_factory=list)
    kind: ProvisionerKind = ProvisionerKind.LOCAL
    _n: int = 0

    def instances(self, pool: str) -> list[Instance]:
        return [Instance(w, pool) for w in [*self.booting, *self.running]]

    def scale(self, pool: str, replicas: int, remove: Sequence[str] = ()) -> None:
        for w in remove:
            self.booting.pop(w, None)
            if w in self.running:
                self.running.discard(w)
                self.removed.append(w)
        while len(self.booting) + len(self.running) < replicas:
            self._n += 1
            self.booting[f"{pool}-{self._n:04d}"] = self.clock() + self.boot_seconds

    def removable(self, pool: str, preferred: Sequence[str]) -> list[str]:
        return list(preferred)

    def close(self) -> None:
        pass

    def due(self) -> list[str]:
        ready = [w for w, at in self.booting.items() if at <= self.clock()]
        for w in ready:
            del self.booting[w]
            self.running.add(w)
        return ready


@dataclass
class Result:
    pending: list[float]
    worker_seconds: float
    minimum_seconds: float
    floor_seconds: float  # the minimum with the premium reservations held (in their hours)
    peak_workers: int
    ups: int  # workers added by scale decisions
    downs: int  # workers taken away
    workers_started: int
    handovers: dict[str, int]
    drains: dict[str, int]
    dropped: int
    failed: int
    preempted: int  # rooms taken off the air to reclaim reserved capacity
    lost: int  # workers removed with rooms on them (not drained)
    stepped_down: int  # rooms stepped down the degradation ladder (to reclaim, or under load)
    rooms: int
    wall: float
    reservations: list[str] = field(default_factory=list)  # "tenant: units, hours"


def spec_of(room: Room, rtmp_share: float, rng: random.Random) -> SessionSpec:
    w, h, fps = room.quality
    if rng.random() < rtmp_share:
        out = Output(OutputKind.RTMP, f"rtmp://203.0.113.10/live/{room.tenant}-{room.room_id}")
    else:
        out = Output(OutputKind.HLS, f"{room.tenant}/{room.room_id}")
    return SessionSpec(tenant=room.tenant, room_id=room.room_id, avatar_id=room.avatar,
                       drive_mode=DriveMode(room.drive), quality=Quality(w, h, fps),
                       tier=Tier(room.tier), output=out, max_duration_seconds=0.0)


def run(peak_rooms: int, hours: float, boot_seconds: float, interval: float, dt: float,
        seed: int, rtmp_share: float, window: float, home: Path,
        log_every: float = 3600.0, shape: DayShape = DAYS["default"],
        headroom: float = AutoscalerConfig().headroom,
        tolerance: float = AutoscalerConfig().scale_down_tolerance,
        ramp: float = AutoscalerConfig().ramp_seconds,
        reserved_spare: float = AutoscalerConfig().reserved_spare,
        show_hours: bool = True) -> Result:
    rng = random.Random(seed)
    tenants = make_tenants(shape=shape)
    trace = [r for r in make_day(peak_rooms, tenants, seed, shape) if r.arrival_s < hours * 3600]
    (ref,) = make_workers(1, 0.0, ["a"], rng)
    tenants = with_reservations(tenants, trace, ref, budgets=False, hours=show_hours)
    avatars = home / "avatars"
    avatars.mkdir(parents=True)
    for r in trace:
        (avatars / f"{r.avatar}.png").write_bytes(PNG_1X1)
    clock = Clock(0.0)
    config = SchedulerConfig(
        database=home / "state.db", sync_to_disk=False, avatar_dir=avatars,
        heartbeat_interval=dt, worker_timeout=1e9, usage_flush_interval=300.0,
        rtmp_allowed_hosts=["203.0.113.10"],
        tenants={t.name: TenantConfig(reserved_units=t.reserved_units,
                                      reserved_hours=list(t.reserved_hours), weight=t.weight)
                 for t in tenants},
        autoscaler=AutoscalerConfig(
            provisioner=ProvisionerKind.LOCAL, interval_seconds=interval, headroom=headroom,
            scale_down_tolerance=tolerance, ramp_seconds=ramp, reserved_spare=reserved_spare,
            scale_down_window_seconds=window, drain_deadline_seconds=300.0,
            boot_timeout_seconds=max(600.0, boot_seconds * 3),
            pools={POOL: PoolConfig(device_type="h200", min_workers=1, max_workers=10_000)}))
    core = Scheduler(SqliteStore(config.database, sync_to_disk=False), config, clock=clock)
    prov = SimProvisioner(clock, boot_seconds)
    ctl = AutoscalingController(core, config.autoscaler, prov, clock=clock)
    conns: dict[str, WorkerConn] = {}
    rooms: dict[str, set[str]] = {}  # worker -> sessions it renders

    def register(wid: str) -> None:
        spec = dataclasses.replace(ref, worker_id=wid)
        ws = worker_state(spec)
        conns[wid] = core.register_worker(
            wid, device_type="h200", provider="CUDAExecutionProvider", profile=ws.profile,
            input_endpoint=f"{wid}:50061", avatars=frozenset(), active={},
            latency_budget=spec.latency_budget_seconds,
            resources=WorkerResources(cpu_cores=spec.cpu_cores))
        rooms[wid] = set()

    share_of: dict[tuple[object, ...], float] = {}
    ref_state = worker_state(ref)

    def share(r: Room) -> float:
        key = (r.quality, r.drive)
        if key not in share_of:
            share_of[key] = _shares(room_req(r, 0), ref_state)
        return share_of[key]

    sid_of: dict[str, str] = {}
    created: dict[str, float] = {}
    first_placed: dict[str, float] = {}
    live_share = 0.0
    dropped: set[str] = set()
    live: dict[str, Room] = {}
    ends = sorted(trace, key=lambda r: r.end_s)
    i_arr = i_end = 0
    worker_seconds = minimum_seconds = floor_seconds = 0.0
    # Reserved units in whole workers (a unit is a 512x512@25 text room: its share).
    unit_share = _shares(room_req(Room("u", 0, 0, "t", "standard", (512, 512, 25), "text", "a"), 0),
                         worker_state(ref))
    configs = config.tenants.values()
    peak_workers = 0
    next_decision = 0.0
    next_log = log_every
    start = time.monotonic()
    horizon = hours * 3600

    def drain_outboxes() -> None:
        busy = True
        while busy:
            busy = False
            for wid, conn in list(conns.items()):
                while not conn.outbox.empty():
                    cmd = conn.outbox.get_nowait()
                    busy = True
                    if isinstance(cmd, AssignCmd):
                        rooms[wid].add(cmd.session_id)
                        first_placed.setdefault(cmd.session_id, clock.t)
                        core.worker_update(conn, cmd.session_id, cmd.epoch, SessionState.RUNNING,
                                           "", None)
                    elif isinstance(cmd, ReleaseCmd):
                        rooms[wid].discard(cmd.session_id)
                        if cmd.handover:
                            # As a worker does: it stops at a clean point and reports the
                            # room ended, and the next worker continues it from there.
                            s = core.get(cmd.session_id)
                            core.worker_update(conn, cmd.session_id, s.epoch, SessionState.ENDED,
                                               "handed over", None)

    while clock.t < horizon:
        clock.t += dt
        while i_arr < len(trace) and trace[i_arr].arrival_s <= clock.t:
            r = trace[i_arr]
            i_arr += 1
            s = core.create(spec_of(r, rtmp_share, rng), request_id=r.room_id)
            sid_of[r.room_id] = s.session_id
            created[s.session_id] = clock.t
            live[r.room_id] = r
            live_share += share(r)
        while i_end < len(ends) and ends[i_end].end_s <= clock.t:
            r = ends[i_end]
            i_end += 1
            if r.room_id in sid_of and r.room_id in live:
                del live[r.room_id]
                live_share -= share(r)
                s = core.sessions[sid_of[r.room_id]]
                if not s.state.terminal:
                    core.end(s.session_id, "the show is over")
        for wid in prov.due():
            register(wid)
        for wid in list(conns):
            if wid not in prov.running and wid not in prov.booting:  # removed by the autoscaler
                core.worker_disconnected(conns.pop(wid), "stopped by the provisioner")
                rooms.pop(wid, None)
        core.place_pending()
        drain_outboxes()
        for conn in conns.values():
            core.worker_seen(conn)
        core.tick()
        drain_outboxes()
        if clock.t >= next_decision:
            next_decision = clock.t + interval
            ctl.set_instances(POOL, prov.instances(POOL))
            for call in ctl.step():
                call.apply(prov)
            drain_outboxes()
        # A placed room back in the queue is off the air: dropped unless it is on again
        # within this step (a stop-then-start handover).
        for sid in core.queue.waiting():
            if sid in first_placed:
                dropped.add(sid)
        n = len(prov.booting) + len(prov.running)
        worker_seconds += n * dt
        peak_workers = max(peak_workers, n)
        need = math.ceil(live_share - 1e-9)
        minimum_seconds += need * dt
        reserved = sum(t.reserved_at(clock.t) for t in configs)
        floor_seconds += max(need, math.ceil(reserved * unit_share - 1e-9)) * dt
        if clock.t >= next_log:
            next_log += log_every
            print(f"  {clock.t / 3600:5.1f} h  rooms {len(live):5d}  workers {len(prov.running):4d} "
                  f"(+{len(prov.booting)} booting, minimum {need})  "
                  f"waiting {core.waiting().count:4d}  "
                  f"wall {time.monotonic() - start:5.1f} s", flush=True)

    pending = [first_placed[sid] - created[sid] for sid in first_placed]
    never = [sid for sid in created if sid not in first_placed]
    pending += [clock.t - created[sid] for sid in never]
    failed = sum(1 for s in core.sessions.values() if s.state is SessionState.FAILED)
    text = core.metrics.registry
    handovers = {k: int(text.get_sample_value("avatarfarm_handovers_total", {"kind": k}) or 0)
                 for k in ("seamless", "restart")}
    drains = {k: int(text.get_sample_value("avatarfarm_worker_drains_total", {"outcome": k}) or 0)
              for k in ("completed", "deadline")}
    # Workers added and taken away by scale decisions (the controller's own event list
    # keeps only the latest few hundred).
    ups, downs = (int(text.get_sample_value("avatarfarm_autoscaler_scale_events_total",
                                            {"pool": POOL, "direction": d}) or 0)
                  for d in ("up", "down"))
    core.store.close()
    return Result(pending, worker_seconds, minimum_seconds, floor_seconds, peak_workers, ups, downs,
                  prov._n, handovers, drains, len(dropped), failed,
                  int(sum(text.get_sample_value("avatarfarm_preemptions_total", {"tier": t.value}) or 0
                          for t in Tier)),
                  int(text.get_sample_value("avatarfarm_workers_lost_total", {"device_type": "h200"}) or 0),
                  int(sum(text.get_sample_value("avatarfarm_degradation_steps_total",
                                                {"tier": t.value, "direction": "down"}) or 0
                          for t in Tier)),
                  len(created), time.monotonic() - start,
                  [f"{t.name} {t.reserved_units:g} units, {', '.join(t.reserved_hours) or 'all day'}"
                   for t in tenants if t.reserved_units])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak-rooms", type=int, default=2000, help="rooms live at the evening peak")
    ap.add_argument("--hours", type=float, default=24.0, help="hours of the day replayed from 00:00")
    ap.add_argument("--boot-seconds", type=float, default=120.0,
                    help="from a scale-up to the worker registering")
    ap.add_argument("--interval", type=float, default=AutoscalerConfig().interval_seconds,
                    help="seconds between decisions (the scheduler's default)")
    ap.add_argument("--window", type=float, default=AutoscalerConfig().scale_down_window_seconds,
                    help="scale-down stabilisation window (the scheduler's default)")
    ap.add_argument("--step", type=float, default=2.0, help="simulated seconds per step")
    ap.add_argument("--rtmp-share", type=float, default=0.3,
                    help="share of rooms pushed over RTMP (handed over by stop-then-start)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--day", default="default",
                    help=f"day shape: {', '.join(DAYS)}, or all (each in turn)")
    ap.add_argument("--headroom", type=float, default=AutoscalerConfig().headroom,
                    help="the autoscaler's headroom (spare capacity above demand, a fraction)")
    ap.add_argument("--tolerance", type=float, default=AutoscalerConfig().scale_down_tolerance,
                    help="the autoscaler's scale-down tolerance")
    ap.add_argument("--ramp", type=float, default=AutoscalerConfig().ramp_seconds,
                    help="seconds of the demand's growth the autoscaler starts ahead (0: none)")
    ap.add_argument("--reserved-spare", type=float, default=AutoscalerConfig().reserved_spare,
                    help="share of unused premium reservations kept free on top of demand")
    ap.add_argument("--all-day-reservations", dest="show_hours", action="store_false",
                    help="brands reserve all day, not for their show hours only")
    ap.add_argument("--log-every", type=float, default=3600.0,
                    help="simulated seconds between progress lines (0: none)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the scheduler's per-worker logs: thousands a day
    code = 0
    for name in list(DAYS) if args.day == "all" else [args.day]:
        code |= _run_day(args, DAYS[name])
    return code


def _run_day(args: argparse.Namespace, shape: DayShape) -> int:
    print(f"== {shape.name}: {shape.description}")
    print(f"autoscaling: {args.peak_rooms} rooms at the peak, {args.hours:g} h, boot "
          f"{args.boot_seconds:g} s, decisions every {args.interval:g} s, window {args.window:g} s, "
          f"headroom {args.headroom:g}, tolerance {args.tolerance:g}, ramp {args.ramp:g} s, "
          f"reserved spare {args.reserved_spare:g}")
    with tempfile.TemporaryDirectory() as tmp:
        r = run(args.peak_rooms, args.hours, args.boot_seconds, args.interval, args.step,
                args.seed, args.rtmp_share, args.window, Path(tmp),
                log_every=args.log_every or math.inf, shape=shape, headroom=args.headroom, ramp=args.ramp,
                tolerance=args.tolerance, reserved_spare=args.reserved_spare,
                show_hours=args.show_hours)
    for t in r.reservations:
        print(f"reservation          {t}")
    ratio = r.worker_seconds / r.minimum_seconds if r.minimum_seconds else float("nan")
    print(f"rooms                {r.rooms} (failed {r.failed})")
    print(f"pending time         p50 {pct(r.pending, 0.5):.1f} s   p99 {pct(r.pending, 0.99):.1f} s   "
          f"max {max(r.pending, default=0):.1f} s")
    print(f"worker-hours         {r.worker_seconds / 3600:.0f} used vs {r.minimum_seconds / 3600:.0f} "
          f"minimum needed ({ratio:.2f}x; peak {r.peak_workers} workers)")
    print(f"                     {r.floor_seconds / 3600:.0f} minimum with the premium reservations "
          f"held {'in their hours' if args.show_hours else 'all day'} "
          f"({r.worker_seconds / r.floor_seconds:.2f}x)")
    print(f"scaling              {r.ups} workers up, {r.downs} down ({r.workers_started} started)")
    print(f"handovers            {r.handovers['seamless']} seamless, {r.handovers['restart']} "
          f"stop-then-start; drains {r.drains['completed']} completed, "
          f"{r.drains['deadline']} past their deadline")
    print(f"rooms stepped down   {r.stepped_down} (the degradation ladder, to take reserved "
          f"capacity back or under load)")
    print(f"rooms dropped        {r.dropped}   goal 0   {'PASS' if r.dropped == 0 else 'MISS'}")
    if r.dropped:
        print(f"                     of them {r.preempted} preempted for reserved rooms; "
              f"{r.lost} worker(s) removed with rooms on them")
    print(f"wall time            {r.wall:.0f} s")
    return 0 if r.dropped == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
