"""The LivePortrait family: a source portrait prepared once (appearance and keypoints),
audio-driven motion from HuBERT rows, keypoints transformed, stitched and warped on the
device; a room on a bundle of a real photograph (scikit-image's astronaut)."""

from __future__ import annotations

import asyncio
import os
import sys
import typing
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from skimage import data

from avatarfarm.avatars import write_bundle_pointer
from avatarfarm.domain import DriveMode, Stage
from avatarfarm.face_motion import face_motion
from avatarfarm.input_tokens import driver_key
from avatarfarm.preparation.bundle import Bundle, VideoLimits, prepare
from avatarfarm.preparation.faces import PreparationError, TrackPolicy
from avatarfarm.preparation.keypoints import degrees
from tests.builders import make_video_room
from tests.driver_publisher import mouth_open
from tests.media import encode_clip, head_motion, probe, speaking_and_quiet, video_avatar_mouths
from workers.device.onnx import ModelInterfaceError, OrtModel, ProviderChoice
from workers.device.pipeline import FACE_READER_KEY, Pipeline
from workers.families.liveportrait import load_warping, motion_of, rotation, transform
from workers.ingest.registry import DriverRooms
from workers.ingest.rtmp import RtmpIngest
from workers.models.folder import ModelFolder, add_liveportrait, build_reference
from workers.models.liveportrait import JAW, KEYPOINTS, build_motion_extractor
from workers.rooms.room import Room, RoomRefused, RoomState

AVATAR = "astronaut-lp"
PREP = dict(limits=VideoLimits(min_seconds=1.0), policy=TrackPolicy(min_side=64))


@pytest.fixture(scope="module")
def clip() -> bytes:
    frames, _ = head_motion(data.astronaut(), 30)
    return encode_clip(frames)


def extractors(folder: ModelFolder) -> tuple[bytes, bytes]:
    assert folder.liveportrait is not None
    return folder.liveportrait.appearance.read_bytes(), folder.liveportrait.motion.read_bytes()


@pytest.fixture(scope="module")
def lp_pipeline(tmp_path_factory: pytest.TempPathFactory, clip: bytes) -> tuple[Pipeline, Bundle]:
    root = tmp_path_factory.mktemp("models")
    build_reference(root, "lite", wav2lip="tiny")
    folder = add_liveportrait(root, "tiny")
    bundle = prepare(clip, folder.avatar_dir / "bundles", (96,), family="liveportrait",
                     extractors=extractors(folder), **PREP)  # type: ignore[arg-type]
    write_bundle_pointer(folder.avatar_dir, AVATAR, bundle.manifest.bundle_id)
    p = Pipeline(ModelFolder.open(root), ProviderChoice.CPU, intra_op_threads=2)
    yield p, bundle  # type: ignore[misc]
    p.close()


def test_keypoints_are_posed_as_liveportrait_poses_them() -> None:
    kp = KEYPOINTS
    zero = np.zeros(3, np.float32)
    # A frontal pose with no expression: the canonical face, scaled and moved in x and y.
    out = transform(kp, zero, np.zeros(63, np.float32), 2.0, np.array([0.1, -0.2, 5.0], np.float32))
    assert np.allclose(out, kp * 2 + np.array([0.1, -0.2, 0.0]), atol=1e-6)
    # A yaw of 90 degrees turns the face: x goes into depth.
    turned = transform(kp, np.array([0, 90, 0], np.float32), np.zeros(63, np.float32), 1.0, zero)
    assert np.allclose(turned[:, 0], kp[:, 2], atol=1e-5) and np.allclose(turned[:, 2], -kp[:, 0], atol=1e-5)
    assert np.allclose(rotation(0, 0, 0), np.eye(3))
    # The 66-bin angles: centred on bins 32 and 33, 0 degrees; on bin 0, -97.5.
    bins = np.full(66, -50.0)
    bins[32] = bins[33] = 50.0
    assert degrees(bins) == pytest.approx(0.0, abs=1e-6)
    bins = np.full(66, -50.0)
    bins[0] = 50.0
    assert degrees(bins) == pytest.approx(-97.5, abs=1e-6)


def test_preparation_stores_the_source_appearance_and_keypoints(tmp_path: Path, clip: bytes) -> None:
    root = tmp_path / "models"
    build_reference(root, "lite", wav2lip=None)
    folder = add_liveportrait(root, "tiny")
    a = prepare(clip, tmp_path / "b", (96,), family="liveportrait", extractors=extractors(folder), **PREP)  # type: ignore[arg-type]
    again = prepare(clip, tmp_path / "b", (96,), family="liveportrait", extractors=extractors(folder), **PREP)  # type: ignore[arg-type]
    assert again.manifest.bundle_id == a.manifest.bundle_id and a.manifest.family == "liveportrait"
    assert {256, 512} <= set(a.manifest.sides)
    src = a.source()
    assert src["feature_3d"].shape == (32, 16, 64, 64)
    assert np.allclose(src["kp"].reshape(21, 3), KEYPOINTS, atol=1e-5) and np.allclose(src["pose"], 0, atol=1e-3)
    # The appearance holds the source crop (its 64 px RGB in the first channels).
    crop = a.crops(256)[0, :, :, ::-1].astype(np.float32) / 255
    assert np.allclose(src["feature_3d"][0, 0], crop[:, :, 0].reshape(64, 4, 64, 4).mean(axis=(1, 3)), atol=1e-4)
    other = build_motion_extractor()
    other.doc_string += " (another)"
    b = prepare(clip, tmp_path / "b", (96,), family="liveportrait",
                extractors=(extractors(folder)[0], other.SerializeToString()), **PREP)  # type: ignore[arg-type]
    assert b.manifest.bundle_id != a.manifest.bundle_id
    with pytest.raises(PreparationError, match="extractors"):
        prepare(clip, tmp_path / "b", (96,), family="liveportrait", **PREP)  # type: ignore[arg-type]


def test_a_warping_export_onnxruntime_cannot_run_is_refused_at_load_saying_why(tmp_path: Path) -> None:
    # Exports made for TensorRT sample the 3-D features with a plugin op, GridSample3D.
    node = helper.make_node("GridSample3D", ["feature_3d", "kp_driving", "kp_source"], ["out"],
                            domain="trt.plugins")
    graph = helper.make_graph(
        [node], "warping_spade",
        [helper.make_tensor_value_info("feature_3d", TensorProto.FLOAT, [1, 32, 16, 64, 64]),
         helper.make_tensor_value_info("kp_driving", TensorProto.FLOAT, [1, 21, 3]),
         helper.make_tensor_value_info("kp_source", TensorProto.FLOAT, [1, 21, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 512, 512])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("trt.plugins", 1)])
    onnx.save(model, str(tmp_path / "warping_spade.onnx"))
    with pytest.raises(ModelInterfaceError, match=r"cannot run on this onnxruntime.*GridSample"):
        load_warping(lambda name, path: OrtModel(name, path, None, ProviderChoice.CPU, 1), "warping",
                     tmp_path / "warping_spade.onnx")


def lp_room(pipeline: Pipeline, tmp_path: Path, *, drive: DriveMode = DriveMode.TEXT,
            avatar: str = AVATAR, **room: typing.Any) -> Room:
    return typing.cast(Room, make_video_room(pipeline, tmp_path, avatar, drive=drive, output="l.mp4", **room))


def test_a_liveportrait_room_on_the_real_photograph_moves_the_mouth_with_speech(
        lp_pipeline: tuple[Pipeline, Bundle], tmp_path: Path) -> None:
    pipeline, bundle = lp_pipeline
    room = lp_room(pipeline, tmp_path)
    asyncio.run(room.run())
    assert room.state is RoomState.ENDED, room.reason
    st = room.stats
    assert st.frames_rendered == 100 and st.late_frames == 0
    a2m, stitch, warp = pipeline.families["liveportrait"].keys  # type: ignore[attr-defined]
    stats = pipeline.engine.stats()
    # Every speaking frame went through motion, stitching and warping, one item each.
    assert 0 < st.batched_items < st.frames_rendered
    assert stats[a2m].items == stats[stitch].items == stats[warp].items == st.batched_items
    assert pipeline.face_family(AVATAR).key == warp and warp.side == 512
    assert "liveportrait" in pipeline.face_families()  # fed by HuBERT rows: it renders it
    assert st.stage_seconds["render"] > 0 and st.stage_seconds["audio_to_motion"] > 0
    assert probe(tmp_path / "l.mp4").frames == 100
    speaking, quiet = speaking_and_quiet(tmp_path / "l.mp4", bundle, st.batched_items)
    assert speaking > quiet + 10


def test_the_start_up_profile_gives_liveportrait_one_face_cost_for_its_three_stages(
        lp_pipeline: tuple[Pipeline, Bundle]) -> None:
    from workers.device.profile import measure

    pipeline, _ = lp_pipeline
    faces = {p.model: p for p in measure(pipeline, [64], [], iterations=1, max_batch=2)
             if p.stage is Stage.FACE}
    lp = faces["liveportrait/liveportrait-tiny"]
    curves = [pipeline.engine.curve(k) for k in pipeline.families["liveportrait"].keys]  # type: ignore[attr-defined]
    assert lp.width == 512 and dict(lp.latencies)[1] == pytest.approx(sum(c.seconds(1) for c in curves))


def test_face_motion_poses_the_expression_keypoints_and_turns_the_head() -> None:
    mo = motion_of(face_motion({"jawOpen": 1.0, "eyeBlinkLeft": 1.0}, yaw=10.0, pitch=-5.0, roll=2.0))
    assert mo.shape == (70,)
    exp = mo[:63].reshape(21, 3)
    assert exp[JAW, 1] == pytest.approx(0.10)  # the jaw keypoint drops: the mouth opens
    assert exp[11, 1] > 0 and exp[15, 1] == 0  # the left lid closes, not the right
    assert list(mo[67:70]) == [-5.0, 10.0, 2.0]  # LivePortrait's order: pitch, yaw, roll
    assert mo[63] == 0 and not mo[64:67].any()  # the source's scale and place
    assert not motion_of(face_motion({})).any()


def test_a_motion_capture_room_on_a_liveportrait_avatar_follows_the_performers_jaw(
        lp_pipeline: tuple[Pipeline, Bundle], tmp_path: Path) -> None:
    pipeline, bundle = lp_pipeline
    a2m, stitch, warp = pipeline.families["liveportrait"].keys  # type: ignore[attr-defined]
    before = pipeline.engine.stats()
    room = lp_room(pipeline, tmp_path, drive=DriveMode.MOCAP)
    jaw = np.tile([0.0, 0.0, 1.0, 1.0, 1.0], 20)  # open and shut, 100 frames of a tracker's

    async def body() -> None:
        async def performer() -> None:
            room.motion_in.attach()
            for j in jaw:
                await room.motion_in.push(face_motion({"jawOpen": float(j)}, yaw=3.0))
            room.motion_in.producer_closed()

        await asyncio.gather(room.run(), performer())

    asyncio.run(body())
    assert room.state is RoomState.ENDED, room.reason
    st, after = room.stats, pipeline.engine.stats()
    assert st.frames_rendered == 100 and st.late_frames == 0
    # Every frame posed from the performer's motion: stitching and warping, no audio model.
    assert st.batched_items == 100 and st.stage_seconds["audio_to_motion"] == 0
    assert after[warp].items - before[warp].items == after[stitch].items - before[stitch].items == 100
    assert after[a2m].items == before[a2m].items
    _, opened = video_avatar_mouths(tmp_path / "l.mp4", bundle)
    assert opened[jaw == 1.0].mean() > opened[jaw == 0.0].mean() + 10


def test_rooms_a_liveportrait_avatar_cannot_have_are_refused(
        lp_pipeline: tuple[Pipeline, Bundle], tmp_path: Path, clip: bytes) -> None:
    pipeline, _ = lp_pipeline
    other = build_motion_extractor()
    other.doc_string += " (another)"
    folder = pipeline.folder
    b = prepare(clip, folder.avatar_dir / "bundles", (96,), family="liveportrait",
                extractors=(extractors(folder)[0], other.SerializeToString()), **PREP)  # type: ignore[arg-type]
    write_bundle_pointer(folder.avatar_dir, "elsewhere-lp", b.manifest.bundle_id)
    with pytest.raises(RoomRefused, match="other appearance and motion extractors"):
        lp_room(pipeline, tmp_path, avatar="elsewhere-lp")


def test_the_command_lines_build_the_models_and_prepare_an_avatar(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from farm.cli import main

    models = tmp_path / "models"
    assert main(["build-models", "--out", str(models), "--wav2lip", "none", "--liveportrait", "tiny"]) == 0
    folder = ModelFolder.open(models)
    assert folder.liveportrait is not None
    frames, _ = head_motion(data.astronaut(), 130)
    video = tmp_path / "anna.mp4"
    video.write_bytes(encode_clip(frames))
    capsys.readouterr()
    lp = folder.liveportrait
    assert main(["prepare-avatar", "--video", str(video), "--avatar-dir", str(folder.avatar_dir),
                 "--sides", "96", "--extractors", f"{lp.appearance},{lp.motion}", "--avatar-id", "anna"]) == 0
    assert "crops at [96, 256, 512] px, liveportrait family" in capsys.readouterr().out
    pipeline = Pipeline(folder, ProviderChoice.CPU, intra_op_threads=1)
    try:
        assert pipeline.video_avatar_refusal("anna") is None  # the folder's own extractors
    finally:
        pipeline.close()


def test_a_camera_room_on_a_liveportrait_avatar_is_driven_by_the_motion_extractor(
        lp_pipeline: tuple[Pipeline, Bundle], tmp_path: Path) -> None:
    """The driver publishes over RTMP (FFmpeg's client); their face is read by LivePortrait's
    own motion extractor, batched on the device, and the avatar's mouth opens as theirs
    does, relative to their first frame (no face reader, no audio model)."""
    pipeline, bundle = lp_pipeline
    lp = pipeline.families["liveportrait"]
    a2m, _, warp = lp.keys  # type: ignore[attr-defined]
    extractor = lp.motion_key  # type: ignore[attr-defined]
    before = pipeline.engine.stats()
    key = os.urandom(32)
    drivers = DriverRooms()
    room = lp_room(pipeline, tmp_path, drive=DriveMode.CAMERA, input_key=key, drivers=drivers)

    async def body() -> None:
        ingest = RtmpIngest(drivers.authorize, "127.0.0.1")
        port = await ingest.start()
        running = asyncio.create_task(room.run())
        driver = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.driver_publisher", f"rtmp://127.0.0.1:{port}/live/{driver_key(key)}",
            "--seconds", "6", "--pattern", "live", stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            await asyncio.wait_for(running, 120)
        finally:
            if driver.returncode is None:
                driver.kill()
            await driver.wait()
            await ingest.close()

    asyncio.run(body())
    assert room.state is RoomState.ENDED, room.reason
    st, after = room.stats, pipeline.engine.stats()
    assert st.frames_rendered == 100
    read = after[extractor].items - (before[extractor].items if extractor in before else 0)
    assert read >= 90  # about a read per frame (a frame whose face was read already is not)
    assert after[warp].items - before[warp].items == st.batched_items >= 90
    assert after[a2m].items == before[a2m].items  # no audio model
    assert FACE_READER_KEY not in after or after[FACE_READER_KEY].items == \
        (before[FACE_READER_KEY].items if FACE_READER_KEY in before else 0)
    _, opened = video_avatar_mouths(tmp_path / "l.mp4", bundle)
    said = np.array([mouth_open(i, "live") for i in range(110)], np.float32)
    best = max(np.corrcoef(opened[10:90], said[10 - lag:90 - lag])[0, 1] for lag in range(0, 8))
    assert best > 0.6
