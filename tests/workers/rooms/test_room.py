"""A room on its own: pacing, stopping, and failures reported as room state."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from avatarfarm.domain import OutputKind, Quality
from tests.builders import make_spec
from tests.media import probe, video_end
from workers.device.pipeline import AUDIO_TO_MOTION_KEY, Pipeline
from workers.output.targets import OutputTarget
from workers.rooms.room import InvalidQuality, Pacing, Room, RoomState


def make_room(pipeline: Pipeline, tmp_path: Path, *, seconds: float, pacing: Pacing,
              avatar: str = "presenter") -> Room:
    spec = make_spec("r", quality=Quality(256, 256, 25), seconds=seconds)
    if avatar != "presenter":
        from dataclasses import replace

        spec = replace(spec, avatar_id=avatar)
    target = OutputTarget.resolve(OutputKind.FILE, "r.mp4", tmp_path)
    return Room("s1", spec, target, pipeline, pacing=pacing)


def test_realtime_pacing_streams_at_the_frame_rate(pipeline: Pipeline, tmp_path: Path) -> None:
    room = make_room(pipeline, tmp_path, seconds=1.0, pacing=Pacing.REALTIME)
    states: list[RoomState] = []
    room.on_change = lambda r: states.append(r.state)

    async def body() -> float:
        t0 = time.monotonic()
        await room.start()
        return time.monotonic() - t0

    wall = asyncio.run(body())
    # 25 frames at 25 fps cannot be delivered faster than their presentation times.
    assert wall >= 0.9
    assert room.stats.frames_rendered == 25
    assert states == [RoomState.RUNNING, RoomState.ENDED]


def test_a_room_without_a_duration_streams_until_stopped(pipeline: Pipeline, tmp_path: Path) -> None:
    room = make_room(pipeline, tmp_path, seconds=0.0, pacing=Pacing.FAST)

    async def body() -> None:
        running = asyncio.Event()
        room.on_change = lambda r: running.set() if r.state is RoomState.RUNNING else None
        task = room.start()
        await asyncio.wait_for(running.wait(), 30)
        room.stop("show is over")
        await asyncio.wait_for(task, 30)

    asyncio.run(body())
    assert room.state is RoomState.ENDED and room.reason == "show is over"
    assert probe(tmp_path / "r.mp4").frames == room.stats.frames_rendered


def test_a_missing_avatar_fails_the_room_with_a_reason(pipeline: Pipeline, tmp_path: Path) -> None:
    room = make_room(pipeline, tmp_path, seconds=1.0, pacing=Pacing.FAST, avatar="ghost")
    asyncio.run(room.run())
    assert room.state is RoomState.FAILED
    assert "ghost" in room.reason


def test_a_live_room_waiting_for_its_input_can_be_stopped(pipeline: Pipeline, tmp_path: Path) -> None:
    from dataclasses import replace

    from avatarfarm.domain import DriveMode

    room = make_room(pipeline, tmp_path, seconds=5.0, pacing=Pacing.FAST)
    room.spec = replace(room.spec, drive_mode=DriveMode.VOICE)
    room.live_input_wait = 600.0

    async def body() -> None:
        task = room.start()
        room.stop("cancelled before the show")  # before or while it waits for its client
        await asyncio.wait_for(task, 10)

    asyncio.run(body())
    assert room.state is RoomState.ENDED and room.stats.frames_rendered == 0


def test_frames_that_cannot_make_their_deadline_are_replaced_and_counted(
        pipeline: Pipeline, tmp_path: Path) -> None:
    # A 4 ms latency budget leaves no time to render any frame: the batcher drops every
    # one, and the room still streams every frame at its time, with its audio.
    room = make_room(pipeline, tmp_path, seconds=1.0, pacing=Pacing.REALTIME)
    room.latency_budget, room.output_margin = 0.004, 0.002
    def rendered() -> int:
        return pipeline.engine.stats()[pipeline.render_key(256)].items

    before = rendered()
    asyncio.run(room.run())
    assert room.state is RoomState.ENDED
    assert room.stats.frames_rendered == 25
    assert room.stats.late_frames == 25
    assert rendered() == before  # no frame was rendered too late to be shown
    facts = probe(tmp_path / "r.mp4")
    assert facts.frames == 25
    assert facts.duration == pytest.approx(1.0)


def test_a_room_behind_real_time_gives_up_frames_past_their_deadline_before_any_work(
        pipeline: Pipeline, tmp_path: Path) -> None:
    # Half a second in, the room's clock jumps a second ahead (a host that stalled): the
    # producer finds itself a second behind real time, and the frames of the first half
    # of that second are past their deadline before they are made. None of them costs
    # the device anything; each is replaced, and the stream keeps every frame and its
    # audio.
    room = make_room(pipeline, tmp_path, seconds=2.0, pacing=Pacing.REALTIME)
    start = time.monotonic()
    room.clock = lambda: time.monotonic() + (1.0 if time.monotonic() - start > 0.5 else 0.0)

    def motions() -> int:
        return pipeline.engine.stats()[AUDIO_TO_MOTION_KEY].items + \
            pipeline.engine.stats()[AUDIO_TO_MOTION_KEY].dropped

    before = motions()
    asyncio.run(room.run())
    assert room.state is RoomState.ENDED and room.stats.frames_rendered == 50
    skipped = room.stats.skipped_frames
    # A second behind with half a second of latency budget: about half a second of
    # frames is given up unmade, and only the frames made reach the device.
    budget = room.latency_budget - room.output_margin
    assert abs(skipped - round(25 * (1.0 - budget))) <= 3 and room.stats.late_frames >= skipped
    assert motions() - before == 50 - skipped
    # Every frame and its time are in the stream: given-up frames that repeated one still
    # waiting for the encoder were held on it (one longer frame) rather than encoded apart.
    assert probe(tmp_path / "r.mp4").frames == 50 - room.stats.merged_frames
    assert video_end(tmp_path / "r.mp4") == pytest.approx(2.0)


def test_a_text_room_starts_its_clock_with_its_first_audio(pipeline: Pipeline, tmp_path: Path) -> None:
    # Its voice takes a second of the room's clock to make the first sentence (one voice
    # serving many rooms that start at once). The first frame waits for that audio
    # whatever the clock says; a clock started before it would find the room a second
    # behind at its first frame, and half a second of frames would be given up and the
    # rest of the backlog caught up in a burst. Started with the audio, none is late.
    from avatarfarm.domain import ScriptSegment
    from workers.rooms.drivers import ScriptPlayer

    room = make_room(pipeline, tmp_path, seconds=1.0, pacing=Pacing.REALTIME)
    ahead = [0.0]
    room.clock = lambda: time.monotonic() + ahead[0]
    voice = room._synthesize

    async def slow_first_sentence(text: str) -> tuple[np.ndarray, float]:
        made = await voice(text)
        if ahead[0] == 0.0:
            ahead[0] = 1.0
        return made

    room.script = ScriptPlayer(slow_first_sentence)
    room.script.append((ScriptSegment("Welcome to the live room. Three new offers today."),))
    asyncio.run(room.run())
    assert room.state is RoomState.ENDED and room.stats.frames_rendered == 25
    assert room.stats.speech_frames > 0
    # Started with its audio, none is late: at most a frame or two where the host itself
    # stalls (a loaded test machine), against ~16 given up when the clock started first.
    assert room.stats.skipped_frames <= 2 and room.stats.late_frames <= 2


def test_an_injected_av_offset_is_measured_and_corrected(pipeline: Pipeline, tmp_path: Path) -> None:
    from dataclasses import replace

    from avatarfarm.domain import ScriptSegment
    from workers.media.alignment import SyncEstimate

    speech = ("Welcome to the live room. Today we have three new offers for you, and every one "
              "of them ships tomorrow morning. Stay with us and ask your questions.")
    room = make_room(pipeline, tmp_path, seconds=10.0, pacing=Pacing.FAST)
    room.spec = replace(room.spec, script=(ScriptSegment(speech),))
    room.script = type(room.script)(room._synthesize)
    room.script.append(room.spec.script)
    # The video is made to lag its audio by 3 frames (120 ms), as a drifting stream would.
    room.video_lag_frames = 3
    room.sync.every_frames = room.sync.window  # type: ignore[union-attr]
    checks: list[SyncEstimate] = []
    room.on_sync = lambda r, est: checks.append(est) if est is not None else None
    asyncio.run(room.run())
    assert room.state is RoomState.ENDED
    assert len(checks) >= 3
    # Measured: the injected lag on top of the pipeline's own (at most a frame).
    assert 3 <= checks[0].offset_frames <= 4
    # Corrected: the audio is held back by as much, and later checks find the stream in sync.
    assert room.stats.sync_corrections >= 1
    assert room.av_delay.audio_frames >= 3
    assert all(abs(c.offset_frames) <= 1 for c in checks[1:])
    assert probe(tmp_path / "r.mp4").frames == 250


# -- live reconfiguration (degradation steps)

SPEECH = ("Welcome to the live room. Today we have three new offers for you, and every one "
          "of them ships tomorrow morning.")


def make_live_room(pipeline: Pipeline, tmp_path: Path, *, seconds: float, pacing: Pacing) -> Room:
    from avatarfarm.domain import ScriptSegment

    spec = make_spec("r", quality=Quality(256, 256, 25), seconds=seconds,
                     script=(ScriptSegment(SPEECH),))
    target = OutputTarget.resolve(OutputKind.FILE, "r.mp4", tmp_path)
    return Room("s1", spec, target, pipeline, pacing=pacing)


async def frames_reach(room: Room, n: int, timeout: float = 30.0) -> None:
    # Polls with a deadline: the test steps the room at a frame count, as the scheduler
    # would at some point of a live stream.
    deadline = time.monotonic() + timeout
    while room.stats.frames_rendered < n and room.task is not None and not room.task.done():
        assert time.monotonic() < deadline, f"room stuck at {room.stats.frames_rendered} frames"
        await asyncio.sleep(0.002)


@dataclass(frozen=True)
class Decoded:
    sizes: set[tuple[int, int]]
    pts: list[Fraction]  # presentation times, seconds, from the first frame's
    duration: float  # the video stream's, as the container states it, from the first frame
    audio: np.ndarray  # samples at audio_rate
    audio_rate: int


def decode(path: Path) -> Decoded:
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = list(c.decode(video=0))
        sizes = {(f.width, f.height) for f in frames}
        assert all(f.pts is not None and f.time_base is not None for f in frames)
        pts = [Fraction(f.pts or 0) * (f.time_base or 0) for f in frames]
        # MP4 starts the video after the AAC encoder's priming (1024 samples) and lets the
        # first frame cover it; measured from where the first frame's own time would start.
        lead = pts[1] - pts[0] - Fraction(1, 25) if len(pts) > 1 else Fraction(0)
        pts = [pts[0]] + [p - lead for p in pts[1:]]
        assert v.duration is not None and v.time_base is not None
        duration = float(v.duration * v.time_base - lead)
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].codec_context.sample_rate
        audio = np.concatenate([f.to_ndarray().ravel() for f in c.decode(audio=0)])
    return Decoded(sizes, pts, duration, audio, rate)


def runs(gaps: list[Fraction]) -> list[tuple[Fraction, int]]:
    """Consecutive equal frame intervals as (interval, count)."""
    out: list[tuple[Fraction, int]] = []
    for g in gaps:
        if out and out[-1][0] == g:
            out[-1] = (g, out[-1][1] + 1)
        else:
            out.append((g, 1))
    return out


SECONDS = 8.0


def test_a_room_steps_down_and_back_up_live_in_one_stream(pipeline: Pipeline, tmp_path: Path) -> None:
    # Long enough that the room is still degraded when the test steps it back up, however
    # late the polling coroutine wakes (at 3 s a slow wake let it finish at 12 fps).
    room = make_live_room(pipeline, tmp_path, seconds=SECONDS, pacing=Pacing.FAST)
    states: list[RoomState] = []
    room.on_change = lambda r: states.append(r.state)
    low = Quality(192, 192, 12)

    def rendered() -> dict[int, int]:
        stats = pipeline.engine.stats()
        return {side: stats[k].items if (k := pipeline.render_key(side)) in stats else 0
                for side in (256, 192)}

    async def body() -> None:
        task = room.start()
        await frames_reach(room, 15)
        room.reconfigure(low, step=2, reason="overload")
        await frames_reach(room, 35)
        room.reconfigure(room.spec.quality, step=0)
        await asyncio.wait_for(task, 60)

    before = rendered()
    asyncio.run(body())
    after = rendered()
    assert states == [RoomState.RUNNING, RoomState.ENDED]
    assert room.rendering == room.spec.quality and room.degradation_step == 0

    out = decode(tmp_path / "r.mp4")
    # The output never changed size: players and ingests see one stream.
    assert out.sizes == {(256, 256)}
    assert len(out.pts) == room.stats.frames_rendered
    # Timestamps: 1/25 s apart, then 1/12 s while degraded, then 1/25 s again.
    assert out.pts[0] == 0
    gaps = [b - a for a, b in zip(out.pts, out.pts[1:], strict=False)]
    pattern = runs(gaps)
    assert [g for g, _ in pattern] == [Fraction(1, 25), Fraction(1, 12), Fraction(1, 25)]
    n25 = pattern[0][1] + 1 + pattern[2][1]  # the last frame at each rate starts the next run
    n12 = pattern[1][1]
    assert n25 + n12 == room.stats.frames_rendered
    # Stream time is counted per frame at its own rate, and the file agrees.
    stream = Fraction(n25, 25) + Fraction(n12, 12)
    assert room.stats.stream_time == stream
    assert SECONDS <= stream < SECONDS + Fraction(1, 12)
    assert out.pts[-1] + Fraction(1, 25) == stream
    assert out.duration == pytest.approx(float(stream), abs=1e-3)
    # The renderer really drew the degraded frames at the lower side.
    assert after[192] - before[192] == n12
    assert after[256] - before[256] == n25
    # Audio runs unbroken under both rates: as long as the video, with speech while degraded.
    assert len(out.audio) / out.audio_rate == pytest.approx(float(stream), abs=0.05)
    t_low = float(out.pts[pattern[0][1]])
    degraded = out.audio[int(t_low * out.audio_rate):int((t_low + n12 / 12) * out.audio_rate)]
    assert float(np.sqrt(np.mean(degraded.astype(np.float64) ** 2))) > 0.01


def test_a_degraded_live_room_is_paced_at_its_new_rate(pipeline: Pipeline, tmp_path: Path) -> None:
    room = make_live_room(pipeline, tmp_path, seconds=1.5, pacing=Pacing.REALTIME)

    async def body() -> float:
        t0 = time.monotonic()
        task = room.start()
        await frames_reach(room, 5)
        room.reconfigure(Quality(192, 192, 12), step=1)
        await asyncio.wait_for(task, 30)
        return time.monotonic() - t0

    wall = asyncio.run(body())
    assert room.state is RoomState.ENDED
    # Fewer frames than 1.5 s at 25 fps, yet the stream still lasts its 1.5 s, in real time.
    assert room.stats.frames_rendered < 30
    assert 1.5 <= room.stats.stream_seconds < 1.5 + 1 / 12
    assert wall >= room.stats.stream_seconds - 1 / 12
    out = decode(tmp_path / "r.mp4")
    assert out.sizes == {(256, 256)}
    assert out.duration == pytest.approx(room.stats.stream_seconds, abs=1e-3)


@pytest.mark.parametrize("quality", [Quality(512, 512, 25), Quality(256, 320, 25),
                                     Quality(256, 256, 30), Quality(192, 192, 0),
                                     Quality(8, 8, 12)])
def test_a_quality_the_room_cannot_render_is_refused(pipeline: Pipeline, tmp_path: Path,
                                                     quality: Quality) -> None:
    room = make_room(pipeline, tmp_path, seconds=1.0, pacing=Pacing.FAST)
    room.reconfigure(Quality(192, 192, 12), step=1)
    with pytest.raises(InvalidQuality):
        room.reconfigure(quality, step=3)
    assert room.rendering == Quality(192, 192, 12) and room.degradation_step == 1


def test_the_injected_drift_grows_the_lag_a_frame_at_a_time() -> None:
    from workers.rooms.room import DelayLine

    line = DelayLine(frames=1, ppm=100_000)  # 10%: a frame more of lag every 0.4 s at 25 fps
    out = [int(line.push(np.array(n), n / 25, 25)) for n in range(100)]
    lags = [n - o for n, o in enumerate(out)]
    assert lags[:2] == [0, 1]  # nothing older than the first frame exists yet
    assert lags[-1] == 1 + int(99 / 25 * 0.1 * 25)
    assert set(np.diff(out)) <= {0, 1}  # repeats, never skips back
    assert [int(DelayLine().push(np.array(n), n / 25, 25)) for n in range(5)] == list(range(5))
