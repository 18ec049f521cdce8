"""Outputs encoded in encoder processes: the same streams, the same errors, and a dead
process failing only its own rooms."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from avatarfarm.domain import OutputKind, Quality
from tests.builders import make_spec
from tests.media import probe, video_end
from workers.device.pipeline import Pipeline
from workers.media.audio import SAMPLE_RATE
from workers.output.encode import EncoderSettings, EncoderThread
from workers.output.encoder_process import RING, EncoderProcessDied, EncoderProcesses, RemoteEncoder
from workers.output.fence import Superseded
from workers.output.targets import OutputTarget
from workers.rooms.room import Pacing, Room, RoomState

W, H, FPS = 64, 48, 25


@pytest.fixture
def processes() -> Iterator[EncoderProcesses]:
    p = EncoderProcesses(2)
    yield p
    p.stop()


def remote(processes: EncoderProcesses, target: OutputTarget, **options: object) -> EncoderThread:
    return EncoderThread(RemoteEncoder(processes, target, W, H, FPS, **options), pool=processes.pool)


def tone(n: int) -> np.ndarray:
    t = (np.arange(SAMPLE_RATE // FPS) + n * (SAMPLE_RATE // FPS)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def grey(level: int) -> np.ndarray:
    return np.full((H, W, 3), level, np.uint8)


def levels(path: Path | str) -> list[int]:
    with av.open(str(path)) as c:
        return [round(float(f.to_ndarray(format="gray").mean())) for f in c.decode(video=0)]


def test_rooms_in_two_processes_each_get_their_own_frames_in_order(
        processes: EncoderProcesses, tmp_path: Path) -> None:
    targets = [OutputTarget.resolve(OutputKind.FILE, f"room{i}.mp4", tmp_path) for i in range(3)]
    encoders = [remote(processes, t) for t in targets]
    for n in range(30):
        for i, enc in enumerate(encoders):
            enc.submit(grey(40 + 60 * i + 2 * n), tone(n), timeout=30)
    for enc in encoders:
        enc.close()
    for i, (enc, target) in enumerate(zip(encoders, targets, strict=True)):
        assert enc.error is None and enc.frames_encoded == 30
        # The child's CPU is counted as the room's, and it is most of the encoder's cost.
        assert 0 < enc.encoder.offloaded_seconds <= enc.encode_seconds
        f = probe(target.location)
        assert (f.video_codec, f.width, f.height, f.frames, f.audio_codec) == ("h264", W, H, 30, "aac")
        assert f.audio_rms > 0.1
        got = levels(target.location)
        assert all(abs(g - (40 + 60 * i + 2 * n)) <= 3 for n, g in enumerate(got)), got
    assert sorted(p.process.pid for p in processes._processes) and len(processes._processes) == 2
    assert all(p.rooms == 0 for p in processes._processes)


def test_a_repeat_still_waiting_is_held_as_it_is_in_a_thread(
        processes: EncoderProcesses, tmp_path: Path) -> None:
    """The merge lives in EncoderThread; the process only sees a frame lasting longer."""
    target = OutputTarget.resolve(OutputKind.FILE, "still.mp4", tmp_path)
    enc = remote(processes, target)
    still = grey(120)
    for n in range(50):
        enc.submit(still if n % 10 else grey(30 + n), tone(n), timeout=30)
    enc.close()
    assert enc.error is None and enc.frames_encoded + enc.frames_merged == 50
    assert video_end(target.location) == pytest.approx(2.0, abs=1e-3)
    assert probe(target.location).frames == enc.frames_encoded


def test_a_superseded_writer_in_a_process_is_told_so_and_publishes_nothing_more(
        processes: EncoderProcesses, tmp_path: Path) -> None:
    target = OutputTarget.resolve(OutputKind.HLS, "show", tmp_path)
    stale = RemoteEncoder(processes, target, W, H, FPS, epoch=1)
    stale.open()
    for n in range(60):
        stale.encode(grey(50), tone(n))
    assert stale._process is not None
    stale._process.call(("ping", 0))  # answered after every frame listed before it
    segments = sorted(p.name for p in (tmp_path / "show").glob("*.ts"))
    newer = RemoteEncoder(processes, target, W, H, FPS, epoch=2, continuation=1)
    newer.open()
    stale.encode(grey(70), tone(60))  # on its way: the answer says it was refused
    with pytest.raises(Superseded, match="taken over by assignment 2") as raised:
        stale.close()  # waits for every frame before it; closes its staging output quietly
    assert (raised.value.epoch, raised.value.holder) == (1, 2)
    assert sorted(p.name for p in (tmp_path / "show").glob("*.ts")) == segments
    newer.encode(grey(60), tone(0))
    newer.close()
    assert (tmp_path / "show" / ".fence").read_text() == "2\n"
    assert all(p.rooms == 0 for p in processes._processes)


def test_a_frame_the_encoder_refuses_fails_its_room_and_no_other(
        processes: EncoderProcesses, tmp_path: Path) -> None:
    bad = remote(processes, OutputTarget.resolve(OutputKind.FILE, "bad.mp4", tmp_path))
    good = remote(processes, OutputTarget.resolve(OutputKind.FILE, "good.mp4", tmp_path))
    bad.submit(np.zeros((H, W, 3), np.float32), tone(0), timeout=30)  # not 8-bit RGB
    for n in range(10):
        good.submit(grey(100), tone(n), timeout=30)
    bad.close()
    good.close()
    assert bad.error is not None and good.error is None
    assert probe(good.encoder.location).frames == 10


def test_a_dead_process_fails_its_rooms_and_the_next_room_gets_a_fresh_one(tmp_path: Path) -> None:
    single = EncoderProcesses(1)
    try:
        first = RemoteEncoder(single, OutputTarget.resolve(OutputKind.FILE, "a.mp4", tmp_path), W, H, FPS)
        first.open()
        first.encode(grey(80), tone(0))
        dead = single._processes[0]
        dead.process.kill()
        # A frame on its way when the process died fails the room at its next call.
        with pytest.raises(EncoderProcessDied, match="exit status"):
            for n in range(1, RING + 2):
                first.encode(grey(80), tone(n))
        with pytest.raises(EncoderProcessDied):
            first.close()
        assert not dead.alive and dead.rooms == 0

        second = remote(single, OutputTarget.resolve(OutputKind.FILE, "b.mp4", tmp_path))
        for n in range(5):
            second.submit(grey(90), tone(n), timeout=30)
        second.close()
        assert second.error is None and probe(second.encoder.location).frames == 5
        assert [p.alive for p in single._processes] == [True]
        assert single._processes[0] is not dead
    finally:
        single.stop()


def test_a_process_whose_worker_went_away_exits_by_itself(tmp_path: Path) -> None:
    processes = EncoderProcesses(1)
    enc = remote(processes, OutputTarget.resolve(OutputKind.FILE, "a.mp4", tmp_path))
    enc.submit(grey(80), tone(0), timeout=30)
    enc.close()
    child = processes._processes[0]
    processes.stop()  # the socket shut down, as the worker's death would; a kill only after 5 s
    assert child.process.returncode == 0


def test_a_room_streams_through_the_encoder_processes(pipeline: Pipeline, tmp_path: Path) -> None:
    spec = make_spec("r", quality=Quality(256, 256, 25), seconds=1.0)
    target = OutputTarget.resolve(OutputKind.FILE, "r.mp4", tmp_path)
    room = Room("s1", spec, target, pipeline, pacing=Pacing.FAST,
                encoder=replace(EncoderSettings(), processes=1))

    async def body() -> None:
        await room.start()

    asyncio.run(body())
    assert room.state is RoomState.ENDED, room.reason
    assert room.stats.frames_rendered == 25
    f = probe(target.location)
    assert (f.video_codec, f.width, f.height, f.frames, f.audio_codec) == ("h264", 256, 256, 25, "aac")
    assert room.stats.stage_seconds["encode"] > 0


def test_a_ring_that_does_not_fit_in_shared_memory_goes_to_the_temporary_folder(
        processes: EncoderProcesses, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    import workers.output.encoder_process as ep

    shm, reserve = tmp_path / "shm", os.posix_fallocate
    shm.mkdir()
    used: list[str] = []

    def full(fd: int, offset: int, size: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        used.append(path)
        if path.startswith(str(shm)):
            raise OSError(errno.ENOSPC, "No space left on device")
        reserve(fd, offset, size)

    monkeypatch.setattr(ep, "_SHM", shm)
    monkeypatch.setattr(os, "posix_fallocate", full)
    enc = remote(processes, OutputTarget.resolve(OutputKind.FILE, "a.mp4", tmp_path))
    for n in range(5):
        enc.submit(grey(90), tone(n), timeout=30)
    enc.close()
    assert enc.error is None and probe(enc.encoder.location).frames == 5
    assert len(used) == 2 and used[0].startswith(str(shm)) and not used[1].startswith(str(shm))
    assert list(shm.iterdir()) == []


class _Gate:
    """A connection whose first send waits until the test opens the gate."""

    def __init__(self, conn: object) -> None:
        self.conn, self.entered, self.open = conn, threading.Event(), threading.Event()

    def send(self, message: object) -> None:
        self.entered.set()
        self.open.wait(30)
        self.conn.send(message)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)


def test_a_withdrawn_room_s_frames_not_yet_sent_are_never_encoded(tmp_path: Path) -> None:
    single = EncoderProcesses(1)
    try:
        target = OutputTarget.resolve(OutputKind.FILE, "moved.mp4", tmp_path)
        enc = RemoteEncoder(single, target, W, H, FPS)
        enc.open()
        process = single._processes[0]
        gate = _Gate(process._conn)
        process._conn = gate  # type: ignore[assignment]
        enc.encode(grey(40), tone(0))  # taken by the sender, held at the gate
        assert gate.entered.wait(30)
        enc.encode(grey(80), tone(1))  # listed behind it
        enc.encode(grey(120), tone(2))
        enc.withdraw()  # the room moved to another worker
        enc.encode(grey(160), tone(3))  # dropped at once
        gate.open.set()
        enc.close()
        assert process.requests == 3  # open, the frame at the gate, close: nothing else travelled
    finally:
        single.stop()
    # Only the frame already on its way was encoded.
    assert levels(target.location) == [40]
