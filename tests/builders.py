"""Builders for test values, so each test states only what it is about."""

from __future__ import annotations

from avatarfarm.domain import (
    DriveMode,
    Output,
    OutputKind,
    Quality,
    ScriptSegment,
    SessionSpec,
    Stage,
    Tier,
)
from scheduler.placement import PendingRoom, StageCost, WorkerProfile, WorkerView


def make_spec(room_id: str = "room-1", *, tenant: str = "vendor", drive: DriveMode = DriveMode.TEXT,
              tier: Tier = Tier.STANDARD, quality: Quality = Quality(512, 512, 25),
              output: Output | None = None, seconds: float = 2.0,
              script: tuple[ScriptSegment, ...] = ()) -> SessionSpec:
    return SessionSpec(tenant, room_id, "presenter", drive, quality, tier,
                       output or Output(OutputKind.FILE, f"{room_id}.mp4"), seconds, script)


def make_profile(render_512: float = 0.010, encode_512: float = 0.002, a2m: float = 0.0005,
                 tts: float = 0.005) -> WorkerProfile:
    """A worker profile measured at 512x512 (render and encode), per call seconds."""
    return WorkerProfile((
        StageCost(Stage.RENDER, 512, 512, render_512),
        StageCost(Stage.ENCODE, 512, 512, encode_512),
        StageCost(Stage.AUDIO_TO_MOTION, 0, 0, a2m),
        StageCost(Stage.TTS, 0, 0, tts),
    ))


def make_worker(worker_id: str = "w1", *, capacity: float = 1.0, load: float = 0.0,
                profile: WorkerProfile | None = None) -> WorkerView:
    return WorkerView(worker_id, profile or make_profile(), capacity, load)


def make_room(session_id: str = "s1", *, seq: int = 1, tier: Tier = Tier.STANDARD,
              drive: DriveMode = DriveMode.TEXT, quality: Quality = Quality(512, 512, 25)) -> PendingRoom:
    return PendingRoom(session_id, quality, drive, tier, seq)
