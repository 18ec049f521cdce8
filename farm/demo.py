"""``avatarfarm demo``: the whole product on one machine.

Starts a scheduler and worker processes, registers a video avatar (a clip of a
real photograph's person, prepared by the scheduler and lip-synced by the
Wav2Lip-signature model), creates rooms of each drive mode and tier on it and on
the reference portrait, feeds the live ones (speech for the voice room, a motion-capture take
for the mocap room) straight to their workers, shows progress, and prints a
summary with frames, late frames, the provider in use and cost per stream-hour.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import grpc

from avatarfarm import client
from avatarfarm.processes import ProcessFailed
from avatarfarm.v1 import avatars_pb2, avatars_pb2_grpc, sessions_pb2, sessions_pb2_grpc, types_pb2
from farm.local import LocalFarm


@dataclass(frozen=True)
class DemoOptions:
    rooms: int = 5
    seconds: float = 20.0
    workers: int = 2
    home: Path = Path("var/demo")
    pacing: str = "fast"
    price_per_hour: float = 0.10
    preset: str = "lite"
    wav2lip: str = "wav2lip_96"  # the Wav2Lip-signature model's cost preset


@dataclass(frozen=True)
class RoomPlan:
    room_id: str
    drive: int
    tier: int
    width: int
    height: int
    fps: int = 25
    avatar: str = "presenter"


VIDEO_AVATAR = "astronaut"
TENANT = "demo-vendor"

# Mixed on purpose: every drive mode and tier, square and vertical (phone) frames.
PLANS = [
    RoomPlan("shoes-premium", types_pb2.DRIVE_MODE_TEXT, types_pb2.TIER_PREMIUM, 512, 512),
    RoomPlan("voice-host", types_pb2.DRIVE_MODE_VOICE, types_pb2.TIER_STANDARD, 512, 512),
    RoomPlan("mocap-host", types_pb2.DRIVE_MODE_MOCAP, types_pb2.TIER_BEST_EFFORT, 640, 360),
    RoomPlan("vertical-live", types_pb2.DRIVE_MODE_TEXT, types_pb2.TIER_STANDARD, 432, 768),
    RoomPlan("astronaut-live", types_pb2.DRIVE_MODE_TEXT, types_pb2.TIER_STANDARD, 512, 512,
             avatar=VIDEO_AVATAR),
]

_MODE: dict[int, str] = {types_pb2.DRIVE_MODE_TEXT: "text", types_pb2.DRIVE_MODE_VOICE: "voice",
         types_pb2.DRIVE_MODE_MOCAP: "mocap"}
_TIER: dict[int, str] = {types_pb2.TIER_PREMIUM: "premium", types_pb2.TIER_STANDARD: "standard",
         types_pb2.TIER_BEST_EFFORT: "best_effort"}


def _state(s: types_pb2.Session) -> str:
    return types_pb2.SessionState.Name(s.state).removeprefix("SESSION_STATE_").lower()


def script_segments() -> list[types_pb2.ScriptSegment]:
    with resources.as_file(resources.files("avatarfarm") / "scripts" / "livestream_en.txt") as p:
        return client.load_script(p)


async def _feed_live(stub: sessions_pb2_grpc.SessionServiceStub, sid: str, plan: RoomPlan,
                     seconds: float, realtime: bool) -> None:
    """Waits for the room to be placed, then streams its live input to its worker."""
    import numpy as np

    from workers.media.audio import SAMPLE_RATE
    from workers.media.tts import EspeakTTS

    s = await client.wait_for(stub, sid, lambda s: bool(s.input_endpoint) or s.state in client.TERMINAL,
                              timeout=600)
    if s.state in client.TERMINAL:
        return
    if plan.drive == types_pb2.DRIVE_MODE_VOICE:
        # Stand-in for a live presenter's microphone: speech, pauses, speech.
        tts = EspeakTTS(words_per_minute=150)
        lines = [seg.text for seg in script_segments()[1:4]]
        gap = np.zeros(int(0.8 * SAMPLE_RATE), np.float32)
        audio = np.concatenate([np.concatenate([tts.synthesize(t), gap]) for t in lines])
        audio = audio[: int(seconds * SAMPLE_RATE)]
        await client.push_audio(s.input_endpoint, sid, audio, SAMPLE_RATE, realtime=realtime,
                                input_token=s.input_token)
    else:
        await client.push_motion(s.input_endpoint, sid,
                                 client.performer_motion(seconds, plan.fps), plan.fps,
                                 realtime=realtime, input_token=s.input_token)


async def _register_video_avatar(avatars: avatars_pb2_grpc.AvatarServiceStub) -> None:
    """Registers the sample clip of a real person as a video avatar: the scheduler
    prepares it (face found and tracked in every frame, crops stored) once; the same
    clip is found prepared on later runs."""
    from avatarfarm.preparation.sample import astronaut_clip

    t0 = time.monotonic()
    clip = await asyncio.to_thread(astronaut_clip)
    a = await avatars.RegisterAvatar(avatars_pb2.RegisterAvatarRequest(
        avatar_id=VIDEO_AVATAR, tenant=TENANT, reference_video=clip,
        licence=avatars_pb2.Licence()), timeout=600)
    print(f"  video avatar {a.avatar_id}: {len(clip) / 1024:.0f} KiB clip, {a.width}x{a.height}, "
          f"bundle {a.bundle_id[:12]}, prepared in {time.monotonic() - t0:.1f}s", flush=True)


def _metric(port: int, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def _run(opts: DemoOptions, farm: LocalFarm) -> int:
    plans = [PLANS[i % len(PLANS)] for i in range(opts.rooms)]
    realtime = opts.pacing == "realtime"
    async with grpc.aio.insecure_channel(farm.address) as ch:
        stub = sessions_pb2_grpc.SessionServiceStub(ch)
        if any(p.avatar == VIDEO_AVATAR for p in plans):
            await _register_video_avatar(avatars_pb2_grpc.AvatarServiceStub(ch))
        ids: list[str] = []
        feeders = []
        for i, plan in enumerate(plans):
            room_id = plan.room_id if i < len(PLANS) else f"{plan.room_id}-{i}"
            spec = client.spec(
                TENANT, room_id, drive=plan.drive, tier=plan.tier, width=plan.width,
                height=plan.height, fps=plan.fps, file_path=f"{room_id}.mp4", seconds=opts.seconds,
                avatar=plan.avatar,
                script=script_segments() if plan.drive == types_pb2.DRIVE_MODE_TEXT else ())
            s = await stub.CreateSession(sessions_pb2.CreateSessionRequest(
                spec=spec, request_id=f"demo-{room_id}"))
            ids.append(s.session_id)
            print(f"  created {room_id:<15} {_MODE[plan.drive]:<5} {_TIER[plan.tier]:<11} "
                  f"{plan.width}x{plan.height}@{plan.fps}  {plan.avatar:<10} -> {_state(s)}",
                  flush=True)
            if plan.drive != types_pb2.DRIVE_MODE_TEXT:
                feeders.append(asyncio.create_task(
                    _feed_live(stub, s.session_id, plan, opts.seconds, realtime)))
        t0 = time.monotonic()
        while True:
            sessions = [await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=i)) for i in ids]
            done = sum(s.state in client.TERMINAL for s in sessions)
            frames = sum(s.progress.frames_rendered for s in sessions)
            states = ", ".join(f"{s.spec.room_id}={_state(s)}:{s.progress.stream_seconds:.0f}s"
                               for s in sessions)
            print(f"  [{time.monotonic() - t0:5.1f}s] {frames} frames; {states}", flush=True)
            if done == len(sessions):
                break
            await asyncio.sleep(2.0)
        for f in feeders:
            f.cancel()
        return _summary(opts, farm, sessions, time.monotonic() - t0)


def _summary(opts: DemoOptions, farm: LocalFarm, sessions: list[types_pb2.Session],
             wall: float) -> int:
    print("\nsummary")
    print(f"  {'room':<15} {'mode':<5} {'tier':<11} {'quality':<12} {'avatar':<10} {'worker':<9} {'state':<6} "
          f"{'frames':>6} {'late':>5} {'video s':>7} {'device s/s':>10}  output")
    failed = 0
    for s in sessions:
        q = s.spec.quality
        out = farm.output_of(s.spec.tenant, s.spec.output.file_path)
        failed += s.state != types_pb2.SESSION_STATE_ENDED
        print(f"  {s.spec.room_id:<15} {_MODE[s.spec.drive_mode]:<5} {_TIER[s.spec.tier]:<11} "
              f"{q.width}x{q.height}@{q.fps:<4} {s.spec.avatar_id:<10} {s.worker_id:<9} {_state(s):<6} "
              f"{s.progress.frames_rendered:>6} {s.progress.late_frames:>5} "
              f"{s.progress.stream_seconds:>7.1f} "
              f"{s.progress.device_seconds / max(s.progress.stream_seconds, 1e-9):>10.2f}  {out}")
        if s.state == types_pb2.SESSION_STATE_FAILED:
            print(f"    failed: {s.reason}")
    providers = sorted({s.provider for s in sessions if s.provider})
    stream = sum(s.progress.stream_seconds for s in sessions)
    device = sum(s.progress.device_seconds for s in sessions)
    frames = sum(s.progress.frames_rendered for s in sessions)
    late = sum(s.progress.late_frames for s in sessions)
    stages: dict[str, float] = {}
    for s in sessions:
        for k, v in s.progress.stage_seconds.items():
            stages[k] = stages.get(k, 0.0) + v
    print(f"  rooms: {len(sessions)}, frames rendered: {frames}, late frames: {late} "
          f"({opts.pacing} pacing), wall time: {wall:.1f}s")
    print(f"  onnxruntime provider: {', '.join(providers) or 'unknown'}")
    if frames:
        per = ", ".join(f"{k} {1000 * v / frames:.1f}" for k, v in sorted(stages.items()))
        print(f"  device time per frame (ms): {per}")
    if stream > 0:
        cost = device * opts.price_per_hour / stream
        print(f"  device time per stream second: {device / stream:.2f}s; cost per stream-hour: "
              f"{cost:.4f} at {opts.price_per_hour:.2f} per device-hour")
    if farm.scheduler is not None and farm.scheduler.metrics_port:
        try:
            cost_metric = _metric(farm.scheduler.metrics_port, "avatarfarm_cost_per_stream_hour{")
            shown = ", ".join(
                f"{_label(k, 'tier')}/{_label(k, 'device_type')}={v:.4f}"
                for k, v in cost_metric.items() if v > 0)
            print(f"  scheduler metric avatarfarm_cost_per_stream_hour: {shown}")
        except OSError as e:
            print(f"  (could not read scheduler metrics: {e})")
    print(f"  videos in {farm.output_of(TENANT, '')}, logs in {farm.home / 'logs'}")
    return 1 if failed else 0


def _label(sample: str, name: str) -> str:
    m = re.search(name + r'="([^"]*)"', sample)
    return m.group(1) if m else "?"


def run_demo(opts: DemoOptions) -> int:
    from workers.models.folder import build_reference

    home = opts.home
    print(f"avatarfarm demo: {opts.rooms} rooms x {opts.seconds:.0f}s on {opts.workers} local "
          f"workers ({opts.pacing} pacing) in {home}")
    folder = build_reference(home / "models", opts.preset, wav2lip=opts.wav2lip)
    print(f"  models: {folder.root} (renderer {folder.renderer_name}, face model "
          f"{folder.wav2lip.name if folder.wav2lip else 'none'})")
    # A fresh run: state and outputs of an earlier demo are not carried over.
    for sub in ("state", "out", "logs"):
        shutil.rmtree(home / sub, ignore_errors=True)
    # Offline rendering needs no real-time headroom: let rooms share workers that
    # could not carry them all live (the scheduler still shows the real loads).
    overcommit = 1.0 if opts.pacing == "realtime" else 8.0
    farm = LocalFarm(home, workers=opts.workers, pacing=opts.pacing, worker_threads=1,
                     overcommit=overcommit, worker_args=["--profile-iterations", "3"],
                     scheduler_args=["--device-prices", json.dumps({"cpu": opts.price_per_hour})])
    t0 = time.monotonic()
    try:
        farm.start()
        print(f"  scheduler on {farm.address}, metrics on :{farm.scheduler.metrics_port if farm.scheduler else 0}, "
              f"{opts.workers} workers ready in {time.monotonic() - t0:.1f}s", flush=True)
        return asyncio.run(_run(opts, farm))
    except ProcessFailed as e:
        print(f"avatarfarm demo: {e}")
        return 1
    finally:
        farm.stop()
