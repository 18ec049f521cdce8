"""Camera rooms on one worker: how many it sustains, and how far behind their drivers.

Each room is a live camera room on the reference portrait (real-time pacing); its driver
is a process publishing over RTMP to the worker's ingest as OBS or ffmpeg would (the
test driver: the real photograph with a moving mouth, a webcam's noise and a tone,
`tests.driver_publisher --pattern live`).
For each number of rooms, per mode (the face reader and renderer batched across rooms,
or one room per call), it prints frames per second delivered, late frames and the
driver latency (a driver frame's arrival to the avatar frame that shows it going to the
encoder) at the median and 95th percentile, over the rooms' last seconds, and the share
of the ``--seconds`` the drivers drove live (the liveness monitor's verdict); each room
first runs `WARMUP` seconds on its idle loop while its driver starts and connects.

    python loadtests/camera_bench.py --rooms 1,2,4 --seconds 8

By default the drivers replay a recording of the test driver (``--drivers replay``: their
packets as they are, paced, next to no CPU), as drivers who publish from their homes
cost the worker nothing to encode; ``--drivers encode`` has each encode H.264 live on
the same CPU, which on a small machine takes a real share of it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent  # the test driver runs as a module from here
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from avatarfarm.domain import DriveMode, Output, OutputKind, Quality, SessionSpec, Tier  # noqa: E402
from avatarfarm.input_tokens import driver_key  # noqa: E402
from workers.device.batching import BatchPolicy  # noqa: E402
from workers.device.onnx import ProviderChoice, auto_intra_op_threads  # noqa: E402
from workers.device.pipeline import FACE_READER_KEY, Pipeline  # noqa: E402
from workers.ingest.registry import DriverRooms  # noqa: E402
from workers.ingest.rtmp import RtmpIngest  # noqa: E402
from workers.models.folder import build_reference  # noqa: E402
from workers.output.targets import OutputTarget  # noqa: E402
from workers.rooms.room import Pacing, Room  # noqa: E402

# Rooms start before their drivers' processes do: a few seconds on the idle loop while the
# drivers start and connect, then ``seconds`` driven.
WARMUP = 3.0


async def run(pipeline: Pipeline, rooms: int, seconds: float, out: Path,
              recording: Path | None) -> dict[str, float]:
    drivers = DriverRooms()
    ingest = RtmpIngest(drivers.authorize, "127.0.0.1")
    port = await ingest.start()
    made = []
    for i in range(rooms):
        spec = SessionSpec("bench", f"cam{i}", "presenter", DriveMode.CAMERA, Quality(256, 256, 25),
                           Tier.STANDARD, Output(OutputKind.FILE, f"cam{i}.mp4"), seconds + WARMUP)
        key = os.urandom(32)
        made.append(Room(f"cam{i}", spec, OutputTarget.resolve(OutputKind.FILE, f"cam{i}.mp4", out),
                         pipeline, pacing=Pacing.REALTIME, input_key=key, drivers=drivers))
    before = pipeline.engine.stats().get(FACE_READER_KEY)
    tasks = [asyncio.create_task(r.run()) for r in made]
    how = (["--replay", str(recording)] if recording
           else ["--seconds", str(seconds + WARMUP), "--pattern", "live"])
    publishers = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.driver_publisher",
        f"rtmp://127.0.0.1:{port}/live/{driver_key(r.input_key)}", *how,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        cwd=str(ROOT)) for r in made]
    await asyncio.gather(*tasks)
    for r in made:
        if r.state.value != "ended":
            print(f"room {r.session_id}: {r.state.value}: {r.reason}", flush=True)
    for p in publishers:
        if p.returncode is None:
            p.kill()
        _, err = await p.communicate()
        if p.returncode not in (0, 3, -9):  # 3: cut off when its room ended; -9: killed here
            print(f"a driver failed ({p.returncode}): {err.decode(errors='replace')[-1500:]}", flush=True)
    await ingest.close()
    after = pipeline.engine.stats()[FACE_READER_KEY]
    calls = sum(after.batch_sizes.values()) - (sum(before.batch_sizes.values()) if before else 0)
    items = after.items - (before.items if before else 0)
    latency = np.array([x for r in made for x in list(r.driver_latency)[len(r.driver_latency) // 3:]])
    frames = sum(r.stats.frames_rendered for r in made)
    late = sum(r.stats.late_frames for r in made)
    driven = sum(r.camera.driven_seconds for r in made if r.camera is not None)
    return {"fps": frames / (seconds + WARMUP), "late": late / max(frames, 1),
            "live": min(1.0, driven / (seconds * rooms)),
            "p50": float(np.percentile(latency, 50)) if latency.size else float("nan"),
            "p95": float(np.percentile(latency, 95)) if latency.size else float("nan"),
            "batch": items / max(calls, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rooms", default="1,2,4", help="numbers of camera rooms to run, comma-separated")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds each load runs")
    ap.add_argument("--modes", default="batched,per-room")
    ap.add_argument("--drivers", choices=("replay", "encode"), default="replay",
                    help="drivers replay a recording (no encoding) or encode live on this CPU")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_reference(Path(tmp) / "models", "lite")
        threads = auto_intra_op_threads()
        pipelines = {
            "batched": Pipeline(folder, ProviderChoice.CPU, threads, policy=BatchPolicy(max_batch=8)),
            "per-room": Pipeline(folder, ProviderChoice.CPU, threads, policy=BatchPolicy(max_batch=1, max_wait=0.0)),
        }
        recording = None
        if args.drivers == "replay":
            recording = Path(tmp) / "driver.flv"
            subprocess.run([sys.executable, "-m", "tests.driver_publisher", str(recording), "--record",
                            "--seconds", str(args.seconds + WARMUP), "--pattern", "live"], check=True,
                           cwd=str(ROOT), stdout=subprocess.DEVNULL)
        print(f"camera rooms 256x256@25 on the reference portrait, {os.cpu_count()} cores, drivers "
              f"{args.drivers}; latency: driver frame in -> avatar frame to the encoder")
        print(f"{'mode':<9} {'rooms':>5} {'frames/s':>9} {'late':>7} {'p50 ms':>7} {'p95 ms':>7} "
              f"{'reader batch':>12} {'live':>6}")
        for n in (int(x) for x in args.rooms.split(",")):
            for mode in args.modes.split(","):
                r = asyncio.run(run(pipelines[mode], n, args.seconds, Path(tmp) / f"{mode}-{n}", recording))
                print(f"{mode:<9} {n:>5} {r['fps']:>9.1f} {r['late']:>7.2%} {r['p50'] * 1e3:>7.0f} "
                      f"{r['p95'] * 1e3:>7.0f} {r['batch']:>12.2f} {r['live']:>6.0%}", flush=True)
        for p in pipelines.values():
            p.close()


if __name__ == "__main__":
    main()
