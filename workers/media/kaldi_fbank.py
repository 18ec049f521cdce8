"""Kaldi's filter-bank features, as WeNet encoders take them (Ultralight's wenet audio
model among them), reproduced with numpy alone.

What WeNet's front end computes (Kaldi's `compute-fbank-feats` defaults, as
``torchaudio.compliance.kaldi.fbank`` gives them with ``num_mel_bins=80, dither=0,
energy_floor=0``): 16 kHz audio at int16 scale, frames of 400 samples (25 ms) every
160 (10 ms) with no padding at the edges, each frame's DC offset removed, pre-emphasis
0.97 (the first sample against itself), the Povey window (a symmetric Hann window to
the power 0.85), zero-padded to 512, power spectrum, 80 triangular filters evenly spaced
on Kaldi's mel scale (``1127 ln(1 + f / 700)``) from 20 Hz to 8 kHz over the 256 bins
below Nyquist, natural log floored at float32's epsilon.
"""

from __future__ import annotations

import functools

import numpy as np

SAMPLE_RATE = 16_000
FRAME = 400  # samples: 25 ms
SHIFT = 160  # samples: 10 ms
N_FFT = 512
N_MELS = 80
LOW_HZ = 20.0
PREEMPHASIS = 0.97
INT16_SCALE = 32768.0
EPS = float(np.finfo(np.float32).eps)


def _mel(hz: np.ndarray | float) -> np.ndarray:
    return np.asarray(1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0))


@functools.cache
def mel_banks() -> np.ndarray:
    """[N_MELS, N_FFT // 2 + 1] Kaldi's triangular filters (weights in the mel domain;
    the Nyquist bin carries none), read-only."""
    lo, hi = _mel(LOW_HZ), _mel(SAMPLE_RATE / 2)
    delta = (hi - lo) / (N_MELS + 1)
    left = lo + delta * np.arange(N_MELS)[:, None]
    centre, right = left + delta, left + 2 * delta
    mel = _mel(np.arange(N_FFT // 2) * SAMPLE_RATE / N_FFT)[None, :]
    up, down = (mel - left) / (centre - left), (right - mel) / (right - centre)
    banks = np.zeros((N_MELS, N_FFT // 2 + 1))
    banks[:, :-1] = np.maximum(0.0, np.minimum(up, down))
    banks.setflags(write=False)
    return banks


@functools.cache
def _povey() -> np.ndarray:
    w = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(FRAME) / (FRAME - 1))) ** 0.85
    w.setflags(write=False)
    return w


def frames_in(samples: int) -> int:
    """How many frames ``samples`` samples give (Kaldi's ``snip_edges``)."""
    return 0 if samples < FRAME else 1 + (samples - FRAME) // SHIFT


def fbank(audio: np.ndarray) -> np.ndarray:
    """[frames_in(N), 80] float32 log filter-bank energies of N samples of 16 kHz mono
    audio in [-1, 1] (scaled to int16's range first, as WeNet reads wave files)."""
    x = np.asarray(audio, np.float64) * INT16_SCALE
    n = frames_in(x.size)
    if n == 0:
        return np.zeros((0, N_MELS), np.float32)
    idx = np.arange(FRAME)[None, :] + SHIFT * np.arange(n)[:, None]
    frames = x[idx]
    frames -= frames.mean(axis=1, keepdims=True)
    shifted = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - PREEMPHASIS * shifted) * _povey()
    power = np.abs(np.fft.rfft(frames, N_FFT)) ** 2
    return np.log(np.maximum(power @ mel_banks().T, EPS)).astype(np.float32)
