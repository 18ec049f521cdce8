"""Where avatars live on disk, one folder for the scheduler (which writes it) and the
workers (which read it):

    <avatar_id>.png | .jpg | .jpeg   a portrait (the reference family)
    <avatar_id>.bundle               a video avatar: JSON naming its prepared bundle
    bundles/<bundle_id>/             prepared bundles (avatarfarm.preparation.bundle),
                                     content-addressed, shared by every avatar made
                                     from the same clip
"""

from __future__ import annotations

import json
import os
import tempfile
import typing
from pathlib import Path

AVATAR_SUFFIXES = (".png", ".jpg", ".jpeg")
BUNDLE_SUFFIX = ".bundle"
BUNDLES = "bundles"


def list_avatars(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.iterdir()
                   if p.suffix.lower() in AVATAR_SUFFIXES or p.suffix == BUNDLE_SUFFIX})


def list_video_avatars(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix == BUNDLE_SUFFIX)


def face_model(family: str, bundle_id: str) -> str:
    """The face model a video avatar's rooms need, as workers name it in their face
    profiles: a family's shared models (``"wav2lip"``, ``"musetalk"``: the worker's
    profile is ``"<family>/<export name>"``), or the avatar's own model, carried in its
    bundle (``"ultralight-<bundle id prefix>"``)."""
    return f"ultralight-{bundle_id[:12]}" if family == "ultralight" else family


def face_family(family: str, features: str = "") -> str:
    """What a worker must be able to render for a video avatar's rooms, as workers report
    it: the family, and for Ultralight the features its model reads
    (``"ultralight/hubert"``, ``"ultralight/wenet"``: a worker feeds one kind)."""
    return f"ultralight/{features or 'hubert'}" if family == "ultralight" else family


class VideoAvatarFace(typing.NamedTuple):
    """A video avatar's face, as placement needs it ("" and 0 for a portrait)."""

    model: str  # the face model its rooms need (`face_model`)
    own_bytes: int  # the avatar's own model's size, where it brings one (0: a family's shared)
    family: str  # what its worker must render (`face_family`)


def video_avatar_face(folder: Path, avatar_id: str) -> VideoAvatarFace:
    """A video avatar's face read from its bundle's manifest (a bundle being written or
    removed reads as Wav2Lip's): its face model, the bytes of the avatar's own model
    where it brings one (what a worker loads for its first room of the avatar), and the
    family a worker must render."""
    try:
        root = bundle_of(folder, avatar_id)
        if root is None:
            return VideoAvatarFace("", 0, "")
        manifest = json.loads((root / "manifest.json").read_text())
        own = root / "model.onnx"
        size = own.stat().st_size if own.is_file() else 0
    except (OSError, ValueError):
        manifest, size = {}, 0
    family = str(manifest.get("family", "wav2lip"))
    return VideoAvatarFace(face_model(family, str(manifest.get("bundle_id", ""))), size,
                           face_family(family, str(manifest.get("features", ""))))


# The face families with a motion input: their avatars take motion-capture rooms.
MOTION_FAMILIES = frozenset({"liveportrait"})


def no_motion_input(avatar_id: str, family: str = "wav2lip") -> str:
    """Why a motion-driven room (motion capture, a camera) on a video avatar is refused
    (scheduler and worker)."""
    return (f"avatar {avatar_id!r} is a video avatar of the {family} family, a lip-sync model "
            "that takes speech and has no motion input: drive it by text or live voice, or use "
            "a LivePortrait or portrait avatar for motion capture or a camera driver")


def is_file_name(avatar_id: str) -> bool:
    """An id that names a file in the folder, never a path (workers take the
    scheduler's ids without the edge's checks)."""
    return bool(avatar_id.strip(".")) and not any(c in avatar_id for c in "/\\\0")


def bundle_of(folder: Path, avatar_id: str) -> Path | None:
    """The prepared bundle folder of a video avatar; None for a portrait or an unknown id."""
    if not is_file_name(avatar_id):
        return None
    pointer = folder / f"{avatar_id}{BUNDLE_SUFFIX}"
    if not pointer.is_file():
        return None
    bid = str(json.loads(pointer.read_text())["bundle"])
    if not is_file_name(bid):
        raise ValueError(f"{pointer} names bundle {bid!r}, which is not a bundle id")
    return folder / BUNDLES / bid


def stage_bundle_pointer(folder: Path, avatar_id: str, bundle_id: str) -> Path:
    """Writes the pointer making `avatar_id` a video avatar of `bundle_id` to a synced
    temporary file (a name starting with '.' is never taken for an avatar);
    `install_bundle_pointer` puts it in place."""
    if not (is_file_name(avatar_id) and is_file_name(bundle_id)):
        raise ValueError(f"avatar {avatar_id!r} / bundle {bundle_id!r}: not file names")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{avatar_id}-", suffix=".upload", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"bundle": bundle_id}, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def install_bundle_pointer(staged: Path, folder: Path, avatar_id: str) -> Path:
    """Renames a staged pointer into place (atomic), replacing what the id was: a
    portrait of the same id goes, since an id is one avatar."""
    path = folder / f"{avatar_id}{BUNDLE_SUFFIX}"
    os.replace(staged, path)
    for suffix in AVATAR_SUFFIXES:
        (folder / f"{avatar_id}{suffix}").unlink(missing_ok=True)
    return path


def write_bundle_pointer(folder: Path, avatar_id: str, bundle_id: str) -> Path:
    """Makes `avatar_id` a video avatar of the prepared bundle `bundle_id`, written whole
    or not at all; returns the pointer's path."""
    return install_bundle_pointer(stage_bundle_pointer(folder, avatar_id, bundle_id), folder,
                                  avatar_id)
