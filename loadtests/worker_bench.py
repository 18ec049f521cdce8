"""Worker benchmark: how many real-time rooms one device carries, per-room vs batched.

On one worker (the real pipeline, rooms, batcher and encoders; no scheduler),
it measures the renderer's best batched throughput alone (the physical limit),
then ramps real-time rooms up, twice in the same run: once with per-room
inference (batch 1, one call per frame) and once with the cross-room batcher.
For each load it prints frames/s rendered, the late (replaced) frame rate, the
render batch-size histogram and device/CPU time per frame by stage; then the
largest load each mode sustains with <= 0.1% late frames, the batcher's
throughput there against the limit, and its late rate at 80% of capacity.

    python loadtests/worker_bench.py                       # CPU, lite renderer, 256x256@25
    python loadtests/worker_bench.py --size 512x512 --rooms 1,2,3
    python loadtests/worker_bench.py --provider cuda --preset standard --size 512x512 \\
        --rooms 4,8,16,24,32,48 --max-batch 32             # a GPU with onnxruntime-gpu

With ``--family wav2lip`` the rooms are on a video avatar (the sample clip of a real
person, prepared here) and the face model (``--wav2lip wav2lip_96`` or ``wav2lip_256``)
takes the renderer's place; silent windows skip it, so the model's share of frames
is printed too. ``--family musetalk`` runs MuseTalk rooms (``--musetalk musetalk``: Whisper
rows, a UNet step and the VAE decoder, ~250 GFLOP a frame; ``tiny`` for a quick look).
``--family liveportrait`` runs LivePortrait rooms (motion from HuBERT rows, stitching and
the warping at 512 px, ``--liveportrait liveportrait`` ~18 GMAC a frame, or ``tiny``).
``--family ultralight`` prepares the clip with the person's own
Ultralight UNet (``--ultralight ultralight``, ~1.7 GMAC a frame, or ``tiny``) in its
bundle; the HuBERT-signature feature model (HuBERT-large's cost with ``--preset
standard``, a small one with ``lite``) runs on the device too: its time per frame is the
a2m column. ``--features wenet`` feeds it a wenet streaming encoder instead (~0.9 GMAC a
50 ms step, batch fixed at 1 as exported) and a UNet trained on wenet steps.

    python loadtests/worker_bench.py --family wav2lip --size 512x512 --rooms 1,2,3
    python loadtests/worker_bench.py --family ultralight --size 512x512 --rooms 1,2,4
    python loadtests/worker_bench.py --family ultralight --features wenet --rooms 1,2,4

Overload and the host path: ``--tiers mixed`` gives the rooms tiers (one in eight
premium, half standard, the rest best effort) and prints late frames by tier, to ramp
past capacity (e.g. to 1.5x) and see who loses; ``--renderer null`` swaps the renderer
for one that costs nothing (the portrait passed through), so frames/s is the worker's
own per-frame ceiling: producer, batcher, emitter, canvas and encoders; ``--encode off``
leaves the encoders out (each frame is still converted to its canvas, then dropped),
for the ceiling of the rest. Each load also prints its steady figures, which leave out
its first ``--warmup`` seconds: all its rooms start at once, so every room's first
sentence is synthesised together at the start, and a worker that starts behind may or
may not catch up. The whole-run figures keep that start. ``--start-over S`` starts the
rooms one after another over S seconds instead, as rooms placed in turn arrive at a
worker; the steady window then begins ``--warmup`` seconds after the last, and prints
late frames by tier.

    python loadtests/worker_bench.py --size 128x128 --rooms 10,15,20,30 --modes batched \\
        --tiers mixed
    python loadtests/worker_bench.py --size 128x128 --rooms 20,40,60 --modes batched \\
        --renderer null
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import math
import os
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Run as a script from a checkout: that checkout's packages, not an installed copy's
# (an A/B between two checkouts would otherwise measure one of them twice).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from avatarfarm.avatars import BUNDLES, write_bundle_pointer  # noqa: E402
from avatarfarm.domain import (  # noqa: E402
    DriveMode,
    Output,
    OutputKind,
    Quality,
    ScriptSegment,
    SessionSpec,
    Tier,
)
from avatarfarm.preparation.bundle import prepare  # noqa: E402
from avatarfarm.preparation.faces import TrackPolicy  # noqa: E402
from avatarfarm.preparation.sample import astronaut_clip  # noqa: E402
from workers.device.batching import BatchPolicy  # noqa: E402
from workers.device.onnx import ProviderChoice, auto_intra_op_threads  # noqa: E402
from workers.device.pipeline import Pipeline  # noqa: E402
from workers.device.profile import measure  # noqa: E402
from workers.device.timing import batch_sizes, measure_curve, run_batch_of  # noqa: E402
from workers.families import liveportrait, musetalk  # noqa: E402
from workers.families.features import WENET  # noqa: E402
from workers.models.folder import add_liveportrait, add_musetalk, build_reference, use_wenet  # noqa: E402
from workers.models.liveportrait import WARP_PRESETS  # noqa: E402
from workers.models.musetalk import MUSETALK_PRESETS  # noqa: E402
from workers.models.reference import RENDERER_PRESETS  # noqa: E402
from workers.models.ultralight import AUDIO_SHAPE, HUBERT, UNET_PRESETS, WENET_AUDIO_SHAPE, build_ultralight  # noqa: E402
from workers.models.wav2lip import WAV2LIP_PRESETS  # noqa: E402
from workers.output.encode import EncoderSettings, OutputTarget, StreamEncoder  # noqa: E402
from workers.output.encoder_process import shared_encoder_processes  # noqa: E402
from workers.rooms.governor import RoomGovernor  # noqa: E402
from workers.rooms.room import Pacing, Room, RoomState  # noqa: E402

SCRIPT = (ScriptSegment("Welcome back everyone, the flash sale starts in one minute, so get ready.", 0.5),
          ScriptSegment("These headphones have forty hours of battery and fold into your pocket.", 0.5))
LATE_GOAL = 0.001
OVERLOAD_RAMP = (0.5, 0.75, 1.0, 1.25, 1.5)  # --rooms auto, as shares of capacity
VIDEO_AVATAR = "astronaut"


@dataclass
class Load:
    rooms: int
    wall: float
    frames: int
    late: int
    batches: collections.Counter[int] = field(default_factory=collections.Counter)
    stage: dict[str, float] = field(default_factory=dict)  # seconds per frame
    model_frames: int = 0  # frames the render/face model ran for (silent ones skip it)
    by_tier: dict[str, tuple[int, int]] = field(default_factory=dict)  # tier -> (frames, late)
    # Host CPU seconds per frame: the event loop (producers, emitters, futures), the device
    # thread outside model calls, canvas conversion and encoding (encoder threads).
    host: dict[str, float] = field(default_factory=dict)
    rate_steps: int = 0  # frame-rate steps the governor took
    # Delivered frames/s and the late share in the steady window: from `warmup` seconds
    # after the last room started to just before the first can end (NaN: no such window).
    steady_fps: float = float("nan")
    steady_late: float = float("nan")
    warmup: float = 0.0
    steady_by_tier: dict[str, tuple[int, int]] = field(default_factory=dict)  # in that window
    start_over: float = 0.0  # seconds over which the rooms started
    skipped: int = 0  # late frames given up before any work (a producer behind its clock)
    merged: int = 0  # emitted frames held on one still waiting for its encoder
    per_trip: float = float("nan")  # requests per message to the encoder processes (if used)

    @property
    def offered_fps(self) -> float:
        return self.frames / self.wall

    @property
    def rendered_fps(self) -> float:
        return (self.frames - self.late) / self.wall

    @property
    def late_rate(self) -> float:
        return self.late / max(self.frames, 1)


def tier_of(i: int, mixed: bool) -> Tier:
    """One room in eight premium, half standard, the rest best effort (mixed)."""
    if not mixed:
        return Tier.STANDARD
    return Tier.PREMIUM if i % 8 == 0 else Tier.STANDARD if i % 2 == 1 else Tier.BEST_EFFORT


async def run_load(pipeline: Pipeline, n: int, quality: Quality, seconds: float, out: Path,
                   encoder: EncoderSettings, label: str, avatar: str = "presenter",
                   mixed: bool = False, governor: bool = True, warmup: float = 2.0,
                   start_over: float = 0.0) -> Load:
    if avatar == VIDEO_AVATAR:
        pipeline.face_avatar_sync(avatar)  # loaded (and its own model served) before timing
        key = pipeline.face_family(avatar).key
    else:
        key = pipeline.render_key(quality.render_side)
    before = pipeline.engine.stats().get(key)
    rooms = []
    for i in range(n):
        spec = SessionSpec("bench", f"room-{i}", avatar, DriveMode.TEXT, quality, tier_of(i, mixed),
                           Output(OutputKind.FILE, f"{label}/n{n}/room-{i}.mp4"), seconds, SCRIPT)
        target = OutputTarget.resolve(OutputKind.FILE, spec.output.target, out)
        rooms.append(Room(f"s{i}", spec, target, pipeline, pacing=Pacing.REALTIME,
                          encoder=encoder, seed=i, sync_interval_seconds=1e9))
    trips = shared_encoder_processes().round_trips() if encoder.processes else (0, 0)
    t0 = time.perf_counter()
    loop_cpu, engine_cpu = time.thread_time(), pipeline.engine.host_seconds
    # Rooms start spread over one frame period, as independent rooms would, or over
    # `start_over` seconds, as rooms placed one after another arrive at a worker.
    spread = max(start_over, 1 / quality.fps) * (n - 1) / max(n, 1)

    async def start(i: int, room: Room) -> None:
        await asyncio.sleep(spread * i / max(n - 1, 1))
        await room.start()
    # The worker's governor, as the worker runs it: frame rates of the lowest tiers down
    # while the host cannot keep up.
    gov = RoomGovernor()
    governing = asyncio.create_task(gov.run(lambda: rooms)) if governor else None
    # The steady window: every room has started, synthesised its first sentence and
    # caught up (or not), and none has ended (each streams `seconds` of real time).
    steady = asyncio.create_task(_steady(rooms, spread + warmup, seconds - 0.25))
    await asyncio.gather(*(start(i, r) for i, r in enumerate(rooms)))
    if governing is not None:
        governing.cancel()
    steady_fps, steady_late, steady_by_tier = steady.result() if steady.done() else \
        (float("nan"), float("nan"), {})
    steady.cancel()
    wall = time.perf_counter() - t0 - spread
    loop_cpu, engine_cpu = time.thread_time() - loop_cpu, pipeline.engine.host_seconds - engine_cpu
    failed = [r for r in rooms if r.state is not RoomState.ENDED]
    if failed:
        raise SystemExit(f"room failed: {failed[0].reason}")
    after = pipeline.engine.stats()[key]
    batches = after.batch_sizes - (before.batch_sizes if before else collections.Counter())
    frames = sum(r.stats.frames_rendered for r in rooms)
    late = sum(r.stats.late_frames for r in rooms)
    stage = {s: sum(r.stats.stage_seconds[s] for r in rooms) / max(frames, 1)
             for s in ("audio_to_motion", "render", "encode", "tts")}
    model_frames = sum(r.stats.batched_items for r in rooms)
    by_tier = tier_counts(rooms)
    canvas = sum(r.stats.canvas_seconds for r in rooms)
    host = {"event loop": loop_cpu, "device thread": engine_cpu, "canvas": canvas,
            "encode": sum(r.stats.stage_seconds["encode"] for r in rooms) - canvas}
    per_trip = float("nan")
    if encoder.processes:
        messages, requests = (b - a for a, b in zip(trips, shared_encoder_processes().round_trips(),
                                                    strict=True))
        per_trip = requests / max(messages, 1)
    return Load(n, wall, frames, late, batches, stage, model_frames, by_tier,
                {k: v / max(frames, 1) for k, v in host.items()}, gov.steps_taken,
                steady_fps, steady_late, warmup, steady_by_tier, start_over,
                sum(r.stats.skipped_frames for r in rooms), sum(r.stats.merged_frames for r in rooms),
                per_trip)


def tier_counts(rooms: list[Room]) -> dict[str, tuple[int, int]]:
    """(frames emitted, of which late) so far, by the rooms' tier."""
    by: dict[str, tuple[int, int]] = {}
    for r in rooms:
        f, lt = by.get(r.spec.tier.value, (0, 0))
        by[r.spec.tier.value] = (f + r.stats.frames_rendered, lt + r.stats.late_frames)
    return by


def late_by_tier(by_tier: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{t} {100 * lt / max(f, 1):.2f}%" for t, (f, lt) in sorted(by_tier.items()))


async def _steady(rooms: list[Room], start: float, end: float
                  ) -> tuple[float, float, dict[str, tuple[int, int]]]:
    """Delivered frames/s, the late share and (frames, late) by tier of `rooms` between
    `start` and `end` seconds from now (NaN where the window is under a second)."""
    if end - start < 1.0:
        return float("nan"), float("nan"), {}

    await asyncio.sleep(start)
    c0, t0 = tier_counts(rooms), time.perf_counter()
    await asyncio.sleep(end - start)
    c1, t1 = tier_counts(rooms), time.perf_counter()
    by_tier = {t: (f - c0[t][0], lt - c0[t][1]) for t, (f, lt) in c1.items()}
    frames, late = sum(f for f, _ in by_tier.values()), sum(lt for _, lt in by_tier.values())
    return (frames - late) / (t1 - t0), late / max(frames, 1), by_tier


class DroppingEncoder(StreamEncoder):
    """For --encode off: opens, encodes and writes nothing (the canvas conversion still
    runs on the encoder thread), so the benchmark measures the rest of the path."""

    def open(self) -> None:
        pass

    def encode(self, rgb: np.ndarray, audio: np.ndarray, fps: int | None = None,
               frames: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def write_null_renderer(path: Path) -> None:
    """A renderer of the reference interface that passes the portrait through: the
    device costs nothing, so what limits frames/s is the worker's own path."""
    write_identity_model(path, "null_renderer", ("avatar", ["B", 3, "S", "S"]), "frame",
                         extra_inputs=(("motion", ["B", 8]),))


def write_identity_model(path: Path, name: str, passed: tuple[str, list[typing.Any]], output: str,
                         extra_inputs: tuple[tuple[str, list[typing.Any]], ...] = ()) -> None:
    """A float graph whose output is its input `passed` (a model call that costs
    nothing), with `extra_inputs` fed and unused, as an interface may require."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
              for n, shape in (passed, *extra_inputs)]
    graph = helper.make_graph(
        [helper.make_node("Identity", [passed[0]], [output])], name, inputs,
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, passed[1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def histogram(c: collections.Counter[int]) -> str:
    return " ".join(f"{b}:{c[b]}" for b in sorted(c)) or "-"


def print_load(mode: str, load: Load) -> None:
    st = load.stage
    print(f"{mode:9s} {load.rooms:5d} {load.rendered_fps:8.1f} {100 * load.late_rate:7.2f}% "
          f"{st['render'] * 1000:8.2f} {st['audio_to_motion'] * 1000:6.2f} "
          f"{st['encode'] * 1000:7.2f} {100 * load.model_frames / max(load.frames, 1):6.0f}%  "
          f"{histogram(load.batches)}", flush=True)
    if load.steady_fps == load.steady_fps:  # not NaN
        window = (f"rooms started over {load.start_over:g} s; from {load.warmup:g} s after the last"
                  if load.start_over else f"after the first {load.warmup:g} s")
        print(" " * 15 + f"steady ({window}): {load.steady_fps:.1f} frames/s, "
              f"{100 * load.steady_late:.2f}% late", flush=True)
        if len(load.steady_by_tier) > 1:
            print(" " * 15 + "steady, late by tier: " + late_by_tier(load.steady_by_tier), flush=True)
    if load.rate_steps:
        print(" " * 15 + f"governor: {load.rate_steps} frame-rate steps; frames emitted "
              f"{load.offered_fps:.1f}/s", flush=True)
    if load.skipped or load.merged:
        print(" " * 15 + f"behind: {load.skipped} frames given up before any work, "
              f"{load.merged} held on a frame waiting for its encoder", flush=True)
    if not math.isnan(load.per_trip):
        print(" " * 15 + f"encoder processes: {load.per_trip:.1f} requests a round trip", flush=True)
    print(" " * 15 + "host CPU ms/frame: " + ", ".join(
        f"{k} {v * 1000:.3f}" for k, v in load.host.items())
        + f" (sum {sum(load.host.values()) * 1000:.3f})", flush=True)
    if len(load.by_tier) > 1:
        print(" " * 15 + "late by tier: " + late_by_tier(load.by_tier), flush=True)


def sustained(loads: list[Load]) -> Load | None:
    ok = [ld for ld in loads if ld.late_rate <= LATE_GOAL]
    return max(ok, key=lambda ld: ld.rooms) if ok else None


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rooms", default="1,2,3,4,5,6",
                    help="room counts to ramp through, or 'auto': 0.5, 0.75, 1, 1.25 and 1.5 times "
                         "the capacity the model alone allows (past capacity, to see overload)")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the figures (capacity and every load) to this file")
    ap.add_argument("--seconds", type=float, default=6.0, help="stream seconds per room per load")
    ap.add_argument("--start-over", type=float, default=0.0,
                    help="start each load's rooms one after another over this many seconds, as "
                         "rooms placed in turn arrive at a worker (0: all within one frame period, "
                         "a mass start); the steady window begins after the last")
    ap.add_argument("--warmup", type=float, default=2.0,
                    help="seconds each load's steady figures leave out at its start (the rooms' "
                         "first sentences, and the catch-up after them); whole-run figures keep them")
    ap.add_argument("--size", default="256x256", help="frame size WxH (portrait side = min)")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--preset", default="lite", choices=sorted(RENDERER_PRESETS),
                    help="reference renderer size (standard ~22 GMAC per 256x256 frame)")
    ap.add_argument("--provider", default="auto", choices=[p.value for p in ProviderChoice])
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: auto)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batch-wait", type=float, default=0.02)
    ap.add_argument("--tiers", default="standard", choices=["standard", "mixed"],
                    help="every room standard, or mixed tiers with late frames printed by tier")
    ap.add_argument("--renderer", default="model", choices=["model", "null"],
                    help="null: a renderer that costs nothing, for the host path's own ceiling")
    ap.add_argument("--encode", default="on", choices=["on", "off"],
                    help="off: frames are converted to their canvas and dropped, not encoded")
    ap.add_argument("--encoders", default="processes", choices=["processes", "pooled", "per-room"],
                    help="processes: encoder processes of their own, one per core, off the "
                         "worker's interpreter lock (the worker's way); pooled: rooms' encoders "
                         "share as many threads as cores in the worker process; per-room: a "
                         "thread per room")
    ap.add_argument("--no-governor", action="store_true",
                    help="leave the worker's frame-rate governor out (every room at its rate)")
    ap.add_argument("--no-shed", action="store_true",
                    help="under overload serve tier first instead of shedding the lowest tier early")
    ap.add_argument("--encoder-preset", default="veryfast")
    ap.add_argument("--modes", default="per-room,batched",
                    help="which modes to run: per-room, batched, tier-first (batched, serving tier "
                         "first under overload instead of shedding), ungoverned (batched without "
                         "the frame-rate governor); loads alternate between them")
    ap.add_argument("--family", default="reference",
                    choices=["reference", "wav2lip", "ultralight", "musetalk", "liveportrait"],
                    help="reference: the portrait renderer; wav2lip: a video avatar, the folder's "
                         "face model; ultralight: a video avatar with its own UNet, fed by HuBERT rows; "
                         "musetalk: Whisper rows, a UNet step on the avatar's latents, the VAE decoder; "
                         "liveportrait: HuBERT rows to motion, keypoints stitched and warped")
    ap.add_argument("--liveportrait", default="liveportrait", choices=sorted(WARP_PRESETS),
                    help="cost preset of the LivePortrait-signature warping (--family liveportrait)")
    ap.add_argument("--musetalk", default="musetalk", choices=sorted(MUSETALK_PRESETS),
                    help="cost preset of the MuseTalk-signature models (--family musetalk)")
    ap.add_argument("--ultralight", default="ultralight", choices=sorted(UNET_PRESETS),
                    help="cost preset of the Ultralight-signature UNet (--family ultralight)")
    ap.add_argument("--features", default="hubert", choices=["hubert", "wenet"],
                    help="the feature model Ultralight rooms are fed by (--family ultralight)")
    ap.add_argument("--wav2lip", default="wav2lip_96", choices=sorted(WAV2LIP_PRESETS),
                    help="cost preset of the Wav2Lip-signature model (--family wav2lip)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import workers.rooms.room as room_module

    if args.encode == "off":
        room_module.StreamEncoder = DroppingEncoder  # type: ignore[attr-defined]
    if args.encoders == "per-room":
        setattr(room_module, "shared_encoder_pool", lambda: None)  # noqa: B010 - a thread per room
    w, _, h = args.size.partition("x")
    quality = Quality(int(w), int(h or w), args.fps)
    # --encode off drops frames in the worker process (DroppingEncoder): no processes.
    processes = -1 if args.encoders == "processes" and args.encode == "on" else 0
    encoder = EncoderSettings(preset=args.encoder_preset, processes=processes)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = build_reference(root / "models", args.preset, wav2lip=args.wav2lip)
        if args.renderer == "null":
            write_null_renderer(folder.renderer)
        video = args.family in ("wav2lip", "ultralight", "musetalk", "liveportrait")
        avatar = "presenter"
        if args.family == "wav2lip":
            assert folder.wav2lip is not None
            side = 256 if args.wav2lip == "wav2lip_256" else 96
            bundle = prepare(astronaut_clip(), folder.avatar_dir / BUNDLES, (side,))
        elif args.family == "ultralight":
            kind, shape = (WENET, WENET_AUDIO_SHAPE) if args.features == "wenet" else (HUBERT, AUDIO_SHAPE)
            if args.features == "wenet":
                folder = use_wenet(root / "models", "wenet" if args.preset == "standard" else "tiny")
            unet = build_ultralight(UNET_PRESETS[args.ultralight], audio_shape=shape,
                                    features=kind).SerializeToString()
            # The sample clip's face is ~100 px: upscaled to the family's 160 px crop.
            bundle = prepare(astronaut_clip(), folder.avatar_dir / BUNDLES, (160,), model=unet,
                             family="ultralight", policy=TrackPolicy(min_side=96),
                             features=args.features)
        elif args.family == "musetalk":
            folder = add_musetalk(root / "models", args.musetalk)
            assert folder.musetalk is not None and folder.musetalk.vae_encoder is not None
            bundle = prepare(astronaut_clip(), folder.avatar_dir / BUNDLES, (96,), family="musetalk",
                             vae_encoder=folder.musetalk.vae_encoder.read_bytes(),
                             policy=TrackPolicy(min_side=96))
        elif args.family == "liveportrait":
            folder = add_liveportrait(root / "models", args.liveportrait)
            assert folder.liveportrait is not None
            bundle = prepare(astronaut_clip(), folder.avatar_dir / BUNDLES, (96,), family="liveportrait",
                             extractors=(folder.liveportrait.appearance.read_bytes(),
                                         folder.liveportrait.motion.read_bytes()),
                             policy=TrackPolicy(min_side=96))
        if video:
            write_bundle_pointer(folder.avatar_dir, VIDEO_AVATAR, bundle.manifest.bundle_id)
            avatar = VIDEO_AVATAR
        provider = ProviderChoice(args.provider)
        threads = args.threads or auto_intra_op_threads()
        pipelines = {
            "per-room": Pipeline(folder, provider, threads, policy=BatchPolicy(max_batch=1, max_wait=0.0)),
            "batched": Pipeline(folder, provider, threads,
                                policy=BatchPolicy(max_batch=args.max_batch, max_wait=args.batch_wait,
                                                   shed=not args.no_shed)),
        }
        if "ungoverned" in args.modes.split(","):
            pipelines["ungoverned"] = pipelines["batched"]  # the same, without the governor
        if "tier-first" in args.modes.split(","):
            pipelines["tier-first"] = Pipeline(folder, provider, threads, policy=BatchPolicy(
                max_batch=args.max_batch, max_wait=args.batch_wait, shed=False))
        side = quality.render_side
        for name, p in pipelines.items():
            if name != "ungoverned":
                measure(p, [side], [], iterations=5, max_batch=1 if name == "per-room" else args.max_batch)
        p = pipelines["batched"]
        if args.family == "liveportrait":
            lp = typing.cast(liveportrait.Runtime, p.families["liveportrait"])
            lp_models = (lp.a2m, lp.stitching, lp.warping)
            lp_items = [m.example_item() for m in lp_models]

            def lp_chain(b: int) -> None:
                for m, item in zip(lp_models, lp_items, strict=True):
                    run_batch_of(m, item, b)

            alone = measure_curve(lp_chain, batch_sizes(args.max_batch), 3)
            what = f"LivePortrait motion + stitching + warping ({args.liveportrait}) at 512 px"
        elif args.family == "musetalk":
            mt = typing.cast(musetalk.Runtime, p.families["musetalk"])
            unet, decoder = mt.unet, mt.decoder
            u_item, d_item = unet.example_item(), decoder.example_item()
            # A frame is a UNet item and a decoder item: both, alone, batched.
            def chain(b: int) -> None:
                run_batch_of(unet, u_item, b)
                run_batch_of(decoder, d_item, b)

            alone = measure_curve(chain, batch_sizes(args.max_batch), 3)
            what = f"MuseTalk UNet + VAE decoder ({args.musetalk}) at 256 px"
        elif video:
            p.face_avatar_sync(avatar)
            face = p.face_device_model(avatar)
            alone = measure_curve(lambda b: run_batch_of(face, face.example_item(), b),
                                  batch_sizes(args.max_batch), 5)
            what = f"face model {face.name} at S={face.side}"
        else:
            portrait = p.avatar_tensor_sync("presenter", side)
            alone = measure_curve(lambda b: p.render_batch_sync(portrait, b), batch_sizes(args.max_batch), 10)
            gmac = RENDERER_PRESETS[args.preset].gmac_per_frame(side)
            what = (f"renderer {args.preset} {gmac:.2f} GMAC/frame at {side}x{side}"
                    if args.renderer == "model" else "null renderer (the portrait passed through)")
        best_b, best_fps = alone.throughput(latency_bound=0.2)
        capacity_rooms = best_fps / quality.fps
        counts = ([int(x) for x in args.rooms.split(",")] if args.rooms != "auto" else
                  sorted({max(1, round(f * capacity_rooms)) for f in OVERLOAD_RAMP}))
        print(f"device: {p.provider} ({os.cpu_count()} cores, {threads} inference threads); "
              f"{what}; rooms {quality}")
        print("model alone: " + ", ".join(f"b{b} {s * 1000:.1f} ms ({b / s:.0f}/s)"
                                          for b, s in alone.points))
        print(f"best batched throughput alone: {best_fps:.1f} frames/s at batch {best_b} "
              f"= {capacity_rooms:.2f} rooms at {quality.fps} fps (capacity)")
        print(f"\n{'mode':9s} {'rooms':>5s} {'frames/s':>8s} {'late':>8s} {'render':>8s} {'a2m':>6s} "
              f"{'encode':>7s} {'model':>7s}  model batch sizes (size:calls)")
        print(f"{'':9s} {'':5s} {'':8s} {'':8s} {'ms/frame device':>15s} {'cpu ms':>8s} {'frames':>7s}")
        modes = args.modes.split(",")
        results: dict[str, list[Load]] = {m: [] for m in modes}
        # Load by load, the modes in turn: a machine whose speed drifts during the run
        # drifts for every mode alike.
        for n in counts:
            for mode in modes:
                load = await run_load(pipelines[mode], n, quality, args.seconds, root / "out",
                                      encoder, mode, avatar, mixed=args.tiers == "mixed",
                                      governor=not args.no_governor and mode != "ungoverned",
                                      warmup=args.warmup, start_over=args.start_over)
                results[mode].append(load)
                print_load(mode, load)
        for pl in {id(pl): pl for pl in pipelines.values()}.values():
            pl.close()
    print()
    best: dict[str, Load | None] = {m: sustained(ls) for m, ls in results.items()}
    for mode, ld in best.items():
        if ld is None:
            print(f"{mode}: no load sustained with <= {LATE_GOAL:.1%} late frames")
        else:
            model_fps = ld.model_frames / ld.wall
            print(f"{mode}: sustains {ld.rooms} rooms ({ld.rendered_fps:.1f} frames/s, "
                  f"{ld.late_rate:.2%} late; the model ran {model_fps:.1f} frames/s) = "
                  f"{model_fps / best_fps:.0%} of the model's best batched throughput alone")
    base, batched = best.get("per-room"), best.get("batched")
    if base is not None and batched is not None:
        print(f"batched / per-room rooms at <= {LATE_GOAL:.1%} late: "
              f"{batched.rooms / base.rooms:.2f}x")
    if "batched" in results:
        target = 0.8 * capacity_rooms
        near = min(results["batched"], key=lambda ld: abs(ld.rooms - target))
        print(f"batched at ~80% of capacity ({near.rooms} rooms ~ {near.rooms / capacity_rooms:.0%}): "
              f"{near.rendered_fps:.1f} frames/s = {near.rendered_fps / (near.rooms * quality.fps):.1%} "
              f"of offered, {near.late_rate:.2%} late")
        peak = max(results["batched"], key=lambda ld: ld.rendered_fps)
        print(f"batched peak: {peak.rendered_fps:.1f} frames/s at {peak.rooms} rooms "
              f"= {peak.rendered_fps / best_fps:.0%} of the best batched throughput alone")
        top = results["batched"][-1]
        if top.rooms > capacity_rooms:
            print(f"batched at {top.rooms / capacity_rooms:.2f}x capacity ({top.rooms} rooms): "
                  f"{top.rendered_fps:.1f} frames/s = {top.rendered_fps / peak.rendered_fps:.0%} of "
                  f"the peak; late by tier: " + late_by_tier(top.by_tier))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "size": args.size, "best_fps": best_fps, "capacity_rooms": capacity_rooms,
            "loads": {m: [{"rooms": ld.rooms, "fps": ld.rendered_fps, "late": ld.late_rate,
                           "steady_fps": ld.steady_fps, "steady_late": ld.steady_late,
                           "by_tier": ld.by_tier, "steady_by_tier": ld.steady_by_tier,
                           "host": ld.host} for ld in ls]
                      for m, ls in results.items()}}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
