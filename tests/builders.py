"""Builders for test values, so each test states only what it is about."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import av

from avatarfarm.domain import DriveMode, Output, OutputKind, Quality, ScriptSegment, SessionSpec, Stage, Tier
from scheduler.config import SchedulerConfig
from scheduler.core import Scheduler
from scheduler.policy.licences import Licence
from scheduler.policy.placement import MemoryProfile, RoomReq, StageCost, WorkerProfile, WorkerState
from scheduler.state.store import open_store
from scheduler.state.worker_conn import WorkerCommand, WorkerConn
from workers.models.avatar import draw_default_avatar


def make_spec(room_id: str = "room-1", *, tenant: str = "vendor", drive: DriveMode = DriveMode.TEXT,
              tier: Tier = Tier.STANDARD, quality: Quality = Quality(512, 512, 25),
              output: Output | None = None, seconds: float = 2.0,
              script: tuple[ScriptSegment, ...] = ()) -> SessionSpec:
    return SessionSpec(tenant, room_id, "presenter", drive, quality, tier,
                       output or Output(OutputKind.FILE, f"{room_id}.mp4"), seconds, script)


def make_profile(render_512: float = 0.010, encode_512: float = 0.002, a2m: float = 0.0005,
                 tts: float = 0.005, batch_gain: float = 0.0) -> WorkerProfile:
    """A worker profile measured at 512x512 (render and encode), per call seconds.

    batch_gain > 0 gives the render and audio-to-motion stages GPU-like curves: a
    batch of n costs 1 + (n - 1) * (1 - batch_gain) calls of one (up to 16)."""
    def stage(st: Stage, w: int, h: int, one: float) -> StageCost:
        if batch_gain <= 0:
            return StageCost(st, w, h, one)
        pts = [(n, one * (1 + (n - 1) * (1 - batch_gain))) for n in (1, 2, 4, 8, 16)]
        return StageCost.measured(st, w, h, pts)
    return WorkerProfile((
        stage(Stage.RENDER, 512, 512, render_512),
        StageCost(Stage.ENCODE, 512, 512, encode_512),
        stage(Stage.AUDIO_TO_MOTION, 0, 0, a2m),
        StageCost(Stage.TTS, 0, 0, tts),
    ))


def make_worker(worker_id: str = "w1", *, capacity: float = 1.0,
                profile: WorkerProfile | None = None, cpu_cores: float = 0.0,
                memory_bytes: float = 0.0, memory: MemoryProfile = MemoryProfile(),
                warm: frozenset[str] = frozenset(), device_type: str = "cpu") -> WorkerState:
    return WorkerState(worker_id, profile or make_profile(), capacity, cpu_cores, memory_bytes,
                       memory, device_type, warm)


def make_room(session_id: str = "s1", *, seq: int = 1, tier: Tier = Tier.STANDARD,
              drive: DriveMode = DriveMode.TEXT, quality: Quality = Quality(512, 512, 25),
              tenant: str = "vendor", avatar: str = "presenter") -> RoomReq:
    return RoomReq(session_id, tenant, avatar, quality, drive, tier, seq)


def make_licence(**kw: object) -> Licence:
    """A licence restricting only what the test names (lists as tuples)."""
    return Licence(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})  # type: ignore[arg-type]


def _encode(codec: str, pix_fmt: str, side: int) -> bytes:
    frame = av.VideoFrame.from_ndarray(draw_default_avatar(side), format="rgb24")
    ctx = av.CodecContext.create(codec, "w")
    ctx.width = ctx.height = side
    ctx.pix_fmt = pix_fmt
    return b"".join(bytes(p) for p in [*ctx.encode(frame.reformat(format=pix_fmt)), *ctx.encode(None)])


def png_image(side: int = 96) -> bytes:
    """A small portrait as a PNG file's bytes."""
    return _encode("png", "rgb24", side)


def jpeg_image(side: int = 96) -> bytes:
    return _encode("mjpeg", "yuvj420p", side)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid, tiny PNG declaring a huge canvas: one compressed run of zeros, which a
    decoder that trusted the header would inflate into width x height x 3 bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(bytes(1 << 20), 9)) + png_chunk(b"IEND", b""))


T0 = 1_750_000_000.0


class Clock:
    """A settable clock for a core under test (``clock.now += 5``)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_core(tmp: Path, clock: Clock | None = None, *, incarnation: int = 0,
              **config: Any) -> tuple[Scheduler, Clock]:
    """A core on a real store (the SQLite file in `tmp`, or the `database_url` given), on
    a settable clock, as the scheduler's `incarnation`-th start; `config` overrides
    SchedulerConfig (workers never time out unless asked)."""
    clock = clock or Clock()
    avatars = tmp / "avatars"
    avatars.mkdir(parents=True, exist_ok=True)
    conf = SchedulerConfig(**{"database": tmp / "s.db", "avatar_dir": avatars,
                              "worker_timeout": 1e9, **config})
    return Scheduler(open_store(conf.database, conf.database_url), conf, clock=clock,
                     incarnation=incarnation), clock


def connect(core: Scheduler, worker_id: str = "w1", *, profile: WorkerProfile | None = None,
            avatars: frozenset[str] = frozenset({"presenter"}), endpoint: str = "",
            **kw: Any) -> WorkerConn:
    """A worker registered with `core` the way the WorkerService registers one."""
    return core.register_worker(worker_id, device_type=kw.pop("device_type", "cpu"),
                                provider=kw.pop("provider", "CPUExecutionProvider"),
                                profile=profile or make_profile(),
                                input_endpoint=endpoint or f"{worker_id}.internal:7001",
                                avatars=avatars, active=kw.pop("active", {}), **kw)


def sent(conn: WorkerConn) -> list[WorkerCommand]:
    """What the core has put on a worker's stream so far (taken off it)."""
    out = []
    while not conn.outbox.empty():
        cmd = conn.outbox.get_nowait()
        assert cmd is not None
        out.append(cmd)
    return out


SPEECH = (ScriptSegment("Welcome to the live room, three new offers today."),)


def make_video_room(pipeline: Any, tmp_path: Path, avatar_id: str, *, drive: DriveMode = DriveMode.TEXT,
                    seconds: float = 4.0, script: tuple[ScriptSegment, ...] = SPEECH,
                    output: str = "v.mp4", **room: Any) -> Any:
    """A fast-paced room of ``seconds`` on a video avatar, 320x256@25, speaking ``script``
    then pausing, written to ``tmp_path / output``."""
    import dataclasses

    from workers.output.targets import OutputTarget
    from workers.rooms.room import Pacing, Room

    spec = dataclasses.replace(
        make_spec("v", drive=drive, quality=Quality(320, 256, 25), seconds=seconds, script=script),
        avatar_id=avatar_id)
    return Room(f"s-{avatar_id}", spec, OutputTarget.resolve(OutputKind.FILE, output, tmp_path), pipeline,
                pacing=Pacing.FAST, **room)
