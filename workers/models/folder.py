"""The model folder: one place models and avatars are loaded from.

Layout::

    manifest.json          names the model files and the interface version
    audio_to_motion.onnx   mel [B, 80, 16] -> motion [B, 8]
    renderer.onnx          avatar [B, 3, S, S], motion [B, 8] -> frame [B, 3, S, S]
    lipsync.onnx           audio [B, T, 80], mouth [B, T, 3, H, W] -> scores [B, 2L+1]
                           (optional: without it rooms run no lip-sync check)
    avatars/<id>.png       portraits aligned to the face template (PNG or JPEG)

``build_reference`` writes the project's own models and default avatar; a user
replaces any file with their own model of the same interface.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

from avatarfarm.avatars import AVATAR_SUFFIXES, list_avatars
from workers.device.onnx import ModelInterface, TensorSpec
from workers.media.audio import HOP, MEL_WINDOW, N_MELS, SAMPLE_RATE
from workers.media.motion import MOTION_NAMES

log = logging.getLogger(__name__)

INTERFACE_VERSION = 1
DEFAULT_AVATAR = "presenter"

AUDIO_TO_MOTION = ModelInterface(inputs=(TensorSpec("mel", 3),), outputs=(TensorSpec("motion", 2),))
RENDERER = ModelInterface(inputs=(TensorSpec("avatar", 4), TensorSpec("motion", 2)),
                          outputs=(TensorSpec("frame", 4),))
LIPSYNC = ModelInterface(inputs=(TensorSpec("audio", 3), TensorSpec("mouth", 5)),
                         outputs=(TensorSpec("scores", 2),))


class ModelFolderError(FileNotFoundError):
    pass


@dataclass(frozen=True, slots=True)
class ModelFolder:
    root: Path
    audio_to_motion: Path
    renderer: Path
    renderer_name: str
    lipsync: Path | None = None

    @staticmethod
    def open(root: Path) -> ModelFolder:
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise ModelFolderError(
                f"no model folder at {root} (manifest.json missing); "
                f"build the reference models with `avatarfarm build-models --out {root}`")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("interface_version") != INTERFACE_VERSION:
            raise ModelFolderError(f"{manifest_path}: interface_version "
                                   f"{manifest.get('interface_version')} != {INTERFACE_VERSION}")
        if tuple(manifest.get("motion", ())) != MOTION_NAMES:
            raise ModelFolderError(f"{manifest_path}: motion layout {manifest.get('motion')} "
                                   f"does not match {list(MOTION_NAMES)}")
        lipsync = manifest.get("lipsync")
        folder = ModelFolder(root, root / manifest["audio_to_motion"], root / manifest["renderer"],
                             manifest.get("renderer_name", "renderer"),
                             root / lipsync if lipsync else None)
        if folder.lipsync is None:
            log.warning("%s names no lipsync model: rooms will run without lip-sync checks",
                        manifest_path)
        for p in (folder.audio_to_motion, folder.renderer, folder.lipsync or folder.renderer):
            if not p.is_file():
                raise ModelFolderError(f"model file {p} named in {manifest_path} is missing")
        return folder

    def avatar_ids(self) -> list[str]:
        return list_avatars(self.root / "avatars")

    def avatar_path(self, avatar_id: str) -> Path:
        # An id names a file in avatars/, never a path: the worker takes the scheduler's
        # ids without the edge's checks (workers.agent.agent.assignment_from_pb).
        if avatar_id.strip(".") and not any(c in avatar_id for c in "/\\\0"):
            for suffix in AVATAR_SUFFIXES:
                p = self.root / "avatars" / f"{avatar_id}{suffix}"
                if p.is_file():
                    return p
        raise ModelFolderError(f"avatar {avatar_id!r} not found in {self.root / 'avatars'}")


def build_reference(root: Path, preset: str = "lite", *, force: bool = False) -> ModelFolder:
    """Writes the reference models and default avatar to ``root`` (deterministic)."""
    from workers.models.avatar import draw_default_avatar, write_png
    from workers.models.reference import (
        RENDERER_PRESETS,
        build_audio_to_motion,
        build_lipsync,
        build_renderer,
    )

    if preset not in RENDERER_PRESETS:
        raise ValueError(f"unknown renderer preset {preset!r}; choose from {sorted(RENDERER_PRESETS)}")
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    if manifest_path.exists() and not force:
        current = json.loads(manifest_path.read_text())
        if current.get("renderer_name") == f"reference-{preset}" and current.get("lipsync"):
            return ModelFolder.open(root)
    size = RENDERER_PRESETS[preset]
    onnx.save(build_audio_to_motion(), str(root / "audio_to_motion.onnx"))
    onnx.save(build_renderer(size), str(root / "renderer.onnx"))
    onnx.save(build_lipsync(), str(root / "lipsync.onnx"))
    avatar = root / "avatars" / f"{DEFAULT_AVATAR}.png"
    if not avatar.exists():
        write_png(avatar, draw_default_avatar())
    manifest = {
        "interface_version": INTERFACE_VERSION,
        "audio_to_motion": "audio_to_motion.onnx",
        "renderer": "renderer.onnx",
        "lipsync": "lipsync.onnx",
        "renderer_name": f"reference-{preset}",
        "renderer_gmac_per_frame_256": round(size.gmac_per_frame(256), 3),
        "motion": list(MOTION_NAMES),
        "audio": {"sample_rate": SAMPLE_RATE, "n_mels": N_MELS, "hop": HOP, "window": MEL_WINDOW},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("built reference models (%s) in %s", preset, root)
    return ModelFolder.open(root)
