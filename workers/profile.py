"""Latency profiles: what each stage costs on this worker, measured at start-up.

The scheduler places rooms by these figures, so a worker on a bigger device
carries more rooms without anyone configuring a slot count.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from avatarfarm.domain import Stage
from workers.audio import MEL_WINDOW, N_MELS, SAMPLE_RATE
from workers.models.folder import DEFAULT_AVATAR
from workers.motion import MOTION_DIM
from workers.pipeline import Pipeline, to_canvas

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    stage: Stage
    model: str
    width: int
    height: int
    latencies: tuple[tuple[int, float], ...]  # (batch size, seconds per call)


def _timed(call: Callable[[], object], iterations: int) -> float:
    call()  # warm-up: first calls allocate and tune
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def measure(pipeline: Pipeline, render_sides: list[int], encode_sizes: list[tuple[int, int]],
            iterations: int = 5, encoder_preset: str = "veryfast",
            avatar_id: str | None = None) -> list[LatencyProfile]:
    avatar_id = avatar_id or (pipeline.folder.avatar_ids() or [DEFAULT_AVATAR])[0]
    rng = np.random.default_rng(0)
    out: list[LatencyProfile] = []
    mel = rng.uniform(-4, 0, (N_MELS, MEL_WINDOW)).astype(np.float32)
    a2m = _timed(lambda: pipeline.audio_to_motion_sync(mel), iterations)
    out.append(LatencyProfile(Stage.AUDIO_TO_MOTION, pipeline.audio_to_motion_model.name, 0, 0,
                              ((1, a2m),)))
    text = "Welcome to the live room, today we have three new offers for you."
    speech = pipeline.synthesize_sync(text)
    tts = _timed(lambda: pipeline.synthesize_sync(text), max(1, iterations // 2))
    out.append(LatencyProfile(Stage.TTS, "espeak-ng", 0, 0,
                              ((1, tts / max(speech.value.size / SAMPLE_RATE, 1e-3)),)))
    sample_frame: np.ndarray | None = None
    for side in render_sides:
        avatar = pipeline.avatar_tensor_sync(avatar_id, side)
        motion = rng.uniform(-0.3, 0.6, MOTION_DIM).astype(np.float32)
        seconds = _timed(functools.partial(pipeline.render_sync, avatar, motion), iterations)
        out.append(LatencyProfile(Stage.RENDER, pipeline.renderer_model.name, side, side,
                                  ((1, seconds),)))
        sample_frame = pipeline.render_sync(avatar, motion).value
    for w, h in encode_sizes:
        frame = to_canvas(sample_frame, w, h) if sample_frame is not None else \
            np.zeros((h, w, 3), np.uint8)
        seconds = _encode_seconds(frame, encoder_preset, iterations * 4)
        out.append(LatencyProfile(Stage.ENCODE, "libx264", w, h, ((1, seconds),)))
    for p in out:
        log.info("profile %s %s %dx%d: %.2f ms", p.stage.value, p.model, p.width, p.height,
                 p.latencies[0][1] * 1000)
    return out


def _encode_seconds(rgb: np.ndarray, preset: str, frames: int) -> float:
    h, w = rgb.shape[:2]
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = w, h, "yuv420p"
    ctx.time_base = Fraction(1, 25)
    ctx.options = {"preset": preset, "tune": "zerolatency"}
    noise = np.random.default_rng(1)
    t0 = time.perf_counter()
    for i in range(frames):
        # Small changes per frame so the encoder does real work, as with a talking head.
        img = rgb.copy()
        img[h // 2: h // 2 + 16, :] = noise.integers(0, 255, (min(16, h - h // 2), w, 3), np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        ctx.encode(frame)
    ctx.encode(None)
    return (time.perf_counter() - t0) / frames
