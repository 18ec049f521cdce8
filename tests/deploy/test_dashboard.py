"""The Grafana dashboard against a real Prometheus (Debian's `prometheus`)
loading deploy/prometheus/rules.yml and scraping a running local farm: every
panel query parses and returns series once rooms have streamed, the cost per
stream-hour recorded from the counters agrees with the scheduler's own figure,
and losing a worker shows in the churn panel."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2
from farm.local import LocalFarm

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "avatarfarm.json"

SPEECH = "Hello and welcome! Today every pair of running shoes is half price."
# Recommend-only autoscaling, deciding every second, so its series appear at once.
AUTOSCALER = {"interval_seconds": 1,
              "pools": {"cpu": {"device_type": "cpu", "min_workers": 1, "max_workers": 2}}}
# Series that exist only once a worker has been lost: queried after killing one.
AFTER_LOSS = "avatarfarm_workers_lost"
Series = list[dict[str, Any]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        why = "prometheus is not installed (apt-get install prometheus)"
        if os.environ.get("AVATARFARM_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return found


def poll(what: str, attempt: Callable[[], Any], timeout: float) -> Any:
    """attempt() until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        got = attempt()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {got!r})")
        time.sleep(0.25)  # polling interval, the deadline above bounds the wait


class Prometheus:
    """A Prometheus server in a temporary folder: 1 s scrapes and rule evaluations."""

    def __init__(self, binary: str, root: Path, targets: dict[str, str]) -> None:
        self.binary = binary
        self.root = root
        self.targets = targets
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "prometheus.yml"  # JSON is YAML
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in self.targets.items()]}))
        self.log = self.root / "prometheus.log"
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                [self.binary, f"--config.file={config}",
                 f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        poll("prometheus ready", self._ready, timeout)
        return self

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)  # a query that does not parse: 400 with the error
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> Series:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return len(active) == len(self.targets) and all(t["health"] == "up" for t in active)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)


def values(series: Series) -> dict[str, float]:
    """Value by label set, the metric name left out (aggregations drop it)."""
    return {json.dumps({k: v for k, v in s["metric"].items() if k != "__name__"}, sort_keys=True):
            float(s["value"][1]) for s in series}


def at_least_one(prom: Prometheus, expr: str) -> list[float]:
    return [v for v in values(prom.query(expr)).values() if v >= 1]


def dashboard_queries() -> list[str]:
    found: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            found.extend(t["expr"] for t in p.get("targets", []) if t["expr"] not in found)
            walk(p.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def create_rooms(address: str) -> None:
    async def body() -> None:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = sessions_pb2_grpc.SessionServiceStub(ch)
            for room, tier in (("dash-premium", types_pb2.TIER_PREMIUM),
                               ("dash-standard", types_pb2.TIER_STANDARD)):
                s = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                    "vendor", room, tier=tier, width=128, height=128, fps=25, seconds=8.0,
                    file_path=f"{room}.mp4", script=[types_pb2.ScriptSegment(text=SPEECH)])))
                assert s.state == types_pb2.SESSION_STATE_PLACED, s.reason

    asyncio.run(asyncio.wait_for(body(), 60))


@pytest.fixture
def prometheus_bin() -> str:
    return prometheus_binary()


def test_every_dashboard_query_returns_series_from_a_running_farm(
        tmp_path: Path, model_dir: Path, prometheus_bin: str) -> None:
    queries = dashboard_queries()
    home = tmp_path / "farm"
    home.mkdir()
    (home / "models").symlink_to(model_dir)
    worker_metrics = free_port()
    farm = LocalFarm(home, workers=1, pacing="realtime", worker_threads=1, overcommit=4.0,
                     scheduler_args=["--autoscaler", json.dumps(AUTOSCALER)],
                     # The worker's ready line does not name its metrics port: give it one.
                     # Lip-sync checks every 2 s, so a short room is checked.
                     worker_args=["--metrics-port", str(worker_metrics), "--sync-interval", "2",
                                  "--profile-render-sides", "128", "--profile-encode-sizes",
                                  "128x128", "--profile-iterations", "1"])
    with farm:
        assert farm.scheduler is not None and farm.scheduler.metrics_port
        prom = Prometheus(prometheus_bin, tmp_path / "prometheus", {
            "avatarfarm-scheduler": f"127.0.0.1:{farm.scheduler.metrics_port}",
            "avatarfarm-workers": f"127.0.0.1:{worker_metrics}"}).start()
        try:
            poll("both targets scraped", prom.targets_up, 30)
            create_rooms(farm.address)

            # Every query parses now, and each returns series within the deadline.
            for expr in queries:
                prom.query(expr)
            waiting = [q for q in queries if AFTER_LOSS not in q]
            deadline = time.monotonic() + 45
            while waiting and time.monotonic() < deadline:
                waiting = [q for q in waiting if not prom.query(q)]
                if waiting:
                    time.sleep(0.5)  # polling interval, bounded by the deadline
            assert not waiting, f"queries that returned no series: {waiting}"

            # The headline figure: recorded from the counters, it matches the cost the
            # scheduler computes itself (same rooms, same prices) within the window.
            def costs() -> dict[str, tuple[float, float]]:
                recorded = values(prom.query("tier_device_type:avatarfarm_cost_per_stream_hour:ratio"))
                exported = values(prom.query(
                    "max without (instance, job) (avatarfarm_cost_per_stream_hour)"))
                both = {k: (v, exported.get(k, math.nan)) for k, v in recorded.items()}
                ok = both and all(math.isfinite(r) and r > 0 and e > 0 for r, e in both.values())
                return both if ok else {}

            for key, (recorded, exported) in poll("cost per stream-hour", costs, 30).items():
                assert 0.5 < recorded / exported < 2.0, (key, recorded, exported)
            assert poll("frames per second", lambda: [
                v for v in values(prom.query("tier:avatarfarm_frames_rendered:rate5m")).values()
                if v > 0], 30)

            # A worker killed outright is a loss, not a drain.
            lost = [q for q in queries if AFTER_LOSS in q]
            assert lost
            farm.worker_procs[0].kill()
            for expr in lost:
                poll(f"{expr} after a worker loss", partial(at_least_one, prom, expr), 30)
        finally:
            prom.stop()
