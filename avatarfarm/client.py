"""Client helpers for the tenant API and the workers' live inputs (used by the
demo, the tests and the load tests; a tenant's own code does the same)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import grpc
import numpy as np

from avatarfarm.v1 import live_input_pb2, live_input_pb2_grpc, sessions_pb2, sessions_pb2_grpc, types_pb2

TERMINAL = (types_pb2.SESSION_STATE_ENDED, types_pb2.SESSION_STATE_FAILED)


def load_script(path: Path) -> list[types_pb2.ScriptSegment]:
    """Reads a script file: one segment per line, ``text | pause seconds``, '#' comments."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        text, _, pause = line.partition("|")
        out.append(types_pb2.ScriptSegment(text=text.strip(),
                                           pause_after_seconds=float(pause or 0)))
    return out


def spec(tenant: str, room_id: str, *, drive: int = types_pb2.DRIVE_MODE_TEXT,
         tier: int = types_pb2.TIER_STANDARD, width: int = 512, height: int = 512, fps: int = 25,
         file_path: str = "", hls_dir: str = "", rtmp_url: str = "", seconds: float = 0.0,
         avatar: str = "presenter", script: Iterable[types_pb2.ScriptSegment] = ()) -> types_pb2.SessionSpec:
    out = types_pb2.Output()
    if file_path:
        out.file_path = file_path
    elif hls_dir:
        out.hls_dir = hls_dir
    elif rtmp_url:
        out.rtmp_url = rtmp_url
    return types_pb2.SessionSpec(tenant=tenant, room_id=room_id, avatar_id=avatar, drive_mode=drive,  # type: ignore[arg-type]
                                 quality=types_pb2.Quality(width=width, height=height, fps=fps),
                                 tier=tier, output=out, max_duration_seconds=seconds, script=script)  # type: ignore[arg-type]


async def wait_for(stub: sessions_pb2_grpc.SessionServiceStub, session_id: str,
                   done: Callable[[types_pb2.Session], bool], timeout: float) -> types_pb2.Session:
    """Follows WatchSession until ``done`` holds for the session (or the timeout passes)."""
    async def follow() -> types_pb2.Session:
        last = None
        call = stub.WatchSession(sessions_pb2.WatchSessionRequest(session_id=session_id))
        try:
            async for ev in call:
                last = ev.session
                if done(last):
                    return last
        finally:
            call.cancel()  # an abandoned stream would outlive this loop
        assert last is not None
        if not done(last):
            raise AssertionError(f"session {session_id} ended without the awaited state: {last}")
        return last

    return await asyncio.wait_for(follow(), timeout)


async def push_audio(endpoint: str, session_id: str, samples: np.ndarray, sample_rate: int,
                     chunk_seconds: float = 0.1, realtime: bool = False) -> live_input_pb2.PushSummary:
    """Streams float32 mono audio as 16-bit PCM chunks to the room's worker."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    step = max(1, int(sample_rate * chunk_seconds))

    async def chunks() -> AsyncIterator[live_input_pb2.AudioChunk]:
        t0 = time.monotonic()
        for i, start in enumerate(range(0, pcm.size, step)):
            if realtime:
                await asyncio.sleep(max(0.0, t0 + i * chunk_seconds - time.monotonic()))
            yield live_input_pb2.AudioChunk(session_id=session_id, sample_rate=sample_rate,
                                            pcm_s16le=pcm[start:start + step].tobytes())

    async with grpc.aio.insecure_channel(endpoint) as ch:
        return await live_input_pb2_grpc.LiveInputServiceStub(ch).PushAudio(chunks())


async def push_motion(endpoint: str, session_id: str, frames: np.ndarray, fps: int,
                      realtime: bool = False) -> live_input_pb2.PushSummary:
    """Streams motion frames ([n, 8] coefficients) to the room's worker."""
    async def gen() -> AsyncIterator[live_input_pb2.MotionFrame]:
        t0 = time.monotonic()
        for i, f in enumerate(frames):
            if realtime:
                await asyncio.sleep(max(0.0, t0 + i / fps - time.monotonic()))
            yield live_input_pb2.MotionFrame(session_id=session_id, coefficients=[float(x) for x in f])

    async with grpc.aio.insecure_channel(endpoint) as ch:
        return await live_input_pb2_grpc.LiveInputServiceStub(ch).PushMotion(gen())


def performer_motion(seconds: float, fps: int, seed: int = 3) -> np.ndarray:
    """A synthetic motion-capture take: talking jaw, blinks, head turns ([n, 8])."""
    rng = np.random.default_rng(seed)
    n = int(seconds * fps)
    t = np.arange(n) / fps
    out = np.zeros((n, 8), np.float32)
    syllables = np.clip(np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6)), 0, None)
    phrases = (np.sin(2 * np.pi * 0.2 * t) > -0.3).astype(np.float32)
    out[:, 0] = 0.8 * syllables * phrases
    out[:, 1] = 0.3 * np.clip(np.sin(2 * np.pi * 1.1 * t), 0, None) * phrases
    blink_at = np.cumsum(rng.uniform(2.0, 5.0, size=int(seconds / 2) + 2))
    for b in blink_at:
        out[:, 3] = np.maximum(out[:, 3], np.clip(1 - np.abs(t - b) / 0.08, 0, 1))
    out[:, 5] = 0.5 * np.sin(2 * np.pi * 0.13 * t)
    out[:, 6] = 0.2 * np.sin(2 * np.pi * 0.31 * t)
    out[:, 7] = 0.2 * np.sin(2 * np.pi * 0.07 * t)
    return out
