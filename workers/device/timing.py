"""Timing model calls into latency curves: the start-up profile and the pipeline's quick
calibration both measure this way."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from avatarfarm.latency import LatencyCurve
from workers.device.engine import DeviceModel


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to max_batch, and max_batch itself."""
    sizes = {1, max(1, max_batch)}
    b = 2
    while b < max_batch:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))


def measure_curve(call: Callable[[int], object], sizes: tuple[int, ...],
                  iterations: int) -> LatencyCurve:
    """Median seconds per call at each batch size, made non-decreasing (noise on a busy
    machine must not make a larger batch look cheaper than a smaller one)."""
    points: list[tuple[int, float]] = []
    floor = 0.0
    for b in sizes:
        seconds = max(median_seconds(functools.partial(call, b), iterations), floor)
        floor = seconds
        points.append((b, seconds))
    return LatencyCurve(tuple(points))


def run_batch_of(model: DeviceModel, feeds: dict[str, np.ndarray], batch: int) -> None:
    """One call of `model` on `batch` copies of one item's feeds (for timing)."""
    model.run({k: np.repeat(v[None], batch, axis=0) for k, v in feeds.items()})


def median_seconds(call: Callable[[], object], iterations: int) -> float:
    """Median wall seconds of `iterations` calls, after one warm-up call."""
    call()  # warm-up: first calls allocate and tune
    samples = []
    for _ in range(max(1, iterations)):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


@dataclass(frozen=True, slots=True)
class Timed:
    """A device result and the device time attributed to it (its share of the batch)."""

    value: np.ndarray
    seconds: float
    batch_size: int = 1
