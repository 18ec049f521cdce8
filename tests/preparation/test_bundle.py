"""Preparing an avatar bundle from a base video of a real person: decoded within limits,
the face tracked, crops stored per family side, content-addressed and idempotent, and
nothing stored when the clip is refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from skimage import data

from avatarfarm.avatars import bundle_of, list_video_avatars
from avatarfarm.preparation.bundle import Bundle, VideoLimits, bundle_id, decode_video, prepare
from avatarfarm.preparation.faces import PreparationError, TrackPolicy
from tests.media import encode_clip, head_motion

SHORT = VideoLimits(min_seconds=1.0, max_seconds=4.0)  # the real default wants 5-60 s


@pytest.fixture(scope="module")
def clip() -> bytes:
    frames, _ = head_motion(data.astronaut(), 30)
    return encode_clip(frames, fps=25)


def test_a_clip_is_prepared_once_into_a_bundle(clip: bytes, tmp_path: Path) -> None:
    stages: list[tuple[str, float]] = []
    b = prepare(clip, tmp_path, (96, 128), limits=SHORT, policy=TrackPolicy(min_side=64),
                progress=lambda stage, done: stages.append((stage, done)))
    m = b.manifest
    assert m.bundle_id == bundle_id(clip, (96, 128)) and b.root == tmp_path / m.bundle_id
    assert (m.frames, m.width, m.height, m.sides) == (30, 512, 512, (96, 128))
    assert m.fps == pytest.approx(25.0) and m.faces_found >= 27
    crops = b.crops(96)
    assert crops.shape == (30, 96, 96, 3) and crops.dtype == np.uint8
    assert b.crops(128).shape == (30, 128, 128, 3)
    with pytest.raises(KeyError, match="no 256 px crops"):
        b.crops(256)
    # The crops are the face (BGR): skin is red-dominant, so blue < red in BGR order.
    mid = crops[:, 30:60, 30:66].reshape(-1, 3).mean(axis=0)
    assert mid[2] > mid[0]
    assert len(b.boxes) == 30 and len(b.frames()) == 30
    assert stages[0] == ("decode", 0.0) and stages[-1] == ("done", 1.0)
    assert any(s == "faces" for s, _ in stages)
    # The same clip again: the same bundle, found, not rewritten.
    mtime = os.stat(b.root / "manifest.json").st_mtime_ns
    again = prepare(clip, tmp_path, (128, 96), limits=SHORT, policy=TrackPolicy(min_side=64))
    assert again.manifest == m and os.stat(b.root / "manifest.json").st_mtime_ns == mtime
    assert Bundle.open(b.root).boxes == b.boxes
    # Other sides make another bundle.
    assert bundle_id(clip, (96,)) != m.bundle_id
    assert sorted(p.name for p in tmp_path.iterdir()) == [m.bundle_id]


def refused(tmp_path: Path, data_: bytes, match: str, limits: VideoLimits = SHORT) -> None:
    with pytest.raises(PreparationError, match=match):
        prepare(data_, tmp_path, (96,), limits=limits, policy=TrackPolicy(min_side=64))
    assert list(tmp_path.iterdir()) == []  # nothing stored, not even a temporary folder


def test_clips_that_cannot_make_an_avatar_are_refused_with_nothing_stored(
        clip: bytes, tmp_path: Path) -> None:
    refused(tmp_path, b"not a video at all" * 100, "cannot be decoded")
    refused(tmp_path, clip, r"at least 5 s", VideoLimits())  # 1.2 s against the default
    refused(tmp_path, clip, r"longer than 0.5 s", VideoLimits(min_seconds=0.1, max_seconds=0.5))
    refused(tmp_path, clip, r"at most 1000 are taken", VideoLimits(max_bytes=1000))
    refused(tmp_path, clip, r"512x512; sides from 128 to 256", VideoLimits(min_seconds=1, max_side=256))
    blank = encode_clip([np.full((256, 256, 3), 90, np.uint8)] * 30)
    refused(tmp_path, blank, r"a face was found in 0 of 30 frames")
    small = encode_clip([np.pad(data.astronaut()[::4, ::4], ((64, 64), (64, 64), (0, 0)))] * 30)
    refused(tmp_path, small, r"(smaller than the 96 px crop|found in 0 of 30)",
            VideoLimits(min_seconds=1.0))


def test_a_clip_is_decoded_with_its_frame_rate(clip: bytes) -> None:
    frames, fps = decode_video(clip, SHORT)
    assert len(frames) == 30 and fps == pytest.approx(25.0)
    assert frames[0].shape == (512, 512, 3) and frames[0].dtype == np.uint8
    # Decoded frames are close to the photograph (lossy H.264).
    assert np.abs(frames[0].astype(int) - data.astronaut().astype(int)).mean() < 12


def test_the_command_line_prepares_and_refuses(clip: bytes, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from farm.cli import main

    video = tmp_path / "anna.mp4"
    video.write_bytes(clip)
    avatars = tmp_path / "avatars"
    # The real limits want 5 s: a 1.2 s clip is refused by name, nothing written.
    assert main(["prepare-avatar", "--video", str(video), "--avatar-dir", str(avatars)]) == 2
    assert "at least 5 s" in capsys.readouterr().err and not avatars.exists()
    long = tmp_path / "long.mp4"
    frames, _ = head_motion(data.astronaut(), 130)
    long.write_bytes(encode_clip(frames))
    assert main(["prepare-avatar", "--video", str(long), "--avatar-dir", str(avatars),
                 "--sides", "96", "--avatar-id", "anna"]) == 0
    out = capsys.readouterr().out
    assert "faces   100%" in out and "130 frames at 25 fps, 512x512" in out
    (bundle,) = (avatars / "bundles").iterdir()
    # A local video avatar, as the workers and the scheduler read the folder.
    assert bundle_of(avatars, "anna") == bundle and list_video_avatars(avatars) == ["anna"]
