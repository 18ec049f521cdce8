"""A camera room end to end: the scheduler places it and says where its driver publishes,
a driver publishes the real photograph with a moving mouth and a tone over RTMP
(FFmpeg's client, as OBS or ffmpeg would), and the room's stream opens the avatar's
mouth where the driver opened theirs, with the driver's own sound; a stream key that is
not the room's is refused."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, types_pb2
from tests.driver_publisher import mouth_open
from tests.media import mouth_openness, probe
from tests.test_farm import ended, farm, run


async def publish(url: str, seconds: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.driver_publisher", url, "--seconds", str(seconds),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def test_a_camera_room_moves_with_its_driver_and_speaks_with_their_voice(tmp_path: Path,
                                                                       model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as (stub, worker):
            room = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                "vendor", "cam", drive=types_pb2.DRIVE_MODE_CAMERA, width=256, height=256,
                file_path="cam.mp4", seconds=3.0)))
            placed = await client.wait_for(stub, room.session_id, lambda s: bool(s.driver_url), 30)
            url = placed.driver_url
            assert url.startswith(f"rtmp://127.0.0.1:{worker.ingest.port}/live/")  # type: ignore[union-attr]
            key = url.rsplit("/", 1)[1]
            assert len(key) >= 32 and room.session_id not in key
            # Someone else's key is refused before any media is taken.
            code, out = await publish(url[:-4] + "AAAA", 0.5)
            assert code == 3 and "refused" in out
            # The room lasts 3 s of stream; a driver who would go on is cut off when it ends.
            code, out = await publish(url, 8.0)
            assert code == 3, out
            done = await client.wait_for(stub, room.session_id, ended, 60)
            assert done.state == types_pb2.SESSION_STATE_ENDED, done.reason
            assert done.progress.frames_rendered == 75 and done.driver_url == ""
            # How far behind its driver the avatar is, measured on every driven frame.
            registry = worker.agent.metrics.registry
            count = registry.get_sample_value("avatarfarm_worker_driver_latency_seconds_count",
                                              {"tier": "standard"})
            total = registry.get_sample_value("avatarfarm_worker_driver_latency_seconds_sum",
                                              {"tier": "standard"})
            assert count is not None and total is not None and count >= 60
            assert 0 < total / count < 2.0

        path = tmp_path / "out" / "@vendor" / "cam.mp4"
        assert probe(path).frames == 75
        # The avatar's mouth follows the driver's (open for half of every 10 frames), a
        # few frames behind at most.
        openness = mouth_openness(path)
        said = np.array([mouth_open(i) for i in range(100)], np.float32)
        best = max(np.corrcoef(openness[10:70], said[10 - lag:70 - lag])[0, 1] for lag in range(0, 8))
        assert best > 0.7
        # And the stream's sound is the driver's: the tone while their mouth is open, in
        # step with the avatar's mouth (within a frame).
        import av

        with av.open(str(path)) as c:
            audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
        rate = 48_000 if audio.size > 100_000 else 16_000
        per = rate // 25
        rms = np.array([np.sqrt(np.mean(audio[i * per:(i + 1) * per] ** 2)) for i in range(70)])
        loud = (rms > 0.05).astype(np.float32)
        assert 0.3 < loud.mean() < 0.7
        opened = (openness[:70] > (openness.max() + openness.min()) / 2).astype(np.float32)
        assert max(float(np.mean(loud[lag:] == opened[:70 - lag])) for lag in (0, 1)) > 0.85

    run(body())
