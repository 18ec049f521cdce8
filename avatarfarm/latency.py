"""The batch-latency curve both planes share: what one model call costs at each batch
size, as a worker measured it. The worker's batcher plans batches with it and the
scheduler places rooms by the per-item costs it implies, so their ideas of a worker's
capacity cannot drift apart."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LatencyCurve:
    """Measured seconds per call at several batch sizes (ascending), for one model at
    one input shape. Between measured sizes it interpolates linearly; past the
    largest it extends by the last step's per-item cost."""

    points: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a latency curve needs at least one measured batch size")
        sizes = [b for b, _ in self.points]
        if sizes != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"batch sizes must be ascending and >= 1, got {sizes}")

    @property
    def max_batch(self) -> int:
        return self.points[-1][0]

    def seconds(self, batch: int) -> float:
        pts = self.points
        sizes = [b for b, _ in pts]
        i = bisect.bisect_left(sizes, batch)
        if i < len(pts) and pts[i][0] == batch:
            return pts[i][1]
        if i == 0:  # below the smallest measured size: scale down per item
            return pts[0][1] * batch / pts[0][0]
        if i == len(pts):
            if len(pts) == 1:
                return pts[0][1] * batch / pts[0][0]
            (b0, s0), (b1, s1) = pts[-2], pts[-1]
            return s1 + (batch - b1) * max(s1 - s0, 0.0) / (b1 - b0)
        (b0, s0), (b1, s1) = pts[i - 1], pts[i]
        return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)

    def throughput(self, latency_bound: float = math.inf) -> tuple[int, float]:
        """(batch size, items per second) of the best measured size whose call fits
        within the bound; (1, rate at batch 1) when none does."""
        best = (1, 1.0 / self.seconds(1))
        for b, s in self.points:
            if s <= latency_bound and b / s > best[1]:
                best = (b, b / s)
        return best

    def useful_batch(self, limit: int) -> int:
        """The batch size up to `limit` with the best throughput (the largest of near-ties):
        growing past it costs latency for nothing. On a GPU that is usually `limit`; on a
        CPU, where one call already fills the cores, it can be 1."""
        rates = [(b, b / self.seconds(b)) for b in range(1, max(limit, 1) + 1)]
        top = max(r for _, r in rates)
        return max(b for b, r in rates if r >= 0.99 * top)

    def scaled(self, factor: float) -> LatencyCurve:
        return LatencyCurve(tuple((b, s * factor) for b, s in self.points))

    def per_item(self, latency_budget: float = 0.0, max_batch: int = 64) -> tuple[float, ...]:
        """Seconds per item when n items share batches, for n = 1..cap, where cap is the
        measured batch size with the best per-item cost among those whose call fits half
        the latency budget (and at most `max_batch`). This is the scheduler's view of a
        room's cost on a worker; the batcher may always choose a smaller batch, so the
        table never increases."""
        bound = latency_budget / 2 if latency_budget > 0 else math.inf
        fitting = [(b, s) for b, s in self.points if s <= bound] or list(self.points[:1])
        best = min(fitting, key=lambda p: p[1] / p[0])[0]
        cap = max(1, min(best, max_batch))
        out: list[float] = []
        for n in range(1, cap + 1):
            each = self.seconds(n) / n
            out.append(min(out[-1], each) if out else each)
        return tuple(out)
