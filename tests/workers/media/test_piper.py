"""Neural voices as Piper exports them: espeak-ng's phonemes, Piper's ids, the voice's
signature, sentences batched on the device (across rooms too, padded per length bucket,
each item's audio the same as alone), and a text-driven room speaking with the voice."""

from __future__ import annotations

import asyncio
import json
import shutil
import typing
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from avatarfarm.voices import PiperConfig, VoiceError
from tests.builders import SPEECH, make_spec
from workers.device.onnx import ModelInterfaceError, OrtModel, ProviderChoice
from workers.device.pipeline import Pipeline
from workers.media.audio import SAMPLE_RATE
from workers.media.piper import BUCKETS, PiperModel, chunks, sentences, voice_key
from workers.media.tts import EspeakTTS
from workers.models.folder import ModelFolder
from workers.models.piper import HOP, write_voice
from workers.models.piper import SAMPLE_RATE as VOICE_RATE

VOICE = "stand-in"
TEXT = "Welcome to the show. This lipstick is on sale today! Only nine ninety nine."


@pytest.fixture(scope="module")
def voiced(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The reference model folder with a neural voice in voices/, the worker's default."""
    root = tmp_path_factory.mktemp("voiced")
    shutil.copytree(model_dir, root, dirs_exist_ok=True)
    write_voice(root / "voices", VOICE, "tiny")
    p = Pipeline(ModelFolder.open(root), ProviderChoice.CPU, 1, tts_voice=VOICE)
    yield p  # type: ignore[misc]
    p.close()


def config(tmp_path: Path) -> PiperConfig:
    write_voice(tmp_path, VOICE, "tiny")
    return PiperConfig.read(tmp_path / f"{VOICE}.onnx.json")


def test_phonemes_become_ids_as_piper_makes_them(tmp_path: Path) -> None:
    c = config(tmp_path)
    clauses = EspeakTTS("en-us").phonemes("Hello world. Nine ninety nine!")
    assert len(clauses) == 2 and "\u02c8" in clauses[0]  # IPA, with its primary stress mark
    ids = c.ids(clauses[0])
    bos, eos, pad = c.phoneme_ids["^"][0], c.phoneme_ids["$"][0], c.phoneme_ids["_"][0]
    known = [ch for ch in clauses[0] if ch in c.phoneme_ids]
    # ^, then each phoneme followed by the pad, then $.
    assert ids[0] == bos and ids[-1] == eos and len(ids) == 2 + 2 * len(known)
    assert ids[2:-1:2] == [pad] * len(known) and ids[1] == c.phoneme_ids[known[0]][0]
    assert sentences(TEXT) == ["Welcome to the show.", "This lipstick is on sale today!",
                               "Only nine ninety nine."]


def test_a_sentence_longer_than_the_largest_bucket_is_cut_after_a_pad(tmp_path: Path) -> None:
    c = config(tmp_path)
    long = c.ids(" ".join(EspeakTTS("en-us").phonemes("word " * 200)))
    parts = chunks(long, c)
    assert len(parts) > 1 and all(len(p) <= BUCKETS[-1] + 1 for p in parts)
    assert all(p[0] == c.phoneme_ids["^"][0] and p[-1] == c.phoneme_ids["$"][0] for p in parts)


def test_a_config_or_model_that_is_not_a_piper_voice_is_refused_saying_why(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx.json"
    bad.write_text(json.dumps({"audio": {"sample_rate": 22050}}))
    with pytest.raises(VoiceError, match="phoneme_id_map"):
        PiperConfig.read(bad)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["audio"])], "g",
        [helper.make_tensor_value_info("text", TensorProto.FLOAT, ["B", "T"])],
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", "T"])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ModelInterfaceError, match=r"input int64 \[B, T\], input_lengths"):
        PiperModel(OrtModel("bad", path, None, ProviderChoice.CPU, 1), config(tmp_path))


def test_sentences_and_rooms_share_the_voices_calls_and_sound_as_alone(voiced: Pipeline) -> None:
    from avatarfarm.latency import LatencyCurve

    voice = voiced.voices[VOICE]

    async def speak() -> tuple[list[np.ndarray], float]:
        alone = (await voiced.synthesize("Welcome to the show.")).value
        # The voice's curve as a GPU's would be (a call of 8 costs little more than one),
        # so the batcher waits a moment for company: on this CPU a batch costs what its
        # items would alone, and whether it waits would depend on noisy timings.
        for b in BUCKETS:
            voiced.engine.serve(voice_key(VOICE, b), voice,
                                LatencyCurve(((1, 0.010), (2, 0.011), (4, 0.012), (8, 0.014))))
        before = sum(s.items for k, s in voiced.engine.stats().items() if k.model == f"voice-{VOICE}")
        calls_before = sum(sum(s.batch_sizes.values()) for k, s in voiced.engine.stats().items()
                           if k.model == f"voice-{VOICE}")
        # Two rooms' segments at once: five sentences.
        both = await asyncio.gather(voiced.synthesize(TEXT), voiced.synthesize("Welcome to the show. Hi!"))
        stats = [s for k, s in voiced.engine.stats().items() if k.model == f"voice-{VOICE}"]
        items = sum(s.items for s in stats) - before
        calls = sum(sum(s.batch_sizes.values()) for s in stats) - calls_before
        return [alone, both[0].value, both[1].value], items / calls if calls else 0.0
    (alone, text, second), per_call = asyncio.run(speak())
    assert per_call > 1.0  # sentences shared the device's calls
    # The first sentence of the second room's segment is the sentence spoken alone: the
    # padding of a shared call changes nothing of it.
    assert np.allclose(second[:alone.size], alone, atol=1e-4)
    # The voice speaks: loud, and as long as its ids last (2 frames of 256 samples an id).
    assert np.sqrt(np.mean(text ** 2)) > 0.05
    cfg = voiced.voice.config  # type: ignore[union-attr]
    ids = sum(len(cfg.ids(c)) for s in sentences(TEXT) for c in voiced.tts.phonemes(s))
    expected = ids * 2 * HOP / VOICE_RATE
    assert 0.8 * expected < text.size / SAMPLE_RATE < 1.1 * expected
    assert {k for k in voiced.engine.stats() if k.model == f"voice-{VOICE}"} <= \
        {voice_key(VOICE, b) for b in BUCKETS}


def test_a_text_room_speaks_with_the_neural_voice(voiced: Pipeline, tmp_path: Path) -> None:
    from avatarfarm.domain import OutputKind, Quality
    from tests.media import mouth_openness
    from workers.output.targets import OutputTarget
    from workers.rooms.room import Pacing, Room, RoomState

    spec = make_spec("voice", quality=Quality(256, 256, 25), seconds=5.0, script=SPEECH)
    room = Room("s-voice", spec, OutputTarget.resolve(OutputKind.FILE, "voice.mp4", tmp_path), voiced,
                pacing=Pacing.FAST)
    asyncio.run(room.run())
    assert room.state is RoomState.ENDED, room.reason
    assert room.stats.stage_seconds["tts"] > 0 and room.stats.speech_frames > 50
    # The avatar speaks with it: the mouth moves while the voice speaks, rests after.
    openness = mouth_openness(tmp_path / "voice.mp4")
    speaking, rest = openness[5:room.stats.speech_frames - 5], openness[-15:]
    assert speaking.std() > 3 * max(rest.std(), 0.5) and speaking.max() > rest.max() + 10


def test_a_room_speaks_with_its_avatars_voice_and_one_the_worker_lacks_is_refused(
        model_dir: Path, tmp_path: Path) -> None:
    from avatarfarm.domain import OutputKind, Quality
    from workers.output.targets import OutputTarget
    from workers.rooms.room import Pacing, Room, RoomRefused, RoomState

    root = tmp_path / "models"
    shutil.copytree(model_dir, root)
    write_voice(root / "voices", VOICE, "tiny")
    pipeline = Pipeline(ModelFolder.open(root), ProviderChoice.CPU, 1)  # espeak-ng by default
    try:
        assert pipeline.voice is None and pipeline.voice_refusal("de") is None
        assert "no voice 'nobody'" in (pipeline.voice_refusal("nobody") or "")
        spec = make_spec("voice", quality=Quality(256, 256, 25), seconds=3.0, script=SPEECH)
        target = OutputTarget.resolve(OutputKind.FILE, "v.mp4", tmp_path)
        with pytest.raises(RoomRefused, match="no voice 'nobody'"):
            Room("s-nobody", spec, target, pipeline, pacing=Pacing.FAST, voice="nobody")
        room = Room("s-voice", spec, target, pipeline, pacing=Pacing.FAST, voice=VOICE)
        asyncio.run(room.run())
        assert room.state is RoomState.ENDED, room.reason
        # The avatar's neural voice spoke, not the worker's espeak-ng default.
        items = sum(s.items for k, s in pipeline.engine.stats().items() if k.model == f"voice-{VOICE}")
        assert items >= 1 and room.stats.speech_frames > 25
    finally:
        pipeline.close()


def test_the_worker_names_its_voices_and_times_each_per_second_of_speech(
        voiced: Pipeline, tmp_path: Path) -> None:
    from avatarfarm.domain import HOST_TTS, Stage
    from scheduler.api.worker_service import profile_from_pb
    from workers.agent.agent import WorkerAgent, profile_to_pb
    from workers.device.profile import measure
    from workers.rooms.room import Pacing

    profiles = measure(voiced, [64], [], iterations=1, max_batch=4)
    tts = {p.model: p for p in profiles if p.stage is Stage.TTS}
    assert set(tts) == {HOST_TTS, VOICE}
    assert [b for b, _ in tts[VOICE].latencies] == [1, 2, 4]
    # Device seconds per second of speech: the tiny voice is far faster than real time,
    # and a batch of 4 sentences costs more than one.
    one, four = tts[VOICE].latencies[0][1], tts[VOICE].latencies[-1][1]
    assert 0 < one < 0.5 and four >= one
    # The scheduler reads the voice's cost apart from espeak-ng's host seconds.
    placed = profile_from_pb([profile_to_pb(p) for p in profiles])
    neural, espeak = placed.cost(Stage.TTS, model=VOICE), placed.cost(Stage.TTS)
    assert neural is not None and espeak is not None
    assert neural[0].model == VOICE and espeak[0].model == HOST_TTS

    async def register() -> list[str]:
        agent = WorkerAgent("w1", "127.0.0.1:1", voiced, [], "127.0.0.1:1", "cpu", tmp_path,
                            pacing=Pacing.FAST)
        try:
            return list(agent.register().register.voices)
        finally:
            await agent.shutdown()

    assert asyncio.run(register()) == [VOICE]


def test_voices_registered_after_the_worker_started_are_loaded_when_a_room_names_them(
        model_dir: Path, tmp_path: Path) -> None:
    from avatarfarm.voices import registered_voices

    root = tmp_path / "models"
    shutil.copytree(model_dir, root)
    registered = registered_voices(root / "avatars")
    write_voice(registered, "at-start", "tiny")
    pipeline = Pipeline(ModelFolder.open(root), ProviderChoice.CPU, 1)
    try:
        assert pipeline.voice_names() == ["at-start"]
        assert "no voice 'later'" in (pipeline.voice_refusal("later") or "")
        write_voice(registered, "later", "tiny")  # registered while the worker runs
        (registered / "broken.onnx").write_bytes(b"not a model")
        (registered / "broken.onnx.json").write_text("{}")
        assert pipeline.voice_refusal("later") is None and "later" in pipeline.voice_names()
        assert "no voice 'broken'" in (pipeline.voice_refusal("broken") or "")

        async def speak() -> np.ndarray:
            return (await pipeline.synthesize("Hello there.", voice_name="later")).value

        assert asyncio.run(speak()).size > SAMPLE_RATE // 4
    finally:
        pipeline.close()


def test_an_avatars_speaking_rate_sets_a_neural_voices_pace(voiced: Pipeline) -> None:
    from workers.media.piper import length_scale

    config = voiced.voice.config  # type: ignore[union-attr]
    assert length_scale(config, 0) == config.scales[1]
    assert length_scale(config, 110) == pytest.approx(config.scales[1] * 1.5)
    assert length_scale(config, 10) == pytest.approx(config.scales[1] * 2.0)  # bounded

    async def speak() -> list[int]:
        return [(await voiced.synthesize(TEXT, voice_name=VOICE, rate=wpm)).value.size
                for wpm in (0, 110, 330)]

    own, slow, fast = asyncio.run(speak())
    assert slow / own == pytest.approx(1.5, rel=0.05) and fast / own == pytest.approx(0.5, rel=0.05)
    # Each pace is its own batch key: a call's items share its scales.
    paces = {k.model for k in voiced.engine.keys() if k.model.startswith(f"voice-{VOICE}")}
    assert paces == {f"voice-{VOICE}", f"voice-{VOICE}x1.50", f"voice-{VOICE}x0.50"}


def test_a_voice_loaded_after_start_is_reported_to_the_scheduler_once(model_dir: Path, tmp_path: Path) -> None:
    from avatarfarm.v1 import workers_pb2
    from avatarfarm.voices import registered_voices
    from workers.agent.agent import WorkerAgent
    from workers.rooms.room import Pacing

    root = tmp_path / "models"
    shutil.copytree(model_dir, root)
    pipeline = Pipeline(ModelFolder.open(root), ProviderChoice.CPU, 1)

    def voices(profiles: typing.Iterable[workers_pb2.LatencyProfile]) -> list[str]:
        return [p.model for p in profiles if p.stage == workers_pb2.STAGE_TTS]

    async def body() -> tuple[list[str], list[str], list[str]]:
        agent = WorkerAgent("w1", "127.0.0.1:1", pipeline, [], "127.0.0.1:1", "cpu", tmp_path,
                            pacing=Pacing.FAST)
        try:
            write_voice(registered_voices(root / "avatars"), "later", "tiny")
            assert pipeline.voice_refusal("later") is None  # a room named it
            sent = [p for m in agent.tick() if m.WhichOneof("kind") == "profile_update"
                    for p in m.profile_update.profiles]
            again = [p for m in agent.tick() if m.WhichOneof("kind") == "profile_update"
                     for p in m.profile_update.profiles]
            reg = agent.register().register
            return voices(sent), voices(again), voices(reg.profiles)
        finally:
            await agent.shutdown()
            pipeline.close()

    sent, again, registered = asyncio.run(body())
    assert sent == ["later"] and again == [] and registered == ["later"]
