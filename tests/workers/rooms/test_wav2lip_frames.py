"""A Wav2Lip-family avatar rendered end to end offline: a bundle prepared from a video of
a real person, speech through Wav2Lip's audio features, the Wav2Lip-signature model,
paste-back, encoded to H.264 and decoded again: the mouth moves with the audio, silent
frames are the base frames untouched, and no seam shows around the pasted face."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import av
import numpy as np
import onnxruntime as ort
import pytest
from skimage import data

from avatarfarm.preparation.bundle import Bundle, VideoLimits, prepare
from avatarfarm.preparation.faces import TrackPolicy
from tests.media import encode_clip, head_motion
from workers.device.binding import LipSyncRunner
from workers.media.face_paste import seam
from workers.media.tts import EspeakTTS
from workers.media.wav2lip_audio import is_silent, mel_windows, melspectrogram, n_video_frames
from workers.models.wav2lip import FACEFUSION, WAV2LIP_PRESETS, build_wav2lip
from workers.rooms.wav2lip_frames import Wav2LipFrames, loop_index

FPS = 25


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    frames, _ = head_motion(data.astronaut(), 30)
    return prepare(encode_clip(frames, fps=FPS), tmp_path_factory.mktemp("bundles"), (96,),
                   limits=VideoLimits(min_seconds=1.0), policy=TrackPolicy(min_side=64))


def runner(*, dynamic: bool = True) -> LipSyncRunner:
    model = build_wav2lip(96, WAV2LIP_PRESETS["tiny"], names=FACEFUSION, dynamic_batch=dynamic)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return LipSyncRunner(ort.InferenceSession(model.SerializeToString(), opts,
                                              providers=["CPUExecutionProvider"]), name="tiny")


def test_the_clip_loops_forward_and_back_without_a_jump() -> None:
    seq = [loop_index(i, 4) for i in range(10)]
    assert seq == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert all(abs(a - b) == 1 for a, b in itertools.pairwise(seq))
    assert loop_index(7, 1) == 0


def test_speech_moves_the_mouth_of_the_real_person_and_pauses_do_not(bundle: Bundle) -> None:
    speech = EspeakTTS().synthesize("Welcome to the live room.")
    pause = np.zeros(16_000, np.float32)  # a second of silence between two sentences
    audio = np.concatenate([speech, pause, EspeakTTS().synthesize("Three new offers today.")])
    n = n_video_frames(audio.size, FPS)
    windows = mel_windows(melspectrogram(audio), FPS, n)
    frames_out = Wav2LipFrames(bundle, runner())
    out, stats = [], []
    for start in range(0, n, 8):  # as a room's batches arrive: 8 frames a call
        chunk, st = frames_out.render(start, windows[start:start + 8])
        out += chunk
        stats.append(st)
    assert len(out) == n and sum(s.frames for s in stats) == n
    silent = is_silent(windows)[:, 0]
    assert sum(s.model_frames for s in stats) == int((~silent).sum()) > 0

    # Encoded and decoded as a stream would be.
    video = encode_clip(out, fps=FPS)
    with av.open(io.BytesIO(video)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == n

    base = bundle.frames()
    boxes = bundle.boxes
    def mouth_darkness(frame: np.ndarray, i: int) -> float:
        b = boxes[loop_index(i, len(base))]
        y0, y1 = b.y + int(b.h * 0.62), b.y + int(b.h * 0.80)
        x0, x1 = b.x + int(b.w * 0.38), b.x + int(b.w * 0.62)
        return 255.0 - float(frame[y0:y1, x0:x1].mean())
    opened = np.array([mouth_darkness(f, i) - mouth_darkness(base[loop_index(i, len(base))], i)
                       for i, f in enumerate(decoded)])
    # Silent frames show the base frame (up to the codec); speaking frames open the mouth.
    assert np.abs(opened[silent]).max() < 6
    assert np.median(opened[~silent]) > 15
    # The mouth follows the audio: loudness per frame and opening correlate.
    level = windows[:, 0, :60, :4].mean(axis=(1, 2))
    assert np.corrcoef(level, opened)[0, 1] > 0.6
    # No seam around the pasted face: the outline's step is the base clip's own.
    for i in np.flatnonzero(~silent)[:10]:
        b = boxes[loop_index(int(i), len(base))]
        assert seam(out[i], b) == pytest.approx(seam(base[loop_index(int(i), len(base))], b), abs=1.0)


def test_batched_and_per_frame_rendering_agree_and_a_fixed_batch_export_too(bundle: Bundle) -> None:
    speech = EspeakTTS().synthesize("Hello and welcome.")
    n = min(16, n_video_frames(speech.size, FPS))
    windows = mel_windows(melspectrogram(speech), FPS, n)
    batched, _ = Wav2LipFrames(bundle, runner()).render(0, windows)
    one_by_one = [Wav2LipFrames(bundle, runner()).render(i, windows[i:i + 1])[0][0] for i in range(n)]
    fixed, _ = Wav2LipFrames(bundle, runner(dynamic=False)).render(0, windows)
    for a, b, c in zip(batched, one_by_one, fixed, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
        assert np.abs(a.astype(int) - c.astype(int)).max() <= 1


def test_silence_costs_no_model_call(bundle: Bundle, tmp_path: Path) -> None:
    windows = mel_windows(melspectrogram(np.zeros(16_000, np.float32)), FPS, 25)
    frames_out = Wav2LipFrames(bundle, runner())
    calls = []
    run = frames_out.runner.run
    frames_out.runner.run = lambda mel, faces: calls.append(len(mel)) or run(mel, faces)  # type: ignore[method-assign]
    out, stats = frames_out.render(3, windows)
    assert calls == [] and stats.model_frames == 0
    base = bundle.frames()
    assert all(np.array_equal(f, base[loop_index(3 + k, len(base))]) for k, f in enumerate(out))
