"""Soak: rooms of every drive mode for hours of stream time on a real local farm.

A scheduler and one worker process (fast pacing: as fast as the device allows), a
text room fed its script as it speaks, a live-voice room and a motion-capture room
fed from looping takes. While they run it samples, per room, the progress the
scheduler reports (frames, late frames, A/V offset, correction, checks), the
worker's lip-sync corrections, and per process its RSS, threads and open files.
At the end it reads the outputs back and prints:

- frames and late frames per room; the largest gap between video timestamps;
  audio and video durations at the end of each output;
- lip-sync corrections per stream-hour, and offset percentiles per quarter of the run;
- worker and scheduler RSS slope per stream-hour after warm-up (the first fifth);
  threads and open files at the start and the end;
- how often the worker re-reported its latency profiles (from its log);
- at each correction the worker applied (its log names the stream time), the largest
  sample-to-sample step in the output audio around it, beside the typical largest step
  of a second of the same output (the speech's own): a glitch shows as a step far above.

With ``--video-drift-ppm`` the worker's fault injection makes every room's video fall
behind its audio at that rate (whole frames), so the corrector has a real drift to follow.

    python loadtests/soak.py --stream-seconds 7200                 # two hours per room
    python loadtests/soak.py --stream-seconds 60 --modes text      # a quick look
    python loadtests/soak.py --stream-seconds 7200 --video-drift-ppm 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from avatarfarm import client  # noqa: E402
from avatarfarm.v1 import (  # noqa: E402
    live_input_pb2,
    live_input_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    types_pb2,
)
from farm.demo import script_segments  # noqa: E402
from farm.local import LocalFarm  # noqa: E402

MODES = {"text": types_pb2.DRIVE_MODE_TEXT, "voice": types_pb2.DRIVE_MODE_VOICE,
         "mocap": types_pb2.DRIVE_MODE_MOCAP}
WARM_UP = 0.2  # share of the run left out of the memory slopes


@dataclass
class Sample:
    wall: float
    stream: dict[str, float]  # room -> stream seconds
    offset: dict[str, float]  # room -> last A/V offset (s)
    checks: dict[str, int]
    rss: dict[str, int]  # process -> bytes
    threads: dict[str, int]
    files: dict[str, int]
    corrections: float


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)


def _proc(pid: int) -> tuple[int, int, int]:
    """RSS bytes, threads and open files of a process, from /proc."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads, len(os.listdir(f"/proc/{pid}/fd"))


def _corrections(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("avatarfarm_worker_av_corrections_total"))


def _speech_loop() -> np.ndarray:
    from workers.media.tts import EspeakTTS

    tts = EspeakTTS(words_per_minute=150)
    gap = np.zeros(12_000, np.float32)
    return np.concatenate([np.concatenate([tts.synthesize(s.text), gap])
                           for s in script_segments()[:4]])


async def _feed_voice(endpoint: str, sid: str, token: str, seconds: float) -> None:
    loop = _speech_loop()
    pcm = (np.clip(loop, -1, 1) * 32767).astype("<i2")
    step, total = 1600, int(seconds * 16_000) + 16_000

    async def chunks() -> AsyncIterator[live_input_pb2.AudioChunk]:
        for start in range(0, total, step):
            i = start % pcm.size
            part = pcm[i:i + step]
            if part.size < step:
                part = np.concatenate([part, pcm[:step - part.size]])
            yield live_input_pb2.AudioChunk(session_id=sid, sample_rate=16_000,
                                            pcm_s16le=part.tobytes())

    async with client.open_channel(endpoint, client.input_auth(token)) as ch:
        await live_input_pb2_grpc.LiveInputServiceStub(ch).PushAudio(chunks())


async def _feed_motion(endpoint: str, sid: str, token: str, seconds: float, fps: int) -> None:
    take = client.performer_motion(60.0, fps)
    total = int(seconds * fps) + fps

    async def frames() -> AsyncIterator[live_input_pb2.MotionFrame]:
        for n in range(total):
            yield client.motion_frame(sid, take[n % len(take)])

    async with client.open_channel(endpoint, client.input_auth(token)) as ch:
        await live_input_pb2_grpc.LiveInputServiceStub(ch).PushMotion(frames())


async def _run(farm: LocalFarm, args: argparse.Namespace) -> tuple[Run, dict[str, types_pb2.Session]]:
    run = Run()
    w, _, h = args.size.partition("x")
    procs = {"scheduler": farm.scheduler, "worker": farm.worker_procs[0]}
    async with client.open_channel(farm.address) as ch:
        stub = sessions_pb2_grpc.SessionServiceStub(ch)
        ids: dict[str, str] = {}
        feeders = []
        script = script_segments()
        appended: dict[str, int] = {}
        for mode in args.modes.split(","):
            spec = client.spec("soak", f"soak-{mode}", drive=MODES[mode], width=int(w),
                               height=int(h or w), fps=args.fps, file_path=f"soak-{mode}.mp4",
                               seconds=args.stream_seconds,
                               script=script if mode == "text" else ())
            s = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=spec))
            ids[mode] = s.session_id
            appended[mode] = len(script)
        for mode, sid in ids.items():
            if mode == "text":
                continue
            s = await client.wait_for(stub, sid, lambda s: bool(s.input_endpoint)
                                      or s.state in client.TERMINAL, timeout=300)
            feed = (_feed_voice(s.input_endpoint, sid, s.input_token, args.stream_seconds)
                    if mode == "voice" else
                    _feed_motion(s.input_endpoint, sid, s.input_token, args.stream_seconds, args.fps))
            feeders.append(asyncio.create_task(feed))
        t0 = time.monotonic()
        last_print = 0.0
        while True:
            sessions = {m: await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=i))
                        for m, i in ids.items()}
            stats = {name: _proc(p.proc.pid) for name, p in procs.items()
                     if p is not None and p.proc is not None}
            run.samples.append(Sample(
                time.monotonic() - t0,
                {m: s.progress.stream_seconds for m, s in sessions.items()},
                {m: s.progress.av_offset_seconds for m, s in sessions.items()},
                {m: s.progress.sync_checks for m, s in sessions.items()},
                {k: v[0] for k, v in stats.items()}, {k: v[1] for k, v in stats.items()},
                {k: v[2] for k, v in stats.items()},
                _corrections(farm.worker_procs[0].metrics_port)))
            text = sessions.get("text")
            if (text is not None and text.state not in client.TERMINAL
                    and appended["text"] - text.progress.script_segments_done < 8):
                try:  # the text room's script, kept ahead of what it has spoken
                    await stub.AppendScript(sessions_pb2.AppendScriptRequest(
                        session_id=ids["text"], segments=script))
                    appended["text"] += len(script)
                except grpc.aio.AioRpcError as e:
                    if e.code() is not grpc.StatusCode.FAILED_PRECONDITION:  # it just ended
                        raise
            if all(s.state in client.TERMINAL for s in sessions.values()):
                break
            if time.monotonic() - last_print > 30:
                last_print = time.monotonic()
                print(f"  [{last_print - t0:6.0f}s] " + ", ".join(
                    f"{m} {s.progress.stream_seconds:.0f}s" for m, s in sessions.items()), flush=True)
            await asyncio.sleep(args.sample_every)
        for f in feeders:
            f.cancel()
        return run, sessions


def _read_back(path: Path) -> tuple[int, float, float, float]:
    """Frames, largest gap between successive video frame times (s), and the video's and
    the audio's durations (s): the last frame's time plus a frame, and samples / rate."""
    with av.open(str(path)) as c:
        times = [float(f.time) for f in c.decode(video=0) if f.time is not None]
    steps = np.diff(times) if len(times) > 1 else np.zeros(1)
    video = times[-1] + float(np.median(steps)) if times else 0.0
    with av.open(str(path)) as c:
        samples = sum(f.samples for f in c.decode(audio=0))
        rate = c.streams.audio[0].rate
    return len(times), float(steps.max()), video, samples / rate


APPLIED = re.compile(r"room (\S+): A/V correction now ([+-]?\d+) frame\(s\), applied at ([0-9.]+) s")


def _applied(worker_log: str) -> dict[str, list[float]]:
    """Session id -> stream times (s) at which a lip-sync correction took effect."""
    out: dict[str, list[float]] = {}
    for m in APPLIED.finditer(worker_log):
        out.setdefault(m.group(1), []).append(float(m.group(3)))
    return out


def _steps(path: Path, at: list[float], around: float = 0.05) -> tuple[float, float]:
    """The largest sample-to-sample step of the output's audio within `around` seconds of
    each time in `at` (the worst of them; 0 with none), and the median over the output's
    seconds of each second's largest step."""
    per_second: dict[int, float] = {}
    worst = 0.0
    last: float | None = None
    with av.open(str(path)) as c:
        for f in c.decode(audio=0):
            x = f.to_ndarray()[0].astype(np.float64)
            if last is not None:
                x = np.concatenate([[last], x])
            last = float(x[-1])
            if x.size < 2:
                continue
            step = float(np.abs(np.diff(x)).max())
            t = float(f.time or 0.0)
            per_second[int(t)] = max(per_second.get(int(t), 0.0), step)
            if any(abs(t - a) <= around for a in at):
                worst = max(worst, step)
    return worst, float(np.median(list(per_second.values()))) if per_second else 0.0


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3 or max(xs) - min(xs) <= 0:
        return 0.0
    return float(np.polyfit(np.array(xs), np.array(ys, dtype=float), 1)[0])


def report(run: Run, sessions: dict[str, types_pb2.Session], out_dir: Path, worker_log: Path) -> None:
    print("\nrooms")
    print(f"  {'mode':<6} {'state':<7} {'frames':>8} {'in file':>8} {'late':>6} {'video ts gap':>13} "
          f"{'video s':>9} {'audio s':>9} {'checks':>7}")
    for mode, s in sessions.items():
        frames, gap, video_s, audio_s = _read_back(out_dir / f"soak-{mode}.mp4")  # tenant "soak"
        state = types_pb2.SessionState.Name(s.state).removeprefix("SESSION_STATE_").lower()
        print(f"  {mode:<6} {state:<7} {s.progress.frames_rendered:>8} {frames:>8} {s.progress.late_frames:>6} "
              f"{gap * 1000:>10.1f} ms {video_s:>9.2f} {audio_s:>9.2f} {s.progress.sync_checks:>7}")
    samples = run.samples
    longest = max(samples[-1].stream.values(), default=0.0)  # stream seconds of the longest room
    total_hours = sum(samples[-1].stream.values()) / 3600 if samples else 0.0
    print(f"\nlip sync: {samples[-1].corrections:.0f} corrections in {total_hours:.2f} stream-hours "
          f"= {samples[-1].corrections / max(total_hours, 1e-9):.1f} per stream-hour")
    quarters = np.array_split(np.arange(len(samples)), 4)
    for mode in sessions:
        parts = []
        for q in quarters:
            offs = [samples[i].offset[mode] * 1000 for i in q if samples[i].checks[mode] > 0]
            parts.append("-" if not offs else
                         "/".join(f"{v:+.0f}" for v in np.percentile(offs, [5, 50, 95])))
        print(f"  {mode:<6} offset ms p5/p50/p95 by quarter: {'  '.join(parts)}")
    warm = [s for s in samples if max(s.stream.values(), default=0.0) >= WARM_UP * longest]
    print("\nprocesses (RSS slope after warm-up, per stream-hour of the longest room)")
    for name in samples[0].rss:
        xs = [max(s.stream.values()) / 3600 for s in warm]
        slope = _slope(xs, [s.rss[name] / 2**20 for s in warm])
        print(f"  {name:<9} RSS {samples[0].rss[name] / 2**20:7.1f} -> {samples[-1].rss[name] / 2**20:7.1f} "
              f"MiB, slope {slope:+.1f} MiB per stream-hour; threads {samples[0].threads[name]} -> "
              f"{samples[-1].threads[name]}; open files {samples[0].files[name]} -> "
              f"{samples[-1].files[name]}")
    text = worker_log.read_text(errors="replace") if worker_log.exists() else ""
    print(f"\nprofile re-reports: {text.count('re-reporting profiles')} in {samples[-1].wall:.0f} s of wall time")
    applied = _applied(text)
    print("corrections applied, and the output audio's largest sample step at them "
          "(beside a second's typical largest step)")
    for mode, s in sessions.items():
        at = applied.get(s.session_id, [])
        worst, typical = _steps(out_dir / f"soak-{mode}.mp4", at)
        print(f"  {mode:<6} {len(at):>4} applied; step at them {worst:.3f}, typical {typical:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream-seconds", type=float, default=7200.0, help="stream seconds per room")
    ap.add_argument("--modes", default="text,voice,mocap")
    ap.add_argument("--size", default="128x128")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--sample-every", type=float, default=2.0, help="wall seconds between samples")
    ap.add_argument("--home", type=Path, default=None, help="farm folder (default: a temporary one)")
    ap.add_argument("--video-drift-ppm", type=float, default=0.0,
                    help="inject a drift: every room's video falls behind its audio at this rate "
                         "(e.g. 100: a frame every 400 s at 25 fps)")
    args = ap.parse_args()
    from workers.models.folder import build_reference

    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp)
        build_reference(home / "models", "lite", wav2lip=None)
        farm = LocalFarm(home, workers=1, pacing="fast", worker_threads=1, overcommit=8.0,
                         worker_args=["--metrics-port", "-1",  # corrections are read from it
                                      "--inject-video-drift-ppm", str(args.video_drift_ppm)])
        print(f"soak: {args.modes} rooms x {args.stream_seconds:.0f} s at {args.size}@{args.fps}, "
              f"fast pacing, video drift {args.video_drift_ppm:g} ppm, in {home}", flush=True)
        t0 = time.monotonic()
        with farm:
            run, sessions = asyncio.run(_run(farm, args))
        print(f"wall {time.monotonic() - t0:.0f} s")
        report(run, sessions, farm.output_of("soak", ""), home / "logs" / "worker-0.log")
        failed = [m for m, s in sessions.items() if s.state != types_pb2.SESSION_STATE_ENDED]
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
