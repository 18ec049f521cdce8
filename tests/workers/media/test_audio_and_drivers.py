from __future__ import annotations

import asyncio

import numpy as np

from avatarfarm.domain import ScriptSegment
from avatarfarm.face_motion import FACE_MOTION_DIM
from workers.media.audio import LOG_FLOOR, MEL_WINDOW, N_MELS, SAMPLE_RATE, MelStream, log_mel, resample
from workers.media.motion import MOTION_DIM, Coef, IdleAnimator, compose
from workers.media.tts import EspeakTTS
from workers.rooms.drivers import LiveAudio, LiveMotion, ScriptPlayer


def test_log_mel_has_one_frame_per_hop_and_a_floor_for_silence() -> None:
    mel = log_mel(np.zeros(SAMPLE_RATE, np.float32))
    assert mel.shape == (N_MELS, 98)
    assert np.all(mel == LOG_FLOOR)
    tone = np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32)
    assert log_mel(tone).max() > -1.0


def test_mel_stream_yields_model_windows() -> None:
    s = MelStream()
    w = s.push(np.zeros(640, np.float32))
    assert w.shape == (N_MELS, MEL_WINDOW)


def test_tts_speaks_at_the_pipeline_rate() -> None:
    audio = EspeakTTS().synthesize("one two three")
    assert 0.5 < audio.size / SAMPLE_RATE < 3.0
    assert np.abs(audio).max() > 0.1
    assert EspeakTTS().synthesize("   ").size == 0


def test_resample_keeps_duration() -> None:
    x = np.random.default_rng(0).standard_normal(22050).astype(np.float32)
    assert resample(x, 22050, SAMPLE_RATE).size == SAMPLE_RATE


def test_script_player_speaks_then_pauses_then_stays_silent() -> None:
    async def synth(text: str) -> tuple[np.ndarray, float]:
        return np.ones(1000, np.float32) * 0.5, 0.001

    async def body() -> None:
        p = ScriptPlayer(synth)
        p.append([ScriptSegment("hi", pause_after_seconds=0.1)])
        a, speaking = await p.take(800)
        assert speaking and a.max() == 0.5
        b, speaking = await p.take(800)  # 200 speech + 600 of the 1600-sample pause
        assert speaking and b[:200].max() == 0.5 and b[200:].max() == 0.0
        c, speaking = await p.take(800)
        assert not speaking and c.max() == 0.0
        d, speaking = await p.take(800)  # queue empty: silence, idle
        assert not speaking and d.size == 800

    asyncio.run(body())


def test_a_script_is_ready_once_its_first_sentence_is_made_or_has_failed() -> None:
    from workers.media.tts import VoiceUnavailable

    made, started = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def synth(text: str) -> tuple[np.ndarray, float]:
        calls.append(text)
        started.set()
        await made.wait()
        return np.full(1000, 0.5, np.float32), 0.001

    async def down(text: str) -> tuple[np.ndarray, float]:
        raise VoiceUnavailable("the voice service is down")

    async def body() -> None:
        await asyncio.wait_for(ScriptPlayer(synth).ready(), 1)  # nothing to say: at once
        p = ScriptPlayer(synth)
        p.append([ScriptSegment("First one. Second one.")])
        ready = asyncio.ensure_future(p.ready())
        await asyncio.wait_for(started.wait(), 1)
        assert calls == ["First one."] and not ready.done()  # made alone, and waited for
        made.set()
        await asyncio.wait_for(ready, 1)
        audio, speaking = await asyncio.wait_for(p.take(800), 1)
        assert speaking and audio.max() == 0.5
        assert calls == ["First one.", "Second one."]  # made once, taken where ready left it
        q = ScriptPlayer(down)
        q.append([ScriptSegment("Hello.")])
        await asyncio.wait_for(q.ready(), 1)  # the failure is take's to report
        silence, speaking = await q.take(800)
        assert not speaking and silence.max() == 0.0 and "down" in q.unavailable

    asyncio.run(body())


def test_a_segment_is_spoken_sentence_by_sentence_without_gaps() -> None:
    """The first sentence is made alone, then the rest; it plays while the second is still
    being made; the audio is every sentence, in order, with the segment's pause after its
    last; the next segment is made before the first has finished playing."""
    log: list[tuple[str, str]] = []
    released = {"Second one.": asyncio.Event()}

    async def synth(text: str) -> tuple[np.ndarray, float]:
        log.append(("start", text))
        if text in released:
            await released[text].wait()
        log.append(("end", text))
        return np.full(1000, 0.1 * (len(log) // 2), np.float32), 0.001

    async def body() -> None:
        p = ScriptPlayer(synth)
        p.append([ScriptSegment("First one. Second one.", pause_after_seconds=0.05),
                  ScriptSegment("Next segment!")])
        first, speaking = await asyncio.wait_for(p.take(800), 1)  # the second is not made yet
        await asyncio.sleep(0)  # (let the second sentence's task start)
        assert speaking and np.all(first == np.float32(0.1))
        assert log == [("start", "First one."), ("end", "First one."), ("start", "Second one.")]
        released["Second one."].set()
        rest = [await p.take(800) for _ in range(4)]
        audio = np.concatenate([first, *(a for a, _ in rest)])
        # 1000 + 1000 of speech, the 800-sample pause, then the next segment's 1000.
        assert np.all(audio[:1000] == np.float32(0.1)) and np.all(audio[1000:2000] == np.float32(0.2))
        assert np.all(audio[2000:2800] == 0) and np.all(audio[2800:3800] == np.float32(0.3))
        assert [t for what, t in log if what == "start"] == ["First one.", "Second one.", "Next segment!"]
        assert p.segments_done == 2 and p.at_boundary

    asyncio.run(body())


def test_a_segment_made_ahead_is_put_back_when_the_script_must_stop_at_a_boundary() -> None:
    async def synth(text: str) -> tuple[np.ndarray, float]:
        return np.full(1000, 0.5, np.float32), 0.001

    async def body() -> None:
        p = ScriptPlayer(synth)
        p.append([ScriptSegment("One."), ScriptSegment("Two.")])
        await p.take(800)  # "One." played in part; "Two." is being made ahead
        p.finish_current()  # e.g. the licence ended: "One." finishes, "Two." is not spoken
        assert p.queued == 1 and p.segments_spoken == 1
        tail = [await p.take(800) for _ in range(3)]
        assert tail[0][0][:200].max() == 0.5 and all(a.max() == 0 for a, _ in tail[1:])
        assert p.at_boundary and p.segments_done == 1
        # A segment being made with nothing of it played yet is not started either.
        q = ScriptPlayer(synth)
        q.append([ScriptSegment("Three.")])
        q._start()  # as take() does when a room's audio runs low
        q.finish_current()
        assert q.queued == 1 and q.at_boundary and (await q.take(800))[0].max() == 0

    asyncio.run(body())


def test_a_voice_that_fails_holds_the_room_in_silence_and_the_script_goes_on_where_it_stopped() -> None:
    """The second sentence's voice fails (its service is down): the first has played, the
    room then plays silence saying why, tries again every VOICE_RETRY_SAMPLES of stream,
    and once the voice is back speaks the second and third sentences, in order, each once."""
    from workers.media.tts import VoiceUnavailable
    from workers.rooms.drivers import VOICE_RETRY_SAMPLES

    down = {"on": False}
    calls: list[str] = []
    level = {"One.": 0.1, "Two.": 0.2, "Three.": 0.3, "Four.": 0.4}

    async def synth(text: str) -> tuple[np.ndarray, float]:
        calls.append(text)
        if down["on"] and text != "One.":
            raise VoiceUnavailable("TTS service for voice 'anna' is failing (HTTP 503)")
        return np.full(1000, level[text], np.float32), 0.001

    async def body() -> None:
        p = ScriptPlayer(synth)
        p.append([ScriptSegment("One. Two. Three."), ScriptSegment("Four.")])
        down["on"] = True
        out = [await p.take(800), await p.take(800)]  # "One." plays; "Two." and "Three." fail
        assert p.unavailable.endswith("(HTTP 503)") and p.voice_failures == 1
        assert out[1][0][:200].max() == np.float32(0.1) and out[1][0][200:].max() == 0
        tries = len(calls)
        for _ in range(VOICE_RETRY_SAMPLES // 800 - 1):  # no try before its time
            out.append(await p.take(800))
        assert len(calls) == tries and all(not speaking for _, speaking in out[2:])
        out.append(await p.take(800))  # time: one sentence is tried, alone
        assert calls[tries:] == ["Two."] and p.voice_failures == 2
        down["on"] = False
        while p.unavailable or len(out) < 40:
            out.append(await p.take(800))
        assert not p.unavailable and p.segments_done == 2 and p.at_boundary
        audio = np.concatenate([a for a, _ in out])
        spoken = [v for v in np.unique(audio) if v > 0]
        assert spoken == [np.float32(x) for x in (0.1, 0.2, 0.3, 0.4)]
        for x in (0.1, 0.2, 0.3, 0.4):  # each sentence once, whole
            assert np.count_nonzero(audio == np.float32(x)) == 1000
        starts = [int(np.flatnonzero(audio == np.float32(x))[0]) for x in (0.1, 0.2, 0.3, 0.4)]
        assert starts == sorted(starts) and starts[1] - starts[0] > VOICE_RETRY_SAMPLES

    asyncio.run(body())


def test_live_audio_pushes_back_when_full_and_pads_underruns() -> None:
    async def body() -> None:
        buf = LiveAudio(max_seconds=0.1)  # 1600 samples
        await buf.push(np.ones(1600, np.float32))
        blocked = asyncio.create_task(buf.push(np.ones(800, np.float32)))
        await asyncio.sleep(0)
        assert not blocked.done()  # back-pressure: the producer waits
        out = buf.take(1000)
        assert out.size == 1000 and out.min() == 1.0
        await asyncio.wait_for(blocked, 1)
        rest = buf.take(2000)
        assert rest[:1400].min() == 1.0 and rest[1400:].max() == 0.0
        assert buf.underrun_samples == 600

    asyncio.run(body())


def test_live_motion_holds_briefly_then_lets_idle_take_over() -> None:
    async def body() -> None:
        m = LiveMotion(hold_frames=2)
        pose = np.full(FACE_MOTION_DIM, 0.5, np.float32)
        await m.push(pose)
        assert np.array_equal(m.take(), pose)
        assert np.array_equal(m.take(), pose)
        assert np.array_equal(m.take(), pose)
        assert m.take() is None

    asyncio.run(body())


def test_idle_blinks_and_breathes_and_is_reproducible() -> None:
    a = IdleAnimator(25, np.random.default_rng(1))
    b = IdleAnimator(25, np.random.default_rng(1))
    seq_a = np.array([a.step() for _ in range(250)])
    seq_b = np.array([b.step() for _ in range(250)])
    assert np.array_equal(seq_a, seq_b)
    assert seq_a[:, Coef.BLINK].max() > 0.9  # at least one blink in 10 s
    assert seq_a[:, Coef.HEAD_PITCH].std() > 0.02
    assert np.all(seq_a[:, Coef.JAW_OPEN] == 0)


def test_compose_gives_the_mouth_to_the_driver() -> None:
    idle = np.zeros(MOTION_DIM, np.float32)
    idle[Coef.BLINK] = 1.0
    driven = np.zeros(MOTION_DIM, np.float32)
    driven[Coef.JAW_OPEN] = 0.7
    out = compose(idle, driven, mouth_only=True)
    assert out[Coef.JAW_OPEN] == np.float32(0.7) and out[Coef.BLINK] == 1.0
    mocap = compose(idle, driven, mouth_only=False)
    assert mocap[Coef.BLINK] == 0.0  # a performer's own eyes win
