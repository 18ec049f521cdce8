"""The simulated fleet's hardware: one ``WorkerSpec`` per worker (device type, price,
host cores, memory, measured batched latency profiles) made by ``make_workers``, and
the load a room puts on such a worker as the scheduler itself computes it
(scheduler.policy.placement), so the load test, the packing simulator and the
autoscaling simulator all agree with placement on what a room costs.

Plain data, no gRPC: the simulated worker (loadtests/sim_worker.py) turns a spec
into a Register message.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from avatarfarm.domain import DriveMode
from avatarfarm.domain import Quality as DomainQuality
from loadtests.packing_sim import worker_state
from scheduler.policy.placement import WorkerProfile

Quality = tuple[int, int, int]  # width, height, fps
ProfileKey = tuple[str, int, int]  # stage, width, height


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
    """1 unit = one 512x512@25 text-driven room on the same device, counted as the
    scheduler counts units (device time only where the host encodes)."""
    units = profile_of(w).units(DomainQuality(*quality), DriveMode(drive), encode=w.cpu_cores <= 0)
    if units is None:
        raise ValueError(f"{w.worker_id} has not measured what {quality} {drive} rooms need")
    return units


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
