"""Chaos load test: many rooms on several local workers while workers are killed
(SIGKILL) at intervals and the scheduler is killed and restarted once.

The real processes (the CLI's scheduler and workers, as `avatarfarm demo` runs
them), real-time rooms with HLS outputs and text scripts. Every `--kill-every`
seconds the worker carrying the most rooms is killed and started again (so
capacity comes back); half-way through, the scheduler is killed and restarted.
Rooms are watched by polling the API; a room's resume time is from the kill of
its worker to the moment it is running again on another worker (the worker
reports running when it has written the first frame of its assignment).

With `--replicas N` the farm runs N schedulers on a local PostgreSQL server (one
leads, the others follow), and instead of the one scheduler restart, every
`--leader-every` seconds the leading scheduler is killed (SIGKILL) or, every other
time, frozen (SIGSTOP) until another has taken over, then woken (SIGCONT: it must
exit, status 75, without acting); either way it is started again as a follower. The
takeover time is from the kill or freeze to the new leader serving.

At the end it prints: rooms resumed, resume time p50/p99/max (goal p99 < 5 s),
frames lost per failover (stream time missing from the rooms' outputs, per
failover), usage lost and doubled (the usage ledger against the stream time the
workers reported for each room; goal 0 and 0) and rooms dropped (not ended with
their full duration; goal 0).

    python loadtests/chaos.py                          # 3 workers, 6 rooms, 60 s
    python loadtests/chaos.py --workers 4 --rooms 12 --seconds 120 --kill-every 15
    python loadtests/chaos.py --replicas 3 --seconds 120 --leader-every 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import av
import grpc

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2
from farm.local import LocalFarm
from farm.postgres import PostgresServer
from scheduler.server import LOST_LEAD_EXIT
from workers.output.encode import hls_segments
from workers.output.targets import tenant_root

RUNNING = types_pb2.SESSION_STATE_RUNNING
ENDED = types_pb2.SESSION_STATE_ENDED
SCRIPT = [types_pb2.ScriptSegment(text=f"Here is product number {i}, on sale tonight.",
                                  pause_after_seconds=1.0) for i in range(1, 40)]


@dataclass
class Room:
    session_id: str
    tenant: str
    folder: str
    worker: str = ""
    state: int = 0
    stream_seconds: float = 0.0
    # Open failovers: kill time, the worker killed; closed ones: resume seconds.
    waiting: list[tuple[float, str]] = field(default_factory=list)
    resumes: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def decoded_seconds(folder: Path, fps: int) -> float:
    total = 0.0
    for seg in hls_segments(folder):
        with av.open(str(folder / seg.name)) as c:
            total += sum(1 for _ in c.decode(video=0)) / fps
    return total


async def poll(farm: LocalFarm, rooms: dict[str, Room]) -> None:
    """Follows every room's state and worker (10 Hz), across scheduler restarts."""
    while True:
        try:
            async with grpc.aio.insecure_channel(farm.address) as ch:
                stub = sessions_pb2_grpc.SessionServiceStub(ch)
                while True:
                    resp = await stub.ListSessions(sessions_pb2.ListSessionsRequest(page_size=1000),
                                                   timeout=2)
                    now = time.monotonic()
                    for s in resp.sessions:
                        r = rooms.get(s.session_id)
                        if r is None:
                            continue
                        r.state, r.stream_seconds = s.state, s.progress.stream_seconds
                        if s.state == RUNNING and s.worker_id:
                            r.worker = s.worker_id
                            # Running again on a worker other than the one killed.
                            still = [(t, w) for t, w in r.waiting if w == s.worker_id]
                            r.resumes += [now - t for t, w in r.waiting if w != s.worker_id]
                            r.waiting = still
                    await asyncio.sleep(0.1)
        except (grpc.aio.AioRpcError, AssertionError):
            await asyncio.sleep(0.2)  # the scheduler is restarting


def prepare_models(model_dir: Path, home: Path) -> None:
    models = model_dir.resolve()
    if (models / "manifest.json").exists():
        (home / "models").symlink_to(models)
    else:
        print(f"no models at {models}: building the reference models ...", flush=True)
        subprocess.run([sys.executable, "-m", "farm.cli", "build-models", "--out",
                        str(home / "models")], check=True, stdout=subprocess.DEVNULL)


@dataclass
class LeaderChaos:
    """The leader changes made, and what they cost."""

    takeovers: list[float] = field(default_factory=list)  # seconds to a new leader serving
    killed: int = 0
    frozen: int = 0
    woken_exits: list[int | None] = field(default_factory=list)  # exit status of woken leaders

    async def change(self, farm: LocalFarm, start: float) -> None:
        old = farm.scheduler
        assert old is not None and old.proc is not None
        index = farm.schedulers.index(old)
        freeze = (self.killed + self.frozen) % 2 == 1
        t = time.monotonic()
        if freeze:
            old.proc.send_signal(signal.SIGSTOP)
        else:
            old.kill()
        new = await asyncio.to_thread(farm.wait_leader, 60.0)
        took = time.monotonic() - t
        self.takeovers.append(took)
        if freeze:
            self.frozen += 1
            old.proc.send_signal(signal.SIGCONT)
            try:
                self.woken_exits.append(await asyncio.to_thread(old.proc.wait, 30))
            except subprocess.TimeoutExpired:
                self.woken_exits.append(None)
                old.kill()
        else:
            self.killed += 1
        print(f"{t - start:6.1f}s  {'froze' if freeze else 'killed'} the leader {old.name}; "
              f"{new.name} leads after {took:.2f} s", flush=True)
        await asyncio.to_thread(farm.start_scheduler, 60.0, index, False)  # back, following


async def main_async(args: argparse.Namespace, home: Path, database_url: str = "") -> int:
    farm = LocalFarm(home, workers=args.workers, pacing="realtime", worker_threads=1,
                     overcommit=4.0, scheduler_port=free_port(), replicas=args.replicas,
                     database_url=database_url, lease_seconds=args.lease_seconds,
                     scheduler_args=["--worker-timeout", "2", "--orphan-grace", "5",
                                     "--usage-flush-interval", "1"],
                     worker_args=["--profile-render-sides", str(args.side),
                                  "--profile-encode-sizes", f"{args.side}x{args.side}",
                                  "--profile-iterations", "1"])
    print(f"starting a scheduler and {args.workers} workers ...", flush=True)
    farm.start()
    rooms: dict[str, Room] = {}
    kills = scheduler_kills = 0
    leaders = LeaderChaos()
    try:
        async with grpc.aio.insecure_channel(farm.address) as ch:
            stub = sessions_pb2_grpc.SessionServiceStub(ch)
            for i in range(args.rooms):
                tenant = f"chaos-{i}"
                s = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                    tenant, f"room-{i}", width=args.side, height=args.side, fps=args.fps,
                    hls_dir=f"room-{i}", seconds=args.seconds, script=SCRIPT)))
                rooms[s.session_id] = Room(s.session_id, tenant, f"room-{i}")
        watcher = asyncio.create_task(poll(farm, rooms))
        start = time.monotonic()
        next_kill = start + args.kill_every
        scheduler_at = start + args.seconds / 2 if args.kill_scheduler and args.replicas == 1 \
            else float("inf")
        next_leader = start + args.leader_every if args.replicas > 1 else float("inf")
        while time.monotonic() - start < args.seconds:
            now = time.monotonic()
            if now >= next_leader:
                await leaders.change(farm, start)
                next_leader = time.monotonic() + args.leader_every
                next_kill = max(next_kill, time.monotonic() + 4.0)  # workers find it first
            elif now >= scheduler_at:
                scheduler_at = float("inf")
                assert farm.scheduler is not None
                farm.scheduler.kill()
                scheduler_kills += 1
                print(f"{now - start:6.1f}s  killed the scheduler (SIGKILL); restarting", flush=True)
                await asyncio.to_thread(farm.start_scheduler)
                # Workers re-register within the orphan grace; the next kill comes after it
                # (a worker lost before it re-registered waits out the grace: see the note).
                next_kill = max(next_kill, time.monotonic() + 8.0)
            elif now >= next_kill:
                next_kill = now + args.kill_every
                load: dict[str, int] = {}
                for r in rooms.values():
                    if r.state == RUNNING and r.worker:
                        load[r.worker] = load.get(r.worker, 0) + 1
                if load:
                    victim = max(load, key=lambda w: load[w])
                    proc = next(p for p in reversed(farm.worker_procs) if p.name == victim)
                    t = time.monotonic()
                    proc.kill()
                    kills += 1
                    for r in rooms.values():
                        if r.worker == victim and r.state == RUNNING:
                            r.waiting.append((t, victim))
                    print(f"{t - start:6.1f}s  killed {victim} carrying {load[victim]} room(s)",
                          flush=True)
                    index = int(victim.rsplit("-", 1)[1])
                    farm.worker_procs.remove(proc)
                    await asyncio.to_thread(farm.start_worker, index, 120.0, False)
            await asyncio.sleep(0.1)
        # Let every room finish its duration.
        deadline = time.monotonic() + args.seconds + 60
        while any(r.state != ENDED for r in rooms.values()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)  # the poller updates the rooms
        watcher.cancel()
        async with grpc.aio.insecure_channel(farm.address) as ch:
            stub = sessions_pb2_grpc.SessionServiceStub(ch)
            finals = {sid: await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=sid))
                      for sid in rooms}
            billed = {}
            for r in rooms.values():
                u = await stub.GetUsage(sessions_pb2.GetUsageRequest(tenant=r.tenant))
                billed[r.session_id] = sum(row.stream_seconds for row in u.rows)
    finally:
        farm.stop()

    resumes = [x for r in rooms.values() for x in r.resumes]
    unresolved = sum(len(r.waiting) for r in rooms.values())
    dropped = [sid for sid, s in finals.items()
               if s.state != ENDED or s.progress.stream_seconds < args.seconds - 0.1]
    lost = sum(max(0.0, finals[sid].progress.stream_seconds - billed[sid]) for sid in rooms)
    doubled = sum(max(0.0, billed[sid] - finals[sid].progress.stream_seconds) for sid in rooms)
    missing = sum(max(0.0, args.seconds - decoded_seconds(tenant_root(home / "out", r.tenant) / r.folder, args.fps))
                  for r in rooms.values())
    failovers = len(resumes) + unresolved
    print()
    print(f"workers killed {kills}, scheduler killed {scheduler_kills}; {args.rooms} rooms of "
          f"{args.seconds:.0f} s at {args.side}x{args.side}@{args.fps}")
    print(f"rooms resumed          {len(resumes)} (failovers not resumed: {unresolved})")
    if resumes:
        p99 = percentile(resumes, 0.99)
        print(f"resume time            p50 {statistics.median(resumes):.2f} s   "
              f"p99 {p99:.2f} s   max {max(resumes):.2f} s   goal p99 < 5 s   "
              f"{'PASS' if p99 < 5 else 'MISS'}")
    print(f"frames lost/failover   {missing * args.fps / max(failovers, 1):.1f} "
          f"(stream time missing from the outputs: {missing:.2f} s over {failovers} failovers)")
    print(f"usage lost / doubled   {lost:.3f} s / {doubled:.3f} s of stream time "
          f"(ledger vs the workers' reports; goal 0 / 0)   "
          f"{'PASS' if lost < 1e-3 and doubled < 1e-3 else 'MISS'}")
    print(f"rooms dropped          {len(dropped)}   goal 0   {'PASS' if not dropped else 'MISS'}")
    ok = not dropped and lost < 1e-3 and doubled < 1e-3
    if args.replicas > 1:
        t = leaders.takeovers
        woken_ok = all(code == LOST_LEAD_EXIT for code in leaders.woken_exits)
        print(f"leader changes         {len(t)} ({leaders.killed} killed, {leaders.frozen} frozen) "
              f"among {args.replicas} replicas, lease {args.lease_seconds:g} s")
        if t:
            p99 = percentile(t, 0.99)
            print(f"new leader serving     p50 {statistics.median(t):.2f} s   p99 {p99:.2f} s   "
                  f"max {max(t):.2f} s   goal p99 < 10 s   {'PASS' if p99 < 10 else 'MISS'}")
            ok = ok and p99 < 10
        print(f"woken leaders exited   {sum(c == LOST_LEAD_EXIT for c in leaders.woken_exits)}"
              f"/{len(leaders.woken_exits)} with status {LOST_LEAD_EXIT}, acting on nothing   "
              f"{'PASS' if woken_ok else 'MISS'}")
        ok = ok and woken_ok
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    ap.add_argument("--rooms", type=int, default=6, help="rooms (default 6)")
    ap.add_argument("--seconds", type=float, default=60.0, help="stream length of each room")
    ap.add_argument("--kill-every", type=float, default=12.0,
                    help="seconds between worker kills (default 12)")
    ap.add_argument("--no-scheduler-kill", dest="kill_scheduler", action="store_false",
                    help="do not kill the scheduler half-way")
    ap.add_argument("--replicas", type=int, default=1,
                    help="schedulers on a local PostgreSQL server (default 1: one, on SQLite)")
    ap.add_argument("--leader-every", type=float, default=20.0,
                    help="with replicas: seconds between leader kills and freezes (default 20)")
    ap.add_argument("--lease-seconds", type=float, default=5.0,
                    help="with replicas: the leader's lease (default 5)")
    ap.add_argument("--side", type=int, default=128, help="frame side (default 128)")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--model-dir", default="var/models", help="built models (make demo builds them)")
    ap.add_argument("--home", type=Path, default=None, help="work folder (default: a temp folder)")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        url = ""
        if args.replicas > 1:
            print("starting a local PostgreSQL server ...", flush=True)
            pg = PostgresServer().start()
            stack.callback(pg.stop)
            url = pg.create_database()
        if args.home is not None:
            args.home.mkdir(parents=True, exist_ok=True)
            prepare_models(Path(args.model_dir), args.home)
            return asyncio.run(main_async(args, args.home, url))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        prepare_models(Path(args.model_dir), Path(tmp))
        return asyncio.run(main_async(args, Path(tmp), url))


if __name__ == "__main__":
    raise SystemExit(main())
