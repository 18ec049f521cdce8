"""Whisper's audio input: the log-mel of 30 s that Whisper encoders (MuseTalk's audio
model is Whisper-tiny's encoder) take, reproduced with numpy alone.

Whisper's feature extractor: 16 kHz, a centred STFT (n_fft 400, a periodic Hann window,
hop 160, reflect padding), power, Slaney mel filters (80 bands, 0-8 kHz), log10 with a
floor of 1e-10, everything below the loudest value minus 8 raised to it, then
``(x + 4) / 4``; audio shorter than 30 s is padded with zeros to 3000 frames.

`log_mel_30s` computes the mel only where there is audio (the padding's frames are the
floor) so a stream's short windows cost what they hold, not 30 s each.
"""

from __future__ import annotations

import functools

import numpy as np

from workers.media.wav2lip_audio import mel_filterbank

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
N_MELS = 80
FRAMES = 3000  # 30 s
LOG_FLOOR = -10.0  # log10(1e-10): the zero padding


@functools.cache
def _hann() -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def log_mel_30s(audio: np.ndarray) -> np.ndarray:
    """[N_MELS, FRAMES] float32 input features of up to 30 s of 16 kHz mono audio."""
    x = np.asarray(audio, np.float32)[: FRAMES * HOP]
    # The audio, the zeros after it (up to a frame's reach), reflect-padded at the start
    # as the centred STFT pads the whole 30 s.
    n = min(FRAMES, x.size // HOP + 3)
    padded = np.concatenate([x[1:N_FFT // 2 + 1][::-1] if x.size > N_FFT // 2 else
                             np.zeros(N_FFT // 2, np.float32), x,
                             np.zeros(N_FFT + HOP, np.float32)])
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n)[:, None]
    spec = np.fft.rfft(padded[idx] * _hann(), axis=1)
    power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
    mel = mel_filterbank(N_FFT, N_MELS, 0.0, SAMPLE_RATE / 2) @ power.T  # [80, n]
    out = np.full((N_MELS, FRAMES), LOG_FLOOR, np.float32)
    out[:, :n] = np.log10(np.maximum(mel, 1e-10))
    out = np.maximum(out, out.max() - 8.0)
    return (out + 4.0) / 4.0
