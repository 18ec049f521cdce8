"""Latency profiles: what each stage costs on this worker, measured at start-up.

Every model is timed at batch sizes 1..max for each shape it serves; the
curves feed the batcher's deadline planning and go to the scheduler, which
places rooms by the capacity they imply (frames per second at the best batch
size within the latency bound), so a worker on a bigger device carries more
rooms without anyone configuring a slot count.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatarfarm.domain import HOST_TTS, OutputKind, Stage
from avatarfarm.latency import LatencyCurve
from workers.device.pipeline import AUDIO_TO_MOTION_KEY, LIPSYNC_KEY, VOICE_SAMPLE, Pipeline, to_canvas
from workers.device.timing import batch_sizes, measure_curve, median_seconds, run_batch_of
from workers.media.audio import MEL_WINDOW, N_MELS, SAMPLE_RATE
from workers.media.motion import MOTION_DIM
from workers.models.folder import DEFAULT_AVATAR
from workers.output.encode import EncoderSettings, OutputTarget, StreamEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    stage: Stage
    model: str
    width: int
    height: int
    latencies: tuple[tuple[int, float], ...]  # (batch size, seconds per call)

    def capacity(self, latency_bound: float = math.inf) -> float:
        """Items per second at the best batch size whose call fits within the bound."""
        return LatencyCurve(self.latencies).throughput(latency_bound)[1]


def measure(pipeline: Pipeline, render_sides: list[int], encode_sizes: list[tuple[int, int]],
            iterations: int = 5, encoder: EncoderSettings = EncoderSettings(), max_batch: int = 8,
            avatar_id: str | None = None) -> list[LatencyProfile]:
    """Measures every model at batch sizes 1..max_batch (and the encoder per frame size),
    serves the curves to the pipeline's batcher and returns them for the scheduler."""
    avatar_id = avatar_id or (pipeline.folder.portrait_ids() or [DEFAULT_AVATAR])[0]
    sizes = batch_sizes(max_batch)
    rng = np.random.default_rng(0)
    out: list[LatencyProfile] = []

    mel = rng.uniform(-4, 0, (N_MELS, MEL_WINDOW)).astype(np.float32)
    a2m = measure_curve(functools.partial(run_batch_of, pipeline.audio_to_motion_model, {"mel": mel}),
                        sizes, iterations)
    pipeline.serve(AUDIO_TO_MOTION_KEY, a2m)
    out.append(LatencyProfile(Stage.AUDIO_TO_MOTION, pipeline.audio_to_motion_model.name, 0, 0,
                              a2m.points))
    if pipeline.lipsync_model is not None and pipeline.sync_shape is not None:
        sh = pipeline.sync_shape
        feeds = {"audio": rng.uniform(-4, 0, (sh.window, N_MELS)).astype(np.float32),
                 "mouth": rng.uniform(0, 1, (sh.window, 3, *sh.crop)).astype(np.float32)}
        sync = measure_curve(functools.partial(run_batch_of, pipeline.lipsync_model, feeds), sizes,
                             iterations)
        pipeline.serve(LIPSYNC_KEY, sync)
        out.append(LatencyProfile(Stage.ALIGNMENT, pipeline.lipsync_model.name, 0, 0, sync.points))
    for runtime in pipeline.families.values():  # the face families' models, each timed
        for served in runtime.served():
            pipeline.engine.serve(served.key, served.model, measure_curve(
                functools.partial(run_batch_of, served.model, served.model.example_item()), sizes,
                iterations))
    for key in pipeline.face_keys():  # the folder's face models (avatars' own report as they load)
        face_profile = pipeline.face_profile(key)
        if face_profile is not None:
            out.append(LatencyProfile(Stage.FACE, face_profile[0], key.side, key.side, face_profile[1]))
    speech = pipeline.synthesize_sync(VOICE_SAMPLE)
    tts = median_seconds(lambda: pipeline.synthesize_sync(VOICE_SAMPLE), max(1, iterations // 2))
    out.append(LatencyProfile(Stage.TTS, HOST_TTS, 0, 0,
                              ((1, tts / max(speech.value.size / SAMPLE_RATE, 1e-3)),)))
    for name in pipeline.voices:
        # Device seconds per second of speech at the batch sizes rooms' sentences share (a
        # batch of long items is dear: up to 4 are timed).
        points = pipeline.measure_voice(name, batch_sizes(min(max_batch, 4)), max(1, iterations // 2))
        out.append(LatencyProfile(Stage.TTS, name, 0, 0, points))
    sample_frame: np.ndarray | None = None
    for side in render_sides:
        avatar = pipeline.avatar_tensor_sync(avatar_id, side)
        curve = measure_curve(functools.partial(pipeline.render_batch_sync, avatar), sizes,
                              iterations)
        pipeline.serve(pipeline.render_key(side), curve)
        out.append(LatencyProfile(Stage.RENDER, pipeline.renderer_model.name, side, side,
                                  curve.points))
        motion = rng.uniform(-0.3, 0.6, MOTION_DIM).astype(np.float32)
        sample_frame = pipeline.render_sync(avatar, motion).value
    codec = encoder.video_codec()
    for w, h in encode_sizes:
        # As a room of this size draws it: the portrait at min(width, height), centred.
        frame = to_canvas(sample_frame, w, h, min(w, h)) if sample_frame is not None else \
            np.zeros((h, w, 3), np.uint8)
        seconds = encode_seconds(frame, speech.value, encoder, iterations * 4)
        out.append(LatencyProfile(Stage.ENCODE, codec, w, h, ((1, seconds),)))
    for p in out:
        b, rate = LatencyCurve(p.latencies).throughput()
        log.info("profile %s %s %dx%d: %.2f ms at batch 1, best %.0f/s at batch %d",
                 p.stage.value, p.model, p.width, p.height, p.latencies[0][1] * 1000, rate, b)
    return out


def encode_seconds(rgb: np.ndarray, speech: np.ndarray, settings: EncoderSettings, frames: int,
                   fps: int = 25) -> float:
    """CPU seconds per frame (this thread's) of a room's own encoder, writing a file: colour
    conversion, video, the frame's share of ``speech`` (audio at SAMPLE_RATE, looped)
    resampled and in AAC, and muxing. On a GPU without NVENC this is the host's second
    capacity limit. The audio counts: AAC on speech costs as much as x264 on a small face."""
    h, w = rgb.shape[:2]
    step = SAMPLE_RATE // fps
    speech = np.resize(speech.astype(np.float32), max(speech.size, step))  # looped to >= a frame
    noise = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        enc = StreamEncoder(OutputTarget(OutputKind.FILE, str(Path(tmp) / "profile.mp4")), w, h, fps,
                            settings)
        enc.open()
        try:
            t0 = time.thread_time()
            for i in range(frames):
                # Small changes per frame so the encoder does real work, as with a talking head.
                img = rgb.copy()
                img[h // 2: h // 2 + 16, :] = noise.integers(0, 255, (min(16, h - h // 2), w, 3),
                                                             np.uint8)
                at = i * step % (speech.size - step + 1)
                enc.encode(img, speech[at: at + step])
            return (time.thread_time() - t0) / frames
        finally:
            enc.close()
