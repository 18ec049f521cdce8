"""The AI-generated label: burned into the frames of a real room, legible when the
decoded output is read back, at each resolution; marked in the container's metadata;
and a room whose licence ended stops at the end of the segment it is speaking."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from avatarfarm.domain import DriveMode, Output, OutputKind, Quality, ScriptSegment
from tests.builders import make_spec
from workers.device.pipeline import Pipeline
from workers.media.label import MIN_SCALE, LabelSpec, LabelStamp, read_label, text_mask
from workers.output.hls import hls_segments
from workers.output.targets import OutputTarget
from workers.rooms.room import Pacing, Room, RoomState


def test_the_font_reads_back_what_it_draws_at_any_position() -> None:
    text = "AI-generated 2026: OK?"
    assert text_mask(text).shape == (7, 6 * len(text) - 1)
    for position in ("top-left", "top-right", "bottom-left", "bottom-right"):
        stamp = LabelStamp(LabelSpec(text, position, 0.06), 640, 360)
        frame = stamp.apply(np.full((360, 640, 3), 200, np.uint8))
        assert read_label(frame, stamp, len(text)) == text.upper()
        top = stamp.top < 180
        assert top == position.startswith("top")
    with pytest.raises(ValueError):
        LabelSpec(position="middle")


def test_a_label_too_long_for_the_frame_shrinks_but_never_below_legible() -> None:
    stamp = LabelStamp(LabelSpec("AI-generated content", "top-left", 0.2), 128, 128)
    assert stamp.scale == MIN_SCALE
    assert stamp.shape[1] <= 128


def run_room(pipeline: Pipeline, tmp_path: Path, quality: Quality, output: Output,
             label: LabelSpec | None, seconds: float = 1.0) -> Room:
    spec = make_spec("r", quality=quality, seconds=seconds, output=output)
    target = OutputTarget.resolve(output.kind, output.target, tmp_path)
    room = Room("s1", spec, target, pipeline, pacing=Pacing.FAST, label=label)

    async def body() -> None:
        await asyncio.wait_for(room.start(), 60)

    asyncio.run(body())
    assert room.state is RoomState.ENDED, room.reason
    return room


@pytest.mark.parametrize("quality", [Quality(256, 256, 25), Quality(640, 360, 25)])
def test_the_label_is_legible_in_every_decoded_frame(pipeline: Pipeline, tmp_path: Path,
                                                     quality: Quality) -> None:
    label = LabelSpec("AI-generated", "bottom-left", 0.05)
    run_room(pipeline, tmp_path, quality, Output(OutputKind.FILE, "show.mp4"), label)
    stamp = LabelStamp(label, quality.width, quality.height)
    with av.open(str(tmp_path / "show.mp4")) as c:
        assert "AI-generated content" in c.metadata.get("comment", "")
        read = [read_label(f.to_ndarray(format="rgb24"), stamp, len(label.text))
                for f in c.decode(video=0)]
    assert len(read) == 25 and all(r == "AI-GENERATED" for r in read), read


def test_without_a_label_there_is_none_and_hls_segments_are_marked(pipeline: Pipeline,
                                                                  tmp_path: Path) -> None:
    q = Quality(256, 256, 25)
    label = LabelSpec("AI-generated", "top-right", 0.05)
    run_room(pipeline, tmp_path / "plain", q, Output(OutputKind.FILE, "plain.mp4"), None)
    stamp = LabelStamp(label, q.width, q.height)
    with av.open(str(tmp_path / "plain" / "plain.mp4")) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
        assert "comment" not in c.metadata
    assert read_label(frame, stamp, len(label.text)) != "AI-GENERATED"
    run_room(pipeline, tmp_path / "hls", q, Output(OutputKind.HLS, "live"), label, seconds=2.5)
    folder = tmp_path / "hls" / "live"
    first = hls_segments(folder)[0]
    # MPEG-TS carries it as the service's name (in the SDT, which PyAV does not expose).
    assert b"AI-generated content" in (folder / first.name).read_bytes()
    with av.open(str(folder / first.name)) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert read_label(frame, stamp, len(label.text)) == "AI-GENERATED"


def test_a_room_told_to_stop_at_a_script_boundary_finishes_its_segment(
        pipeline: Pipeline, tmp_path: Path) -> None:
    spec = replace(make_spec("r", quality=Quality(128, 128, 25), seconds=0.0),
                   drive_mode=DriveMode.TEXT,
                   script=(ScriptSegment("This sentence is spoken to its end.", 0.5),
                           ScriptSegment("This one is never started.", 0.5)))
    target = OutputTarget.resolve(OutputKind.FILE, "r.mp4", tmp_path)
    room = Room("s1", spec, target, pipeline, pacing=Pacing.FAST)

    async def body() -> None:
        running = asyncio.Event()
        room.on_change = lambda r: running.set() if r.state is RoomState.RUNNING else None
        task = room.start()
        await asyncio.wait_for(running.wait(), 30)
        room.stop_at_script_boundary("licence revoked")
        await asyncio.wait_for(task, 60)

    asyncio.run(body())
    assert room.state is RoomState.ENDED and room.reason == "licence revoked"
    assert room.script.segments_done == 1  # the first finished, the second never began
    assert room.script.segments_spoken == 1
    assert room.stats.stream_seconds > 1.0  # not cut at the first frame
