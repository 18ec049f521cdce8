"""The scheduler's core alone, without gRPC: how fast it admits and places rooms, and
how long its once-a-second tick holds the event loop, on the load test's fleet and
day. Read next to ``scheduler_load.py``, which measures the same through the real
server: the difference is what the RPC layer and the worker streams cost. Last, it
opens the store again as a new core, as a restarted scheduler or a new leader among
replicas does, and times the loading of every room (`--store postgresql`: on a local
PostgreSQL server, as replicas share it).

It builds the real core (SQLite store, group commit on an event loop), registers
simulated H200 workers with the load test's profiles, creates rooms drawn from the
day's mix (each placed in its answer, committed once per batch of 50 as concurrent
calls would share a commit), ends some, and times ticks with all rooms live.

    python loadtests/core_bench.py                      # 1,000 workers, 10,000 rooms
    python loadtests/core_bench.py --workers 200 --rooms 2000 --ended 4000
    python loadtests/core_bench.py --ended 10000 --store postgresql
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `loadtests.*` and the packages importable
    sys.path.insert(0, str(ROOT))

from avatarfarm.domain import SessionState  # noqa: E402
from loadtests.autoscale_sim import spec_of  # noqa: E402
from loadtests.packing_sim import worker_state  # noqa: E402
from loadtests.trace import PNG_1X1, make_day, make_tenants, synthetic  # noqa: E402
from loadtests.worker_specs import make_workers  # noqa: E402
from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.core import Scheduler  # noqa: E402
from scheduler.state.store import open_store  # noqa: E402
from scheduler.state.worker_conn import WorkerResources  # noqa: E402


class _Clock:
    def __init__(self) -> None:
        self.t = 1_750_000_000.0

    def __call__(self) -> float:
        return self.t


async def bench(workers: int, rooms: int, ended: int, ticks: int, seed: int, home: Path,
                database_url: str = "") -> None:
    rng = random.Random(seed)
    tenants = make_tenants()
    trace = make_day(rooms, tenants, seed)
    (ref,) = make_workers(1, 0.0, ["a"], rng)
    avatars = home / "avatars"
    avatars.mkdir(parents=True)
    for r in trace:
        (avatars / f"{r.avatar}.png").write_bytes(PNG_1X1)
    clock = _Clock()
    config = SchedulerConfig(database=home / "state.db", sync_to_disk=False, avatar_dir=avatars,
                             worker_timeout=1e9, rtmp_allowed_hosts=["203.0.113.10"],
                             database_url=database_url)

    def open_core() -> Scheduler:
        return Scheduler(open_store(config.database, config.database_url, sync_to_disk=False),
                         config, clock=clock)

    core = open_core()
    profile = worker_state(ref).profile
    for i in range(workers):
        core.register_worker(f"h200-{i:04d}", device_type="h200", provider="CUDAExecutionProvider",
                             profile=profile, input_endpoint=f"h200-{i:04d}:50061",
                             avatars=frozenset(), active={},
                             latency_budget=ref.latency_budget_seconds,
                             resources=WorkerResources(cpu_cores=ref.cpu_cores))

    async def create(batch: Sequence[object], what: str) -> list[str]:
        ids = []
        t0 = time.perf_counter()
        for i, r in enumerate(batch):
            ids.append(core.create(spec_of(r, 0.3, rng)).session_id)  # type: ignore[arg-type]
            if i % 50 == 49:
                await core.durable()
        await core.durable()
        wall = time.perf_counter() - t0
        placed = sum(core.sessions[s].state is SessionState.PLACED for s in ids)
        print(f"{what}: {len(ids)} rooms in {wall:.2f} s = {len(ids) / wall:.0f}/s "
              f"({wall / len(ids) * 1e3:.2f} ms a room), {placed} placed in the answer", flush=True)
        return ids

    if ended:
        gone = await create(synthetic(trace, ended, "e", rng), "create (to be ended)")
        for sid in gone:
            core.end(sid, "over")
        await core.durable()
    await create(synthetic(trace, rooms, "r", rng), f"create over {workers} workers")
    for _ in range(3):  # the first ticks flush what the creates left
        clock.t += 1.0
        core.tick()
    t0 = time.perf_counter()
    for _ in range(ticks):
        clock.t += 1.0
        core.tick()
    tick = (time.perf_counter() - t0) / ticks
    live = sum(s.state in (SessionState.PLACED, SessionState.RUNNING) for s in core.sessions.values())
    print(f"tick: {tick * 1e3:.1f} ms ({live} live rooms, {ended} ended, {workers} workers): "
          "the loop answers no call meanwhile", flush=True)
    await core.durable()
    core.store.close()
    t0 = time.perf_counter()
    again = open_core()
    wall = time.perf_counter() - t0
    print(f"reopened: {len(again.sessions)} rooms loaded in {wall:.2f} s (what a restarted "
          f"scheduler, or a new leader, reads before it serves)", flush=True)
    again.store.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1000, help="simulated H200 workers (default 1000)")
    ap.add_argument("--rooms", type=int, default=10000, help="rooms created and left live (default 10000)")
    ap.add_argument("--ended", type=int, default=0, help="rooms created and ended first (default 0)")
    ap.add_argument("--ticks", type=int, default=10, help="ticks timed (default 10)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite",
                    help="the core's store: an SQLite file (default) or a local PostgreSQL server")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="avatarfarm-core-") as home, \
            contextlib.ExitStack() as stack:
        url = ""
        if args.store == "postgresql":
            from farm.postgres import PostgresServer

            pg = PostgresServer().start()
            stack.callback(pg.stop)
            url = pg.create_database()
        asyncio.run(bench(args.workers, args.rooms, args.ended, args.ticks, args.seed, Path(home),
                          url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
