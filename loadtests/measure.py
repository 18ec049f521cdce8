"""What the load test measures with: CPU time of processes from /proc (the scheduler's
and the generator's own, so a reader can tell who was the bottleneck), the scheduler's
Prometheus metrics scraped and summed, and percentiles.
"""

from __future__ import annotations

import collections
import math
import os
import time
import urllib.request
from collections.abc import Iterable, Sequence

from prometheus_client.parser import text_string_to_metric_families

CLK_TCK = os.sysconf("SC_CLK_TCK")


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


Metrics = dict[str, list[tuple[dict[str, str], float]]]  # sample name -> (labels, value) pairs


def scrape(port: int) -> Metrics:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Metrics = collections.defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name].append((dict(s.labels), s.value))
    return out


def msum(m: Metrics, name: str, **labels: str) -> float:
    return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.2f} ms"
