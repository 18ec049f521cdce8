"""Preparing an avatar from a person's base video, once: a versioned, content-addressed
bundle that workers load and keep warm.

`prepare` decodes the clip within limits checked before and while decoding (bytes,
frame size, duration; an undecodable or hostile file is refused), finds and tracks the
face (`faces.track_faces`), and stores per frame what the lip-sync families need: the
smoothed face box to paste back into, the face crop at each family's side (BGR,
as the models take it), and the decoded frames themselves (RGB, `frames.npy`), which
workers map into memory rather than decode: the operating system shares them between
worker processes and keeps in memory only what rooms read. The clip is kept as
uploaded beside them. The bundle's id is the SHA-256 of the clip and of everything that
shapes the result (this module's version, the sides), so preparing the same clip
twice finds the first bundle and does nothing; a bundle is written into a temporary
folder and renamed into place whole, so a failed or interrupted preparation leaves
nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

from avatarfarm.preparation.faces import (
    Box,
    FaceDetector,
    PreparationError,
    TrackPolicy,
    crop,
    track_faces,
)

VERSION = 3  # bump when what a bundle holds or how it is made changes
MODEL_FILE = "model.onnx"
FAMILIES = ("wav2lip", "ultralight", "musetalk", "liveportrait")
MUSETALK_SIDE = 256
MASKS_FILE = "masks.npy"  # MuseTalk's per-frame jaw masks, at its 256 px crop
LIVEPORTRAIT_SIDES = (256, 512)  # the extractors' input; the warping's output, pasted back
Progress = Callable[[str, float], None]  # (stage, fraction done)


@dataclass(frozen=True, slots=True)
class VideoLimits:
    max_bytes: int = 200 * 1024 * 1024
    min_seconds: float = 5.0
    max_seconds: float = 60.0
    max_side: int = 3840
    max_pixels: int = 3840 * 2160
    min_side: int = 128


@dataclass(frozen=True, slots=True)
class Manifest:
    bundle_id: str
    version: int
    fps: float
    frames: int
    width: int
    height: int
    sides: tuple[int, ...]
    faces_found: int  # frames where the detector found the face (the rest hold the nearest)
    # The family that renders it: "wav2lip" (the worker's model), or "ultralight" (the
    # person's own model, carried in the bundle as model.onnx).
    family: str = "wav2lip"
    # MuseTalk: the VAE encoder its latents were made with (sha256 of the ONNX file);
    # LivePortrait: the extractors its source was made with.
    vae_encoder: str = ""
    # Ultralight: the audio features its model reads, "hubert" or "wenet" (read from the
    # model's audio input when it is prepared; "" in older bundles: HuBERT).
    features: str = ""


@dataclass(frozen=True, slots=True)
class Bundle:
    root: Path
    manifest: Manifest
    boxes: tuple[Box, ...]

    def crops(self, side: int) -> np.ndarray:
        """uint8 [frames, side, side, 3] BGR face crops (memory-mapped)."""
        if side not in self.manifest.sides:
            raise KeyError(f"bundle {self.manifest.bundle_id} has no {side} px crops "
                           f"(it has {list(self.manifest.sides)})")
        return np.load(self.root / f"crops_{side}.npy", mmap_mode="r")

    @property
    def model_path(self) -> Path | None:
        """The person's own face model, for families with one model per avatar."""
        p = self.root / MODEL_FILE
        return p if p.is_file() else None

    def latents(self) -> np.ndarray:
        """MuseTalk's per-frame latents [frames, 8, 32, 32] (masked, reference; mapped)."""
        return np.load(self.root / "latents.npy", mmap_mode="r")

    def masks(self) -> np.ndarray | None:
        """Per-frame jaw masks uint8 [frames, S, S] (0..255, at the side they were made
        at; mapped) to blend the redrawn face through, or None: the bundle has none (its
        family blends through the fixed lower-face shape)."""
        p = self.root / MASKS_FILE
        return np.load(p, mmap_mode="r") if p.is_file() else None

    def source(self) -> dict[str, np.ndarray]:
        """LivePortrait's source: feature_3d, kp, pose (degrees), exp, scale, t."""
        with np.load(self.root / "source.npz") as z:
            return {k: z[k] for k in z.files}

    def frames(self) -> np.ndarray:
        """The base video's frames, uint8 [frames, height, width, 3] RGB (memory-mapped,
        read-only)."""
        return np.load(self.root / "frames.npy", mmap_mode="r")

    @classmethod
    def open(cls, root: Path) -> Bundle:
        m = json.loads((root / "manifest.json").read_text())
        manifest = Manifest(**{**m, "sides": tuple(m["sides"])})
        boxes = tuple(Box(*b) for b in json.loads((root / "boxes.json").read_text()))
        return cls(root, manifest, boxes)


def bundle_id(data: bytes, sides: Sequence[int], model: bytes | None = None) -> str:
    h = hashlib.sha256()
    h.update(f"avatar-bundle v{VERSION} sides {','.join(map(str, sorted(sides)))}\n".encode())
    h.update(data)
    if model is not None:  # the person's own model is part of what the bundle is
        h.update(b"\nmodel " + hashlib.sha256(model).hexdigest().encode())
    return h.hexdigest()


def decode_video(data: bytes, limits: VideoLimits = VideoLimits()) -> tuple[list[np.ndarray], float]:
    """RGB frames and frame rate of a clip, or PreparationError saying what is wrong."""
    if len(data) > limits.max_bytes:
        raise PreparationError(f"the clip is {len(data)} bytes; at most {limits.max_bytes} are taken")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as e:
        raise PreparationError(f"the clip cannot be decoded as a video ({e})") from e
    with container:
        streams = container.streams.video
        if not streams:
            raise PreparationError("the file has no video stream")
        stream = streams[0]
        ctx = stream.codec_context
        # The declared size is checked before any frame is decoded (a decoder bomb claims
        # a huge frame in a tiny file).
        w, h = ctx.width, ctx.height
        if not (limits.min_side <= min(w, h) and max(w, h) <= limits.max_side
                and w * h <= limits.max_pixels):
            raise PreparationError(f"the clip is {w}x{h}; sides from {limits.min_side} to "
                                   f"{limits.max_side} px and at most {limits.max_pixels} pixels")
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        if not 1.0 <= rate <= 120.0:
            raise PreparationError(f"the clip's frame rate {rate:g} is not a video's")
        most = int(limits.max_seconds * rate) + 1
        frames: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                if frame.width != w or frame.height != h:
                    raise PreparationError("the clip changes frame size part-way")
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) > most:
                    raise PreparationError(f"the clip is longer than {limits.max_seconds:g} s: "
                                           "trim it to a loop of the person")
        except av.error.FFmpegError as e:
            raise PreparationError(f"the clip cannot be decoded ({e})") from e
    if len(frames) < limits.min_seconds * rate:
        raise PreparationError(f"the clip is {len(frames) / rate:.1f} s; at least "
                               f"{limits.min_seconds:g} s of the person are needed")
    return frames, rate


def prepare(data: bytes, bundles: Path, sides: Sequence[int] = (96,), *,
            detector: FaceDetector | None = None, limits: VideoLimits = VideoLimits(),
            policy: TrackPolicy | None = None, progress: Progress | None = None,
            model: bytes | None = None, family: str = "wav2lip",
            vae_encoder: bytes | None = None,
            extractors: tuple[bytes, bytes] | None = None, features: str = "hubert") -> Bundle:
    """The bundle for `data` under `bundles/<id>/`, made now or found from before.
    ``model``: the person's own face model (ONNX bytes) for a family with one model per
    avatar (``family="ultralight"``); it is stored in the bundle and part of its id,
    and ``features`` names the audio features it reads ("hubert" or "wenet").
    ``vae_encoder``: for ``family="musetalk"``, the VAE encoder whose latents of every
    base frame (at 256 px) the bundle stores (`avatarfarm.preparation.latents`).
    ``extractors``: for ``family="liveportrait"``, the appearance feature extractor and
    the motion extractor, run on the first frame (`avatarfarm.preparation.keypoints`)."""
    sides = tuple(sorted(set(sides)))
    if not sides or any(s < 16 for s in sides):
        raise PreparationError(f"crop sides {list(sides)}: give one or more sides of 16 px or more")
    if family not in FAMILIES:
        raise PreparationError(f"family {family!r}: one of {list(FAMILIES)}")
    if (family == "ultralight") != (model is not None):
        raise PreparationError("an Ultralight avatar needs the person's own model (and only it does)")
    if (family == "musetalk") != (vae_encoder is not None):
        raise PreparationError("a MuseTalk avatar needs the VAE encoder to prepare its latents "
                               "(and only it does)")
    if (family == "liveportrait") != (extractors is not None):
        raise PreparationError("a LivePortrait avatar needs its appearance and motion extractors "
                               "(and only it does)")
    if family == "musetalk":
        sides = tuple(sorted({*sides, MUSETALK_SIDE}))
    if family == "liveportrait":
        sides = tuple(sorted({*sides, *LIVEPORTRAIT_SIDES}))
    identity = model if model is not None else vae_encoder if vae_encoder is not None else \
        b"".join(extractors) if extractors is not None else None
    bid = bundle_id(data, sides, identity)
    root = bundles / bid
    if (root / "manifest.json").is_file():
        return Bundle.open(root)
    say = progress or (lambda stage, done: None)
    say("decode", 0.0)
    frames, fps = decode_video(data, limits)
    say("decode", 1.0)
    policy = policy or TrackPolicy(min_side=min(sides))

    def counted(i: int, frame: np.ndarray) -> np.ndarray:
        if i % 25 == 0:
            say("faces", i / len(frames))
        return frame

    track = track_faces((counted(i, f) for i, f in enumerate(frames)), detector, policy)
    say("faces", 1.0)
    height, width = frames[0].shape[:2]
    bundles.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{bid[:12]}-", dir=bundles))
    try:
        for n, side in enumerate(sides):
            crops = np.stack([_crop_bgr(f, b, side) for f, b in zip(frames, track.boxes, strict=True)])
            np.save(tmp / f"crops_{side}.npy", crops)
            say("crops", (n + 1) / len(sides))
        stored = np.lib.format.open_memmap(tmp / "frames.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(frames), height, width, 3))
        for i, f in enumerate(frames):
            stored[i] = f
        stored.flush()
        del stored
        (tmp / "base.video").write_bytes(data)
        if model is not None:
            (tmp / MODEL_FILE).write_bytes(model)
        vae = ""
        if vae_encoder is not None:
            from avatarfarm.preparation.latents import model_id, vae_latents

            say("latents", 0.0)
            np.save(tmp / "latents.npy", vae_latents(np.load(tmp / f"crops_{MUSETALK_SIDE}.npy"),
                                                     vae_encoder))
            vae = model_id(vae_encoder)
            say("latents", 1.0)
            from avatarfarm.preparation.masks import jaw_masks

            np.save(tmp / MASKS_FILE, jaw_masks(np.load(tmp / f"crops_{MUSETALK_SIDE}.npy", mmap_mode="r")))
            say("masks", 1.0)
        if extractors is not None:
            from avatarfarm.preparation import keypoints

            source = keypoints.source_of(np.load(tmp / "crops_256.npy", mmap_mode="r")[0], *extractors)
            np.savez(tmp / "source.npz", **source)  # type: ignore[arg-type]
            vae = keypoints.model_id(*extractors)
        (tmp / "boxes.json").write_text(json.dumps([[b.x, b.y, b.w, b.h] for b in track.boxes]))
        manifest = Manifest(bid, VERSION, fps, len(frames), width, height, sides, track.found, family,
                            vae, features if model is not None else "")
        (tmp / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1))
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "manifest.json").is_file():  # not a concurrent preparation's
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say("done", 1.0)
    return Bundle.open(root)


def _crop_bgr(rgb: np.ndarray, box: Box, side: int) -> np.ndarray:
    return crop(np.ascontiguousarray(rgb[:, :, ::-1]), box, side)
