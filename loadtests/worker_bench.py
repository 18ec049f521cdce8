"""Worker baseline benchmark: N rooms on one worker, rendered as fast as possible.

For each room count it prints frames/s, device time per frame by stage (TTS,
audio-to-motion, render, encode), the rooms this device could carry in real
time at that load, and cost per stream-hour at the given device price. No
cross-room batching yet: this is the per-room baseline the batcher is
measured against.

    python loadtests/worker_bench.py --rooms 1,2,4 --size 512x512 --seconds 6
    python loadtests/worker_bench.py --provider cuda --preset standard   # on a GPU machine
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from avatarfarm.domain import (
    DriveMode,
    Output,
    OutputKind,
    Quality,
    ScriptSegment,
    SessionSpec,
    Tier,
)
from workers.encode import EncoderSettings, OutputTarget
from workers.inference import ProviderChoice
from workers.models.folder import build_reference
from workers.models.reference import RENDERER_PRESETS
from workers.pipeline import Pipeline
from workers.room import Pacing, Room, RoomState

SCRIPT = (ScriptSegment("Welcome back everyone, the flash sale starts in one minute, so get ready.", 0.5),
          ScriptSegment("These headphones have forty hours of battery and fold into your pocket.", 0.5))


async def run_rooms(pipeline: Pipeline, n: int, quality: Quality, seconds: float, out: Path,
                    preset: str) -> dict[str, float]:
    rooms = []
    for i in range(n):
        spec = SessionSpec("bench", f"room-{i}", "presenter", DriveMode.TEXT, quality, Tier.STANDARD,
                           Output(OutputKind.FILE, f"n{n}/room-{i}.mp4"), seconds, SCRIPT)
        target = OutputTarget.resolve(OutputKind.FILE, spec.output.target, out)
        rooms.append(Room(f"s{i}", spec, target, pipeline, pacing=Pacing.FAST,
                          encoder=EncoderSettings(preset=preset), seed=i))
    t0 = time.perf_counter()
    await asyncio.gather(*(r.start() for r in rooms))
    wall = time.perf_counter() - t0
    failed = [r for r in rooms if r.state is not RoomState.ENDED]
    if failed:
        raise SystemExit(f"room failed: {failed[0].reason}")
    frames = sum(r.stats.frames_rendered for r in rooms)
    result = {"wall": wall, "frames": frames}
    for stage in ("tts", "audio_to_motion", "render", "encode"):
        result[stage] = sum(r.stats.stage_seconds[stage] for r in rooms)
    result["device"] = sum(r.stats.device_seconds for r in rooms)
    result["stream"] = sum(r.stats.stream_seconds(quality.fps) for r in rooms)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rooms", default="1,2,4", help="room counts to run, comma-separated")
    p.add_argument("--size", default="512x512", help="frame size WxH")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--seconds", type=float, default=6.0, help="seconds of video per room")
    p.add_argument("--preset", default="lite", choices=sorted(RENDERER_PRESETS))
    p.add_argument("--provider", default="auto", choices=[c.value for c in ProviderChoice])
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument("--encoder-preset", default="veryfast")
    p.add_argument("--price", type=float, default=0.10, help="price per device-hour")
    args = p.parse_args()

    w, _, h = args.size.partition("x")
    quality = Quality(int(w), int(h or w), args.fps)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_reference(Path(tmp) / "models", args.preset)
        pipeline = Pipeline(folder, ProviderChoice(args.provider), args.threads)
        size = RENDERER_PRESETS[args.preset]
        print(f"worker baseline: {quality}, renderer {args.preset} "
              f"({size.gmac_per_frame(quality.render_side):.2f} GMAC/frame), "
              f"provider {pipeline.provider}, {args.seconds:g}s per room, price {args.price}/device-hour")
        print(f"{'rooms':>5} {'frames/s':>9} {'x realtime':>10} {'rt rooms':>8} "
              f"{'tts ms':>7} {'a2m ms':>7} {'render ms':>9} {'encode ms':>9} "
              f"{'$/stream-h attributed':>22} {'$/stream-h device':>18}")
        for n in [int(x) for x in args.rooms.split(",")]:
            r = asyncio.run(run_rooms(pipeline, n, quality, args.seconds, Path(tmp) / "out",
                                      args.encoder_preset))
            fps = r["frames"] / r["wall"]
            per = {k: 1000 * r[k] / r["frames"] for k in ("tts", "audio_to_motion", "render", "encode")}
            # Whole-device cost: the device renders `fps` frames a second; a stream needs quality.fps.
            realtime_rooms = fps / quality.fps
            print(f"{n:>5} {fps:>9.1f} {r['stream'] / r['wall']:>10.2f} {realtime_rooms:>8.2f} "
                  f"{per['tts']:>7.2f} {per['audio_to_motion']:>7.2f} {per['render']:>9.2f} "
                  f"{per['encode']:>9.2f} {r['device'] * args.price / r['stream']:>22.4f} "
                  f"{args.price / max(realtime_rooms, 1e-9):>18.4f}")
        pipeline.close()


if __name__ == "__main__":
    main()
