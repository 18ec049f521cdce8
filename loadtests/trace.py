"""The simulated day: tenants, and the rooms they open over one livestream-commerce day
(quiet night, sharp 20:00-22:00 peak; KA brands with premium reservations, SaaS vendors
with standard rooms, best-effort tenants).

Plain, seeded data (no gRPC, no processes): the scheduler load test replays it against
the real scheduler and hands it to the packing simulator, and the autoscaling simulator
replays the same day in simulated time.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loadtests.worker_specs import Quality, WorkerSpec, compute_units

DAY = 86400.0
HOUR = 3600.0
TIERS = ("premium", "standard", "best_effort")
# A 1x1 PNG: the scheduler only needs <avatar_id>.png to exist in avatar_dir.
PNG_1X1 = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


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
class Tenant:
    name: str
    kind: str  # "ka", "saas" or "best_effort": how the trace draws its rooms
    concurrency_units: float = 0.0
    spend_budget: float = 0.0
    spend_period_seconds: float = 86400.0
    on_budget_exhausted: str = "degrade"
    grace_seconds: float = 300.0
    reserved_units: float = 0.0
    reserved_hours: tuple[str, ...] = ()  # "HH:MM-HH:MM" of the day, UTC; empty: all day
    weight: float = 1.0
    avatars: tuple[str, ...] = ()


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


@dataclass(frozen=True, slots=True)
class DayShape:
    """What a day of traffic looks like: when rooms arrive, how long they stay, what they
    are and who opens them. The packing and autoscaling simulators report every shape
    (`DAYS`), so a policy is not tuned to one day."""

    name: str
    description: str
    diurnal: tuple[tuple[float, float], ...] = DIURNAL
    kinds: dict[str, tuple[float, dict[str, float], dict[tuple[int, int, int], float],
                           dict[str, float], int]] = dataclasses.field(default_factory=lambda: KINDS)
    stay_through_peak: dict[str, float] = dataclasses.field(default_factory=lambda: STAY_THROUGH_PEAK)
    show_hours: tuple[float, float] = (1.0, 4.0)  # a show that does not stay through the peak
    tenants: tuple[int, int, int] = (3, 20, 4)  # KA brands, SaaS vendors, best-effort tenants
    vendor_skew: float = 0.8  # Zipf exponent of rooms over a kind's tenants
    big_vendor_share: float = 0.0  # > 0: the first SaaS vendor opens this share of SaaS rooms


def _with(kind: str, **changes: Any) -> tuple[Any, ...]:
    share, tiers, qualities, drives, per = KINDS[kind]
    values = {"share": share, "tiers": tiers, "qualities": qualities, "drives": drives, "per": per,
              **changes}
    return (values["share"], values["tiers"], values["qualities"], values["drives"], values["per"])


DAYS = {d.name: d for d in (
    DayShape("default", "the load test's day: most rooms stay on through the evening peak"),
    DayShape("long-shows", "2-6 h shows through the afternoon and evening, few rooms all day",
             stay_through_peak={"ka": 0.1, "saas": 0.15, "best_effort": 0.05}, show_hours=(2.0, 6.0),
             diurnal=((0, 0.1), (6, 0.1), (10, 1.0), (13, 2.0), (16, 2.5), (19, 3.0), (21, 1.5),
                      (23, 0.3), (24, 0.1))),
    DayShape("premium-1080p", "brands' day: a third of the rooms premium, most at 1080p or 720p",
             kinds={"ka": _with("ka", share=0.35, qualities={(1080, 1920, 25): 0.45, (1920, 1080, 30): 0.25,
                                                            (720, 1280, 25): 0.30}),
                    "saas": _with("saas", share=0.6, qualities={(1080, 1920, 25): 0.3, (720, 1280, 25): 0.5,
                                                               (540, 960, 25): 0.2}),
                    "best_effort": _with("best_effort", share=0.05)},
             tenants=(8, 12, 2)),
    DayShape("flash-sale", "a flash sale: arrivals ten times the evening rate for half an hour at "
                           "20:00, short rooms that leave within two hours",
             diurnal=((0, 0.2), (8, 0.4), (12, 0.8), (19.9, 1.0), (20.0, 25.0), (20.5, 25.0),
                      (20.6, 1.0), (24, 0.3)),
             stay_through_peak={"ka": 0.2, "saas": 0.2, "best_effort": 0.1}, show_hours=(0.5, 2.0)),
    DayShape("one-vendor", "one SaaS vendor opens 70% of the SaaS rooms, the rest spread thin",
             big_vendor_share=0.7, tenants=(2, 30, 3)),
)}


def diurnal_rate(hour: float, diurnal: Sequence[tuple[float, float]] = DIURNAL) -> float:
    for (h0, r0), (h1, r1) in itertools.pairwise(diurnal):
        if h0 <= hour <= h1:
            return r0 + (r1 - r0) * (hour - h0) / (h1 - h0) if h1 > h0 else r1
    return diurnal[-1][1]


def _pick(rng: random.Random, weights: dict[Any, float]) -> Any:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def make_tenants(n_ka: int = 3, n_saas: int = 20, n_be: int = 4,
                 shape: DayShape | None = None) -> list[Tenant]:
    if shape is not None:
        n_ka, n_saas, n_be = shape.tenants
    kinds = shape.kinds if shape is not None else KINDS
    out = []
    for kind, n, prefix in (("ka", n_ka, "ka-brand"), ("saas", n_saas, "saas"), ("best_effort", n_be, "be")):
        per = kinds[kind][4]
        for i in range(1, n + 1):
            name = f"{prefix}-{i}"
            out.append(Tenant(name, kind, avatars=tuple(f"{name}-host-{j}" for j in range(1, per + 1)),
                              weight=2.0 if kind == "ka" else 1.0))
    return out


def make_trace(n: int, tenants: Sequence[Tenant], rng: random.Random,
               shape: DayShape = DAYS["default"]) -> list[Room]:
    kinds = shape.kinds
    grid = [i * 0.01 for i in range(2401)]
    cdf = [0.0]
    for a, b in itertools.pairwise(grid):
        cdf.append(cdf[-1] + (diurnal_rate(a, shape.diurnal) + diurnal_rate(b, shape.diurnal))
                   / 2 * (b - a))
    by_kind: dict[str, list[Tenant]] = collections.defaultdict(list)
    for t in tenants:
        by_kind[t.kind].append(t)
    rooms = []
    for i in range(n):
        u = rng.random() * cdf[-1]
        j = min(bisect.bisect_left(cdf, u), len(grid) - 1)
        hour = max(0.0, grid[j] - 0.01 * rng.random())
        kind = _pick(rng, {k: v[0] for k, v in kinds.items() if by_kind[k]})
        _, tiers, qualities, drives, _ = kinds[kind]
        ts = by_kind[kind]
        # Vendors are not equal: a few large ones carry most rooms (Zipf-like), or one
        # vendor carries most of its kind's.
        if kind == "saas" and shape.big_vendor_share and rng.random() < shape.big_vendor_share:
            tenant = ts[0]
        else:
            tenant = rng.choices(ts, weights=[1 / (k + 1) ** shape.vendor_skew for k in range(len(ts))])[0]
        tier = _pick(rng, tiers)
        # Rooms that go live during the day and stay on through the evening peak (unattended
        # merchant rooms, brands' evening shows); the rest are shows of show_hours.
        if rng.random() < shape.stay_through_peak[kind]:
            dur_h = max(1.0, rng.uniform(22.0, 25.5) - hour)
        else:
            dur_h = rng.uniform(*shape.show_hours)
        rooms.append(Room(f"r{i:05d}", hour * HOUR, dur_h * HOUR, tenant.name, tier,
                          _pick(rng, qualities), _pick(rng, drives), rng.choice(tenant.avatars)))
    rooms.sort(key=lambda r: r.arrival_s)
    return rooms


def make_day(peak_rooms: int, tenants: Sequence[Tenant], seed: int,
             shape: DayShape = DAYS["default"]) -> list[Room]:
    """A trace whose peak has about `peak_rooms` rooms live (more arrive over the day)."""
    n = peak_rooms
    for _ in range(6):
        trace = make_trace(n, tenants, random.Random(seed), shape)
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
                      budgets: bool, hours: bool = False) -> list[Tenant]:
    """KA brands reserve their peak premium units (with `hours`, for their show hours
    only: `show_hours`); two SaaS vendors get budgets to exercise admission (a
    concurrency cap) and degradation (a small spend budget)."""
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
            if hours:
                kw["reserved_hours"] = show_hours(
                    [r for r in trace if r.tenant == t.name and r.tier == "premium"])
        if t.name == capped:
            kw["concurrency_units"] = float(max(1, round(units[t.name] * 0.6)))
        if t.name == spendy:
            kw.update(spend_budget=2.0, on_budget_exhausted="degrade", grace_seconds=5.0)
        out.append(dataclasses.replace(t, **kw))
    return out


def show_hours(rooms: Sequence[Room], share: float = 0.25, step: float = 300.0) -> tuple[str, ...]:
    """The whole hours a brand would book for its shows: from the first to the last moment
    at least `share` of its peak number of rooms are live (ends rounded out to the hour)."""
    if not rooms:
        return ()
    samples = [(t, len(live_at(rooms, t))) for t in (i * step for i in range(int(DAY / step)))]
    peak = max(n for _, n in samples)
    busy = [t for t, n in samples if peak and n >= share * peak]
    if not busy:
        return ()
    first, last = int(busy[0] // 3600), min(24, int(busy[-1] // 3600) + 1)
    return (f"{first:02d}:00-{last:02d}:00",)


def synthetic(trace: Sequence[Room], n: int, prefix: str, rng: random.Random) -> list[Room]:
    """n rooms with the trace's mix of tenants, tiers and qualities, under fresh room ids."""
    return [Room(f"{prefix}{i:05d}", 0.0, 0.0, r.tenant, r.tier, r.quality, r.drive, r.avatar)
            for i, r in enumerate(rng.choices(list(trace), k=n))]
