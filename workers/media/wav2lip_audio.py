"""Wav2Lip's audio input: the normalised mel windows that Wav2Lip-family lip-sync models take.

Every Wav2Lip export (wav2lip_96, wav2lip_gan_96, wav2lip_256, LiveTalking's wav2lip256) was
trained on the features of Wav2Lip's ``audio.py`` with its ``hparams.py``, so they are
reproduced here with numpy alone (no librosa): pre-emphasis, a centred STFT, librosa's Slaney
mel filterbank, dB and symmetric scaling to [-4, 4], then one [80, 16] window per video frame.
The reference motion models keep their own, different features in ``workers/media/audio.py``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

# Wav2Lip's hparams. The rate is the model's, not the pipeline's: other rates must be resampled.
SAMPLE_RATE = 16_000
N_FFT = 800
WIN = 800  # a periodic Hann window as long as the FFT
HOP = 200  # 12.5 ms
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS_VALUE = 4.0
WINDOW = 16  # mel frames per model input: 200 ms of audio
MEL_FPS = SAMPLE_RATE // HOP  # 80 mel frames per second

FLOOR = -MAX_ABS_VALUE
"""The normalised value of silence (any mel amplitude below -80 dB maps to it)."""

LOOKAHEAD_SAMPLES = (WINDOW - 1) * HOP + N_FFT // 2
"""Audio a video frame's window needs after the frame's own time: 3400 samples, 212.5 ms."""

SILENCE_THRESHOLD = 1.0
"""Default for :func:`is_silent`: a :func:`window_level` in normalised units (one is 12.5 dB).

Measured levels: digital silence 0; white noise at -80 dBFS 0.4, at -70 dBFS 1.2, at -60 dBFS
2.0; a 1 kHz tone at -60 dBFS 2.2; espeak-ng speech 4 to 5.5, falling through 1 to 3 at the
edges of words.
"""

_PAD = N_FFT // 2  # librosa's stft(center=True) pads this much on each side
_MIN_AMPLITUDE = 10.0 ** (MIN_LEVEL_DB / 20.0)  # 1e-5


class Wav2LipAudioError(ValueError):
    """Audio or mel of the wrong shape, or an impossible frame rate or frame count."""


# --- the mel filterbank: librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600),
# htk=False and norm="slaney" (librosa 0.7's norm=1), which is what Wav2Lip built.

_SLANEY_F_SP = 200.0 / 3.0  # Hz per mel below 1 kHz, where the scale is linear
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP  # 15
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _SLANEY_F_SP
    log = _SLANEY_MIN_LOG_MEL + np.log(np.maximum(hz, _SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP
    return np.where(hz >= _SLANEY_MIN_LOG_HZ, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = _SLANEY_F_SP * mel
    log = _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOGSTEP * (np.maximum(mel, _SLANEY_MIN_LOG_MEL) - _SLANEY_MIN_LOG_MEL))
    return np.where(mel >= _SLANEY_MIN_LOG_MEL, log, linear)


def mel_band_edges(n_mels: int = N_MELS, fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """The n_mels + 2 corner frequencies in Hz: band i rises from edge i, peaks at i+1, ends at i+2."""
    return _mel_to_hz(np.linspace(_hz_to_mel(np.array(fmin)), _hz_to_mel(np.array(fmax)), n_mels + 2))


@functools.cache
def mel_filterbank(n_fft: int = N_FFT, n_mels: int = N_MELS, fmin: float = FMIN,
                   fmax: float = FMAX) -> np.ndarray:
    """Slaney mel filters with area normalisation (librosa.filters.mel's defaults at 16 kHz),
    shape [n_mels, n_fft // 2 + 1], read-only: Wav2Lip's by default, Whisper's with
    ``(400, 80, 0, 8000)``."""
    edges = mel_band_edges(n_mels, fmin, fmax)
    bins = np.linspace(0.0, SAMPLE_RATE / 2, n_fft // 2 + 1)
    widths = np.diff(edges)
    ramps = edges[:, None] - bins[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]  # each triangle has unit area in Hz
    weights.setflags(write=False)
    return weights


@functools.cache
def _hann() -> np.ndarray:
    # scipy.signal.get_window("hann", WIN, fftbins=True): periodic, not np.hanning's symmetric one.
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(WIN) / WIN)
    w.setflags(write=False)
    return w


def _preemphasise(x: np.ndarray, previous: float) -> np.ndarray:
    """lfilter([1, -k], [1], x) continued from ``previous``, the sample before x (0 at the start)."""
    y = x.copy()
    if x.size:
        y[0] -= PREEMPHASIS * previous
        y[1:] -= PREEMPHASIS * x[:-1]
    return y


def _mel_frames(padded: np.ndarray, n_frames: int) -> np.ndarray:
    """Normalised mel of the first ``n_frames`` STFT frames of an already padded signal."""
    if n_frames <= 0:
        return np.zeros((N_MELS, 0), dtype=np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(padded[: (n_frames - 1) * HOP + N_FFT], N_FFT)[::HOP]
    magnitude = np.abs(np.fft.rfft(frames * _hann(), axis=1))
    mel = magnitude @ mel_filterbank().T  # [n_frames, N_MELS]
    db = 20.0 * np.log10(np.maximum(_MIN_AMPLITUDE, mel)) - REF_LEVEL_DB
    scaled = 2.0 * MAX_ABS_VALUE * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS_VALUE
    return np.clip(scaled, -MAX_ABS_VALUE, MAX_ABS_VALUE).T.astype(np.float32)


def _mel_of_preemphasised(y: np.ndarray) -> np.ndarray:
    if y.size == 0:
        return np.zeros((N_MELS, 0), dtype=np.float32)
    return _mel_frames(np.pad(y, _PAD, mode="reflect"), 1 + y.size // HOP)


def _as_mono(wav: np.ndarray) -> np.ndarray:
    x = np.asarray(wav)
    if x.ndim != 1:
        raise Wav2LipAudioError(f"audio must be mono samples of shape [n], got shape {x.shape}")
    return x.astype(np.float64)


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip's ``audio.melspectrogram``: float32 [N_MELS, 1 + n // HOP] in [-4, 4].

    ``wav`` is mono float audio at SAMPLE_RATE, full scale +-1. Empty audio gives [N_MELS, 0]
    (librosa would refuse it).
    """
    return _mel_of_preemphasised(_preemphasise(_as_mono(wav), 0.0))


# --- one window per video frame


def _check_fps(fps: float) -> None:
    if not (math.isfinite(fps) and fps > 0):
        raise Wav2LipAudioError(f"fps must be a positive number, got {fps}")


def window_start(i: int, fps: float) -> int:
    """First mel frame of video frame i's window, as Wav2Lip's inference computes it."""
    return int(i * (MEL_FPS / fps))


def n_video_frames(n_samples: int, fps: float) -> int:
    """Video frames whose time falls inside ``n_samples`` of audio: ceil(duration * fps)."""
    _check_fps(fps)
    # Rounding first keeps 1 s at 30 fps from becoming 31 frames through float error.
    return math.ceil(round(n_samples * fps / SAMPLE_RATE, 9))


def _gather(mel: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Windows [len(starts), 1, N_MELS, WINDOW]; columns past the end of ``mel`` read as FLOOR."""
    if starts.size == 0:
        return np.zeros((0, 1, N_MELS, WINDOW), dtype=np.float32)
    needed = int(starts.max()) + WINDOW
    if needed > mel.shape[1]:
        mel = np.concatenate(
            [mel, np.full((N_MELS, needed - mel.shape[1]), FLOOR, dtype=np.float32)], axis=1
        )
    columns = starts[:, None] + np.arange(WINDOW)[None, :]
    return np.ascontiguousarray(mel[:, columns].transpose(1, 0, 2)[:, None], dtype=np.float32)


def mel_windows(mel: np.ndarray, fps: float, n_frames: int) -> np.ndarray:
    """The model input for video frames 0 .. n_frames-1: float32 [n_frames, 1, N_MELS, WINDOW].

    Frame i reads the WINDOW mel frames from ``window_start(i, fps)``. Where that runs past the
    end of ``mel`` the missing frames are FLOOR, i.e. silence: past the end the audio really is
    silent, so the mouth closes, and every window stays aligned with its own time. (Wav2Lip's
    inference instead shifts its last window back to end on the last mel frame and stops there,
    so it emits about 200 ms of video fewer than the audio lasts.)
    """
    mel = np.asarray(mel, dtype=np.float32)
    if mel.ndim != 2 or mel.shape[0] != N_MELS:
        raise Wav2LipAudioError(f"mel must have shape [{N_MELS}, T], got {mel.shape}")
    _check_fps(fps)
    if n_frames < 0:
        raise Wav2LipAudioError(f"n_frames must be >= 0, got {n_frames}")
    starts = np.array([window_start(i, fps) for i in range(n_frames)], dtype=np.int64)
    return _gather(mel, starts)


# --- silence


def window_level(windows: np.ndarray) -> np.ndarray:
    """How loud each [..., N_MELS, WINDOW] window is: from 0 (silence) to 8.

    The loudest band of each mel frame, as height above FLOOR, averaged over the window's
    frames. The loudest band, so that a pure tone counts as much as broadband speech; averaged
    over time, so that one click or breath does not wake the model.
    """
    w = np.asarray(windows, dtype=np.float32)
    if w.ndim < 2 or w.shape[-2:] != (N_MELS, WINDOW):
        raise Wav2LipAudioError(f"windows must have shape [..., {N_MELS}, {WINDOW}], got {w.shape}")
    return (w.max(axis=-2) - FLOOR).mean(axis=-1)


def is_silent(windows: np.ndarray, threshold: float = SILENCE_THRESHOLD) -> np.ndarray:
    """True for each window whose :func:`window_level` is at most ``threshold``.

    A room shows base-video frames for silent windows instead of running the model on them.
    The default keeps steady noise below about -73 dBFS silent; raise it for a noisy microphone.
    """
    return window_level(windows) <= threshold


# --- live audio


class Wav2LipAudioStream:
    """Turns live audio into each video frame's window as soon as the audio for it has arrived.

    ``push`` returns the windows that became complete, in order; ``finish`` at the end of the
    audio returns the rest. Together they equal ``mel_windows(melspectrogram(all audio), fps,
    n_frames)`` on the same audio, whatever the chunking.

    Latency: video frame i (at time i / fps) is returned once the audio reaches at most
    LOOKAHEAD_SAMPLES (212.5 ms) past that time, exactly that when 80 * i / fps is whole. That
    is 5.3 video frames at 25 fps and 6.4 at 30 fps, plus however long a chunk takes to arrive.
    It is inherent to Wav2Lip: each window covers the 200 ms after its frame, and a centred STFT
    frame needs 25 ms past its centre. Memory stays bounded: only the unused tail is kept.
    """

    def __init__(self, fps: float) -> None:
        _check_fps(fps)
        self.fps = fps
        self._n_samples = 0
        self._last_sample = 0.0
        self._signal = np.zeros(0, dtype=np.float64)  # pre-emphasised; left-padded once long enough
        self._padded = False
        self._signal_base = 0  # padded index of self._signal[0]
        self._mel = np.zeros((N_MELS, 0), dtype=np.float32)
        self._mel_base = 0  # mel frame index of self._mel[:, 0]
        self._next_frame = 0
        self._finished = False

    @property
    def samples_received(self) -> int:
        return self._n_samples

    @property
    def frames_emitted(self) -> int:
        return self._next_frame

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Adds mono SAMPLE_RATE audio; returns the newly complete windows [k, 1, N_MELS, WINDOW]."""
        if self._finished:
            raise Wav2LipAudioError("the stream is finished; start a new one")
        x = _as_mono(samples)
        if x.size == 0:
            return _gather(self._mel, np.zeros(0, dtype=np.int64))
        y = _preemphasise(x, self._last_sample)
        self._last_sample = float(x[-1])
        self._n_samples += x.size
        self._signal = np.concatenate([self._signal, y])
        if not self._padded and self._n_samples > _PAD:
            # The left half of frame 0 is the reflection of samples 1 .. _PAD.
            self._signal = np.concatenate([self._signal[_PAD:0:-1], self._signal])
            self._padded = True
        if self._padded:
            # Mel frame j needs samples up to j * HOP + _PAD, beyond which it would read the
            # right-hand padding that only finish() can know.
            self._compute_mel((self._n_samples - _PAD) // HOP + 1)
        return self._emit(self._ready_frames())

    def finish(self, n_frames: int | None = None) -> np.ndarray:
        """Ends the audio; returns the remaining windows up to ``n_frames`` video frames in all.

        ``n_frames`` defaults to :func:`n_video_frames` of the audio received. Windows
        ``push`` already returned stay returned: below ``frames_emitted``, none more come.
        """
        if self._finished:
            raise Wav2LipAudioError("the stream is already finished")
        self._finished = True
        total_mel = 1 + self._n_samples // HOP if self._n_samples else 0
        if not self._padded:
            self._mel = _mel_of_preemphasised(self._signal)  # too short for anything to be out yet
        else:
            # librosa's right-hand reflect padding: the samples before the last, mirrored.
            self._signal = np.concatenate([self._signal, self._signal[-2 : -_PAD - 2 : -1]])
            self._compute_mel(total_mel)
        if n_frames is None:
            n_frames = n_video_frames(self._n_samples, self.fps)
        return self._emit(max(0, n_frames))

    def _compute_mel(self, n_ready: int) -> None:
        done = self._mel_base + self._mel.shape[1]
        if n_ready <= done:
            return
        offset = done * HOP - self._signal_base
        new = _mel_frames(self._signal[offset:], n_ready - done)
        self._mel = np.concatenate([self._mel, new], axis=1)
        drop = n_ready * HOP - self._signal_base  # later frames start at or after this
        self._signal = self._signal[drop:]
        self._signal_base += drop

    def _ready_frames(self) -> int:
        """How many video frames, from the first, have all their mel frames computed."""
        done = self._mel_base + self._mel.shape[1]
        i = self._next_frame
        while window_start(i, self.fps) + WINDOW <= done:
            i += 1
        return i

    def _emit(self, end: int) -> np.ndarray:
        starts = np.array([window_start(i, self.fps) for i in range(self._next_frame, end)], dtype=np.int64)
        windows = _gather(self._mel, starts - self._mel_base)
        if starts.size:
            self._next_frame = end
            # At very low fps the next window can start past what is computed yet.
            keep_from = min(window_start(end, self.fps) - self._mel_base, self._mel.shape[1])
            if keep_from > 0:
                self._mel = self._mel[:, keep_from:]
                self._mel_base += keep_from
        return windows
