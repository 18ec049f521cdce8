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


def test_drift_policy_corrects_large_offsets_at_once_and_two_frames_when_confirmed() -> None:
    p = DriftPolicy()
    assert p.correction(est(3)) == 3
    assert p.correction(None) == 0
    assert p.correction(est(2)) == 0
    assert p.correction(est(2)) == 2  # confirmed
    assert p.correction(est(2)) == 0  # a fresh confirmation is needed after a correction
    assert p.correction(est(-4)) == -4


def test_a_steady_sub_frame_offset_is_never_corrected() -> None:
    # A room whose true offset is under a frame, as measured over two hours of checks
    # every 10 s: -1, 0 and +1 in the proportions seen (176, 350, 192 of 718).
    rng = np.random.default_rng(7)
    p = DriftPolicy()
    readings = rng.choice([-1, 0, 1], size=720, p=[176 / 718, 350 / 718, 192 / 718])
    assert sum(p.correction(est(int(r))) != 0 for r in readings) == 0


def test_a_steady_half_frame_offset_stays_put_for_hours() -> None:
    # The hardest steady case: the truth half a frame off, each check's reading rounded with
    # a check's jitter, so readings split between 0 and +1; a correction would only move the
    # offset to the other side of zero.
    rng = np.random.default_rng(11)
    p, offset, corrections = DriftPolicy(), 0.5, 0
    for _ in range(2160):  # six hours of checks every 10 s
        c = p.correction(est(int(np.rint(offset + rng.normal(0, 0.45)))))
        offset -= c
        corrections += c != 0
    # Exactly half a frame is the worst case: under one an hour (64 an hour before).
    assert corrections <= 6


def test_a_real_drift_is_corrected_once_per_frame_it_accumulates() -> None:
    # An audio clock 100 ppm fast: 0.1 ms per second, a frame (40 ms) every 400 s, checked
    # every 10 s; each check reads the true offset rounded, with a check's jitter.
    rng = np.random.default_rng(3)
    p = DriftPolicy()
    offset, worst, corrections = 0.0, 0.0, 0
    for _ in range(720):  # two hours
        offset += 10 * 0.1 / 40  # frames gained per check
        c = p.correction(est(int(np.rint(offset + rng.normal(0, 0.45)))))
        offset -= c
        corrections += c != 0
        worst = max(worst, abs(offset))
    # Kept within about a frame: whole-frame corrections decided on two minutes of checks
    # let it reach a frame and a little more before each.
    assert worst <= 1.5
    assert 16 <= corrections <= 20  # 18 frames accumulated in two hours, one correction each


def test_av_delay_shifts_audio_or_video_by_whole_frames_and_keeps_timing() -> None:
    d = AvDelay(max_wait_frames=0, fade_samples=0)  # at once, as if every frame were quiet
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


def _tone(n: int, start: int, rate: int = 16_000) -> np.ndarray:
    t = (start + np.arange(n)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _largest_step(audio: np.ndarray) -> float:
    return float(np.max(np.abs(np.diff(audio))))


def test_a_correction_waits_for_a_pause_and_leaves_no_step_in_the_audio() -> None:
    d = AvDelay()
    chunks = [_tone(640, 640 * i) for i in range(10)] + [np.zeros(640, np.float32)] * 3 + \
        [_tone(640, 640 * i) for i in range(13, 20)]
    out = []
    for i, c in enumerate(chunks):
        if i == 4:
            d.correct(1)  # mid-speech: held until the pause
        _, a = d.process(i, c)
        out.append(a)
        if i < 10:
            assert d.net_frames == 0 and d.pending_frames == 1 - (i < 4)
    assert d.net_frames == 1 and d.pending_frames == 0
    # The silence inserted inside the pause adds no step the input did not have.
    assert _largest_step(np.concatenate(out)) <= _largest_step(np.concatenate(chunks)) + 1e-6
    # Applied mid-speech instead, the audio would have stopped dead for a frame.
    assert _largest_step(np.concatenate(out[:10])) <= _largest_step(_tone(6400, 0)) + 1e-6


def test_without_a_pause_a_correction_is_crossfaded_after_a_while() -> None:
    d = AvDelay(max_wait_frames=5)
    out = []
    for i in range(20):
        if i == 2:
            d.correct(-1)  # skip a frame of audio: never a pause in this tone
        _, a = d.process(i, _tone(640, 640 * i))
        out.append(a)
    assert d.net_frames == -1  # applied, by holding the video back a frame
    joined = np.concatenate(out)
    # Without the fade, skipping nothing but holding video back leaves the audio continuous;
    # an audio-side change would step by up to the tone's amplitude. Either way: no click.
    assert _largest_step(joined) <= 2 * _largest_step(_tone(640 * 20, 0))


def test_a_forced_audio_skip_is_faded_in() -> None:
    d = AvDelay(max_wait_frames=3)
    d.audio_frames = 2  # audio held back two frames already
    out = []
    for i in range(16):
        if i == 6:
            d.correct(-1)  # hold the audio back one frame less: skip 40 ms of a 220 Hz tone
        _, a = d.process(i, _tone(640, 640 * i))
        out.append(a)
    assert d.net_frames == 1
    joined = np.concatenate(out[3:])  # past the delay line filling with silence
    hard = np.concatenate([_tone(640, 640 * 3)[-1:], _tone(640, 640 * 5)[:1]])  # the cut unfaded
    assert _largest_step(joined) < 0.5 * max(abs(float(hard[1] - hard[0])), 0.05)
