"""Ultralight fed by a wenet streaming encoder: Kaldi fbank as Kaldi computes it, one
encoder step per 50 ms batched on the device, a frame's window of steps at any frame
rate, and a room on the real photograph whose mouth moves with its speech."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import typing
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from skimage import data

from avatarfarm.avatars import write_bundle_pointer
from avatarfarm.domain import ScriptSegment
from avatarfarm.preparation.bundle import Bundle, VideoLimits, prepare
from avatarfarm.preparation.faces import TrackPolicy
from tests.builders import make_video_room
from tests.media import encode_clip, head_motion, probe, speaking_and_quiet
from workers.device.onnx import ModelInterfaceError, OrtModel, ProviderChoice
from workers.device.pipeline import Pipeline, Timed
from workers.families.features import WENET, open_features
from workers.families.rows import RowStream
from workers.families.wenet import WenetFeatures
from workers.media.kaldi_fbank import fbank
from workers.models.folder import ModelFolder, build_reference, use_wenet
from workers.models.ultralight import (
    UNET_PRESETS,
    WENET_AUDIO_SHAPE,
    WENET_PRESETS,
    build_ultralight,
    build_wenet,
)
from workers.rooms.room import Room, RoomRefused, RoomState

RATE = 16_000
AVATAR = "astronaut-wenet"


def burst(seconds: float, amp: float = 0.2) -> np.ndarray:
    return (amp * np.random.default_rng(5).standard_normal(round(seconds * RATE))).astype(np.float32)


def _ort(name: str, model: onnx.ModelProto, folder: Path) -> OrtModel:
    p = folder / f"{name}.onnx"
    onnx.save(model, str(p))
    return OrtModel(name, p, None, ProviderChoice.CPU, 1)


@pytest.fixture(scope="module")
def wenet(tmp_path_factory: pytest.TempPathFactory) -> WenetFeatures:
    model = open_features(_ort("wenet", build_wenet(WENET_PRESETS["tiny"]), tmp_path_factory.mktemp("w")))
    assert isinstance(model, WenetFeatures)
    return model


def test_the_filter_bank_is_kaldis() -> None:
    t = np.arange(RATE) / RATE
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + burst(1.0, 0.05)).astype(np.float32)
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0
    opts.mel_opts.num_bins = 80
    opts.energy_floor = 0.0
    kaldi = knf.OnlineFbank(opts)
    kaldi.accept_waveform(RATE, (audio * 32768).tolist())
    kaldi.input_finished()
    expected = np.array([kaldi.get_frame(i) for i in range(kaldi.num_frames_ready)])
    ours = fbank(audio)
    assert ours.shape == expected.shape == (98, 80)
    assert np.abs(ours - expected).max() < 1e-3


def test_a_step_reads_its_own_audio_and_a_silent_step_is_the_models_silence(wenet: WenetFeatures) -> None:
    assert wenet.kind == WENET and wenet.samples == 10_960 and wenet.silence.shape == (1, 16 * 512)
    quiet = np.zeros((1, wenet.samples), np.float32)
    loud = burst(wenet.samples / RATE)[None]
    (out,), _ = wenet.run({WenetFeatures.INPUT: np.concatenate([quiet, loud])})
    assert out.shape == (2, 1, 8192)
    assert np.array_equal(out[0], wenet.silence)
    bands = out[:, 0].reshape(2, 16, 512)[:, :, :32].mean(axis=(1, 2))
    assert bands[1] > bands[0] + 5  # the band power of the step's audio, in its first values


def test_each_frame_reads_the_steps_of_its_own_audio_at_any_frame_rate(wenet: WenetFeatures) -> None:
    calls: list[int] = []

    async def submit(chunk: np.ndarray, deadline: float, priority: int) -> Timed:
        calls.append(chunk.size)
        (out,), dt = wenet.run({WenetFeatures.INPUT: chunk[None]})
        return Timed(out[0], dt)

    for fps in (20, 25):
        calls.clear()
        speech = RowStream(fps, wenet.grid(WENET_AUDIO_SHAPE), wenet.silence, submit, 1)
        audio = np.zeros(RATE * 2, np.float32)  # 2 s, sound from 1.0 s to 1.1 s only
        audio[RATE:RATE + RATE // 10] = burst(0.1)

        async def body(speech: RowStream = speech, fps: int = fps,
                       audio: np.ndarray = audio) -> list[np.ndarray]:
            step = RATE // fps
            frames = []
            for i in range(0, audio.size, step):
                frames += speech.push(audio[i:i + step], float("inf"))
            frames += speech.finish(audio.size // step)
            return [await f.value() for f in frames]

        inputs = asyncio.run(body())
        assert len(inputs) == 2 * fps and all(x.shape == WENET_AUDIO_SHAPE for x in inputs)
        # The frame's own step is the window's centre (step 4 of 8): loudest for the frames
        # at 1.0-1.1 s of stream, whatever the frame rate.
        power = np.array([x.reshape(8, 16, 512)[4, :, :32].mean() for x in inputs])
        loudest = int(np.argmax(power))
        assert 1.0 <= loudest / fps <= 1.1, (fps, loudest)
        # Only the steps whose own 50 ms hold sound ran on the device.
        assert 2 <= len(calls) <= 3 and all(n == wenet.samples for n in calls)


def test_a_graph_without_the_encoders_inputs_is_refused_naming_them(tmp_path: Path) -> None:
    chunk = helper.make_tensor_value_info("chunk", TensorProto.FLOAT, [1, 67, 80])
    att = helper.make_tensor_value_info("att_cache", TensorProto.FLOAT, [3, 8, 16, 128])
    cnn = helper.make_tensor_value_info("cnn_cache", TensorProto.FLOAT, [3, 1, 512, 14])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 67, 80])
    graph = helper.make_graph([helper.make_node("Identity", ["chunk"], ["output"])], "no-offset",
                              [chunk, att, cnn], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ModelInterfaceError, match=r"expected chunk .* offset int64 \[1\].*it has inputs "
                                                   r"chunk tensor\(float\) \[1, 67, 80\]"):
        open_features(_ort("bad", model, tmp_path))


@pytest.fixture(scope="module")
def wenet_pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, Bundle]:
    root = tmp_path_factory.mktemp("models")
    build_reference(root, "lite", wav2lip="tiny")
    folder = use_wenet(root, "tiny")
    assert json.loads((root / "manifest.json").read_text())["features"]["model"] == "wenet.onnx"
    frames, _ = head_motion(data.astronaut(), 30)
    unet = build_ultralight(UNET_PRESETS["tiny"], audio_shape=WENET_AUDIO_SHAPE, features=WENET)
    bundle = prepare(encode_clip(frames), folder.avatar_dir / "bundles", (160,),
                     limits=VideoLimits(min_seconds=1.0), policy=TrackPolicy(min_side=64),
                     model=unet.SerializeToString(), family="ultralight", features="wenet")
    assert bundle.manifest.features == "wenet"
    write_bundle_pointer(folder.avatar_dir, AVATAR, bundle.manifest.bundle_id)
    p = Pipeline(ModelFolder.open(root), ProviderChoice.CPU, intra_op_threads=2)
    yield p, bundle  # type: ignore[misc]
    p.close()


def test_a_room_fed_by_wenet_moves_the_mouth_with_speech(
        wenet_pipeline: tuple[Pipeline, Bundle], tmp_path: Path) -> None:
    pipeline, bundle = wenet_pipeline
    # What the worker says it renders, and what the avatar's bundle says it needs.
    from avatarfarm.avatars import video_avatar_face

    assert pipeline.face_families() == ["ultralight/wenet", "wav2lip"]
    assert video_avatar_face(pipeline.folder.avatar_dir, AVATAR).family == "ultralight/wenet"
    script = (ScriptSegment("Welcome to the live room, three new offers today."),)
    room = typing.cast(Room, make_video_room(pipeline, tmp_path, AVATAR, script=script, seconds=4.0,
                                             output="w.mp4"))
    asyncio.run(room.run())
    assert room.state is RoomState.ENDED, room.reason
    st = room.stats
    assert st.frames_rendered == 100 and st.late_frames == 0
    assert 0 < st.batched_items < st.frames_rendered  # the UNet ran for speech only
    assert probe(tmp_path / "w.mp4").frames == 100
    speaking, quiet = speaking_and_quiet(tmp_path / "w.mp4", bundle, st.batched_items)
    assert speaking > quiet + 10


def test_a_hubert_trained_unet_is_refused_on_a_wenet_worker_naming_its_input(
        wenet_pipeline: tuple[Pipeline, Bundle], tmp_path: Path) -> None:
    pipeline, _ = wenet_pipeline
    frames, _ = head_motion(data.astronaut(), 30)
    hubert_unet = build_ultralight(UNET_PRESETS["tiny"]).SerializeToString()  # [16, 32, 32]
    other = prepare(encode_clip(frames), pipeline.folder.avatar_dir / "bundles", (160,),
                    limits=VideoLimits(min_seconds=1.0), policy=TrackPolicy(min_side=64),
                    model=hubert_unet, family="ultralight")
    write_bundle_pointer(pipeline.folder.avatar_dir, "hubert-trained", other.manifest.bundle_id)
    # Refused before the room starts: the bundle says what its model reads.
    with pytest.raises(RoomRefused, match="reads hubert features and this worker's feature model "
                                          "gives wenet rows"):
        make_video_room(pipeline, tmp_path, "hubert-trained", output="h.mp4")
    # A bundle that claims wenet for a HuBERT model is refused when the model loads, naming
    # the input that does not fit.
    with pytest.raises(ValueError, match=r"audio is \[B, 16, 32, 32\] where audio float32 \[B, C, H, W\] "
                                         r"holding whole video frames of wenet rows"):
        pipeline.families["ultralight"].family(dataclasses.replace(
            other, manifest=dataclasses.replace(other.manifest, features="wenet")))


def test_the_command_line_makes_a_wenet_folder_and_reads_a_models_features_from_its_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from farm.cli import main

    models = tmp_path / "models"
    assert main(["build-models", "--out", str(models), "--wav2lip", "tiny", "--features", "wenet-tiny"]) == 0
    assert f"wenet feature model (Ultralight, LivePortrait avatars) in {models / 'wenet.onnx'}" in \
        capsys.readouterr().out
    assert isinstance(open_features(OrtModel("f", ModelFolder.open(models).features.path,  # type: ignore[union-attr]
                                             None, ProviderChoice.CPU, 1)), WenetFeatures)
    frames, _ = head_motion(data.astronaut(), 130)  # the command line wants 5 s of the person
    (tmp_path / "anna.mp4").write_bytes(encode_clip(frames))
    onnx.save(build_ultralight(UNET_PRESETS["tiny"], audio_shape=WENET_AUDIO_SHAPE, features=WENET),
              str(tmp_path / "anna-wenet.onnx"))
    assert main(["prepare-avatar", "--video", str(tmp_path / "anna.mp4"), "--avatar-dir",
                 str(models / "avatars"), "--model", str(tmp_path / "anna-wenet.onnx"),
                 "--avatar-id", "anna"]) == 0
    assert "audio [128, 16, 32] (8 frames of wenet rows)" in capsys.readouterr().out
    (root,) = (models / "avatars" / "bundles").iterdir()
    assert Bundle.open(root).manifest.features == "wenet"
