"""The real processes, as a user runs them: the CLI's scheduler and worker,
a scheduler restart under a running room, and the README's demo command."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2
from farm.local import LocalFarm
from tests.media import probe

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_rooms_keep_streaming_through_a_scheduler_restart(tmp_path: Path, model_dir: Path) -> None:
    home = tmp_path / "farm"
    home.mkdir()
    (home / "models").symlink_to(model_dir)
    farm = LocalFarm(home, workers=1, pacing="realtime", worker_threads=2, overcommit=4.0,
                     scheduler_port=free_port(),
                     worker_args=["--profile-render-sides", "256", "--profile-encode-sizes", "256x256",
                                  "--profile-iterations", "1"])

    async def session(fn):  # type: ignore[no-untyped-def]
        async with grpc.aio.insecure_channel(farm.address) as ch:
            return await fn(sessions_pb2_grpc.SessionServiceStub(ch))

    async def create(stub):  # type: ignore[no-untyped-def]
        s = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
            "vendor", "long-show", width=256, height=256, fps=25, file_path="show.mp4"),
            request_id="show-1"))
        return await client.wait_for(stub, s.session_id,
                                     lambda x: x.state == types_pb2.SESSION_STATE_RUNNING, 60)

    def get(sid: str):  # type: ignore[no-untyped-def]
        return lambda stub: stub.GetSession(sessions_pb2.GetSessionRequest(session_id=sid))

    with farm:
        running = asyncio.run(session(create))
        assert farm.scheduler is not None
        assert farm.scheduler.stop() == 0  # a clean SIGTERM shutdown
        worker_log_before = farm.worker_procs[0].log_path.read_text()
        farm.start_scheduler()

        async def after_restart(stub):  # type: ignore[no-untyped-def]
            # Same session, re-adopted from the worker (not re-placed), still making progress.
            s = await client.wait_for(
                stub, running.session_id,
                lambda x: x.progress.frames_rendered > running.progress.frames_rendered + 25, 60)
            return s

        s = asyncio.run(session(after_restart))
        assert s.state == types_pb2.SESSION_STATE_RUNNING
        assert s.worker_id == "worker-0"
        assert s.spec == running.spec
        assert "re-placing" not in s.reason
        assert "Traceback" not in worker_log_before
        ended = asyncio.run(session(lambda stub: stub.EndSession(
            sessions_pb2.EndSessionRequest(session_id=running.session_id))))
        assert ended.state == types_pb2.SESSION_STATE_ENDED

    # The worker closed the output when the room ended (or at the latest when it stopped).
    f = probe(home / "out" / "@vendor" / "show.mp4")
    assert f.video_codec == "h264" and f.frames > 50


def test_the_demo_command_renders_every_room(tmp_path: Path, model_dir: Path) -> None:
    home = tmp_path / "demo"
    models = home / "models"
    models.mkdir(parents=True)
    # The session's models, and an avatar folder of the demo's own (it registers one).
    for p in model_dir.iterdir():
        if p.name != "avatars":
            (models / p.name).symlink_to(p)
    (models / "avatars").mkdir()
    shutil.copy(model_dir / "avatars" / "presenter.png", models / "avatars")
    out = subprocess.run([sys.executable, "-m", "farm.cli", "demo", "--rooms", "5",
                          "--seconds", "2", "--home", str(home), "--wav2lip", "tiny"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "summary" in out.stdout
    assert "onnxruntime provider: CPUExecutionProvider" in out.stdout
    assert "cost per stream-hour" in out.stdout
    assert "avatarfarm_cost_per_stream_hour:" in out.stdout and "premium/cpu=" in out.stdout
    videos = sorted((home / "out" / "@demo-vendor").glob("*.mp4"))
    assert len(videos) == 5 and home / "out" / "@demo-vendor" / "astronaut-live.mp4" in videos
    assert "video avatar astronaut" in out.stdout  # registered and prepared by the scheduler
    for v in videos:
        f = probe(v)
        assert f.video_codec == "h264" and f.audio_codec == "aac" and f.frames == 50
    # No process is left behind.
    leftover = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
