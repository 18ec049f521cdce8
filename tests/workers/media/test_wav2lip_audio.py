"""Wav2Lip audio features against a slow reference written out here from Wav2Lip's formulas.

The reference uses none of the module's helpers: pre-emphasis as a loop, reflect padding by
index, a DFT from its definition, the Slaney mel scale and filters from librosa's formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from workers.media.wav2lip_audio import (
    FLOOR,
    LOOKAHEAD_SAMPLES,
    N_MELS,
    SAMPLE_RATE,
    WINDOW,
    Wav2LipAudioError,
    Wav2LipAudioStream,
    is_silent,
    mel_band_edges,
    mel_filterbank,
    mel_windows,
    melspectrogram,
    n_video_frames,
    window_level,
    window_start,
)

# --- the reference, from Wav2Lip's hparams.py / audio.py and librosa 0.7's stft and filters.mel


def _ref_hz_to_mel(f: float) -> float:
    if f < 1000.0:
        return f / (200.0 / 3.0)
    return 15.0 + math.log(f / 1000.0) / (math.log(6.4) / 27.0)


def _ref_mel_to_hz(m: float) -> float:
    if m < 15.0:
        return m * 200.0 / 3.0
    return 1000.0 * math.exp((m - 15.0) * math.log(6.4) / 27.0)


def _ref_edges() -> list[float]:
    lo, hi = _ref_hz_to_mel(55.0), _ref_hz_to_mel(7600.0)
    return [_ref_mel_to_hz(lo + (hi - lo) * i / 81) for i in range(82)]


def _ref_filterbank() -> np.ndarray:
    edges = _ref_edges()
    w = np.zeros((80, 401))
    for i in range(80):
        left, centre, right = edges[i], edges[i + 1], edges[i + 2]
        for b in range(401):
            f = b * 16000 / 800
            if left < f < centre:
                w[i, b] = (f - left) / (centre - left)
            elif centre <= f < right:
                w[i, b] = (right - f) / (right - centre)
        w[i] *= 2.0 / (right - left)  # Slaney: unit area in Hz
    return w


def _ref_melspectrogram(x: np.ndarray) -> np.ndarray:
    n = x.size
    y = np.empty(n)
    previous = 0.0
    for j in range(n):  # scipy.signal.lfilter([1, -0.97], [1], x)
        y[j] = x[j] - 0.97 * previous
        previous = x[j]
    # librosa.stft(center=True, pad_mode="reflect"): 400 mirrored samples each side, edge excluded
    padded = np.array([y[400 - k] for k in range(400)] + list(y) + [y[n - 2 - k] for k in range(400)])
    m = np.arange(800)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * m / 800)  # periodic
    k = np.arange(401)[:, None]
    cos_basis, sin_basis = np.cos(2 * np.pi * k * m / 800), np.sin(2 * np.pi * k * m / 800)
    fb = _ref_filterbank()
    out = np.empty((80, 1 + n // 200))
    for t in range(out.shape[1]):
        frame = padded[200 * t : 200 * t + 800] * hann
        magnitude = np.hypot(cos_basis @ frame, sin_basis @ frame)
        db = 20 * np.log10(np.maximum(1e-5, fb @ magnitude)) - 20
        out[:, t] = np.clip(8 * ((db + 100) / 100) - 4, -4, 4)
    return out


def _tones_and_noise(n: int, seed: int = 0) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    loudness = np.linspace(1.0, 0.001, n)  # sweeps the scale from near the top to the floor
    x = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 2500 * t) + 0.05 * rng.standard_normal(n)
    return (loudness * x).astype(np.float32)


# --- features


@pytest.mark.parametrize("n", [4800, 4937, 1000, 401])
def test_melspectrogram_matches_the_reference(n: int) -> None:
    x = _tones_and_noise(n)
    got = melspectrogram(x)
    want = _ref_melspectrogram(x.astype(np.float64))
    assert got.shape == want.shape == (N_MELS, 1 + n // 200)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    assert got.min() < -3.5 and got.max() > 1.5  # the comparison covered a wide range


def test_filterbank_is_librosas_slaney_mel() -> None:
    fb = mel_filterbank()
    assert fb.shape == (80, 401)
    np.testing.assert_allclose(fb, _ref_filterbank(), rtol=1e-9, atol=1e-12)
    assert _ref_hz_to_mel(1000.0) == 15.0 and _ref_hz_to_mel(6400.0) == pytest.approx(42.0)
    np.testing.assert_allclose(mel_band_edges(), _ref_edges(), rtol=1e-12)


def test_filterbank_triangles_lie_in_55_to_7600_hz_with_unit_area() -> None:
    fb = mel_filterbank()
    freqs = np.arange(401) * 20.0
    assert np.all(fb >= 0)
    peaks = freqs[fb.argmax(axis=1)]
    assert np.all((peaks > 55) & (peaks < 7600))
    assert np.all(np.diff(peaks) >= 0)
    assert np.all(fb[:, (freqs <= 55) | (freqs >= 7600)] == 0)
    # Area normalisation: each triangle integrates to 1 over Hz (bins are 20 Hz apart).
    # The narrow low bands are sampled coarsely, so the sum is only close to 1.
    areas = fb.sum(axis=1) * 20.0
    np.testing.assert_allclose(areas, 1.0, rtol=0.05)
    np.testing.assert_allclose(areas[40:], 1.0, rtol=0.02)
    edges = np.array(_ref_edges())
    assert np.all(fb.max(axis=1) <= 2.0 / (edges[2:] - edges[:-2]) + 1e-12)


def test_silence_is_the_floor_everywhere() -> None:
    mel = melspectrogram(np.zeros(SAMPLE_RATE, np.float32))
    assert mel.shape == (N_MELS, 81)
    assert np.all(mel == FLOOR)
    windows = mel_windows(mel, 25, 25)
    assert np.all(windows == FLOOR)
    assert np.all(window_level(windows) == 0)
    assert np.all(is_silent(windows))
    assert melspectrogram(np.zeros(0, np.float32)).shape == (N_MELS, 0)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0, 6000.0])
def test_a_loud_tone_raises_the_band_around_it(freq: float) -> None:
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    mel = melspectrogram(0.5 * np.sin(2 * np.pi * freq * t))
    profile = mel[:, 5:-5].mean(axis=1)  # away from the padded ends
    centres = np.array(_ref_edges())[1:-1]
    nearest = int(np.argmin(np.abs(centres - freq)))
    assert abs(int(np.argmax(profile)) - nearest) <= 1
    assert profile.max() > 1.0  # pre-emphasis takes 18 dB off 300 Hz
    far = np.abs(np.log2(centres / freq)) > 1.5  # more than an octave and a half away
    assert np.all(profile[far] < profile.max() - 3.0)
    assert not np.any(is_silent(mel_windows(mel, 25, 25)))


# --- windows per video frame


@pytest.mark.parametrize("fps", [25, 30])
def test_window_index_is_int_80_i_over_fps(fps: int) -> None:
    assert [window_start(i, fps) for i in range(20_000)] == [int(80 * i / fps) for i in range(20_000)]


@pytest.mark.parametrize(("fps", "last_start"), [(25, 76), (30, 77)])
def test_windows_read_their_mel_frames_and_the_floor_past_the_end(fps: int, last_start: int) -> None:
    n_mel = 81  # one second of audio
    mel = np.tile(np.arange(n_mel, dtype=np.float32), (N_MELS, 1))  # each column holds its index
    n = n_video_frames(SAMPLE_RATE, fps)
    assert n == fps
    windows = mel_windows(mel, fps, n)
    assert windows.shape == (n, 1, N_MELS, WINDOW)
    for i in range(n):
        cols = int(80 * i / fps) + np.arange(WINDOW)
        want = np.where(cols < n_mel, cols, FLOOR).astype(np.float32)
        assert np.array_equal(windows[i, 0], np.tile(want, (N_MELS, 1))), i
    assert windows[-1, 0, 0, 0] == last_start
    assert windows[-1, 0, 0, n_mel - last_start] == FLOOR  # the first mel frame past the audio


def test_video_frame_count_covers_the_audio() -> None:
    assert n_video_frames(0, 25) == 0
    assert n_video_frames(1, 25) == 1
    assert n_video_frames(SAMPLE_RATE + 1, 25) == 26
    assert n_video_frames(10 * SAMPLE_RATE, 29.97) == 300
    assert n_video_frames(3 * SAMPLE_RATE, 30) == 90


def test_model_input_shape_and_dtype() -> None:
    mel = melspectrogram(_tones_and_noise(8000).astype(np.float64))
    windows = mel_windows(mel, 25, 12)
    assert windows.shape == (12, 1, 80, 16)
    assert windows.dtype == np.float32
    assert windows.flags.c_contiguous
    assert mel_windows(mel, 25, 0).shape == (0, 1, 80, 16)
    assert window_level(windows).shape == (12, 1)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(Wav2LipAudioError):
        melspectrogram(np.zeros((2, 100), np.float32))
    with pytest.raises(Wav2LipAudioError):
        mel_windows(np.zeros((40, 10), np.float32), 25, 1)
    with pytest.raises(Wav2LipAudioError):
        mel_windows(np.zeros((80, 10), np.float32), 0, 1)
    with pytest.raises(Wav2LipAudioError):
        Wav2LipAudioStream(float("nan"))
    stream = Wav2LipAudioStream(25)
    stream.finish()
    with pytest.raises(Wav2LipAudioError):
        stream.push(np.zeros(10, np.float32))


# --- streaming


def _stream(x: np.ndarray, fps: float, chunks: list[int], n_frames: int | None = None) -> np.ndarray:
    return _stream_and_pushed(x, fps, chunks, n_frames)[0]


def _stream_and_pushed(x: np.ndarray, fps: float, chunks: list[int],
                       n_frames: int | None = None) -> tuple[np.ndarray, int]:
    """The stream's windows, and how many of them `push` returned before `finish`."""
    stream = Wav2LipAudioStream(fps)
    out, at = [], 0
    for size in chunks:
        out.append(stream.push(x[at : at + size]))
        at += size
    out.append(stream.push(x[at:]))
    pushed = stream.frames_emitted
    out.append(stream.finish(n_frames))
    return np.concatenate(out), pushed


def _batch(x: np.ndarray, fps: float, n_frames: int | None = None) -> np.ndarray:
    n = n_video_frames(x.size, fps) if n_frames is None else n_frames
    return mel_windows(melspectrogram(x), fps, n)


@pytest.mark.parametrize("n", [0, 1, 399, 400, 401, 402, 600, 3399, 3400, 3401, 16_000, 16_137])
@pytest.mark.parametrize("fps", [25, 30, 29.97])
def test_stream_equals_batch(n: int, fps: float) -> None:
    x = _tones_and_noise(n)
    rng = np.random.default_rng(n)
    chunks = [int(c) for c in rng.integers(0, 900, size=n // 300 + 1)]
    want = _batch(x, fps)
    for got in (_stream(x, fps, chunks), _stream(x, fps, []), _stream(x, fps, [320] * (n // 320))):
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 6000),
    fps=st.sampled_from([12.5, 24.0, 25.0, 30.0, 50.0, 60.0]),
    chunks=st.lists(st.integers(0, 2500), max_size=12),
    extra=st.integers(-3, 5),
)
@example(n=5800, fps=12.5, chunks=[], extra=-3)  # push returns 3 windows; a total of 2 is asked
def test_stream_equals_batch_for_any_chunking_and_frame_count(
    n: int, fps: float, chunks: list[int], extra: int
) -> None:
    x = _tones_and_noise(n, seed=n)
    n_frames = max(0, n_video_frames(n, fps) + extra)
    got, pushed = _stream_and_pushed(x, fps, chunks, n_frames)
    # Windows `push` has returned stay returned: a total below them ends the stream with
    # none more (the worker always asks for at least what it has).
    total = max(n_frames, pushed)
    assert got.shape[0] == total
    np.testing.assert_allclose(got, _batch(x, fps, total), atol=1e-6)


def test_one_sample_chunks_equal_batch() -> None:
    x = _tones_and_noise(4000)
    np.testing.assert_allclose(_stream(x, 25, [1] * 4000), _batch(x, 25), atol=1e-6)


@pytest.mark.parametrize("fps", [25, 30])
def test_stream_emits_each_frame_as_soon_as_its_audio_is_in(fps: int) -> None:
    assert LOOKAHEAD_SAMPLES == 3400  # 212.5 ms
    x = _tones_and_noise(2 * SAMPLE_RATE)
    stream = Wav2LipAudioStream(fps)
    for n in range(0, x.size, 50):
        stream.push(x[n : n + 50])
        received = n + 50
        ready = sum(1 for i in range(100) if 200 * int(80 * i / fps) + LOOKAHEAD_SAMPLES <= received)
        assert stream.frames_emitted == ready, received
    # The first window arrives 212.5 ms into the audio, not before.
    first = Wav2LipAudioStream(fps)
    assert first.push(x[: LOOKAHEAD_SAMPLES - 1]).shape[0] == 0
    assert first.push(x[LOOKAHEAD_SAMPLES - 1 : LOOKAHEAD_SAMPLES]).shape[0] == 1


def test_stream_memory_stays_bounded() -> None:
    x = _tones_and_noise(10 * SAMPLE_RATE)
    stream = Wav2LipAudioStream(25)
    for n in range(0, x.size, 320):
        stream.push(x[n : n + 320])
        assert stream._signal.size <= 800 + 320
        assert stream._mel.shape[1] <= WINDOW + 4
    assert stream.samples_received == x.size


# --- real speech


def test_speech_is_louder_than_its_pauses() -> None:
    pytest.importorskip("espeakng_loader")
    from workers.media.tts import EspeakTTS

    speech = EspeakTTS().synthesize("Hello there. This is a test of the avatar farm. Goodbye now.")
    fps = 25
    n = n_video_frames(speech.size, fps)
    levels = window_level(mel_windows(melspectrogram(speech), fps, n))[:, 0]
    # What each window hears: samples from 25 ms before its frame to 212.5 ms after.
    padded = np.concatenate([np.zeros(400), speech, np.zeros(LOOKAHEAD_SAMPLES)])
    spans = [padded[640 * i : 640 * i + 400 + LOOKAHEAD_SAMPLES] for i in range(n)]
    pauses = np.array([np.abs(s).max() < 1e-4 for s in spans])
    loud = np.array([np.sqrt(np.mean(s**2)) > 10 ** (-30 / 20) for s in spans])
    assert pauses.sum() >= 3 and loud.sum() >= 30
    assert np.all(levels[pauses] <= 0.1)
    assert np.median(levels[loud]) > 3.5
    assert levels[loud].mean() > levels[pauses].mean() + 3.0
    silent = is_silent(mel_windows(melspectrogram(speech), fps, n))[:, 0]
    # espeak-ng's output varies a little from call to call (its state carries over), and
    # a window whose loud span sits at its very edge can read quiet: allow a stray one.
    assert np.all(silent[pauses]) and silent[loud].mean() <= 0.05
