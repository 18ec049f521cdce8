"""Video avatars through the AvatarService on a real scheduler and port: a clip of a
real photograph's person prepared once into a content-addressed bundle, the same clip
found again, bad clips refused with nothing stored, and motion capture refused for a
family that has no motion input."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import numpy as np
import pytest
from skimage import data

from avatarfarm.avatars import BUNDLES
from avatarfarm.v1 import avatars_pb2, types_pb2
from tests.media import encode_clip, head_motion
from tests.scheduler.api.test_avatars import farm, licence, registration, room
from tests.scheduler.api.test_service import expect_status, run


@pytest.fixture(scope="module")
def clip() -> bytes:
    frames, _ = head_motion(data.astronaut(), 125)  # 5 s at 25 fps, 512x512
    return encode_clip(frames)


def video_registration(avatar_id: str, video: bytes) -> avatars_pb2.RegisterAvatarRequest:
    return avatars_pb2.RegisterAvatarRequest(avatar_id=avatar_id, tenant="brand",
                                             reference_video=video, licence=licence())


def bundles(avatar_dir: Path) -> list[str]:
    root = avatar_dir / BUNDLES
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_a_video_avatar_is_prepared_once_and_refuses_motion_capture(
        tmp_path: Path, model_dir: Path, clip: bytes) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir, avatar_crop_sides=[96]) as f:
            a = await f.avatars.RegisterAvatar(video_registration("anna", clip))
            assert a.bundle_id and (a.width, a.height) == (512, 512)
            assert bundles(f.avatar_dir) == [a.bundle_id]
            assert {"anna.bundle", "presenter.png", BUNDLES} == set(f.files())
            got = await f.avatars.GetAvatar(avatars_pb2.GetAvatarRequest(avatar_id="anna"))
            assert got.bundle_id == a.bundle_id
            # The same clip again: the same bundle, not prepared twice.
            b = await f.avatars.RegisterAvatar(video_registration("ben", clip))
            assert b.bundle_id == a.bundle_id and bundles(f.avatar_dir) == [a.bundle_id]
            # The family has no motion input: a mocap room is refused, text and voice are taken.
            details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, f.sessions.CreateSession(
                room("r1", drive=types_pb2.DRIVE_MODE_MOCAP)))
            assert "no motion input" in details
            await f.sessions.CreateSession(room("r2"))
            await f.sessions.CreateSession(room("r3", drive=types_pb2.DRIVE_MODE_VOICE))
            # A portrait registered under the id replaces the video avatar.
            await f.avatars.RegisterAvatar(registration("ben"))
            assert "ben.bundle" not in f.files() and "ben.png" in f.files()
            got = await f.avatars.GetAvatar(avatars_pb2.GetAvatarRequest(avatar_id="ben"))
            assert got.bundle_id == ""

    run(body)


def _flat_clip(seconds: float) -> bytes:
    grey = np.full((160, 160, 3), 128, np.uint8)
    return encode_clip([grey] * int(25 * seconds))


@pytest.mark.parametrize(("make", "code", "says"), [
    (lambda clip: _flat_clip(5.0), grpc.StatusCode.INVALID_ARGUMENT, "face"),
    (lambda clip: encode_clip(head_motion(data.astronaut()[::2, ::2], 25)[0]),
     grpc.StatusCode.INVALID_ARGUMENT, "at least 5 s"),
    (lambda clip: b"\x00\x00\x00\x18ftypmp42" + b"\xff" * 4000, grpc.StatusCode.INVALID_ARGUMENT,
     "cannot be decoded"),
    (lambda clip: clip + b"\x00" * (300 * 1024), grpc.StatusCode.RESOURCE_EXHAUSTED, "at most"),
], ids=["no-face", "too-short", "undecodable", "too-large"])
def test_bad_clips_are_refused_and_nothing_is_stored(tmp_path: Path, model_dir: Path, clip: bytes,
                                                     make, code: grpc.StatusCode, says: str) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        async with farm(tmp_path, model_dir, avatar_crop_sides=[96],
                        avatar_video_max_bytes=len(clip) + 100 * 1024) as f:
            details = await expect_status(code, f.avatars.RegisterAvatar(
                video_registration("anna", make(clip))))
            assert says in details
            assert bundles(f.avatar_dir) == [] and "anna.bundle" not in f.files()
            assert not (await f.avatars.ListAvatars(avatars_pb2.ListAvatarsRequest())).avatars
        with sqlite3.connect(tmp_path / "state.db") as db:
            assert db.execute("SELECT COUNT(*) FROM avatars").fetchone() == (0,)

    run(body)


def test_an_image_and_a_video_together_are_refused(tmp_path: Path, model_dir: Path, clip: bytes) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as f:
            both = registration("anna")
            both.reference_video = clip
            details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, f.avatars.RegisterAvatar(both))
            assert "exactly one" in details

    run(body)


def test_the_scheduler_prepares_with_the_configured_onnx_detector(tmp_path: Path, model_dir: Path,
                                                                  clip: bytes) -> None:
    from avatarfarm.preparation.bundle import Bundle
    from avatarfarm.preparation.faces import PreparationError
    from tests.preparation.test_faces import FACE_BOX, ssd_detector

    detector = ssd_detector(tmp_path / "detector.onnx")

    async def body() -> None:
        async with farm(tmp_path, model_dir, avatar_crop_sides=[96],
                        face_detector=str(detector)) as f:
            a = await f.avatars.RegisterAvatar(video_registration("anna", clip))
            box = Bundle.open(f.avatar_dir / BUNDLES / a.bundle_id).boxes[0]
            # The stand-in's face (lower left), not the one OpenCV's cascade finds.
            assert abs(box.x - FACE_BOX[0] * 512) < 8 and abs(box.y - FACE_BOX[1] * 512) < 8
        # A detector that does not load fails the start, before anything is opened.
        (tmp_path / "2").mkdir()
        with pytest.raises(PreparationError, match="cannot load"):
            async with farm(tmp_path / "2", model_dir, face_detector=str(tmp_path / "none.onnx")):
                pass
        assert not (tmp_path / "2" / "state.db").exists()

    run(body)
