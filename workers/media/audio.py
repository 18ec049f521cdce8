"""Audio features shared by the pipeline and the reference models.

Everything inside a worker runs at SAMPLE_RATE mono float32. Log-mel
spectrograms (80 bands, 10 ms hop) are what audio-to-motion models consume,
as in Wav2Lip-style lip-sync networks.
"""

from __future__ import annotations

import functools

import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 512
WIN_LENGTH = 400  # 25 ms
HOP = 160  # 10 ms -> 100 mel frames per second
N_MELS = 80
MEL_WINDOW = 16  # mel frames per model input: 160 ms of context
LOG_FLOOR = -5.0  # log10 of the quietest power we distinguish (silence)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@functools.cache
def mel_filterbank(fmin: float = 55.0, fmax: float = 7600.0) -> np.ndarray:
    """Triangular mel filters, shape (N_MELS, N_FFT // 2 + 1)."""
    bins = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_pts = np.linspace(_hz_to_mel(np.array(fmin)), _hz_to_mel(np.array(fmax)), N_MELS + 2)
    hz = _mel_to_hz(mel_pts)
    fb = np.zeros((N_MELS, bins.size), dtype=np.float32)
    for i in range(N_MELS):
        lo, mid, hi = hz[i], hz[i + 1], hz[i + 2]
        up = (bins - lo) / max(mid - lo, 1e-6)
        down = (hi - bins) / max(hi - mid, 1e-6)
        fb[i] = np.clip(np.minimum(up, down), 0.0, None)
    fb /= np.maximum(fb.sum(axis=1, keepdims=True), 1e-6)
    return fb


@functools.cache
def _window() -> np.ndarray:
    w = np.zeros(N_FFT, dtype=np.float32)
    w[:WIN_LENGTH] = np.hanning(WIN_LENGTH)
    return w


_OFFSETS = np.arange(WIN_LENGTH)[None, :]


def log_mel(samples: np.ndarray) -> np.ndarray:
    """Log-mel frames of float32 audio, shape (N_MELS, n_frames), one frame per HOP."""
    x = np.asarray(samples, dtype=np.float32)
    n = max(0, (x.size - WIN_LENGTH) // HOP + 1)
    return log_mel_at(x, HOP * np.arange(n))


def log_mel_at(samples: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The log-mel frames of float32 audio that start at the given sample offsets (each
    WIN_LENGTH samples, inside the audio), shape (N_MELS, len(starts))."""
    if len(starts) == 0:
        return np.full((N_MELS, 0), LOG_FLOOR, dtype=np.float32)
    # Each frame reads WIN_LENGTH samples; the window is zero over the rest of N_FFT.
    frames = samples[np.asarray(starts)[:, None] + _OFFSETS]
    power = np.abs(np.fft.rfft(frames * _window()[:WIN_LENGTH], n=N_FFT, axis=1)) ** 2
    mel = mel_filterbank() @ power.T.astype(np.float32)
    return np.maximum(np.log10(np.maximum(mel, 1e-12)), LOG_FLOOR).astype(np.float32)


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def resample(x: np.ndarray, src_rate: int, dst_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Linear-interpolation resampling; enough for speech features and monitoring."""
    if src_rate == dst_rate or x.size == 0:
        return x.astype(np.float32)
    n_out = round(x.size * dst_rate / src_rate)
    t_out = np.arange(n_out) * (src_rate / dst_rate)
    return np.interp(t_out, np.arange(x.size), x).astype(np.float32)


class MelStream:
    """Keeps a rolling audio history and yields the model's mel window per frame.

    The window ends at the current frame's end (causal), so live audio needs no
    look-ahead; the resulting ~80 ms lip lag is constant and small next to the
    frame period. Where a frame's audio is a whole number of hops (640 samples at
    25 fps) the window slides: only the new mel frames are computed, a quarter of
    it; otherwise the grid moves and all are. Each call returns a new array (the
    device may still hold the last one).
    """

    KEEP = WIN_LENGTH + HOP * (MEL_WINDOW - 1)

    def __init__(self) -> None:
        self._history = np.zeros(self.KEEP, dtype=np.float32)
        self._window: np.ndarray | None = None  # the last window returned

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """Adds a frame's audio; returns the (N_MELS, MEL_WINDOW) window ending now."""
        n, h = chunk.size, self._history
        if n >= self.KEEP:
            h[:] = chunk[-self.KEEP:]
        elif n:
            h[:-n] = h[n:]
            h[-n:] = chunk
        old = self._window
        slide = n // HOP if n % HOP == 0 else MEL_WINDOW
        if old is None or slide >= MEL_WINDOW:
            self._window = log_mel_at(h, HOP * np.arange(MEL_WINDOW))
        elif slide:
            fresh = log_mel_at(h, HOP * np.arange(MEL_WINDOW - slide, MEL_WINDOW))
            self._window = np.concatenate([old[:, slide:], fresh], axis=1)
        else:
            self._window = old.copy()
        return self._window
