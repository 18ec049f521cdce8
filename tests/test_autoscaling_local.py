"""The autoscaler with the local provisioner and the real processes: a scheduler
with no worker gets rooms, starts worker processes for them, and once the rooms
are over drains the workers and stops them."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2
from farm.local import LocalFarm

pytestmark = pytest.mark.slow


def metrics(port: int) -> dict[str, float]:
    out = {}
    for line in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def poll(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)  # polling another process's state with a deadline


def test_local_workers_are_started_for_rooms_and_stopped_after_them(
        tmp_path: Path, model_dir: Path) -> None:
    home = tmp_path / "farm"
    home.mkdir()
    (home / "models").symlink_to(model_dir)
    pool = {
        "device_type": "cpu", "min_workers": 0, "max_workers": 1, "units_per_worker": 4.0,
        "worker_args": ["--model-dir", str(model_dir), "--output-dir", str(home / "out"),
                        "--pacing", "fast", "--intra-op-threads", "1", "--metrics-port", "0",
                        "--listen", "127.0.0.1:0", "--profile-render-sides", "128",
                        "--profile-encode-sizes", "128x128", "--profile-iterations", "1"],
    }
    autoscaler = {"provisioner": "local", "interval_seconds": 0.5,
                  "local_log_dir": str(home / "logs" / "workers"),
                  "scale_down_window_seconds": 0.0, "drain_deadline_seconds": 30.0,
                  "pools": {"cpu": pool}}
    farm = LocalFarm(home, workers=0, scheduler_args=["--autoscaler", json.dumps(autoscaler)])
    with farm:
        port = farm.scheduler.metrics_port if farm.scheduler else 0
        ready = 'avatarfarm_autoscaler_workers{pool="cpu",state="ready"}'
        assert metrics(port).get(ready, 0.0) == 0.0

        async def rooms() -> list[sessions_pb2.Session]:
            async with grpc.aio.insecure_channel(farm.address) as ch:
                stub = sessions_pb2_grpc.SessionServiceStub(ch)
                made = [await stub.CreateSession(sessions_pb2.CreateSessionRequest(
                    spec=client.spec("vendor", f"room-{i}", width=128, height=128, fps=25,
                                     file_path=f"room-{i}.mp4", seconds=2.0)))
                    for i in range(2)]
                return [await client.wait_for(stub, s.session_id,
                                              lambda x: x.state == types_pb2.SESSION_STATE_ENDED,
                                              120)
                        for s in made]
        done = asyncio.run(rooms())
        assert {s.worker_id for s in done} and all(s.worker_id.startswith("cpu-") for s in done)
        assert all(s.progress.stream_seconds == pytest.approx(2.0, abs=0.05) for s in done)
        started = {s.worker_id for s in done}
        # The rooms are over: the pool goes back to zero, its worker drained and stopped.
        poll(lambda: metrics(port).get(ready, 1.0) == 0.0
             and metrics(port).get('avatarfarm_autoscaler_desired_workers{pool="cpu"}') == 0.0,
             60, "the pool did not scale back to zero")
        m = metrics(port)
        assert m['avatarfarm_autoscaler_scale_events_total{direction="up",pool="cpu"}'] >= 1
        assert m['avatarfarm_autoscaler_scale_events_total{direction="down",pool="cpu"}'] >= 1
        assert m['avatarfarm_worker_drains_total{outcome="completed"}'] >= 1
        assert m.get('avatarfarm_workers_lost_total{device_type="cpu"}', 0.0) == 0.0
        for wid in started:
            log = (home / "logs" / "workers" / f"{wid}.log")
            poll(lambda log=log: "worker shutting down" in log.read_text(), 30,
                 f"{wid} was not stopped")
