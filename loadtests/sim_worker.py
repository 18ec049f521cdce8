"""Simulated workers: fake worker processes that speak the real ``WorkerService`` protocol.

Each ``SimWorker`` is one real gRPC ``Connect`` stream: it registers a GPU-like batched
latency profile (from its ``WorkerSpec``), reports RUNNING on every Assign, and every
second sends a heartbeat and one ``UsageReport`` with every room's cumulative progress,
rendering nothing. Thousands of them share a few channels in a few child processes
(``Fleet``), so the generator does not take the scheduler's core; the parent asks the
children for their counters over a pipe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import multiprocessing as mp
import random
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from avatarfarm.v1 import types_pb2, workers_pb2, workers_pb2_grpc
from loadtests.wire import DRIVE_NAME, END_REASON, TIER_NAME, channel
from loadtests.worker_specs import WorkerSpec, room_load

STAGE_PB = {"render": workers_pb2.STAGE_RENDER, "encode": workers_pb2.STAGE_ENCODE,
            "audio_to_motion": workers_pb2.STAGE_AUDIO_TO_MOTION, "tts": workers_pb2.STAGE_TTS}


def memory_profile() -> workers_pb2.MemoryProfile:
    return workers_pb2.MemoryProfile(models_bytes=6 * 10**9, avatar_bytes_per_pixel=400.0,
                                     room_bytes_per_pixel=60.0)


@dataclass
class RoomRun:
    started: float
    load: float
    fps: int
    tier: str
    epoch: int = 1


@dataclass
class SimStats:
    registered: int = 0
    assigns: collections.Counter[str] = field(default_factory=collections.Counter)
    releases: int = 0
    foreign_releases: int = 0  # released for a reason other than our EndSession (preempted, moved)
    reconfigures: int = 0
    stream_errors: int = 0
    connected: int = 0
    lost_rooms: int = 0
    reports: int = 0
    heartbeats: int = 0
    last_usage_seq_seen: int = 0  # Registered.last_usage_seq > 0 means the scheduler tracks seqs
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    # session_id -> [assigns, foreign releases, reconfigures]
    records: dict[str, list[int]] = field(default_factory=dict)


class SimWorker:
    """One worker: a real Connect stream, a latency profile, rooms that only count time."""

    def __init__(self, spec: WorkerSpec, channel: grpc.aio.Channel, avatars: Sequence[str],
                 stats: SimStats, epoch: int, mode: list[str]) -> None:
        self.spec = spec
        self.stats = stats
        self.epoch = epoch
        self.mode = mode  # shared one-element list: "usage_report" or "session_update"
        self.avatars = avatars
        self.rooms: dict[str, RoomRun] = {}
        self.outbox: asyncio.Queue[workers_pb2.WorkerMessage | None] = asyncio.Queue()
        self.seq = 0
        self.interval = 1.0
        self._call = workers_pb2_grpc.WorkerServiceStub(channel).Connect(self._out())
        self._ticker: asyncio.Task[None] | None = None
        self.registered = False
        self.closing = False

    def _register(self) -> workers_pb2.WorkerMessage:
        s = self.spec
        profiles = [workers_pb2.LatencyProfile(
            stage=STAGE_PB[stage], model=f"sim-{stage}", width=w, height=h,  # type: ignore[arg-type]
            latencies=[workers_pb2.BatchLatency(batch_size=b, seconds=sec) for b, sec in pts])
            for (stage, w, h), pts in s.profiles.items()]
        return workers_pb2.WorkerMessage(register=workers_pb2.Register(
            worker_id=s.worker_id, input_endpoint="127.0.0.1:1", models=["sim-renderer", "sim-a2m"],
            device=workers_pb2.Device(provider="CUDAExecutionProvider", device_type=s.device_type,
                                      name=s.device_type.upper(), cpu_cores=s.cpu_cores,
                                      latency_budget_seconds=s.latency_budget_seconds,
                                      memory_bytes=s.memory_bytes),
            profiles=profiles, avatars=list(self.avatars), memory=memory_profile(),
            warm_avatars=list(s.warm_avatars), usage_epoch=self.epoch))

    async def _out(self) -> Any:
        yield self._register()
        while (msg := await self.outbox.get()) is not None:
            yield msg

    def _progress(self, r: RoomRun, now: float) -> types_pb2.SessionProgress:
        secs = max(0.0, now - r.started)
        return types_pb2.SessionProgress(frames_rendered=int(secs * r.fps), stream_seconds=secs,
                                         device_seconds=secs * r.load)

    async def run(self) -> None:
        try:
            async for msg in self._call:
                kind = msg.WhichOneof("kind")
                if kind == "registered":
                    self.stats.registered += 1
                    self.stats.connected += 1
                    self.registered = True
                    self.stats.last_usage_seq_seen = max(self.stats.last_usage_seq_seen,
                                                         msg.registered.last_usage_seq)
                    self.interval = msg.registered.heartbeat_interval_seconds or 1.0
                    self._ticker = asyncio.create_task(self._tick())
                elif kind == "pace":
                    self.interval = msg.pace.heartbeat_interval_seconds or self.interval
                elif kind == "assign":
                    self._assign(msg.assign)
                elif kind == "release":
                    self._release(msg.release)
                elif kind == "reconfigure":
                    self.stats.reconfigures += 1
                    rec = self.stats.records.setdefault(msg.reconfigure.session_id, [0, 0, 0])
                    rec[2] += 1
            if not self.closing:
                self.stats.stream_errors += 1
                self.stats.errors["stream closed by the scheduler"] += 1
        except grpc.aio.AioRpcError as e:
            if not self.closing:
                self.stats.stream_errors += 1
                self.stats.errors[f"{e.code().name}: {(e.details() or '')[:80]}"] += 1
        except Exception as e:  # noqa: BLE001 - one worker's bug must not stop the others
            self.stats.stream_errors += 1
            self.stats.errors[f"{type(e).__name__}: {e}"[:100]] += 1
        finally:
            # A lost stream is a lost worker: its rooms are gone (no reconnect is simulated).
            self.stats.lost_rooms += len(self.rooms)
            self.rooms.clear()
            if self.registered:
                self.stats.connected -= 1
            if self._ticker is not None:
                self._ticker.cancel()

    def _assign(self, a: workers_pb2.Assign) -> None:
        q = a.spec.quality
        drive = DRIVE_NAME.get(a.spec.drive_mode, "text")
        tier = TIER_NAME.get(a.spec.tier, "standard")
        load = room_load(self.spec, (q.width, q.height, q.fps), drive)
        self.rooms[a.session_id] = RoomRun(time.monotonic(), load, q.fps, tier, a.epoch)
        self.stats.assigns[tier] += 1
        rec = self.stats.records.setdefault(a.session_id, [0, 0, 0])
        rec[0] += 1
        self.outbox.put_nowait(workers_pb2.WorkerMessage(session_update=workers_pb2.SessionUpdate(
            session_id=a.session_id, state=types_pb2.SESSION_STATE_RUNNING, reason="streaming",
            epoch=a.epoch)))

    def _release(self, r: workers_pb2.Release) -> None:
        self.stats.releases += 1
        if r.reason != END_REASON:
            self.stats.foreign_releases += 1
            rec = self.stats.records.setdefault(r.session_id, [0, 0, 0])
            rec[1] += 1
        run = self.rooms.pop(r.session_id, None)
        if run is not None:
            self.outbox.put_nowait(workers_pb2.WorkerMessage(session_update=workers_pb2.SessionUpdate(
                session_id=r.session_id, state=types_pb2.SESSION_STATE_ENDED, reason=r.reason,
                progress=self._progress(run, time.monotonic()), epoch=run.epoch)))

    async def _tick(self) -> None:
        # Workers start their clocks at random offsets, as independent machines would.
        await asyncio.sleep(random.random() * self.interval)
        nxt = time.monotonic()
        while True:
            now = time.monotonic()
            load = sum(r.load for r in self.rooms.values())
            if not self.rooms or self.mode[0] != "usage_report":
                # As real workers do: a usage report is proof of life, a heartbeat only
                # when there is nothing to report.
                self.outbox.put_nowait(workers_pb2.WorkerMessage(heartbeat=workers_pb2.Heartbeat(
                    active_sessions=len(self.rooms), load=load)))
                self.stats.heartbeats += 1
            updates = [workers_pb2.SessionUpdate(session_id=sid, state=types_pb2.SESSION_STATE_RUNNING,
                                                 progress=self._progress(r, now), epoch=r.epoch)
                       for sid, r in self.rooms.items()]
            if self.mode[0] == "usage_report":
                self.seq += 1
                self.outbox.put_nowait(workers_pb2.WorkerMessage(
                    usage_report=workers_pb2.UsageReport(seq=self.seq, updates=updates)))
                self.stats.reports += 1
            else:
                for u in updates:
                    self.outbox.put_nowait(workers_pb2.WorkerMessage(session_update=u))
                self.stats.reports += len(updates)
            nxt += self.interval
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    async def close(self) -> None:
        self.closing = True
        self.outbox.put_nowait(None)
        self._call.cancel()


# -- one child process of workers, and the parent's handle on all of them ----------------------------

async def _fleet(conn: Any, address: str, specs: list[WorkerSpec], avatars: list[str],
                 per_channel: int, mode: str, epoch: int) -> None:
    loop = asyncio.get_running_loop()
    stats = SimStats()
    shared_mode = [mode]
    channels = [channel(address) for _ in range(math.ceil(len(specs) / per_channel))]
    workers = [SimWorker(s, channels[i // per_channel], avatars, stats, epoch + i, shared_mode)
               for i, s in enumerate(specs)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    stop = asyncio.Event()
    t_cpu0 = time.process_time()

    async def handle(cmd: tuple[Any, ...]) -> Any:
        match cmd[0]:
            case "stats":
                return {"registered": stats.registered, "assigns": dict(stats.assigns),
                        "releases": stats.releases, "foreign_releases": stats.foreign_releases,
                        "reconfigures": stats.reconfigures, "stream_errors": stats.stream_errors,
                        "connected": stats.connected, "lost_rooms": stats.lost_rooms,
                        "reports": stats.reports, "heartbeats": stats.heartbeats,
                        "errors": dict(stats.errors.most_common(5)),
                        "last_usage_seq": stats.last_usage_seq_seen,
                        "rooms": sum(len(w.rooms) for w in workers),
                        "cpu": time.process_time() - t_cpu0}
            case "records":
                return stats.records
            case "mode":
                shared_mode[0] = cmd[1]
                return shared_mode[0]
            case "stop":
                stop.set()
                return "stopping"
        return None

    def control() -> None:
        while True:
            try:
                cmd = conn.recv()
            except (EOFError, OSError):
                loop.call_soon_threadsafe(stop.set)
                return
            try:
                reply = asyncio.run_coroutine_threadsafe(handle(cmd), loop).result(30)
            except Exception as e:  # noqa: BLE001 - reply rather than leave the parent waiting
                reply = {"error": repr(e)}
            conn.send(reply)
            if cmd[0] == "stop":
                return

    threading.Thread(target=control, daemon=True).start()
    await stop.wait()
    for w in workers:
        await w.close()
    await asyncio.wait(tasks, timeout=5)
    for ch in channels:
        await ch.close(grace=None)


def fleet_main(conn: Any, address: str, specs: list[WorkerSpec], avatars: list[str],
               per_channel: int, mode: str, epoch: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    asyncio.run(_fleet(conn, address, specs, avatars, per_channel, mode, epoch))


class Fleet:
    """The simulated workers, split over child processes; asks them for stats by pipe."""

    def __init__(self, address: str, specs: list[WorkerSpec], avatars: list[str], procs: int,
                 per_channel: int, mode: str) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.locks: list[threading.Lock] = []
        epoch = int(time.time()) * 1000
        for k in range(procs):
            part = specs[k::procs]
            if not part:
                continue
            parent, child = ctx.Pipe()
            p = ctx.Process(target=fleet_main, args=(child, address, part, avatars, per_channel, mode,
                                                     epoch + k * 100_000), daemon=True,
                            name=f"sim-workers-{k}")
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
            self.locks.append(threading.Lock())

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid]

    def _ask(self, i: int, cmd: tuple[Any, ...], timeout: float) -> Any:
        with self.locks[i]:
            self.conns[i].send(cmd)
            if not self.conns[i].poll(timeout):
                raise TimeoutError(f"worker process {i} did not answer {cmd[0]!r} in {timeout:.0f}s")
            return self.conns[i].recv()

    async def ask(self, cmd: tuple[Any, ...], timeout: float = 30.0) -> list[Any]:
        return list(await asyncio.gather(*(asyncio.to_thread(self._ask, i, cmd, timeout)
                                           for i in range(len(self.conns)))))

    async def stats(self) -> dict[str, Any]:
        parts = await self.ask(("stats",))
        out: dict[str, Any] = {"assigns": collections.Counter(), "errors": collections.Counter()}
        for p in parts:
            for k, v in p.items():
                if k == "assigns":
                    out["assigns"].update(v)
                elif k == "errors":
                    out["errors"].update(v)
                elif k == "last_usage_seq":
                    out[k] = max(out.get(k, 0), v)
                else:
                    out[k] = out.get(k, 0) + v
        return out

    async def records(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for part in await self.ask(("records",), timeout=60):
            for sid, rec in part.items():
                mine = out.setdefault(sid, [0, 0, 0])
                for j in range(3):
                    mine[j] += rec[j]
        return out

    def stop(self) -> None:
        for i, p in enumerate(self.procs):
            if p.is_alive():
                with contextlib.suppress(Exception):
                    self._ask(i, ("stop",), 10)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(2)
