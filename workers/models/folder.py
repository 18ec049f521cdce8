"""The model folder: one place models and avatars are loaded from.

Layout::

    manifest.json          names the model files and the interface version
    audio_to_motion.onnx   mel [B, 80, 16] -> motion [B, 8]
    renderer.onnx          avatar [B, 3, S, S], motion [B, 8] -> frame [B, 3, S, S]
    lipsync.onnx           audio [B, T, 80], mouth [B, T, 3, H, W] -> scores [B, 2L+1]
                           (optional: without it rooms run no lip-sync check)
    wav2lip.onnx           the Wav2Lip family (optional): mel [B, 1, 80, 16] and faces
                           [B, 6, S, S] -> face [B, 3, S, S], bound by shape, whatever
                           the export names its tensors (workers.device.binding)
    face_reader.onnx       reads a camera driver's face (optional; camera rooms of the
                           reference family): face [B, 3, 128, 128] -> measures [B, 3]
    hubert.onnx            an audio feature model (optional): waveform [B, N] -> rows
                           [B, T, F] every 20 ms, for families fed by HuBERT features
                           (Ultralight, LivePortrait; workers.families.hubert)
    wenet.onnx             or, in its place, a WeNet streaming encoder: fbank chunk
                           [1, 67, 80] and caches -> [1, 16, 512] every 50 ms, for
                           Ultralight's wenet models (workers.families.wenet)
    avatars/<id>.png       portraits aligned to the face template (PNG or JPEG)
    avatars/<id>.bundle    video avatars, prepared (avatarfarm.avatars)

A ``"musetalk"`` entry names MuseTalk 1.5's models, shared by its avatars:
``{"whisper": ..., "unet": ..., "vae_decoder": ..., "vae_encoder": ...}``
(`workers.families.musetalk`; `add_musetalk` writes the project's stand-ins).

A ``"liveportrait"`` entry names LivePortrait's: ``{"appearance": ..., "motion": ...,
"audio_to_motion": ..., "stitching": ..., "warping": ...}`` (`workers.families.liveportrait`;
`add_liveportrait` writes stand-ins); it is fed by the ``"features"`` model.

The manifest's ``"wav2lip"`` entry names the family's model and, for an export that
differs from Wav2Lip's own layout, its ``"layout"``: ``{"channels": "masked_first" |
"unmasked_first", "colour": "bgr" | "rgb", "scale": "0..1" | "-1..1"}``. Its
``"features"`` entry names the audio feature model: ``{"model": "hubert.onnx",
"name": "hubert", "normalize": false}`` (``normalize``: each chunk to zero mean and
unit variance, for exports fed by Wav2Vec2FeatureExtractor); its kind is read from its
inputs (`workers.families.features`); `use_wenet` puts the wenet stand-in in its place. Families with one
model per person (Ultralight) carry it in the avatar's bundle, not here.

``build_reference`` writes the project's own models and default avatar; a user
replaces any file with their own model of the same interface.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

from avatarfarm.avatars import (
    AVATAR_SUFFIXES,
    bundle_of,
    is_file_name,
    list_avatars,
    list_video_avatars,
)
from workers.device.binding import WAV2LIP_LAYOUT, FaceLayout
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
class FaceModel:
    """A lip-sync model that redraws the face of a prepared avatar (the Wav2Lip family)."""

    path: Path
    name: str
    layout: FaceLayout = WAV2LIP_LAYOUT


@dataclass(frozen=True, slots=True)
class FeatureModelSpec:
    """The audio feature model (HuBERT or wenet) that families with learnt audio features share."""

    path: Path
    name: str = "hubert"
    normalize: bool = False


@dataclass(frozen=True, slots=True)
class MuseTalkSpec:
    """MuseTalk 1.5's models, shared by its avatars: the Whisper-tiny encoder, the UNet,
    the VAE decoder, and the VAE encoder avatars were prepared with (optional here; when
    present, a bundle prepared with another is refused)."""

    whisper: Path
    unet: Path
    vae_decoder: Path
    vae_encoder: Path | None = None
    name: str = "musetalk"

    @property
    def paths(self) -> list[Path]:
        return [self.whisper, self.unet, self.vae_decoder]


@dataclass(frozen=True, slots=True)
class LivePortraitSpec:
    """LivePortrait's models: the extractors avatars are prepared with (a bundle made
    with others is refused), and the per-frame audio-to-motion, stitching and warping."""

    appearance: Path
    motion: Path
    audio_to_motion: Path
    stitching: Path
    warping: Path
    name: str = "liveportrait"

    @property
    def paths(self) -> list[Path]:
        return [self.appearance, self.motion, self.audio_to_motion, self.stitching, self.warping]


@dataclass(frozen=True, slots=True)
class ModelFolder:
    root: Path
    audio_to_motion: Path
    renderer: Path
    renderer_name: str
    lipsync: Path | None = None
    wav2lip: FaceModel | None = None
    features: FeatureModelSpec | None = None
    musetalk: MuseTalkSpec | None = None
    liveportrait: LivePortraitSpec | None = None
    face_reader: Path | None = None  # reads a camera driver's face (camera rooms)

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
        wav2lip = manifest.get("wav2lip")
        face = None
        if wav2lip:
            face = FaceModel(root / wav2lip["model"], wav2lip.get("name", "wav2lip"),
                             FaceLayout.from_manifest(wav2lip.get("layout", {})))
        feats = manifest.get("features")
        features = None
        if feats:
            features = FeatureModelSpec(root / feats["model"], feats.get("name", "hubert"),
                                        bool(feats.get("normalize", False)))
        mt = manifest.get("musetalk")
        musetalk = None
        if mt:
            musetalk = MuseTalkSpec(root / mt["whisper"], root / mt["unet"], root / mt["vae_decoder"],
                                    root / mt["vae_encoder"] if mt.get("vae_encoder") else None,
                                    mt.get("name", "musetalk"))
        lp = manifest.get("liveportrait")
        liveportrait = None
        if lp:
            liveportrait = LivePortraitSpec(root / lp["appearance"], root / lp["motion"],
                                            root / lp["audio_to_motion"], root / lp["stitching"],
                                            root / lp["warping"], lp.get("name", "liveportrait"))
        reader = manifest.get("face_reader")
        folder = ModelFolder(root, root / manifest["audio_to_motion"], root / manifest["renderer"],
                             manifest.get("renderer_name", "renderer"),
                             root / lipsync if lipsync else None, face, features, musetalk, liveportrait,
                             root / reader if reader else None)
        if folder.lipsync is None:
            log.warning("%s names no lipsync model: rooms will run without lip-sync checks",
                        manifest_path)
        for p in (folder.audio_to_motion, folder.renderer, folder.lipsync or folder.renderer,
                  face.path if face else folder.renderer,
                  features.path if features else folder.renderer,
                  *(musetalk.paths if musetalk else []),
                  *(liveportrait.paths if liveportrait else []),
                  folder.face_reader or folder.renderer):
            if not p.is_file():
                raise ModelFolderError(f"model file {p} named in {manifest_path} is missing")
        return folder

    def avatar_ids(self) -> list[str]:
        return list_avatars(self.root / "avatars")

    def portrait_ids(self) -> list[str]:
        """The avatars the reference renderer draws (video avatars left out)."""
        videos = set(list_video_avatars(self.avatar_dir))
        return [a for a in self.avatar_ids() if a not in videos]

    @property
    def avatar_dir(self) -> Path:
        return self.root / "avatars"

    def bundle_path(self, avatar_id: str) -> Path | None:
        """The prepared bundle of a video avatar; None for a portrait."""
        return bundle_of(self.avatar_dir, avatar_id)

    @property
    def model_paths(self) -> list[Path]:
        return [self.audio_to_motion, self.renderer, *([self.lipsync] if self.lipsync else []),
                *([self.wav2lip.path] if self.wav2lip else []),
                *([self.features.path] if self.features else []),
                *(self.musetalk.paths if self.musetalk else []),
                *(self.liveportrait.paths[2:] if self.liveportrait else []),
                *([self.face_reader] if self.face_reader else [])]

    def avatar_path(self, avatar_id: str) -> Path:
        # An id names a file in avatars/, never a path: the worker takes the scheduler's
        # ids without the edge's checks (workers.agent.agent.assignment_from_pb).
        if is_file_name(avatar_id):
            for suffix in AVATAR_SUFFIXES:
                p = self.root / "avatars" / f"{avatar_id}{suffix}"
                if p.is_file():
                    return p
        raise ModelFolderError(f"avatar {avatar_id!r} not found in {self.root / 'avatars'}")


def build_reference(root: Path, preset: str = "lite", *, wav2lip: str | None = "wav2lip_96",
                    force: bool = False) -> ModelFolder:
    """Writes the reference models, default avatar, (unless ``wav2lip`` is None) the
    Wav2Lip-signature model of that cost preset and the HuBERT-signature feature model
    (HuBERT-large's cost with the standard preset, a small one with lite) to ``root``
    (deterministic)."""
    from workers.models.avatar import draw_default_avatar, write_png
    from workers.models.camera import build_face_reader
    from workers.models.reference import (
        RENDERER_PRESETS,
        build_audio_to_motion,
        build_lipsync,
        build_renderer,
    )
    from workers.models.ultralight import FEATURE_PRESETS, build_hubert
    from workers.models.wav2lip import WAV2LIP_PRESETS, build_wav2lip, conv_gmac_per_frame

    if preset not in RENDERER_PRESETS:
        raise ValueError(f"unknown renderer preset {preset!r}; choose from {sorted(RENDERER_PRESETS)}")
    if wav2lip is not None and wav2lip not in WAV2LIP_PRESETS:
        raise ValueError(f"unknown Wav2Lip preset {wav2lip!r}; choose from {sorted(WAV2LIP_PRESETS)}")
    face_name = None if wav2lip is None else f"wav2lip-{wav2lip}"
    features_cost = "hubert_large" if preset == "standard" else "tiny"
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    if manifest_path.exists() and not force:
        current = json.loads(manifest_path.read_text())
        if (current.get("renderer_name") == f"reference-{preset}" and current.get("lipsync")
                and (current.get("wav2lip") or {}).get("name") == face_name
                and (current.get("features") or {}).get("cost") == features_cost
                and current.get("face_reader")):
            return ModelFolder.open(root)
    size = RENDERER_PRESETS[preset]
    onnx.save(build_audio_to_motion(), str(root / "audio_to_motion.onnx"))
    onnx.save(build_renderer(size), str(root / "renderer.onnx"))
    onnx.save(build_lipsync(), str(root / "lipsync.onnx"))
    face_entry = None
    if wav2lip is not None:
        # The stand-in's crop side: 256 for the larger community variant's cost, else 96.
        cost = WAV2LIP_PRESETS[wav2lip]
        face = build_wav2lip(256 if wav2lip == "wav2lip_256" else 96, cost)
        onnx.save(face, str(root / "wav2lip.onnx"))
        face_entry = {"model": "wav2lip.onnx", "name": face_name,
                      "gmac_per_frame": round(conv_gmac_per_frame(face), 3)}
    onnx.save(build_hubert(FEATURE_PRESETS[features_cost]), str(root / "hubert.onnx"))
    onnx.save(build_face_reader(), str(root / "face_reader.onnx"))
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
        **({"wav2lip": face_entry} if face_entry else {}),
        "features": {"model": "hubert.onnx", "name": "hubert", "normalize": False,
                     "cost": features_cost},
        "face_reader": "face_reader.onnx",
        "motion": list(MOTION_NAMES),
        "audio": {"sample_rate": SAMPLE_RATE, "n_mels": N_MELS, "hop": HOP, "window": MEL_WINDOW},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("built reference models (%s) in %s", preset, root)
    return ModelFolder.open(root)


def add_musetalk(root: Path, preset: str = "tiny") -> ModelFolder:
    """Writes the MuseTalk-signature stand-ins of a cost preset into the model folder
    ``root`` (``musetalk/``) and names them in its manifest."""
    from workers.models.musetalk import (
        MUSETALK_PRESETS,
        build_musetalk_unet,
        build_vae_decoder,
        build_vae_encoder,
        build_whisper_encoder,
    )

    cost = MUSETALK_PRESETS[preset]
    return _add_family(root, "musetalk", preset, {
        "whisper": ("whisper_encoder.onnx", build_whisper_encoder(cost.encoder)),
        "unet": ("unet.onnx", build_musetalk_unet(cost.unet)),
        "vae_decoder": ("vae_decoder.onnx", build_vae_decoder(cost.decoder)),
        "vae_encoder": ("vae_encoder.onnx", build_vae_encoder())})


def add_liveportrait(root: Path, preset: str = "tiny") -> ModelFolder:
    """Writes the LivePortrait-signature stand-ins (``tiny`` or ``liveportrait``, the
    warping's cost) into the model folder ``root`` (``liveportrait/``), named in its manifest."""
    from workers.models.liveportrait import (
        WARP_PRESETS,
        build_appearance_extractor,
        build_audio_to_motion,
        build_motion_extractor,
        build_stitching,
        build_warping,
    )

    return _add_family(root, "liveportrait", preset, {
        "appearance": ("appearance_feature_extractor.onnx", build_appearance_extractor()),
        "motion": ("motion_extractor.onnx", build_motion_extractor()),
        "audio_to_motion": ("audio_to_motion.onnx", build_audio_to_motion()),
        "stitching": ("stitching.onnx", build_stitching()),
        "warping": ("warping_spade.onnx", build_warping(WARP_PRESETS[preset]))})


def use_wenet(root: Path, preset: str = "tiny") -> ModelFolder:
    """Writes the wenet-signature stand-in of a cost preset into the model folder ``root``
    (``wenet.onnx``) and makes it the folder's feature model, in HuBERT's place."""
    from workers.models.ultralight import WENET_PRESETS, build_wenet

    if preset not in WENET_PRESETS:
        raise ValueError(f"unknown wenet preset {preset!r}; choose from {sorted(WENET_PRESETS)}")
    onnx.save(build_wenet(WENET_PRESETS[preset]), str(root / "wenet.onnx"))
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["features"] = {"model": "wenet.onnx", "name": "wenet", "cost": f"wenet/{preset}"}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return ModelFolder.open(root)


def _add_family(root: Path, family: str, preset: str,
                files: dict[str, tuple[str, onnx.ModelProto]]) -> ModelFolder:
    """Saves a family's models under ``root/<family>/`` and names them in the manifest's
    ``<family>`` entry, by role."""
    (root / family).mkdir(parents=True, exist_ok=True)
    entry: dict[str, str] = {"name": f"{family}-{preset}"}
    for role, (name, model) in files.items():
        onnx.save(model, str(root / family / name))
        entry[role] = f"{family}/{name}"
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest[family] = entry
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return ModelFolder.open(root)
