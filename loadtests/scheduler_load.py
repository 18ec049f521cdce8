"""Scheduler load test: the real scheduler process, simulated workers, a diurnal trace.

Starts ``avatarfarm scheduler`` as a subprocess and drives it with simulated
workers: real gRPC ``WorkerService.Connect`` streams that register GPU-like
batched latency profiles, report RUNNING on assignment, then every second a
heartbeat and one ``UsageReport`` with every room's cumulative progress,
rendering nothing. A tenant client creates and ends rooms from a trace of one
livestream-commerce day (quiet night, sharp 20:00-22:00 peak; KA brands with
premium reservations, SaaS vendors with standard rooms, best-effort tenants).

One run prints, phase by phase, then as a PASS/MISS table against the goals:
  1. burst      placements per second (rooms created as fast as they are answered)
  2. rate       p50/p99/max CreateSession latency at a fixed open-loop rate
  3. trace      the day replayed; the clock holds at the evening peak while the
                scheduler's CPU (of one core) is measured from /proc
  4. metrics    sessions by state and tier, GPU utilisation (load / capacity),
                cost per stream-hour by tier, premium guarantees kept, degradations
  5. costs      ``compare_costs(trace, worker_specs)`` (loadtests/packing_sim.py,
                if present: batch-aware vs round-robin vs least-loaded packing)

The generator shares the machine with the scheduler: its own CPU is printed
next to the scheduler's so a reader can tell who was the bottleneck.

Data handed to the packing simulator (plain dataclasses, defined below):
  Room        room_id, arrival_s / duration_s (seconds of the simulated day,
              0..86400), tenant, tier ("premium" | "standard" | "best_effort"),
              quality (width, height, fps), drive ("text" | "voice" | "mocap"), avatar
  WorkerSpec  worker_id, device_type, price_per_hour, cpu_cores, memory_bytes,
              latency_budget_seconds, profiles {(stage, width, height): [(batch, seconds per call)]}
              with stage one of "render" (square side), "encode" (frame size, host
              CPU seconds per frame), "audio_to_motion" and "tts" (0x0; tts seconds
              per second of speech)

    python loadtests/scheduler_load.py                                  # full goal scale
    python loadtests/scheduler_load.py --workers 50 --rooms 500 --day-seconds 30   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import dataclasses
import itertools
import math
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `loadtests.*` and the packages importable
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from avatarfarm import client  # noqa: E402
from avatarfarm.domain import DriveMode  # noqa: E402
from avatarfarm.domain import Quality as DomainQuality  # noqa: E402
from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2, workers_pb2, workers_pb2_grpc  # noqa: E402
from loadtests.packing_sim import worker_state  # noqa: E402
from scheduler.policy.placement import WorkerProfile  # noqa: E402

DAY = 86400.0
HOUR = 3600.0
TIERS = ("premium", "standard", "best_effort")
TIER_PB = {"premium": types_pb2.TIER_PREMIUM, "standard": types_pb2.TIER_STANDARD,
           "best_effort": types_pb2.TIER_BEST_EFFORT}
TIER_NAME = {v: k for k, v in TIER_PB.items()}
DRIVE_PB = {"text": types_pb2.DRIVE_MODE_TEXT, "voice": types_pb2.DRIVE_MODE_VOICE,
            "mocap": types_pb2.DRIVE_MODE_MOCAP}
STAGE_PB = {"render": workers_pb2.STAGE_RENDER, "encode": workers_pb2.STAGE_ENCODE,
            "audio_to_motion": workers_pb2.STAGE_AUDIO_TO_MOTION, "tts": workers_pb2.STAGE_TTS}
LIVE = (types_pb2.SESSION_STATE_PENDING, types_pb2.SESSION_STATE_PLACED, types_pb2.SESSION_STATE_RUNNING)
STATE_NAME = {types_pb2.SESSION_STATE_PENDING: "pending", types_pb2.SESSION_STATE_PLACED: "placed",
              types_pb2.SESSION_STATE_RUNNING: "running", types_pb2.SESSION_STATE_ENDED: "ended",
              types_pb2.SESSION_STATE_FAILED: "failed"}
END_REASON = "ended by load generator"
GOAL_PLACEMENTS = 2000.0
GOAL_P99 = 0.005
GOAL_CPU = 0.50
# A 1x1 PNG: the scheduler only needs <avatar_id>.png to exist in avatar_dir.
PNG_1X1 = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the data a packing simulator can take -------------------------------------------------

Quality = tuple[int, int, int]  # width, height, fps
ProfileKey = tuple[str, int, int]  # stage, width, height


@dataclass(frozen=True, slots=True)
class Room:
    room_id: str
    arrival_s: float   # seconds since midnight of the simulated day
    duration_s: float  # simulated seconds; the room is ended at arrival_s + duration_s (or day end)
    tenant: str
    tier: str
    quality: Quality
    drive: str
    avatar: str

    @property
    def end_s(self) -> float:
        return self.arrival_s + self.duration_s


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    worker_id: str
    device_type: str
    price_per_hour: float
    cpu_cores: int
    memory_bytes: int
    latency_budget_seconds: float
    profiles: dict[ProfileKey, list[tuple[int, float]]]
    warm_avatars: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    kind: str  # "ka", "saas" or "best_effort": how the trace draws its rooms
    concurrency_units: float = 0.0
    spend_budget: float = 0.0
    spend_period_seconds: float = 86400.0
    on_budget_exhausted: str = "degrade"
    grace_seconds: float = 300.0
    reserved_units: float = 0.0
    weight: float = 1.0
    avatars: tuple[str, ...] = ()


# -- load model: the scheduler's own (scheduler.policy.placement), from a WorkerSpec -------------

_PROFILES: dict[str, WorkerProfile] = {}


def profile_of(w: WorkerSpec) -> WorkerProfile:
    """The scheduler's view of a simulated worker's profile (one per worker, cached)."""
    p = _PROFILES.get(w.worker_id)
    if p is None:
        p = _PROFILES[w.worker_id] = worker_state(w).profile
    return p


def room_load(w: WorkerSpec, quality: Quality, drive: str) -> float:
    """Device-seconds per second of stream at the best batch, every stage on one device."""
    load = profile_of(w).room_load(DomainQuality(*quality), DriveMode(drive))
    if load is None:
        raise ValueError(f"{w.worker_id} has not measured what {quality} {drive} rooms need")
    return load


def compute_units(w: WorkerSpec, quality: Quality, drive: str) -> float:
    """1 unit = one 512x512@25 text-driven room on the same device."""
    return room_load(w, quality, drive) / room_load(w, (512, 512, 25), "text")


# -- worker fleet ------------------------------------------------------------------------------

BATCHES = (1, 2, 4, 8, 16)
# GPU stages: seconds of one call at batch 1 on an H200; a call of b items takes
# t1 * b**0.55 (batching pays: per-item time at b=16 is a third of b=1).
H200_T1 = {("render", 512, 512): 0.0034, ("render", 720, 720): 0.0066,
           ("audio_to_motion", 0, 0): 0.0010, ("tts", 0, 0): 0.026}
# Encode: host CPU seconds per frame at the output sizes (x264 veryfast-ish on a fast core).
ENCODE = {(512, 512): 0.0005, (540, 960): 0.0009, (720, 1280): 0.0016, (1280, 720): 0.0016}
DEVICES = {
    #        gpu speed vs h200, encode slowdown, host cores, memory, price/h
    "h200": (1.00, 1.0, 16, 141 * 10**9, 5.00),
    "l4":   (0.30, 1.3, 8, 24 * 10**9, 0.80),
}


def make_workers(n: int, l4_share: float, avatars: Sequence[str], rng: random.Random) -> list[WorkerSpec]:
    out = []
    step = round(1 / l4_share) if l4_share > 0 else 0
    for i in range(n):
        dev = "l4" if step and i % step == step - 1 else "h200"
        speed, enc, cores, mem, price = DEVICES[dev]
        profiles: dict[ProfileKey, list[tuple[int, float]]] = {}
        for key, t1 in H200_T1.items():
            # TTS is one call per second of speech and does not batch across sizes; keep b=1..4.
            sizes = BATCHES if key[0] != "tts" else (1, 2, 4)
            profiles[key] = [(b, round(t1 * b ** 0.55 / speed, 6)) for b in sizes]
        for (w, h), s in ENCODE.items():
            profiles[("encode", w, h)] = [(1, round(s * enc, 6))]
        warm = tuple(rng.sample(list(avatars), k=min(4, len(avatars))))
        out.append(WorkerSpec(f"sim-{dev}-{i:04d}", dev, price, cores, mem, 0.5, profiles, warm))
    return out


def memory_profile() -> workers_pb2.MemoryProfile:
    return workers_pb2.MemoryProfile(models_bytes=6 * 10**9, avatar_bytes_per_pixel=400.0,
                                     room_bytes_per_pixel=60.0)


# -- the trace ---------------------------------------------------------------------------------

# Arrival intensity over the day (hour, relative rate): quiet night, busy afternoon,
# a sharp evening peak at 20:00-22:00 (livestream commerce).
DIURNAL = ((0, 0.25), (3, 0.08), (6, 0.08), (8, 0.5), (11, 1.0), (14, 1.0), (17, 1.4),
           (19, 2.6), (20, 5.0), (21.5, 5.0), (22.5, 1.2), (24, 0.3))
KINDS = {
    # share of rooms, tiers, qualities, drive modes, avatars per tenant
    "ka": (0.10, {"premium": 0.85, "standard": 0.15},
           {(720, 1280, 25): 0.5, (1280, 720, 30): 0.35, (540, 960, 25): 0.15},
           {"voice": 0.45, "mocap": 0.35, "text": 0.20}, 3),
    "saas": (0.80, {"standard": 0.92, "best_effort": 0.08},
             {(540, 960, 25): 0.40, (512, 512, 25): 0.30, (720, 1280, 25): 0.25, (1280, 720, 30): 0.05},
             {"text": 0.70, "voice": 0.20, "mocap": 0.10}, 4),
    "best_effort": (0.10, {"best_effort": 1.0}, {(512, 512, 25): 0.7, (540, 960, 25): 0.3},
                    {"text": 0.8, "mocap": 0.2}, 2),
}


STAY_THROUGH_PEAK = {"ka": 0.85, "saas": 0.9, "best_effort": 0.5}


def diurnal_rate(hour: float) -> float:
    for (h0, r0), (h1, r1) in itertools.pairwise(DIURNAL):
        if h0 <= hour <= h1:
            return r0 + (r1 - r0) * (hour - h0) / (h1 - h0)
    return DIURNAL[-1][1]


def _pick(rng: random.Random, weights: dict[Any, float]) -> Any:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def make_tenants(n_ka: int = 3, n_saas: int = 20, n_be: int = 4) -> list[Tenant]:
    out = []
    for kind, n, prefix in (("ka", n_ka, "ka-brand"), ("saas", n_saas, "saas"), ("best_effort", n_be, "be")):
        per = KINDS[kind][4]
        for i in range(1, n + 1):
            name = f"{prefix}-{i}"
            out.append(Tenant(name, kind, avatars=tuple(f"{name}-host-{j}" for j in range(1, per + 1)),
                              weight=2.0 if kind == "ka" else 1.0))
    return out


def make_trace(n: int, tenants: Sequence[Tenant], rng: random.Random) -> list[Room]:
    grid = [i * 0.01 for i in range(2401)]
    cdf = [0.0]
    for a, b in itertools.pairwise(grid):
        cdf.append(cdf[-1] + (diurnal_rate(a) + diurnal_rate(b)) / 2 * (b - a))
    by_kind: dict[str, list[Tenant]] = collections.defaultdict(list)
    for t in tenants:
        by_kind[t.kind].append(t)
    rooms = []
    for i in range(n):
        u = rng.random() * cdf[-1]
        j = min(bisect.bisect_left(cdf, u), len(grid) - 1)
        hour = max(0.0, grid[j] - 0.01 * rng.random())
        kind = _pick(rng, {k: v[0] for k, v in KINDS.items() if by_kind[k]})
        _, tiers, qualities, drives, _ = KINDS[kind]
        ts = by_kind[kind]
        # Vendors are not equal: a few large ones carry most rooms (Zipf-like).
        tenant = rng.choices(ts, weights=[1 / (k + 1) ** 0.8 for k in range(len(ts))])[0]
        tier = _pick(rng, tiers)
        # Most rooms go live during the day and stay on through the evening peak (unattended
        # merchant rooms, brands' evening shows); the rest are 1-4 h shows.
        if rng.random() < STAY_THROUGH_PEAK[kind]:
            dur_h = max(1.0, rng.uniform(22.0, 25.5) - hour)
        else:
            dur_h = rng.uniform(1.0, 4.0)
        rooms.append(Room(f"r{i:05d}", hour * HOUR, dur_h * HOUR, tenant.name, tier,
                          _pick(rng, qualities), _pick(rng, drives), rng.choice(tenant.avatars)))
    rooms.sort(key=lambda r: r.arrival_s)
    return rooms


def make_day(peak_rooms: int, tenants: Sequence[Tenant], seed: int) -> list[Room]:
    """A trace whose evening peak has about `peak_rooms` rooms live (more arrive over the day)."""
    n = peak_rooms
    for _ in range(4):
        trace = make_trace(n, tenants, random.Random(seed))
        _, peak = peak_of(trace)
        if abs(peak - peak_rooms) <= max(1, peak_rooms // 500):
            break
        n = max(1, round(n * peak_rooms / max(peak, 1)))
    return trace


def concurrency_curve(trace: Sequence[Room]) -> list[tuple[float, int]]:
    events = sorted([(r.arrival_s, 1) for r in trace] + [(min(r.end_s, DAY), -1) for r in trace],
                    key=lambda e: (e[0], e[1]))
    out, n = [], 0
    for t, d in events:
        n += d
        out.append((t, n))
    return out


def peak_of(trace: Sequence[Room]) -> tuple[float, int]:
    curve = concurrency_curve(trace)
    t, n = max(curve, key=lambda e: e[1])
    return t, n


def live_at(trace: Sequence[Room], t: float) -> list[Room]:
    return [r for r in trace if r.arrival_s <= t < r.end_s]


def with_reservations(tenants: Sequence[Tenant], trace: Sequence[Room], ref: WorkerSpec,
                      budgets: bool) -> list[Tenant]:
    """KA brands reserve their peak premium units; two SaaS vendors get budgets to exercise
    admission (a concurrency cap) and degradation (a small spend budget)."""
    t_peak, _ = peak_of(trace)
    live = live_at(trace, t_peak)
    premium_units: dict[str, float] = collections.Counter()
    units: dict[str, float] = collections.Counter()
    for r in live:
        u = compute_units(ref, r.quality, r.drive)
        units[r.tenant] += u
        if r.tier == "premium":
            premium_units[r.tenant] += u
    out = []
    saas = [t for t in tenants if t.kind == "saas"]
    capped = saas[-1].name if budgets and saas else ""
    spendy = saas[-2].name if budgets and len(saas) > 1 else ""
    for t in tenants:
        kw: dict[str, Any] = {}
        if t.kind == "ka":
            kw["reserved_units"] = float(math.ceil(premium_units[t.name] * 1.1 / 10) * 10)
        if t.name == capped:
            kw["concurrency_units"] = float(max(1, round(units[t.name] * 0.6)))
        if t.name == spendy:
            kw.update(spend_budget=2.0, on_budget_exhausted="degrade", grace_seconds=5.0)
        out.append(dataclasses.replace(t, **kw))
    return out


def spec_pb(room: Room, room_id: str | None = None) -> types_pb2.SessionSpec:
    rid = room_id or room.room_id
    w, h, fps = room.quality
    return client.spec(room.tenant, rid, drive=DRIVE_PB[room.drive], tier=TIER_PB[room.tier],
                       width=w, height=h, fps=fps, avatar=room.avatar,
                       rtmp_url=f"rtmp://ingest.example.com/live/{room.tenant}-{rid}")


# -- helpers: CPU, metrics, percentiles ----------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except OSError:
        return 0.0
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMeter:
    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = list(pids)
        self.t0 = time.perf_counter()
        self.c0 = sum(cpu_seconds(p) for p in self.pids)

    def share(self) -> float:
        """CPU used since start as a fraction of one core."""
        wall = time.perf_counter() - self.t0
        return (sum(cpu_seconds(p) for p in self.pids) - self.c0) / max(wall, 1e-9)


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name].append((dict(s.labels), s.value))
    return out


def msum(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.2f} ms"


# -- the scheduler process -------------------------------------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + "}"
    return repr(float(v)) if isinstance(v, float) else str(v)


def write_config(path: Path, state: Path, avatar_dir: Path, tenants: Sequence[Tenant] | None,
                 extra: dict[str, Any]) -> None:
    top: dict[str, Any] = {
        "listen": "127.0.0.1:0", "metrics_port": -1, "database": str(state / "scheduler.db"),
        "avatar_dir": str(avatar_dir), "heartbeat_interval": 1.0, "worker_timeout": 30.0,
        "device_prices": {dev: spec[4] for dev, spec in DEVICES.items()}, **extra}
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for t in tenants or ():
        lines += ["", f'[tenants."{t.name}"]']
        for f in ("concurrency_units", "spend_budget", "spend_period_seconds", "on_budget_exhausted",
                  "grace_seconds", "reserved_units", "weight"):
            lines.append(f"{f} = {_toml_value(getattr(t, f))}")
    path.write_text("\n".join(lines) + "\n")


class SchedulerProcess:
    """``avatarfarm scheduler`` as a child process: started, watched, stopped (TERM, then KILL)."""

    def __init__(self, config: Path, log_path: Path, log_level: str, root: Path = ROOT) -> None:
        # `python -m farm.cli` with the code root first on the path: the same as the
        # `avatarfarm` command, and --scheduler-root can point at another checkout to compare.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "farm.cli", "--log-level", log_level, "scheduler",
             "--config", str(config)],
            stdout=subprocess.PIPE, stderr=self._log, cwd=str(root), env=env, start_new_session=True)
        self.port = self.metrics_port = 0

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Parses 'avatarfarm scheduler ready on port N (metrics port M)'; False if it exited."""
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace")
                if "ready on port" in line and not found:
                    found.append(line)
            # keep draining until EOF so the pipe never fills

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not found and self.proc.poll() is None:
            time.sleep(0.05)
        if not found:
            return False
        words = found[0].replace("(", " ").replace(")", " ").split()
        self.port = int(words[words.index("port") + 1])
        self.metrics_port = int(words[words.index("metrics") + 2])
        return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# -- simulated workers (run in child processes) ------------------------------------------------------

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
        drive = {v: k for k, v in DRIVE_PB.items()}.get(a.spec.drive_mode, "text")
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


def _channel(address: str) -> grpc.aio.Channel:
    # A local subchannel pool gives each channel its own TCP connection.
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


async def _fleet(conn: Any, address: str, specs: list[WorkerSpec], avatars: list[str],
                 per_channel: int, mode: str, epoch: int) -> None:
    loop = asyncio.get_running_loop()
    stats = SimStats()
    shared_mode = [mode]
    channels = [_channel(address) for _ in range(math.ceil(len(specs) / per_channel))]
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


# -- the tenant client ------------------------------------------------------------------------------------

@dataclass
class Call:
    latency: float
    state: int = 0  # SessionState of the answer; 0 on error
    code: str = "OK"
    session_id: str = ""


class Tenants:
    """CreateSession/EndSession over a few channels, round robin."""

    def __init__(self, address: str, channels: int, timeout: float) -> None:
        self.channels = [_channel(address) for _ in range(channels)]
        self.stubs = [sessions_pb2_grpc.SessionServiceStub(c) for c in self.channels]
        self.timeout = timeout
        self._i = 0

    def stub(self) -> sessions_pb2_grpc.SessionServiceStub:
        self._i = (self._i + 1) % len(self.stubs)
        return self.stubs[self._i]

    async def create(self, spec: types_pb2.SessionSpec, request_id: str) -> Call:
        req = sessions_pb2.CreateSessionRequest(spec=spec, request_id=request_id)
        stub = self.stub()
        t0 = time.perf_counter()
        try:
            s = await stub.CreateSession(req, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            return Call(time.perf_counter() - t0, 0, e.code().name)
        return Call(time.perf_counter() - t0, s.state, "OK", s.session_id)

    async def end(self, session_id: str) -> Call:
        t0 = time.perf_counter()
        try:
            s = await self.stub().EndSession(sessions_pb2.EndSessionRequest(
                session_id=session_id, reason=END_REASON), timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            return Call(time.perf_counter() - t0, 0, e.code().name)
        return Call(time.perf_counter() - t0, s.state, "OK", s.session_id)

    async def list_live(self) -> list[types_pb2.Session]:
        out: list[types_pb2.Session] = []
        token = ""
        while True:
            page = await self.stubs[0].ListSessions(sessions_pb2.ListSessionsRequest(
                states=LIVE, page_size=1000, page_token=token), timeout=60)
            out += page.sessions
            token = page.next_page_token
            if not token:
                return out

    async def close(self) -> None:
        for c in self.channels:
            await c.close(grace=None)


async def bounded(items: Iterable[Any], concurrency: int, fn: Any,
                  time_limit: float = math.inf) -> list[Any]:
    """fn(item) for every item with at most `concurrency` in flight; results in order (None for
    items not started within `time_limit` seconds)."""
    items = list(items)
    results: list[Any] = [None] * len(items)
    it: Iterator[int] = iter(range(len(items)))
    deadline = time.perf_counter() + time_limit

    async def lane() -> None:
        for i in it:
            if time.perf_counter() > deadline:
                return
            results[i] = await fn(items[i])

    await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, len(items))))))
    return results


async def end_leftovers(tc: Tenants, prefix: str) -> int:
    """Ends live sessions of ours whose CreateSession answer never arrived (timed out)."""
    try:
        live = await tc.list_live()
    except grpc.aio.AioRpcError:
        return 0
    ids = [s.session_id for s in live if s.spec.room_id.startswith(prefix)]
    await bounded(ids, 64, tc.end)
    return len(ids)


def codes(calls: Iterable[Call]) -> str:
    c = collections.Counter(x.code for x in calls if x.code != "OK")
    return ", ".join(f"{k} {v}" for k, v in c.most_common()) or "none"


# -- phases ------------------------------------------------------------------------------------------------

@dataclass
class Report:
    notes: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


def synthetic(trace: Sequence[Room], n: int, prefix: str, rng: random.Random) -> list[Room]:
    """n rooms with the trace's mix of tenants, tiers and qualities, under fresh room ids."""
    return [Room(f"{prefix}{i:05d}", 0.0, 0.0, r.tenant, r.tier, r.quality, r.drive, r.avatar)
            for i, r in enumerate(rng.choices(list(trace), k=n))]


async def phase_burst(tc: Tenants, fleet: Fleet, rooms: list[Room], concurrency: int,
                      sched_pid: int, rep: Report, time_limit: float) -> None:
    print(f"\n[1] burst: {len(rooms)} CreateSession calls, {concurrency} in flight", flush=True)
    before = await fleet.stats()
    sched = CpuMeter([sched_pid])
    gen = CpuMeter([os.getpid(), *fleet.pids])
    t0 = time.perf_counter()
    results = await bounded(rooms, concurrency, lambda r: tc.create(spec_pb(r), r.room_id), time_limit)
    wall = time.perf_counter() - t0
    calls: list[Call] = [c for c in results if c is not None]
    if len(calls) < len(rooms):
        rep.note(f"burst stopped at its {time_limit:.0f}s limit after {len(calls)}/{len(rooms)} calls")
    s_cpu, g_cpu = sched.share(), gen.share()
    placed = sum(c.state in (types_pb2.SESSION_STATE_PLACED, types_pb2.SESSION_STATE_RUNNING) for c in calls)
    await asyncio.sleep(1.0)
    after = await fleet.stats()
    assigned = sum(after["assigns"].values()) - sum(before["assigns"].values())
    rate = placed / wall
    lat = [c.latency for c in calls if c.code == "OK"]
    print(f"  {placed}/{len(calls)} placed in the answer in {wall:.2f}s = {rate:.0f} placements/s "
          f"({assigned} Assign messages reached the workers); errors: {codes(calls)}")
    print(f"  latency p50 {ms(pct(lat, 0.5))} p99 {ms(pct(lat, 0.99))} (closed loop); CPU: scheduler "
          f"{s_cpu:.0%} of a core, generator {g_cpu:.0%}", flush=True)
    rep.values.update(burst_rate=rate, burst_placed=placed, burst_sched_cpu=s_cpu, burst_gen_cpu=g_cpu)
    t1 = time.perf_counter()
    ids = [c.session_id for c in calls if c.session_id]
    ends = await bounded(ids, concurrency, tc.end)
    print(f"  ended {len(ids)} in {time.perf_counter() - t1:.2f}s "
          f"({len(ids) / max(time.perf_counter() - t1, 1e-9):.0f}/s); errors: {codes(ends)}", flush=True)
    if len(ids) < len(rooms):
        print(f"  ended {await end_leftovers(tc, 'b')} more created by calls that timed out", flush=True)


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
          f"workers reporting every second; measuring CPU for {args.hold_seconds:.0f}s", flush=True)
    s_meter = CpuMeter([sched.pid])
    g_meter = CpuMeter([os.getpid(), *fleet.pids])
    r0 = st["reports"]
    await asyncio.sleep(args.hold_seconds)
    s_cpu, g_cpu = s_meter.share(), g_meter.share()
    st2 = await fleet.stats()
    msgs = (st2["reports"] - r0) / args.hold_seconds
    print(f"  scheduler CPU {s_cpu:.1%} of one core with {st2['rooms']} rooms, {st2['registered']} workers "
          f"({msgs:.0f} reports/s + heartbeats); generator {g_cpu:.0%}", flush=True)
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


def summary(args: argparse.Namespace, rep: Report) -> int:
    v = rep.values
    full = args.workers >= 1000 and args.rooms >= 10000
    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, value: str, goal: str, ok: bool | None) -> None:
        rows.append((name, value, goal, "-" if ok is None else ("PASS" if ok else "MISS")))

    if "burst_rate" in v:
        row("placements per second (burst)", f"{v['burst_rate']:.0f}/s", ">= 2000/s",
            v["burst_rate"] >= GOAL_PLACEMENTS)
    if "rate_p99" in v:
        at_rate = v["rate_achieved"] >= 0.95 * v["rate_target"] and v["rate_skipped"] == 0
        row(f"CreateSession p99 at {v['rate_target']:.0f}/s", f"{ms(v['rate_p99'])} "
            f"(p50 {ms(v['rate_p50'])}, achieved {v['rate_achieved']:.0f}/s)", "< 5 ms at >= 2000/s",
            v["rate_p99"] < GOAL_P99 and at_rate and v["rate_target"] >= GOAL_PLACEMENTS)
    if "peak_cpu" in v:
        row("scheduler CPU at the peak", f"{v['peak_cpu']:.1%} of a core ({v['peak_rooms']} rooms, "
            f"{v['peak_workers']} workers)", "< 50% (10,000 rooms, 1,000 workers)", v["peak_cpu"] < GOAL_CPU)
        row("GPU utilisation at the peak", f"{v['peak_util']:.1%}", "info", None)
        row("rooms pending at the peak", f"{v['peak_pending']}", "info", None)
    if "premium_eligible" in v:
        row("premium guarantees kept", f"{v['premium_kept']}/{v['premium_eligible']}", "all",
            v["premium_kept"] == v["premium_eligible"])
        row("degradations (Reconfigure)", f"{v['degradations']}", "info", None)
    if "cost" in v:
        row("cost per stream-hour", ", ".join(f"{t} {v['cost'].get(t, 0):.3f}" for t in TIERS), "info", None)
    print(f"\n== summary ({args.workers} workers, {args.rooms} rooms"
          f"{'' if full else '; scaled down: goals are stated for 1,000 workers and 10,000 rooms'}) ==")
    w = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    for r in rows:
        print(f"  {r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
    if rep.notes:
        print("notes (what this scheduler does not do yet, or what went wrong):")
        for n in rep.notes:
            print(f"  - {n}")
    return 0


# -- main ---------------------------------------------------------------------------------------------------

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
    ap.add_argument("--rate", type=float, default=2000.0, help="CreateSession per second in phase 2 (default 2000)")
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
                    help="scheduler with sync_to_disk = false (no fsync per commit)")
    ap.add_argument("--phases", default="burst,rate,trace", help="which phases to run (default all)")
    ap.add_argument("--seed", type=int, default=7, help="trace and fleet seed (default 7)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (config, db, scheduler log)")
    ap.add_argument("--scheduler-root", type=Path, default=ROOT,
                    help="checkout whose scheduler is run (default this one), e.g. a `git archive` "
                         "of another commit to compare")
    ap.add_argument("--scheduler-log-level", default="warning", help="the scheduler's --log-level")
    return ap.parse_args(argv)


async def run(args: argparse.Namespace, home: Path, rep: Report, cleanup: list[Any]) -> None:
    rng = random.Random(args.seed)
    tenants = make_tenants()
    avatars = sorted(a for t in tenants for a in t.avatars)
    trace = make_day(args.rooms, tenants, args.seed)
    workers = make_workers(args.workers, args.l4_share, avatars, rng)
    ref = next(w for w in workers if w.device_type == "h200")
    tenants = with_reservations(tenants, trace, ref, budgets=not args.no_budgets)
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

    avatar_dir = home / "avatars"
    avatar_dir.mkdir()
    for a in avatars:
        (avatar_dir / f"{a}.png").write_bytes(PNG_1X1)
    config = home / "scheduler.toml"
    use_tenants = not args.no_tenants
    sched: SchedulerProcess | None = None
    for attempt in (1, 2):
        write_config(config, home, avatar_dir, tenants if use_tenants else None,
                     {"sync_to_disk": not args.no_sync})
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
    address = f"127.0.0.1:{sched.port}"
    print(f"scheduler pid {sched.pid} on {address}, metrics port {sched.metrics_port}; "
          f"tenants {'configured' if use_tenants else 'off'}", flush=True)

    mode = "usage_report" if args.progress == "auto" else args.progress
    fleet = Fleet(address, workers, avatars, args.worker_procs, args.workers_per_channel, mode)
    cleanup.append(fleet.stop)
    tc = Tenants(address, args.client_channels, args.call_timeout)
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

    phases = set(args.phases.split(","))
    burst_n = args.burst if args.burst is not None else int(args.rooms * 0.4)
    if "burst" in phases and burst_n > 0:
        await phase_burst(tc, fleet, synthetic(trace, burst_n, "b", rng), args.concurrency, sched.pid, rep,
                          args.phase_timeout)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. from `timeout`) cleans up as Ctrl-C does: workers and scheduler stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    home = Path(tempfile.mkdtemp(prefix="avatarfarm-load-"))
    rep = Report()
    cleanup: list[Any] = []
    code = 0
    try:
        asyncio.run(run(args, home, rep, cleanup))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        for fn in reversed(cleanup):  # workers first, then the scheduler
            with contextlib.suppress(Exception):
                fn()
        if args.keep:
            print(f"kept {home}")
        else:
            import shutil
            shutil.rmtree(home, ignore_errors=True)
    return summary(args, rep) or code


if __name__ == "__main__":
    sys.exit(main())
