"""A room on its own: pacing, stopping, and failures reported as room state."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from avatarfarm.domain import OutputKind, Quality
from tests.builders import make_spec
from tests.media import probe
from workers.encode import OutputTarget
from workers.pipeline import Pipeline
from workers.room import Pacing, Room, RoomState


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


def test_an_injected_av_offset_is_measured_and_corrected(pipeline: Pipeline, tmp_path: Path) -> None:
    from dataclasses import replace

    from avatarfarm.domain import ScriptSegment
    from workers.alignment import SyncEstimate

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
