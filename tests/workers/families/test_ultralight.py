"""The Ultralight family: HuBERT rows batched on the device, a per-person UNet carried in
the avatar's bundle, a room on a bundle of a real photograph (scikit-image's astronaut)."""

from __future__ import annotations

import asyncio
import json
import typing
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from skimage import data

from avatarfarm.avatars import write_bundle_pointer
from avatarfarm.domain import DriveMode, ScriptSegment
from avatarfarm.preparation.bundle import Bundle, VideoLimits, prepare
from avatarfarm.preparation.faces import PreparationError, TrackPolicy
from tests.builders import make_video_room
from tests.media import encode_clip, head_motion, probe, speaking_and_quiet
from workers.device.binding import ModelBindingError, bind_lipsync
from workers.device.onnx import ModelInterfaceError, OrtModel, ProviderChoice
from workers.device.pipeline import Pipeline, Timed
from workers.families import ultralight
from workers.families.hubert import FeatureModel
from workers.families.rows import RowStream
from workers.models.folder import ModelFolder, build_reference
from workers.models.ultralight import (
    FEATURE_PRESETS,
    HUBERT,
    UNET_PRESETS,
    build_hubert,
    build_ultralight,
)
from workers.rooms.room import Pacing, Room, RoomRefused, RoomState

AVATAR = "astronaut-ul"
RATE = 16_000


def burst(seconds: float, amp: float = 0.2) -> np.ndarray:
    """Broadband sound (speech-like in the band powers the stand-in reads)."""
    return (amp * np.random.default_rng(3).standard_normal(round(seconds * RATE))).astype(np.float32)


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> FeatureModel:
    return FeatureModel(_ort("hubert", build_hubert(FEATURE_PRESETS["tiny"]), tmp_path_factory.mktemp("f")))


def _ort(name: str, model: onnx.ModelProto, folder: Path) -> OrtModel:
    p = folder / f"{name}.onnx"
    onnx.save(model, str(p))
    return OrtModel(name, p, None, ProviderChoice.CPU, 1)


@pytest.fixture(scope="module")
def ul_pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, Bundle]:
    root = tmp_path_factory.mktemp("models")
    folder = build_reference(root, "lite", wav2lip="tiny")
    frames, _ = head_motion(data.astronaut(), 30)
    unet = build_ultralight(UNET_PRESETS["tiny"]).SerializeToString()
    bundle = prepare(encode_clip(frames), folder.avatar_dir / "bundles", (160,),
                     limits=VideoLimits(min_seconds=1.0), policy=TrackPolicy(min_side=64),
                     model=unet, family="ultralight")
    write_bundle_pointer(folder.avatar_dir, AVATAR, bundle.manifest.bundle_id)
    p = Pipeline(ModelFolder.open(root), ProviderChoice.CPU, intra_op_threads=2)
    yield p, bundle  # type: ignore[misc]
    p.close()


def run_speech(speech: RowStream, audio: np.ndarray, fps: int) -> list[np.ndarray]:
    """Pushes `audio` a frame at a time, finishes, and returns every frame's input."""

    async def body() -> list[np.ndarray]:
        step = RATE // fps
        frames = []
        for i in range(0, audio.size, step):
            frames += speech.push(audio[i:i + step], float("inf"))
        frames += speech.finish(audio.size // step)
        return [await f.value() for f in frames]

    return asyncio.run(body())


def test_each_frame_reads_the_rows_of_its_own_audio_at_the_window_centre(features: FeatureModel) -> None:
    calls: list[int] = []

    async def submit(chunk: np.ndarray, deadline: float, priority: int) -> Timed:
        calls.append(chunk.size)
        out, dt = features.run({FeatureModel.INPUT: chunk[None]})
        return Timed(out[0][0], dt)

    speech = RowStream(25, features.grid((16, 32, 32)), features.silence, submit, 1)
    audio = np.zeros(RATE * 2, np.float32)  # 2 s: 50 frames, a tone in frame 20 only
    audio[20 * 640:21 * 640] = burst(0.04)
    inputs = run_speech(speech, audio, 25)
    assert len(inputs) == 50 and all(x.shape == (16, 32, 32) for x in inputs)
    # The frame's own two rows sit at the window's centre (rows 8 and 9 of 16).
    power = np.array([x.reshape(16, 1024)[8:10, :32].mean() for x in inputs])
    assert int(np.argmax(power)) == 20
    assert power[20] > np.median(power) + 1.0
    # Silent chunks never reach the device: only the chunks touching the tone ran.
    assert 1 <= len(calls) <= 2 and all(n == 720 for n in calls)
    # A frame whose whole window is silent is said to be so (no model call).
    speech = RowStream(25, features.grid((16, 32, 32)), features.silence, submit, 1)

    async def flags() -> list[bool]:
        out = []
        for i in range(0, audio.size, 640):
            out += [f.silent for f in speech.push(audio[i:i + 640], float("inf"))]
        return out + [f.silent for f in speech.finish(50)]

    silent = asyncio.run(flags())
    assert not silent[20] and silent[0] and silent[40]


def test_the_window_follows_stream_time_at_another_frame_rate(features: FeatureModel) -> None:
    async def submit(chunk: np.ndarray, deadline: float, priority: int) -> Timed:
        out, dt = features.run({FeatureModel.INPUT: chunk[None]})
        return Timed(out[0][0], dt)

    speech = RowStream(20, features.grid((16, 32, 32)), features.silence, submit, 1)
    audio = np.zeros(RATE * 2, np.float32)
    audio[round(1.0 * RATE):round(1.05 * RATE)] = burst(0.05)  # at 1.0 s: frame 20 at 20 fps
    inputs = run_speech(speech, audio, 20)
    assert len(inputs) == 40
    power = np.array([x.reshape(16, 1024)[8:10, :32].mean() for x in inputs])
    assert int(np.argmax(power)) == 20


def test_a_feature_model_that_does_not_fit_is_refused_naming_what_it_has(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("wave", TensorProto.FLOAT, ["B", 1, "N"])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 1, "N"])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["wave"], ["out"])],
                                                "bad", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ModelInterfaceError, match=r"expected input float32 \[B, N\].*wave"):
        FeatureModel(_ort("bad", model, tmp_path))


def test_a_unet_whose_audio_input_is_not_whole_frames_of_rows_is_refused_naming_it() -> None:
    faces = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", 6, 160, 160])
    audio = helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", 16, 32, 30])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 3, 160, 160])
    node = helper.make_node("Slice", ["input", "s", "e", "a"], ["output"])
    inits = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s", 0), ("e", 3), ("a", 1))]
    model = helper.make_model(helper.make_graph([node], "bad", [faces, audio], [out], inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(ModelBindingError, match=r"input audio is \[B, 16, 32, 30\] where audio float32"):
        bind_lipsync(session, ultralight.LAYOUT, name="bad", audio=ultralight.audio_role(HUBERT))
    # The family's own stand-in binds: real crop first, a window of 8 frames of rows.
    good = build_ultralight(UNET_PRESETS["tiny"])
    b = bind_lipsync(ort.InferenceSession(good.SerializeToString(), providers=["CPUExecutionProvider"]),
                     ultralight.LAYOUT, audio=ultralight.audio_role(HUBERT))
    assert (b.faces, b.mel, b.side, b.audio_shape) == ("input", "audio", 160, (16, 32, 32))


def test_the_masked_copy_blacks_out_the_family_rectangle_after_the_real_crop() -> None:
    from workers.device.binding import make_feeds

    good = build_ultralight(UNET_PRESETS["tiny"])
    b = bind_lipsync(ort.InferenceSession(good.SerializeToString(), providers=["CPUExecutionProvider"]),
                     ultralight.LAYOUT, audio=ultralight.audio_role(HUBERT))
    crops = np.full((1, 160, 160, 3), 200, np.uint8)
    x = make_feeds(b, np.zeros((1, 16, 32, 32), np.float32), crops)["input"]
    real, masked = x[0, :3], x[0, 3:]
    assert np.allclose(real, 200 / 255)
    assert np.all(masked[:, 5:151, 5:156] == 0)  # (5, 5, 150, 145): both ends included
    assert np.allclose(masked[:, :5], 200 / 255) and np.allclose(masked[:, 151:], 200 / 255)
    assert np.allclose(masked[:, :, 156:], 200 / 255)


def test_preparation_stores_the_persons_model_in_the_bundle_and_its_id(tmp_path: Path) -> None:
    frames, _ = head_motion(data.astronaut(), 30)
    clip = encode_clip(frames)
    kw = dict(limits=VideoLimits(min_seconds=1.0), policy=TrackPolicy(min_side=64))
    unet = build_ultralight(UNET_PRESETS["tiny"]).SerializeToString()
    a = prepare(clip, tmp_path, (160,), model=unet, family="ultralight", **kw)  # type: ignore[arg-type]
    again = prepare(clip, tmp_path, (160,), model=unet, family="ultralight", **kw)  # type: ignore[arg-type]
    plain = prepare(clip, tmp_path, (160,), **kw)  # type: ignore[arg-type]
    assert again.manifest.bundle_id == a.manifest.bundle_id != plain.manifest.bundle_id
    assert a.manifest.family == "ultralight" and plain.manifest.family == "wav2lip"
    assert a.model_path is not None and a.model_path.read_bytes() == unet
    assert plain.model_path is None
    assert Bundle.open(a.root).manifest == a.manifest
    with pytest.raises(PreparationError, match="own model"):
        prepare(clip, tmp_path, (160,), family="ultralight", **kw)  # type: ignore[arg-type]


def ul_room(pipeline: Pipeline, tmp_path: Path, *, drive: DriveMode = DriveMode.TEXT,
            seconds: float = 4.0, script: tuple[ScriptSegment, ...] = ()) -> Room:
    return typing.cast(Room, make_video_room(pipeline, tmp_path, AVATAR, drive=drive, seconds=seconds,
                                             script=script, output="u.mp4"))


def test_an_ultralight_room_on_the_real_photograph_moves_the_mouth_with_speech(
        ul_pipeline: tuple[Pipeline, Bundle], tmp_path: Path) -> None:
    pipeline, bundle = ul_pipeline
    script = (ScriptSegment("Welcome to the live room, three new offers today."),)
    room = ul_room(pipeline, tmp_path, script=script)
    asyncio.run(room.run())
    assert room.state is RoomState.ENDED, room.reason
    st = room.stats
    assert st.frames_rendered == 100 and st.late_frames == 0
    assert room.family is not None and AVATAR not in pipeline.warm_avatars()  # unloaded
    key = room.family.key
    assert key.model == f"ultralight-{bundle.manifest.bundle_id[:12]}" and key.side == 160
    # The scheduler reads the same name from the bundle, and places the room by its profile.
    from avatarfarm.avatars import video_avatar_face

    assert video_avatar_face(pipeline.folder.avatar_dir, AVATAR) == (
        key.model, (bundle.root / "model.onnx").stat().st_size,  # the model a worker loads
        "ultralight/hubert")  # and what it must render: this worker does
    assert pipeline.face_families() == ["ultralight/hubert", "wav2lip"]
    assert video_avatar_face(pipeline.folder.avatar_dir, "presenter") == ("", 0, "")
    # The room was the avatar's last here: its model is unloaded, its counters kept.
    assert key not in pipeline.face_keys() and not pipeline.engine.serves(key)
    assert pipeline.engine.stats()[key].items == st.batched_items
    # The UNet ran for speech only; the HuBERT rows were device items too, and cost the room.
    assert 0 < st.batched_items < st.frames_rendered
    assert st.stage_seconds["render"] > 0 and st.stage_seconds["audio_to_motion"] > 0

    assert probe(tmp_path / "u.mp4").frames == 100
    speaking, quiet = speaking_and_quiet(tmp_path / "u.mp4", bundle, st.batched_items)
    assert speaking > quiet + 10


def test_rooms_an_ultralight_avatar_cannot_have_are_refused(
        ul_pipeline: tuple[Pipeline, Bundle], tmp_path: Path) -> None:
    pipeline, bundle = ul_pipeline
    with pytest.raises(RoomRefused, match="no motion input"):
        ul_room(pipeline, tmp_path, drive=DriveMode.MOCAP)
    # A worker whose folder has no feature model cannot feed the person's UNet.
    root = tmp_path / "nofeatures"
    build_reference(root, "lite", wav2lip="tiny")
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["features"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    write_bundle_pointer(root / "avatars", AVATAR, bundle.manifest.bundle_id)
    (root / "avatars" / "bundles").mkdir(exist_ok=True)
    (root / "avatars" / "bundles" / bundle.manifest.bundle_id).symlink_to(bundle.root)
    bare = Pipeline(ModelFolder.open(root), ProviderChoice.CPU, intra_op_threads=1)
    try:
        with pytest.raises(RoomRefused, match="no audio feature model"):
            ul_room(bare, tmp_path, drive=DriveMode.TEXT)
    finally:
        bare.close()


def test_the_command_line_stores_a_fitting_model_and_refuses_one_that_does_not(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from farm.cli import main

    frames, _ = head_motion(data.astronaut(), 130)
    video = tmp_path / "anna.mp4"
    video.write_bytes(encode_clip(frames))
    avatars = tmp_path / "avatars"
    bad = build_ultralight(UNET_PRESETS["tiny"], audio_shape=(8, 32, 32))  # 4 frames: fits
    bad.graph.input[1].type.tensor_type.shape.dim[3].dim_value = 30  # now it does not
    (tmp_path / "bad.onnx").write_bytes(bad.SerializeToString())
    assert main(["prepare-avatar", "--video", str(video), "--avatar-dir", str(avatars),
                 "--model", str(tmp_path / "bad.onnx")]) == 2
    assert "input audio is [B, 8, 32, 30]" in capsys.readouterr().err and not avatars.exists()
    onnx.save(build_ultralight(UNET_PRESETS["tiny"]), str(tmp_path / "anna-unet.onnx"))
    assert main(["prepare-avatar", "--video", str(video), "--avatar-dir", str(avatars), "--sides", "96",
                 "--model", str(tmp_path / "anna-unet.onnx"), "--avatar-id", "anna"]) == 0
    out = capsys.readouterr().out
    assert "crop side 160, audio [16, 32, 32] (8 frames of hubert rows)" in out
    assert "crops at [96, 160] px, ultralight family" in out
    (root,) = (avatars / "bundles").iterdir()
    bundle = Bundle.open(root)
    assert bundle.manifest.family == "ultralight" and bundle.model_path is not None


def test_a_frame_given_up_does_not_take_its_shared_rows_with_it(features: FeatureModel) -> None:
    async def body() -> np.ndarray:
        gate = asyncio.Event()

        async def submit(chunk: np.ndarray, deadline: float, priority: int) -> Timed:
            await gate.wait()  # the device is busy: the rows come later
            out, dt = features.run({FeatureModel.INPUT: chunk[None]})
            return Timed(out[0][0], dt)

        speech = RowStream(25, features.grid((16, 32, 32)), features.silence, submit, 1)
        windows = []
        for _ in range(25):  # 1 s of sound, a frame at a time
            windows += speech.push(burst(0.04), float("inf"))
        first, second = windows[10], windows[9]  # both read the chunk of rows 12-13
        given_up = asyncio.ensure_future(first.value())
        await asyncio.sleep(0)
        given_up.cancel()  # the room's deadline for that frame passed
        gate.set()
        return await second.value()

    value = asyncio.run(body())
    assert value.shape == (16, 32, 32) and value.reshape(16, 1024)[8:10, :32].mean() > -8.5


def test_the_worker_reports_an_avatars_own_model_once_loaded(
        ul_pipeline: tuple[Pipeline, Bundle], tmp_path: Path) -> None:
    from avatarfarm.avatars import face_model
    from workers.agent.agent import WorkerAgent

    pipeline, bundle = ul_pipeline
    name = face_model("ultralight", bundle.manifest.bundle_id)

    async def body() -> list[tuple[str, int]]:
        agent = WorkerAgent("w1", "127.0.0.1:1", pipeline, [], "127.0.0.1:1", "cpu", tmp_path,
                            pacing=Pacing.FAST)
        try:
            reg = agent.register().register
            assert list(reg.face_families) == ["ultralight/hubert", "wav2lip"]
            pipeline.face_avatar_sync(AVATAR)  # a room of the avatar started here
            sent = [p for m in agent.tick() if m.WhichOneof("kind") == "profile_update"
                    for p in m.profile_update.profiles]
            again = [m for m in agent.tick() if m.WhichOneof("kind") == "profile_update"]
            assert again == []  # reported once
            return [(p.model, p.width) for p in sent]
        finally:
            await agent.shutdown()

    # The scheduler now places the avatar's rooms by its model's own measured cost.
    assert (name, 160) in asyncio.run(body())


def test_an_avatars_own_model_is_unloaded_with_its_last_room_and_loaded_again_for_the_next(
        ul_pipeline: tuple[Pipeline, Bundle]) -> None:
    pipeline, _ = ul_pipeline
    first = pipeline.hold_face_sync(AVATAR)[1]  # two rooms of the avatar start here
    second = pipeline.hold_face_sync(AVATAR)[1]
    key = first.key
    assert second.key == key and pipeline.engine.serves(key) and key in pipeline.face_keys()
    pipeline.release_face_sync(first)  # one ends: the other still renders with the model
    assert pipeline.engine.serves(key) and AVATAR in pipeline.warm_avatars()
    pipeline.release_face_sync(second)  # the last ends: the model and its avatar go
    assert not pipeline.engine.serves(key) and key not in pipeline.face_keys()
    assert AVATAR not in pipeline.warm_avatars()
    again = pipeline.hold_face_sync(AVATAR)[1]  # a later room loads it again
    try:
        assert again.key == key and pipeline.engine.serves(key)
    finally:
        pipeline.release_face_sync(again)
    # A Wav2Lip avatar's model is the folder's: it stays loaded for the family's other avatars.
    assert pipeline.families["wav2lip"].release(pipeline.face_key) is False
    assert pipeline.engine.serves(pipeline.face_key)
