from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avatarfarm.domain import OutputKind
from tests.media import probe, video_end
from workers.media.audio import SAMPLE_RATE
from workers.output.encode import EncoderThread, StreamEncoder
from workers.output.targets import OutputError, OutputTarget


def encode(target: OutputTarget, seconds: float = 2.0, w: int = 320, h: int = 240, fps: int = 25) -> None:
    enc = EncoderThread(StreamEncoder(target, w, h, fps))
    per_frame = SAMPLE_RATE // fps
    t = np.arange(per_frame) / SAMPLE_RATE
    for i in range(int(seconds * fps)):
        img = np.full((h, w, 3), (i * 5) % 255, np.uint8)
        enc.submit(img, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    enc.close()
    assert enc.error is None
    assert enc.frames_encoded == int(seconds * fps)
    assert enc.encode_seconds > 0


@pytest.mark.parametrize("name", ["room.mp4", "nested/room.flv"])
def test_file_outputs_hold_h264_and_aac_of_the_right_length(tmp_path: Path, name: str) -> None:
    target = OutputTarget.resolve(OutputKind.FILE, name, tmp_path)
    encode(target)
    f = probe(target.location)
    assert (f.video_codec, f.width, f.height, f.frames) == ("h264", 320, 240, 50)
    assert f.fps == pytest.approx(25)
    assert f.audio_codec == "aac" and f.audio_rate == 48000
    assert f.audio_rms > 0.1


def test_hls_output_writes_a_playlist_and_segments(tmp_path: Path) -> None:
    target = OutputTarget.resolve(OutputKind.HLS, "show", tmp_path)
    encode(target, seconds=5.0)
    playlist = (tmp_path / "show" / "index.m3u8").read_text()
    segments = sorted((tmp_path / "show").glob("segment_*.ts"))
    assert "#EXTM3U" in playlist and len(segments) >= 2
    assert all(s.name in playlist for s in segments)
    f = probe(tmp_path / "show" / "index.m3u8")
    assert f.video_codec == "h264" and f.frames == 125


@pytest.mark.parametrize("kind,value", [
    (OutputKind.FILE, "../escape.mp4"), (OutputKind.FILE, "/srv/abs.mp4"),
    (OutputKind.FILE, "room.mkv"), (OutputKind.HLS, "a/../../b"), (OutputKind.RTMP, "http://x/y"),
])
def test_targets_outside_the_output_folder_are_refused(tmp_path: Path, kind: OutputKind, value: str) -> None:
    with pytest.raises(OutputError):
        OutputTarget.resolve(kind, value, tmp_path)


def test_a_symlink_cannot_lead_out_of_the_output_folder(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(OutputError, match="leaves"):
        OutputTarget.resolve(OutputKind.FILE, "link/x.mp4", root)


def test_an_unreachable_rtmp_ingest_is_reported_not_raised(tmp_path: Path) -> None:
    target = OutputTarget.resolve(OutputKind.RTMP, "rtmp://127.0.0.1:9/live/x", tmp_path)
    enc = EncoderThread(StreamEncoder(target, 320, 240, 25))
    for _ in range(10):
        if not enc.try_submit(np.zeros((240, 320, 3), np.uint8), np.zeros(640, np.float32)):
            break
    enc.close()
    assert enc.error is not None


def test_a_repeated_frame_is_prepared_once(tmp_path: Path) -> None:
    target = OutputTarget.resolve(OutputKind.FILE, "r.mp4", tmp_path)
    prepared: list[int] = []

    def prepare(frame: np.ndarray) -> np.ndarray:
        prepared.append(id(frame))
        return np.repeat(frame, 2, axis=0)  # the canvas: a new array from the frame

    enc = EncoderThread(StreamEncoder(target, 64, 64, 25), prepare=prepare)
    good, other = np.full((32, 64, 3), 90, np.uint8), np.full((32, 64, 3), 160, np.uint8)
    audio = np.zeros(640, np.float32)
    for frame in (good, good, good, other, good):  # two late frames repeat the last good one
        enc.submit(frame, audio, timeout=10)
    enc.close()
    # Encoded each time, or held on the waiting one where the encoder was behind.
    assert enc.error is None and enc.frames_encoded + enc.frames_merged == 5
    assert prepared == [id(good), id(other), id(good)]
    assert probe(tmp_path / "r.mp4").frames == enc.frames_encoded
    assert video_end(tmp_path / "r.mp4") == pytest.approx(0.2)


def test_an_encoder_behind_holds_a_repeated_frame_longer_instead_of_encoding_it_again(
        tmp_path: Path) -> None:
    """Repeats of a frame still waiting for the encoder (a room's late frames, while its
    encoder is behind) become one longer frame: the stream keeps its time and all its
    sound, and the encoder catches up at the cost of one frame."""
    import threading

    import av

    target = OutputTarget.resolve(OutputKind.FILE, "r.mp4", tmp_path)
    first_taken, go = threading.Event(), threading.Event()

    def prepare(frame: np.ndarray) -> np.ndarray:
        if not first_taken.is_set():  # the encoder is busy with the first frame ...
            first_taken.set()
            assert go.wait(10)  # ... until every other frame has been submitted
        return frame

    enc = EncoderThread(StreamEncoder(target, 64, 64, 25), prepare=prepare)
    start, still, other = (np.full((64, 64, 3), v, np.uint8) for v in (30, 90, 200))
    per = SAMPLE_RATE // 25
    clicks = []
    enc.submit(start, np.zeros(per, np.float32), timeout=10)
    assert first_taken.wait(10)
    for i, frame in enumerate((still, still, still, still, still, other, still), start=1):
        audio = np.zeros(per, np.float32)
        audio[:40] = 0.8  # a click at the start of every period: all the sound is kept
        clicks.append(i * 0.04)
        assert enc.try_submit(frame, audio)
    go.set()
    enc.close()
    assert enc.error is None
    # start; still for five periods (four held on it); other; still again, queued apart.
    assert (enc.frames_encoded, enc.frames_merged) == (4, 4)
    with av.open(target.location) as c:
        times = [round(float(f.time), 3) for f in c.decode(c.streams.video[0])]
    assert times == [0.0, 0.04, 0.24, 0.28]
    assert video_end(Path(target.location)) == pytest.approx(0.32)
    with av.open(target.location) as c:
        frames = list(c.decode(audio=0))
        t0 = float(frames[0].time)
        samples = np.concatenate([f.to_ndarray()[0] for f in frames])
    loud = np.flatnonzero(np.abs(samples) > 0.3) / 48_000 + t0
    heard = sorted({round(float(t), 2) for t in loud})
    assert all(any(abs(h - c) < 0.006 for h in heard) for c in clicks)


@pytest.mark.parametrize("kind,name", [(OutputKind.FILE, "room.mp4"), (OutputKind.FILE, "room.flv"),
                                       (OutputKind.HLS, "show")])
def test_every_frame_keeps_its_time_and_a_sound_lands_where_it_was_given(
        tmp_path: Path, kind: OutputKind, name: str) -> None:
    """The AAC encoder's priming packet must not shift the streams: a shift stretched
    the first video frame of every MP4 to 61 ms (and moved every sound 21 ms late)."""
    import av

    target = OutputTarget.resolve(kind, name, tmp_path)
    enc = StreamEncoder(target, 64, 64, 25)
    enc.open()
    per_frame = SAMPLE_RATE // 25
    for i in range(50):
        audio = np.zeros(per_frame, np.float32)
        if i == 20:  # a click at 0.8 s
            audio[:80] = 0.8
        enc.encode(np.full((64, 64, 3), i * 5, np.uint8), audio)
    enc.close()
    path = target.location if kind is OutputKind.FILE else tmp_path / name / "index.m3u8"
    with av.open(str(path)) as c:
        video = c.streams.video[0]
        times = [float(f.time) for f in c.decode(video)]
    with av.open(str(path)) as c:
        frames = list(c.decode(audio=0))
        first_audio = float(frames[0].time)
        samples = np.concatenate([f.to_ndarray()[0] for f in frames])
    start = times[0]
    gaps = np.diff(times)
    assert len(times) == 50
    assert gaps.min() == pytest.approx(0.04, abs=0.0015) and gaps.max() == pytest.approx(0.04, abs=0.0015)
    assert first_audio == pytest.approx(start, abs=0.0015)
    click = (np.argmax(np.abs(samples) > 0.3) / 48_000) + first_audio - start
    assert click == pytest.approx(0.8, abs=0.003)


def test_encoders_sharing_a_pool_keep_each_rooms_frames_in_order(tmp_path: Path) -> None:
    import av

    from workers.output.encode import EncoderPool

    pool = EncoderPool(2)
    per_frame = SAMPLE_RATE // 25

    def broken(rgb: np.ndarray) -> np.ndarray:
        raise RuntimeError("this room's canvas fails")

    rooms = [EncoderThread(StreamEncoder(OutputTarget.resolve(OutputKind.FILE, f"r{i}.mp4", tmp_path),
                                         64, 64, 25), pool=pool, prepare=broken if i == 3 else
                           (lambda rgb: rgb)) for i in range(6)]
    for n in range(40):  # interleaved, as rooms submit
        for i, enc in enumerate(rooms):
            level = (n * 6 + i * 2) % 250
            img = np.full((64, 64, 3), level, np.uint8)
            if not enc.try_submit(img, np.zeros(per_frame, np.float32)):
                enc.submit(img, np.zeros(per_frame, np.float32), timeout=10)
    for enc in rooms:
        enc.close()
    assert isinstance(rooms[3].error, RuntimeError)  # one room's failure is its own
    for i, enc in enumerate(rooms):
        if i == 3:
            continue
        assert enc.error is None and enc.frames_encoded == 40
        with av.open(str(tmp_path / f"r{i}.mp4")) as c:
            levels = [float(f.to_ndarray(format="gray").mean()) for f in c.decode(video=0)]
        assert len(levels) == 40
        assert np.allclose(levels, [(n * 6 + i * 2) % 250 for n in range(40)], atol=4)


def test_a_busy_pool_serves_higher_tiers_first_and_starves_none() -> None:
    import threading
    import time

    from workers.output.encode import EncoderPool

    pool = EncoderPool(1)
    order: list[str] = []
    done = threading.Event()
    stop = threading.Event()

    def premium() -> None:  # a premium room that always has frames waiting
        order.append("premium")
        time.sleep(0.01)
        if not stop.is_set():
            pool.submit(premium, priority=0)

    def best_effort() -> None:
        order.append("best effort")
        done.set()

    pool.submit(premium, priority=0)
    pool.submit(premium, priority=0)
    pool.submit(best_effort, priority=2)
    try:
        assert done.wait(5), "the best-effort turn never ran"
    finally:
        stop.set()
    # Premium went first while the best-effort turn was young, and it still ran.
    assert order.index("best effort") >= 2


def test_a_voice_comes_out_of_the_encoder_as_it_went_in(tmp_path: Path) -> None:
    """The worker's AAC coder ("fast", chosen for its CPU cost) keeps a real TTS voice's
    waveform: decoded, back at the input's rate and aligned, it differs from what went in
    by under a thousandth of its power (33 dB here; FFmpeg's default "twoloop", at 3.4x
    the CPU, gives 24.5)."""
    import av

    from workers.media.tts import EspeakTTS

    speech = EspeakTTS().synthesize("Three new serums at a special price, and every order ships tomorrow.")
    target = OutputTarget.resolve(OutputKind.FILE, "voice.mp4", tmp_path)
    enc = StreamEncoder(target, 64, 64, 25)
    enc.open()
    step = SAMPLE_RATE // 25
    frames = speech.size // step
    for i in range(frames):
        enc.encode(np.full((64, 64, 3), 128, np.uint8), speech[i * step:(i + 1) * step])
    enc.close()
    back = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    with av.open(target.location) as c:
        out = np.concatenate([r.to_ndarray().reshape(-1) for f in c.decode(audio=0)
                              for r in back.resample(f)])
    sent = speech[:frames * step]
    lag = int(np.argmax(np.correlate(sent[:6000], out[:4000], mode="valid")))
    n = min(sent.size - lag, out.size) - 400  # the resampler's tail aside
    got, want = out[:n], sent[lag: lag + n]
    snr = 10 * np.log10(np.sum(want ** 2) / np.sum((want - got) ** 2))
    assert snr >= 30.0, f"{snr:.1f} dB at lag {lag}"
