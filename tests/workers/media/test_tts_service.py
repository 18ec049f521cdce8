"""Voices of a streaming TTS service: the speech arrives whole and in order (raw PCM or a
streamed WAV), resampled to the pipeline's rate; timeouts, 5xx and cut streams are
retried; failures in a row open the circuit (no more requests) until a probe succeeds;
a request the service refuses as wrong is not retried."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from avatarfarm.voices import ServiceConfigError, ServiceVoiceConfig, find_service_voices
from tests.tts_server import RATE, TtsServer
from workers.media.audio import SAMPLE_RATE, resample
from workers.media.breaker import BreakerState, CircuitBreaker
from workers.media.tts import VoiceUnavailable
from workers.media.tts_service import ServiceVoice

T = TypeVar("T")
TEXT = "Welcome to the show, this lipstick is on sale today."


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_failures_in_a_row_and_a_probe_closes_it() -> None:
    b = CircuitBreaker(failures_to_open=3, open_seconds=5.0)
    for t in (0.0, 1.0):
        assert b.allow(t)
        b.failed(t)
    b.succeeded()  # a success in between: the count starts again
    for t in (2.0, 3.0, 4.0):
        assert b.allow(t)
        b.failed(t)
    assert b.state is BreakerState.OPEN and not b.allow(8.9) and b.retry_in(8.9) == pytest.approx(0.1)
    assert b.allow(9.0) and b.state is BreakerState.HALF_OPEN  # the probe
    assert not b.allow(9.0)  # one probe at a time
    b.failed(9.5)  # the probe failed: open again, for a full period
    assert b.state is BreakerState.OPEN and not b.allow(14.0) and b.allow(14.5)
    b.succeeded()
    assert b.state is BreakerState.CLOSED and b.allow(14.6)


def run_with_server(body: Callable[[TtsServer], Awaitable[T]], **kw: Any) -> T:
    async def main() -> T:
        server = await TtsServer(**kw).start()
        try:
            return await body(server)
        finally:
            await server.stop()
    return asyncio.run(main())


def voice(server: TtsServer, clock: Callable[[], float] | None = None, **kw: Any) -> ServiceVoice:
    config = ServiceVoiceConfig(server.url, RATE, params={"voice": "anna", "language": "en"},
                                first_audio_timeout_seconds=0.5, retry_backoff_seconds=0.0, **kw)
    return ServiceVoice("anna", config, clock or Clock())


@pytest.mark.parametrize("wav", [False, True], ids=["raw PCM", "streamed WAV"])
def test_a_sentence_streams_in_whole_and_is_resampled(wav: bool) -> None:
    async def body(server: TtsServer) -> tuple[np.ndarray, TtsServer]:
        v = voice(server)
        try:
            audio, _ = await v.synthesize(TEXT)
        finally:
            await v.aclose()
        return audio, server

    audio, server = run_with_server(body, wav=wav)
    assert server.requests == [{"voice": "anna", "language": "en", "text": TEXT}]
    sent = resample(server.sent[0].astype(np.float32) / 32768, RATE, SAMPLE_RATE)
    assert audio.size > SAMPLE_RATE
    np.testing.assert_allclose(audio, sent, atol=1e-6)


def test_failed_attempts_are_retried_and_the_circuit_opens_then_a_probe_closes_it() -> None:
    clock = Clock()

    async def body(server: TtsServer) -> None:
        v = voice(server, clock, retries=2, failures_to_open=3, open_seconds=5.0)
        try:
            server.fail = 2  # two 503s, then audio: the third attempt speaks
            audio, _ = await v.synthesize(TEXT)
            assert audio.size > SAMPLE_RATE and len(server.requests) == 3
            assert v.state is BreakerState.CLOSED
            server.down = True
            with pytest.raises(VoiceUnavailable, match="failed 3 times: HTTP 503"):
                await v.synthesize(TEXT)
            assert len(server.requests) == 6 and v.state is BreakerState.OPEN
            # Open: sentences fail at once without reaching the service.
            with pytest.raises(VoiceUnavailable, match=r"next try in 5\.0 s"):
                await v.synthesize(TEXT)
            assert len(server.requests) == 6
            server.down = False
            clock.now += 5.0  # the probe goes through and closes the circuit
            audio, _ = await v.synthesize(TEXT)
            assert audio.size > SAMPLE_RATE and len(server.requests) == 7
            assert v.state is BreakerState.CLOSED
        finally:
            await v.aclose()

    run_with_server(body)


@pytest.mark.parametrize("mode", ["hang", "cut"])
def test_a_service_that_stalls_or_cuts_the_stream_is_given_up_on_in_time(mode: str) -> None:
    async def body(server: TtsServer) -> float:
        v = voice(server, retries=1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            with pytest.raises(VoiceUnavailable, match="failed 2 times"):
                await v.synthesize(TEXT)
        finally:
            await v.aclose()
        assert len(server.requests) == 2
        return loop.time() - t0

    took = run_with_server(body, **{mode: True})
    # Two attempts of at most the connect and first-audio timeouts (1.5 s) each.
    assert took < 3.5


def test_an_answer_with_no_audio_is_silence_not_a_failure() -> None:
    async def body(server: TtsServer) -> None:
        v = voice(server, retries=2, failures_to_open=1)
        try:
            audio, _ = await v.synthesize("...")
        finally:
            await v.aclose()
        assert audio.size == 0 and len(server.requests) == 1 and v.state is BreakerState.CLOSED

    run_with_server(body, silent=True)


def test_a_request_the_service_refuses_is_not_retried() -> None:
    async def body(server: TtsServer) -> None:
        config = ServiceVoiceConfig(server.url, RATE, text_field="input", retries=3,
                                    retry_backoff_seconds=0.0)
        v = ServiceVoice("anna", config)
        try:
            with pytest.raises(VoiceUnavailable, match="refused the request: HTTP 400 text is required"):
                await v.synthesize(TEXT)
        finally:
            await v.aclose()
        assert len(server.requests) == 1

    run_with_server(body)


def test_service_voices_are_read_from_the_voices_folder_and_bad_ones_refused(tmp_path: Path) -> None:
    (tmp_path / "anna.service.json").write_text(json.dumps(
        {"url": "http://tts:9880/tts", "sample_rate": 22050, "params": {"spk_id": "anna"}}))
    found = find_service_voices(tmp_path)
    assert list(found) == ["anna"] and found["anna"].sample_rate == 22050
    assert found["anna"].params == {"spk_id": "anna"}
    for bad, why in (({"url": "ftp://x"}, "http"), ({"url": "http://x", "retries": -1}, "retries"),
                     ({"url": "http://x", "colour": 1}, "unknown keys"),
                     ({"url": "http://x", "read_timeout_seconds": "soon"}, "read_timeout_seconds")):
        (tmp_path / "bad.service.json").write_text(json.dumps(bad))
        with pytest.raises(ServiceConfigError, match=why):
            find_service_voices(tmp_path)


def test_a_text_room_holds_while_its_service_voice_fails_then_speaks_all_of_its_script(
        model_dir: Path, tmp_path: Path) -> None:
    """The service answers 503 three times: the room keeps its frame rate on the idle loop
    in silence, says why, tries again every half second of stream, then speaks the whole
    script; the service's time is not billed as this device's."""
    import shutil

    import av

    from avatarfarm.domain import OutputKind, Quality
    from tests.builders import SPEECH, make_spec
    from workers.device.onnx import ProviderChoice
    from workers.device.pipeline import Pipeline
    from workers.models.folder import ModelFolder
    from workers.output.targets import OutputTarget
    from workers.rooms.room import Pacing, Room, RoomState

    root = tmp_path / "models"
    shutil.copytree(model_dir, root)
    (root / "voices").mkdir(exist_ok=True)

    async def body(server: TtsServer) -> Room:
        (root / "voices" / "anna.service.json").write_text(json.dumps(
            {"url": server.url, "sample_rate": RATE, "params": {"voice": "anna"}, "retries": 0,
             "failures_to_open": 1, "open_seconds": 0}))
        pipeline = Pipeline(ModelFolder.open(root), ProviderChoice.CPU, 1)
        try:
            assert pipeline.voice_names() == ["anna"] and pipeline.voice_refusal("anna") is None
            spec = make_spec("svc", quality=Quality(128, 128, 25), seconds=6.0, script=SPEECH)
            room = Room("s-svc", spec, OutputTarget.resolve(OutputKind.FILE, "svc.mp4", tmp_path),
                        pipeline, pacing=Pacing.FAST, voice="anna")
            await room.run()
            return room
        finally:
            await pipeline.aclose()
            pipeline.close()

    room = run_with_server(body, fail=3)
    assert room.state is RoomState.ENDED, room.reason
    assert room.script.voice_failures == 3 and room.script.unavailable == ""
    assert room.stats.stage_seconds["tts"] == 0.0 and room.stats.speech_frames > 25
    assert room.stats.frames_rendered == 150 and room.script.segments_done == 1
    with av.open(str(tmp_path / "svc.mp4")) as c:
        rate = c.streams.audio[0].codec_context.sample_rate
        audio = np.concatenate([f.to_ndarray().mean(axis=0) for f in c.decode(audio=0)])
    onset = np.flatnonzero(np.abs(audio) > 0.05)[0] / rate
    assert 1.4 <= onset <= 1.8  # three failed tries, half a second of stream apart
