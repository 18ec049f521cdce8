"""The MuseTalk family: Whisper rows on the device, latents prepared once per avatar, a UNet
step chained to the VAE decoder, a room on a bundle of a real photograph (scikit-image's
astronaut)."""

from __future__ import annotations

import asyncio
import typing
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from skimage import data

from avatarfarm.avatars import write_bundle_pointer
from avatarfarm.domain import DriveMode
from avatarfarm.preparation.bundle import Bundle, VideoLimits, prepare
from avatarfarm.preparation.faces import PreparationError, TrackPolicy
from avatarfarm.preparation.masks import jaw_mask
from tests.builders import make_video_room
from tests.media import encode_clip, head_motion, probe, speaking_and_quiet
from workers.device.onnx import ModelInterfaceError, OrtModel, ProviderChoice
from workers.device.pipeline import Pipeline, Timed
from workers.families.musetalk import GRID, MuseTalkUNet, WhisperEncoder
from workers.families.rows import RowStream
from workers.models.folder import ModelFolder, add_musetalk, build_reference
from workers.models.musetalk import MUSETALK_PRESETS, build_vae_encoder, build_whisper_encoder
from workers.rooms.room import Room, RoomRefused, RoomState
from workers.rooms.wav2lip_frames import FaceAvatar, FaceFrame

AVATAR = "astronaut-mt"
RATE = 16_000
PREP = dict(limits=VideoLimits(min_seconds=1.0), policy=TrackPolicy(min_side=64))


@pytest.fixture(scope="module")
def clip() -> bytes:
    frames, _ = head_motion(data.astronaut(), 30)
    return encode_clip(frames)


@pytest.fixture(scope="module")
def mt_pipeline(tmp_path_factory: pytest.TempPathFactory, clip: bytes) -> tuple[Pipeline, Bundle]:
    root = tmp_path_factory.mktemp("models")
    build_reference(root, "lite", wav2lip="tiny")
    folder = add_musetalk(root, "tiny")
    assert folder.musetalk is not None and folder.musetalk.vae_encoder is not None
    bundle = prepare(clip, folder.avatar_dir / "bundles", (96,), family="musetalk",
                     vae_encoder=folder.musetalk.vae_encoder.read_bytes(), **PREP)  # type: ignore[arg-type]
    write_bundle_pointer(folder.avatar_dir, AVATAR, bundle.manifest.bundle_id)
    p = Pipeline(ModelFolder.open(root), ProviderChoice.CPU, intra_op_threads=2)
    yield p, bundle  # type: ignore[misc]
    p.close()


def another_vae() -> bytes:
    """A VAE encoder other than the folder's (another file, same interface)."""
    m = build_vae_encoder()
    m.doc_string += " (another one)"
    return m.SerializeToString()


def _ort(name: str, model: onnx.ModelProto, folder: Path) -> OrtModel:
    p = folder / f"{name}.onnx"
    onnx.save(model, str(p))
    return OrtModel(name, p, None, ProviderChoice.CPU, 1)


def test_each_frame_reads_its_own_whisper_rows_among_ten(tmp_path: Path) -> None:
    whisper = WhisperEncoder(_ort("whisper", build_whisper_encoder(MUSETALK_PRESETS["tiny"].encoder),
                                  tmp_path))
    calls: list[int] = []

    async def submit(item: np.ndarray, deadline: float, priority: int) -> Timed:
        calls.append(item.size)
        out, dt = whisper.run({WhisperEncoder.AUDIO: item[None]})
        return Timed(out[0][0], dt)

    audio = np.zeros(RATE * 3, np.float32)  # 3 s: 75 frames; speech-like noise in frame 40
    audio[40 * 640:41 * 640] = 0.2 * np.random.default_rng(2).standard_normal(640)
    stream = RowStream(25, GRID, whisper.silence, submit, 1)

    async def body() -> list[np.ndarray]:
        frames = []
        for i in range(0, audio.size, 640):
            frames += stream.push(audio[i:i + 640], float("inf"))
        frames += stream.finish(75)
        return [await f.value() for f in frames]

    inputs = asyncio.run(body())
    assert len(inputs) == 75 and all(x.shape == (50, 384) for x in inputs)
    # The frame's own two rows are the window's 5th and 6th (x 5 states): rows 20-29.
    own = np.array([x[20:30, :8].mean() for x in inputs])
    assert int(np.argmax(own)) == 40 and own[40] > np.median(own) + 0.5
    # Frames 38 and 42 see the sound too, off-centre (+-2 frames of context).
    assert inputs[38][40:50, :8].mean() > inputs[38][0:10, :8].mean()
    # One chunk of 16 rows ran (the others were silent); items carry 1 s of context.
    assert calls == [GRID.item] and GRID.item == 16_000 + 5_120 + 1_920


def test_preparation_stores_each_frames_masked_and_reference_latents(tmp_path: Path, clip: bytes) -> None:
    vae = build_vae_encoder().SerializeToString()
    a = prepare(clip, tmp_path, (96,), family="musetalk", vae_encoder=vae, **PREP)  # type: ignore[arg-type]
    again = prepare(clip, tmp_path, (96,), family="musetalk", vae_encoder=vae, **PREP)  # type: ignore[arg-type]
    assert again.manifest.bundle_id == a.manifest.bundle_id and a.manifest.family == "musetalk"
    assert 256 in a.manifest.sides  # MuseTalk's crop, added
    latents = a.latents()
    assert latents.shape == (a.manifest.frames, 8, 32, 32) and latents.dtype == np.float32
    masked, ref = latents[:, :4], latents[:, 4:]
    # The masked crop's lower half is blank in latent space too; its upper half is the crop's.
    assert np.abs(masked[:, :, 16:]).max() == 0 and np.abs(ref[:, :, 16:]).mean() > 0.01
    assert np.allclose(masked[:, :, :16], ref[:, :, :16], atol=1e-6)
    # Latents are those of the crop: the VAE's block means, scaled by 0.18215.
    crop = a.crops(256)[0, :, :, ::-1].astype(np.float32) / 127.5 - 1.0
    assert np.allclose(ref[0, 0], crop[:, :, 0].reshape(32, 8, 32, 8).mean(axis=(1, 3)) * 0.18215, atol=1e-4)
    # Each frame's own jaw mask, at the 256 px crop: the mouth and jaw, not the eyes, no edge.
    masks = a.masks()
    assert masks is not None and masks.shape == (a.manifest.frames, 256, 256) and masks.dtype == np.uint8
    assert np.array_equal(masks[5], jaw_mask(a.crops(256)[5]))
    assert masks[:, 184, 128].min() > 200 and masks[:, :100].max() < 30 and masks[:, :, 0].max() == 0
    other = prepare(clip, tmp_path, (96,), family="musetalk", vae_encoder=another_vae(), **PREP)  # type: ignore[arg-type]
    assert other.manifest.bundle_id != a.manifest.bundle_id
    with pytest.raises(PreparationError, match="VAE encoder"):
        prepare(clip, tmp_path, (96,), family="musetalk", **PREP)  # type: ignore[arg-type]


def test_models_that_do_not_fit_are_refused_naming_what_they_have(tmp_path: Path) -> None:
    sample = helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 8, 32, 32])
    cond = helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["B", 77, 768])
    out = helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["B", 4, 32, 32])
    node = helper.make_node("Slice", ["sample", "s", "e", "a"], ["latent"])
    inits = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s", 0), ("e", 4), ("a", 1))]
    bad = helper.make_model(helper.make_graph([node], "bad", [sample, cond], [out], inits),
                            opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ModelInterfaceError,
                       match=r"input encoder_hidden_states is \['B', 77, 768\] where encoder_hidden_states"):
        MuseTalkUNet(_ort("bad-unet", bad, tmp_path))
    x = helper.make_tensor_value_info("input_features", TensorProto.FLOAT, ["B", 80, 3000])
    y = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["B", 80, 3000])
    one_output = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_features"],
                                                                       ["last_hidden_state"])],
                                                     "w", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ModelInterfaceError, match=r"0 outputs are \[B, 1500, 384\].*last_hidden_state"):
        WhisperEncoder(_ort("bad-whisper", one_output, tmp_path))


def mt_room(pipeline: Pipeline, tmp_path: Path, *, drive: DriveMode = DriveMode.TEXT,
            avatar: str = AVATAR) -> Room:
    return typing.cast(Room, make_video_room(pipeline, tmp_path, avatar, drive=drive, output="m.mp4"))


def test_the_redrawn_face_is_blended_through_the_frames_own_jaw_mask(
        mt_pipeline: tuple[Pipeline, Bundle]) -> None:
    _, bundle = mt_pipeline
    face = FaceAvatar(bundle, 256)
    assert face.masks is not None
    drawn = np.random.default_rng(1).uniform(0, 1, (3, 256, 256)).astype(np.float32)
    out, base = face.compose(FaceFrame(3, drawn)), np.asarray(face.frames[3])
    box = bundle.boxes[3]
    mask = cv2.resize(np.asarray(face.masks[3]), (box.w, box.h), interpolation=cv2.INTER_LINEAR)
    inside = (out != base)[box.y:box.y + box.h, box.x:box.x + box.w].any(axis=2)
    assert not inside[mask == 0].any()  # outside the jaw: the base frame, exactly
    assert inside[mask > 250].mean() > 0.9  # inside: the model's face
    outside = np.ones(out.shape[:2], bool)
    outside[box.y:box.y + box.h, box.x:box.x + box.w] = False
    assert np.array_equal(out[outside], base[outside])


def test_a_musetalk_room_on_the_real_photograph_moves_the_mouth_with_speech(
        mt_pipeline: tuple[Pipeline, Bundle], tmp_path: Path) -> None:
    pipeline, bundle = mt_pipeline
    room = mt_room(pipeline, tmp_path)
    asyncio.run(room.run())
    assert room.state is RoomState.ENDED, room.reason
    st = room.stats
    assert st.frames_rendered == 100 and st.late_frames == 0
    whisper_key, unet_key, decoder_key = pipeline.families["musetalk"].keys  # type: ignore[attr-defined]
    stats = pipeline.engine.stats()
    # Every speaking frame was a UNet item and then a decoder item; Whisper ran per chunk.
    assert 0 < st.batched_items < st.frames_rendered
    assert stats[unet_key].items == stats[decoder_key].items == st.batched_items
    assert 0 < stats[whisper_key].items < st.batched_items
    assert pipeline.face_family(AVATAR).key == unet_key and unet_key in pipeline.face_keys()
    from avatarfarm.avatars import video_avatar_face

    face, own_bytes, family = video_avatar_face(pipeline.folder.avatar_dir, AVATAR)
    assert family in pipeline.face_families()  # the scheduler places it on this worker
    assert (face, own_bytes) == ("musetalk", 0) and pipeline.face_profile(unet_key)[0].startswith(face + "/")  # type: ignore[index]
    assert st.stage_seconds["render"] > 0 and st.stage_seconds["audio_to_motion"] > 0

    assert probe(tmp_path / "m.mp4").frames == 100
    speaking, quiet = speaking_and_quiet(tmp_path / "m.mp4", bundle, st.batched_items)
    assert speaking > quiet + 10


def test_rooms_a_musetalk_avatar_cannot_have_are_refused(
        mt_pipeline: tuple[Pipeline, Bundle], tmp_path: Path, clip: bytes) -> None:
    pipeline, _ = mt_pipeline
    with pytest.raises(RoomRefused, match="no motion input"):
        mt_room(pipeline, tmp_path, drive=DriveMode.MOCAP)
    # Latents made by another VAE encoder would not decode right on this worker.
    folder = pipeline.folder
    other = prepare(clip, folder.avatar_dir / "bundles", (96,), family="musetalk",
                    vae_encoder=another_vae(), **PREP)  # type: ignore[arg-type]
    write_bundle_pointer(folder.avatar_dir, "elsewhere", other.manifest.bundle_id)
    with pytest.raises(RoomRefused, match="another VAE encoder"):
        mt_room(pipeline, tmp_path, avatar="elsewhere")


def test_the_command_lines_build_the_models_and_prepare_an_avatar(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from farm.cli import main

    models = tmp_path / "models"
    assert main(["build-models", "--out", str(models), "--wav2lip", "tiny", "--musetalk", "tiny"]) == 0
    folder = ModelFolder.open(models)
    assert folder.musetalk is not None and folder.musetalk.vae_encoder is not None
    frames, _ = head_motion(data.astronaut(), 130)
    video = tmp_path / "anna.mp4"
    video.write_bytes(encode_clip(frames))
    capsys.readouterr()
    assert main(["prepare-avatar", "--video", str(video), "--avatar-dir", str(folder.avatar_dir),
                 "--sides", "96", "--vae-encoder", str(folder.musetalk.vae_encoder),
                 "--avatar-id", "anna"]) == 0
    assert "crops at [96, 256] px, musetalk family" in capsys.readouterr().out
    pipeline = Pipeline(folder, ProviderChoice.CPU, intra_op_threads=1)
    try:
        assert pipeline.video_avatar_refusal("anna") is None  # the folder's own VAE encoder
    finally:
        pipeline.close()


def test_the_start_up_profile_gives_musetalk_one_face_cost_for_both_of_a_frames_stages(
        mt_pipeline: tuple[Pipeline, Bundle]) -> None:
    from avatarfarm.domain import Stage
    from workers.device.profile import measure

    pipeline, _ = mt_pipeline
    profiles = measure(pipeline, [64], [], iterations=1, max_batch=2)
    faces = {p.model: p for p in profiles if p.stage is Stage.FACE}
    assert set(faces) == {f"wav2lip/{pipeline.face_key.model}", "musetalk/musetalk-tiny"}
    mt = faces["musetalk/musetalk-tiny"]
    _, unet, decoder = pipeline.families["musetalk"].keys  # type: ignore[attr-defined]
    step, dec = pipeline.engine.curve(unet), pipeline.engine.curve(decoder)
    assert mt.width == 256 and [b for b, _ in mt.latencies] == [1, 2]
    assert dict(mt.latencies)[1] == pytest.approx(step.seconds(1) + dec.seconds(1))
