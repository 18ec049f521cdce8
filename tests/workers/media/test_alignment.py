"""Alignment pieces on their own: the lip-sync model's offset estimate, the drift
policy, and the A/V delay that corrects without changing the stream's timing."""

from __future__ import annotations

import numpy as np
import pytest

from workers.device.pipeline import Pipeline
from workers.media.alignment import AvDelay, DriftPolicy, MouthCrop, SyncEstimate, estimate


def synthetic_window(pipeline: Pipeline, lag: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Speech-like energy bursts, and mouth crops that darken with it `lag` frames later."""
    assert pipeline.sync_shape is not None
    t, (h, w) = pipeline.sync_shape.window, pipeline.sync_shape.crop
    rng = np.random.default_rng(seed)
    energy = np.repeat(rng.uniform(-4.5, -0.5, t // 4 + 1), 4)[:t]
    audio = np.repeat(energy[:, None], 80, axis=1).astype(np.float32)
    opening = np.concatenate([np.full(lag, energy[0]), energy])[:t] if lag >= 0 else \
        np.concatenate([energy[-lag:], np.full(-lag, energy[-1])])
    shade = 0.7 - 0.08 * (opening + 4.5)
    mouth = np.broadcast_to(shade[:, None, None, None], (t, 3, h, w)).astype(np.float32)
    return audio, mouth


@pytest.mark.parametrize("lag", [-3, 0, 2, 5])
def test_the_lipsync_model_finds_the_offset(pipeline: Pipeline, lag: int) -> None:
    scores = pipeline.sync_scores_sync(*synthetic_window(pipeline, lag)).value
    est = estimate(scores)
    assert est is not None and est.offset_frames == lag


def test_silence_and_a_still_face_are_not_conclusive(pipeline: Pipeline) -> None:
    assert pipeline.sync_shape is not None
    t, (h, w) = pipeline.sync_shape.window, pipeline.sync_shape.crop
    scores = pipeline.sync_scores_sync(np.full((t, 80), -5.0, np.float32),
                                       np.full((t, 3, h, w), 0.6, np.float32)).value
    assert estimate(scores) is None


def test_mouth_crop_has_a_fixed_size_at_any_side() -> None:
    crop = MouthCrop(16, 24)
    for side in (192, 256, 720):
        assert crop(np.zeros((3, side, side), np.float32)).shape == (3, 16, 24)


def est(offset: int) -> SyncEstimate:
    return SyncEstimate(offset, 0.9, 0.5)


def test_drift_policy_corrects_large_offsets_at_once_and_one_frame_only_when_confirmed() -> None:
    p = DriftPolicy()
    assert p.correction(est(3)) == 3
    assert p.correction(est(1)) == 0
    assert p.correction(None) == 0
    assert p.correction(est(-1)) == 0  # jitter: the sign changed
    assert p.correction(est(-1)) == -1  # confirmed
    assert p.correction(est(-1)) == 0  # a fresh confirmation is needed after a correction


def test_av_delay_shifts_audio_or_video_by_whole_frames_and_keeps_timing() -> None:
    d = AvDelay()
    out = []
    for n in range(10):
        if n == 3:
            d.correct(2)  # video lags: hold the audio back two frames
        if n == 7:
            d.correct(-3)  # overshoot: net one frame the other way: hold the video back
        frame, audio = d.process(np.array(n), np.full(4, float(n)))
        assert audio.shape == (4,)
        out.append((int(frame), float(audio[0])))
    assert out[:3] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert out[3:5] == [(3, 0.0), (4, 0.0)]  # silence while the audio delay fills
    assert out[5:7] == [(5, 3.0), (6, 4.0)]  # audio two frames behind
    assert out[7:] == [(6, 7.0), (7, 8.0), (8, 9.0)]  # video one frame behind, audio current
    assert (d.audio_frames, d.video_frames, d.net_frames) == (0, 1, -1)
