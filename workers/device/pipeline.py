"""The avatar pipeline's inference stages for one worker: TTS, audio-to-motion,
render and the lip-sync check for the reference family; the face redraw for video
avatars (a prepared video, its mouth redrawn from the speech) by their family: the
Wav2Lip family's model from the model folder, or the avatar's own model carried in
its bundle (Ultralight, fed by the folder's audio feature model), loaded on demand.

The ONNX models run on the device thread of one `InferenceEngine`, which
batches items across rooms per model and input shape (the renderer once per
portrait side, the face model at its crop side) under their deadlines. TTS is CPU work on its own thread so it
never holds the device. Every call returns the device time attributed to the
item (its share of the batch) for cost accounting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from avatarfarm.avatars import face_model
from avatarfarm.latency import LatencyCurve
from avatarfarm.preparation import keypoints
from avatarfarm.preparation.bundle import Bundle
from workers.device.batching import BatchPolicy
from workers.device.binding import LipSyncDeviceModel
from workers.device.engine import BatchKey, DeviceModel, InferenceEngine, ItemResult
from workers.device.onnx import OrtModel, ProviderChoice
from workers.device.timing import measure_curve, run_batch_of
from workers.families import liveportrait, musetalk, ultralight, wav2lip
from workers.families.base import FaceFamily, Redraw
from workers.media.tts import EspeakTTS
from workers.models.avatar import read_image, scale_image
from workers.models.folder import AUDIO_TO_MOTION, LIPSYNC, RENDERER, ModelFolder
from workers.rooms.wav2lip_frames import FaceAvatar

log = logging.getLogger(__name__)

AUDIO_TO_MOTION_KEY = BatchKey("audio_to_motion")
LIPSYNC_KEY = BatchKey("lipsync")
# What the pipeline caches per avatar and render side: the [3, S, S] float32 portrait.
AVATAR_BYTES_PER_PIXEL = 3 * np.dtype(np.float32).itemsize


@dataclass(frozen=True, slots=True)
class Timed:
    value: np.ndarray
    seconds: float  # device time attributed to this item
    batch_size: int = 1


@dataclass(frozen=True, slots=True)
class SyncShape:
    window: int  # frames per check
    max_lag: int
    crop: tuple[int, int]  # mouth crop height, width


class Pipeline:
    def __init__(self, folder: ModelFolder, provider: ProviderChoice = ProviderChoice.AUTO,
                 intra_op_threads: int = 0, tts_voice: str = "en",
                 policy: BatchPolicy = BatchPolicy()) -> None:
        self.folder = folder
        self.audio_to_motion_model = OrtModel("audio_to_motion", folder.audio_to_motion,
                                              AUDIO_TO_MOTION, provider, intra_op_threads)
        self.renderer_model = OrtModel(folder.renderer_name, folder.renderer, RENDERER, provider,
                                       intra_op_threads)
        self.lipsync_model = (OrtModel("lipsync", folder.lipsync, LIPSYNC, provider, intra_op_threads)
                              if folder.lipsync is not None else None)
        self.sync_shape: SyncShape | None = None
        if self.lipsync_model is not None:
            _, t, _, h, w = self.lipsync_model.input_shape("mouth")
            lags = self.lipsync_model.output_shape("scores")[1]
            if not all(isinstance(d, int) for d in (t, h, w, lags)):
                raise ValueError("the lipsync model needs static window, crop and lag dimensions")
            assert isinstance(t, int) and isinstance(h, int) and isinstance(w, int)
            assert isinstance(lags, int)
            self.sync_shape = SyncShape(t, lags // 2, (h, w))
        self.face_model: LipSyncDeviceModel | None = None
        if folder.wav2lip is not None:
            self.face_model = LipSyncDeviceModel(
                OrtModel(folder.wav2lip.name, folder.wav2lip.path, None, provider, intra_op_threads),
                folder.wav2lip.layout)
            log.info("face model %s: crop side %d, batch axis %s", self.face_model.name,
                     self.face_model.side, self.face_model.runner.binding.batch or "dynamic")
        self.wav2lip_family = (wav2lip.family(self.face_key, folder.wav2lip.layout,
                                              self._redraw_crop(self.face_key))
                               if self.face_model is not None and folder.wav2lip is not None else None)
        self.features_model: ultralight.FeatureModel | None = None
        if folder.features is not None:
            self.features_model = ultralight.FeatureModel(
                OrtModel(folder.features.name, folder.features.path, None, provider, intra_op_threads),
                folder.features.normalize)
        self._provider, self._threads = provider, intra_op_threads
        self.musetalk_models: tuple[musetalk.WhisperEncoder, musetalk.MuseTalkUNet, musetalk.VaeDecoder] | None = None
        self._vae_encoder_sha = ""
        if folder.musetalk is not None:
            mt = folder.musetalk

            def load(role: str, path: Path) -> OrtModel:
                return OrtModel(f"{mt.name}-{role}", path, None, provider, intra_op_threads)

            # Hashed once: bundles are checked against it as rooms are created.
            self._vae_encoder_sha = _sha256(mt.vae_encoder) if mt.vae_encoder is not None else ""
            self.musetalk_models = (musetalk.WhisperEncoder(load("whisper", mt.whisper)),
                                    musetalk.MuseTalkUNet(load("unet", mt.unet)),
                                    musetalk.VaeDecoder(load("vae-decoder", mt.vae_decoder)))
        self._avatar_models: dict[str, LipSyncDeviceModel] = {}  # per-person models, by bundle
        self.liveportrait_models: tuple[liveportrait.AudioToMotion, liveportrait.Stitching,
                                        liveportrait.Warping] | None = None
        self._extractors_sha = ""
        if folder.liveportrait is not None:
            lp = folder.liveportrait
            self._extractors_sha = keypoints.model_id(lp.appearance.read_bytes(), lp.motion.read_bytes())
            self.liveportrait_models = (
                liveportrait.AudioToMotion(OrtModel(f"{lp.name}-a2m", lp.audio_to_motion, None, provider,
                                                    intra_op_threads)),
                liveportrait.Stitching(OrtModel(f"{lp.name}-stitching", lp.stitching, None, provider,
                                                intra_op_threads)),
                liveportrait.load_warping(f"{lp.name}-warping", lp.warping, provider, intra_op_threads))
        self.tts = EspeakTTS(tts_voice)
        self.engine = InferenceEngine(policy)
        self._tts = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tts")
        # Filled on the TTS thread, read by the agent on the event loop.
        self._avatars: dict[tuple[str, int], tuple[tuple[int, int, int], np.ndarray]] = {}
        self._faces: dict[str, tuple[Bundle, FaceAvatar, FaceFamily]] = {}  # video avatars, loaded
        self._avatars_lock = threading.Lock()
        self.models_bytes = sum(p.stat().st_size for p in folder.model_paths)
        self._calibrate()

    def _calibrate(self) -> None:
        """Quick curves for the fixed-shape models so rooms can run before (or without) a
        full start-up profile; `workers.device.profile.measure` replaces them."""
        from workers.media.audio import MEL_WINDOW, N_MELS

        mel = np.full((N_MELS, MEL_WINDOW), -2.0, np.float32)
        self.serve(AUDIO_TO_MOTION_KEY, measure_curve(
            functools.partial(run_batch_of, self.audio_to_motion_model, {"mel": mel}), (1, 4), 1))
        if self.lipsync_model is not None and self.sync_shape is not None:
            sh = self.sync_shape
            feeds = {"audio": np.zeros((sh.window, N_MELS), np.float32),
                     "mouth": np.zeros((sh.window, 3, *sh.crop), np.float32)}
            self.serve(LIPSYNC_KEY, measure_curve(
                functools.partial(run_batch_of, self.lipsync_model, feeds), (1, 4), 1))
        if self.face_model is not None:
            self.serve(self.face_key, measure_curve(
                functools.partial(run_batch_of, self.face_model, self.face_model.example_item()),
                (1, 4), 1))
        if self.musetalk_models is not None:
            whisper, unet, decoder = self.musetalk_models
            timed: list[tuple[DeviceModel, dict[str, np.ndarray]]] = [
                (whisper, whisper.example_item()), (unet, unet.example_item()),
                (decoder, decoder.example_item())]
            for key, (model, item) in zip(self.musetalk_keys, timed, strict=True):
                self.serve(key, measure_curve(functools.partial(run_batch_of, model, item), (1, 2), 1))
        if self.liveportrait_models is not None:
            a2m, stitch, warp = self.liveportrait_models
            calibrate: list[tuple[DeviceModel, dict[str, np.ndarray]]] = [
                (a2m, a2m.example_item()), (stitch, stitch.example_item()), (warp, warp.example_item())]
            for key, (model, item) in zip(self.liveportrait_keys, calibrate, strict=True):
                self.serve(key, measure_curve(functools.partial(run_batch_of, model, item), (1, 2), 1))
        if self.features_model is not None:
            self.serve(ultralight.FEATURES_KEY, measure_curve(
                functools.partial(run_batch_of, self.features_model, self.features_model.example_item()),
                (1, 4), 1))

    @property
    def provider(self) -> str:
        return self.renderer_model.provider

    @property
    def model_names(self) -> list[str]:
        names = [self.audio_to_motion_model.name, self.renderer_model.name]
        return names + ([self.lipsync_model.name] if self.lipsync_model else []) + \
            ([self.face_model.name] if self.face_model else []) + \
            ([self.features_model.name] if self.features_model else [])

    @property
    def face_key(self) -> BatchKey:
        assert self.face_model is not None
        return BatchKey(self.face_model.name, self.face_model.side)

    def warm_avatars(self) -> list[str]:
        """Avatars whose portrait tensors (at any side) or prepared frames are loaded."""
        with self._avatars_lock:
            return sorted({avatar_id for avatar_id, _ in self._avatars} | set(self._faces))

    def is_video_avatar(self, avatar_id: str) -> bool:
        return self.folder.bundle_path(avatar_id) is not None

    @property
    def musetalk_keys(self) -> tuple[BatchKey, BatchKey, BatchKey]:
        """The Whisper encoder, the UNet and the VAE decoder, as the batcher keys them."""
        assert self.folder.musetalk is not None
        name = self.folder.musetalk.name
        return (musetalk.WHISPER_KEY, BatchKey(f"{name}-unet", 256), BatchKey(f"{name}-vae-decoder", 256))

    @property
    def liveportrait_keys(self) -> tuple[BatchKey, BatchKey, BatchKey]:
        """The audio-to-motion, stitching and warping models, as the batcher keys them."""
        assert self.folder.liveportrait is not None and self.liveportrait_models is not None
        name = self.folder.liveportrait.name
        side = self.liveportrait_models[2].side
        return (BatchKey(f"{name}-a2m"), BatchKey(f"{name}-stitching"), BatchKey(f"{name}-warping", side))

    def video_avatar_refusal(self, avatar_id: str) -> str | None:
        """Why this worker cannot render a video avatar (None: it can): the family its
        bundle names needs a model this worker's folder lacks."""
        root = self.folder.bundle_path(avatar_id)
        if root is None:
            return f"avatar {avatar_id!r} is not a video avatar"
        manifest = Bundle.open(root).manifest
        family = manifest.family
        if family == "musetalk":
            mt = self.folder.musetalk
            if mt is None:
                return (f"avatar {avatar_id!r} is a MuseTalk avatar and this worker's model folder "
                        "has no MuseTalk models")
            if self._vae_encoder_sha and manifest.vae_encoder != self._vae_encoder_sha:
                return (f"avatar {avatar_id!r} was prepared with another VAE encoder than this "
                        "worker's: its latents would not decode right; prepare it again with "
                        f"{mt.vae_encoder}")
        elif family == "liveportrait":
            if self.folder.liveportrait is None or self.features_model is None:
                return (f"avatar {avatar_id!r} is a LivePortrait avatar and this worker's model folder "
                        "lacks LivePortrait's models or the audio feature model that drives them")
            if manifest.vae_encoder != self._extractors_sha:
                return (f"avatar {avatar_id!r} was prepared with other appearance and motion "
                        "extractors than this worker's: its keypoints would not match; prepare it "
                        "again with this folder's")
        elif family == "ultralight":
            if self.features_model is None:
                return (f"avatar {avatar_id!r} is an Ultralight avatar and this worker's model "
                        "folder has no audio feature model (hubert.onnx) to feed it")
        elif self.face_model is None:
            return (f"avatar {avatar_id!r} is a video avatar and this worker's model folder "
                    "has no Wav2Lip-family model")
        return None

    def face_profile(self, key: BatchKey) -> tuple[str, tuple[tuple[int, float], ...]] | None:
        """A face model's profile as the scheduler places by it (None: ``key`` is not one
        a face profile is reported for): its name (`avatarfarm.avatars.face_model`, with
        the export's name after the family for shared models) and its curve. MuseTalk's
        is its two stages a frame goes through, the UNet and the VAE decoder, summed."""
        if self.face_model is not None and key == self.face_key:
            return f"wav2lip/{self.face_model.name}", self.engine.curve(key).points
        if self.folder.musetalk is not None and key in self.musetalk_keys[1:]:
            _, unet, decoder = self.musetalk_keys
            step, dec = self.engine.curve(unet), self.engine.curve(decoder)
            return (f"musetalk/{self.folder.musetalk.name}",
                    tuple((b, s + dec.seconds(b)) for b, s in step.points))
        if self.liveportrait_models is not None and key in self.liveportrait_keys:
            assert self.folder.liveportrait is not None
            a2m, stitch, warp = (self.engine.curve(k) for k in self.liveportrait_keys)
            return (f"liveportrait/{self.folder.liveportrait.name}",
                    tuple((b, s + a2m.seconds(b) + stitch.seconds(b)) for b, s in warp.points))
        if key.model.startswith("ultralight-") and key in self.face_keys():
            return key.model, self.engine.curve(key).points
        return None

    def face_keys(self) -> list[BatchKey]:
        """The face models served now: the folder's Wav2Lip model and every per-person
        model loaded."""
        keys = [self.face_key] if self.face_model is not None else []
        if self.musetalk_models is not None:
            keys.append(self.musetalk_keys[1])
        if self.liveportrait_models is not None:
            keys.append(self.liveportrait_keys[2])
        with self._avatars_lock:
            return keys + sorted({f.key for _, _, f in self._faces.values() if f.name == "ultralight"})

    def render_key(self, side: int) -> BatchKey:
        return BatchKey(self.renderer_model.name, side)

    def close(self) -> None:
        self.engine.close()
        self._tts.shutdown(wait=False, cancel_futures=True)

    # -- latency curves

    def serve(self, key: BatchKey, curve: LatencyCurve) -> None:
        models: dict[BatchKey, DeviceModel | None] = {
            AUDIO_TO_MOTION_KEY: self.audio_to_motion_model, LIPSYNC_KEY: self.lipsync_model,
            ultralight.FEATURES_KEY: self.features_model}
        if self.face_model is not None:
            models[self.face_key] = self.face_model
        for bundle_id, own in self._avatar_models.items():
            models[_avatar_key(bundle_id, own.side)] = own
        if self.musetalk_models is not None:
            models.update(zip(self.musetalk_keys, self.musetalk_models, strict=True))
        if self.liveportrait_models is not None:
            models.update(zip(self.liveportrait_keys, self.liveportrait_models, strict=True))
        model = models.get(key, self.renderer_model)
        assert model is not None
        self.engine.serve(key, model, curve)

    def ensure_render_side(self, side: int) -> None:
        """Serves a portrait side no start-up profile measured, with a curve scaled by
        pixels from the nearest measured side (live timings then correct it), or
        measured now when nothing was."""
        key = self.render_key(side)
        if self.engine.serves(key):
            return
        measured = [k for k in self.engine.keys() if k.model == key.model]
        if measured:
            near = min(measured, key=lambda k: abs(k.side - side))
            curve = self.engine.curve(near).scaled(side * side / (near.side * near.side))
        else:
            curve = measure_curve(lambda b: self.render_batch_sync(
                self.avatar_tensor_sync(self.folder.portrait_ids()[0], side), b), (1, 2), 2)
        log.info("renderer at side %d served with an estimated curve %s", side, curve.points)
        self.engine.serve(key, self.renderer_model, curve)

    # -- blocking implementations (profiling, tests); rooms use the async API

    def synthesize_sync(self, text: str) -> Timed:
        t0 = time.perf_counter()
        audio = self.tts.synthesize(text)
        return Timed(audio, time.perf_counter() - t0)

    def audio_to_motion_sync(self, mel: np.ndarray) -> Timed:
        (motion,), dt = self.audio_to_motion_model.run({"mel": mel[None].astype(np.float32)})
        return Timed(motion[0], dt)

    def render_sync(self, avatar: np.ndarray, motion: np.ndarray) -> Timed:
        (frame,), dt = self.renderer_model.run({"avatar": avatar[None],
                                                "motion": motion[None].astype(np.float32)})
        return Timed(frame[0], dt)

    def render_batch_sync(self, avatar: np.ndarray, batch: int) -> float:
        """One call of `batch` identical items; returns its seconds (for profiling)."""
        motion = np.linspace(0.0, 0.5, 8 * batch, dtype=np.float32).reshape(batch, 8)
        _, dt = self.renderer_model.run({"avatar": np.repeat(avatar[None], batch, axis=0),
                                         "motion": motion})
        return dt

    def sync_scores_sync(self, audio: np.ndarray, mouth: np.ndarray) -> Timed:
        assert self.lipsync_model is not None
        (scores,), dt = self.lipsync_model.run({"audio": audio[None].astype(np.float32),
                                                "mouth": mouth[None].astype(np.float32)})
        return Timed(scores[0], dt)

    def avatar_tensor_sync(self, avatar_id: str, side: int) -> np.ndarray:
        """The avatar portrait as the renderer takes it: [3, side, side] in [0, 1]."""
        key = (avatar_id, side)
        path = self.folder.avatar_path(avatar_id)
        st = path.stat()
        # An avatar re-registered under the same id replaces its file: a new version.
        version = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._avatars_lock:
            cached = self._avatars.get(key)
        if cached is None or cached[0] != version:
            rgb = read_image(path, side)
            tensor = np.ascontiguousarray((rgb.astype(np.float32) / 255.0).transpose(2, 0, 1))
            cached = (version, tensor)
            with self._avatars_lock:
                self._avatars[key] = cached
        return cached[1]

    def face_avatar_sync(self, avatar_id: str) -> FaceAvatar:
        """A video avatar's prepared frames at its face model's side, loaded once and
        shared by its rooms (again when the id names another bundle); for a family with
        one model per person, that model too, bound and timed."""
        refusal = self.video_avatar_refusal(avatar_id)
        if refusal is not None:
            raise ValueError(refusal)
        root = self.folder.bundle_path(avatar_id)
        assert root is not None
        with self._avatars_lock:
            cached = self._faces.get(avatar_id)
        if cached is None or cached[0].root != root:
            bundle = Bundle.open(root)
            if bundle.manifest.family == "ultralight":
                family = self._ultralight_family(bundle)
                model_name = family.key.model
            elif bundle.manifest.family == "musetalk":
                family = self._musetalk_family(bundle)
                model_name = family.key.model
            elif bundle.manifest.family == "liveportrait":
                assert self.features_model is not None
                family = liveportrait.family(self.engine, self.liveportrait_keys, bundle.source(),
                                             self.features_model, self.features, Timed)
                model_name = family.key.model
            else:
                assert self.face_model is not None and self.wav2lip_family is not None
                family, model_name = self.wav2lip_family, self.face_model.name
            side = family.key.side
            if side not in bundle.manifest.sides:
                raise ValueError(f"avatar {avatar_id!r} was prepared with crops at "
                                 f"{list(bundle.manifest.sides)} px; the face model "
                                 f"{model_name} takes {side} px: prepare it again "
                                 f"with --sides {side}")
            cached = (bundle, FaceAvatar(bundle, side), family)
            with self._avatars_lock:
                self._faces[avatar_id] = cached
            log.info("video avatar %s loaded (%s family): bundle %s, %d frames (mapped), crops %.1f MiB",
                     avatar_id, family.name, bundle.manifest.bundle_id[:12], len(cached[1]),
                     cached[1].nbytes / 2**20)
        return cached[1]

    def face_device_model(self, avatar_id: str) -> LipSyncDeviceModel:
        """The face model of a video avatar loaded by `face_avatar` (for timing it alone)."""
        family = self.face_family(avatar_id)
        if family.name == "wav2lip":
            assert self.face_model is not None
            return self.face_model
        return next(m for bid, m in self._avatar_models.items()
                    if _avatar_key(bid, m.side) == family.key)

    def face_family(self, avatar_id: str) -> FaceFamily:
        """The family of a video avatar loaded by `face_avatar`."""
        with self._avatars_lock:
            return self._faces[avatar_id][2]

    def _ultralight_family(self, bundle: Bundle) -> FaceFamily:
        """The person's own UNet from the bundle, bound and served under its own key
        (rooms of the avatar batch together), timed now for the batcher."""
        assert self.features_model is not None
        bid = bundle.manifest.bundle_id
        path = bundle.model_path
        if path is None:
            raise ValueError(f"bundle {bid[:12]} is an Ultralight avatar without its model.onnx")
        model = self._avatar_models.get(bid)
        if model is None:
            ort = OrtModel(f"ultralight-{bid[:12]}", path, None, self._provider, self._threads)
            model = LipSyncDeviceModel(ort, ultralight.LAYOUT,
                                       ultralight.audio_role(self.features_model.width))
            key = _avatar_key(bid, model.side)
            self.engine.serve(key, model, measure_curve(
                functools.partial(run_batch_of, model, model.example_item()), (1, 4), 1))
            self._avatar_models[bid] = model
            log.info("avatar model %s loaded: crop side %d, audio %s", ort.name, model.side,
                     list(model.runner.binding.audio_shape))
        key = _avatar_key(bid, model.side)
        return ultralight.family(key, model.runner.binding.audio_shape, self.features_model,
                                 self.features, self._redraw_crop(key))

    def _musetalk_family(self, bundle: Bundle) -> FaceFamily:
        assert self.musetalk_models is not None
        whisper_key, unet_key, decoder_key = self.musetalk_keys

        async def rows(item: np.ndarray, deadline: float, priority: int) -> Timed:
            r = await self.engine.infer(whisper_key, {musetalk.WhisperEncoder.AUDIO: item}, deadline, priority)
            return _timed(r)

        return musetalk.family(self.engine, unet_key, decoder_key, self.musetalk_models[0],
                               bundle.latents(), rows, Timed)

    def _redraw_crop(self, key: BatchKey) -> Redraw:
        """A family's redraw from the base frame's crop: one item of the face model."""
        async def redraw(audio: np.ndarray, face: FaceAvatar, index: int, deadline: float,
                         priority: int) -> Timed:
            return await self.redraw(audio, face.crops[index], deadline, priority, key)
        return redraw

    def redraw_sync(self, mel: np.ndarray, face: np.ndarray) -> Timed:
        assert self.face_model is not None
        (out,), dt = self.face_model.run({LipSyncDeviceModel.MEL: mel[None],
                                          LipSyncDeviceModel.FACES: face[None]})
        return Timed(out[0], dt)

    # -- async API for rooms: batched on the device under each item's deadline

    async def face_avatar(self, avatar_id: str) -> FaceAvatar:
        return await asyncio.to_thread(self.face_avatar_sync, avatar_id)

    async def redraw(self, mel: np.ndarray, face: np.ndarray, deadline: float = math.inf,
                     priority: int = 1, key: BatchKey | None = None) -> Timed:
        """A face model on one frame (the folder's Wav2Lip model unless ``key`` names a
        family's): its audio input (a mel window [1, 80, 16] for Wav2Lip) and the base
        frame's crop [S, S, 3] uint8 BGR -> the redrawn face [3, S, S] BGR in 0..1."""
        r = await self.engine.infer(key or self.face_key, {LipSyncDeviceModel.MEL: mel,
                                                           LipSyncDeviceModel.FACES: face},
                                    deadline, priority)
        return _timed(r)

    async def features(self, chunk: np.ndarray, deadline: float = math.inf, priority: int = 1) -> Timed:
        """The audio feature model on one chunk of 720 samples -> its rows [2, F]."""
        r = await self.engine.infer(ultralight.FEATURES_KEY,
                                    {ultralight.FeatureModel.INPUT: chunk}, deadline, priority)
        return _timed(r)

    async def synthesize(self, text: str) -> Timed:
        return await asyncio.get_running_loop().run_in_executor(self._tts, self.synthesize_sync, text)

    async def audio_to_motion(self, mel: np.ndarray, deadline: float = math.inf,
                              priority: int = 1) -> Timed:
        r = await self.engine.infer(AUDIO_TO_MOTION_KEY, {"mel": mel.astype(np.float32)},
                                    deadline, priority)
        return _timed(r)

    async def render(self, avatar: np.ndarray, motion: np.ndarray, deadline: float = math.inf,
                     priority: int = 1) -> Timed:
        r = await self.engine.infer(self.render_key(avatar.shape[-1]),
                                    {"avatar": avatar, "motion": motion.astype(np.float32)},
                                    deadline, priority)
        return _timed(r)

    async def sync_scores(self, audio: np.ndarray, mouth: np.ndarray, deadline: float = math.inf,
                          priority: int = 1) -> Timed:
        r = await self.engine.infer(LIPSYNC_KEY, {"audio": audio.astype(np.float32),
                                                  "mouth": mouth.astype(np.float32)},
                                    deadline, priority)
        return _timed(r)

    async def avatar_tensor(self, avatar_id: str, side: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        tensor = await loop.run_in_executor(self._tts, self.avatar_tensor_sync, avatar_id, side)
        await loop.run_in_executor(self._tts, self.ensure_render_side, side)
        return tensor


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _avatar_key(bundle_id: str, side: int) -> BatchKey:
    return BatchKey(face_model("ultralight", bundle_id), side)


def _timed(r: ItemResult) -> Timed:
    return Timed(r.outputs[0], r.seconds, r.batch_size)


def to_canvas(frame: np.ndarray, width: int, height: int, side: int | None = None) -> np.ndarray:
    """[3, S, S] float in [0, 1] -> [height, width, 3] uint8, the portrait centred and the
    backdrop's edge extended to fill a non-square frame. A portrait drawn smaller than
    ``side`` (a room rendering at a degraded quality) is scaled up to it first, so the
    frame looks the same size whatever side it was rendered at."""
    rgb = (frame.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
    if side is not None and rgb.shape[0] != side:
        rgb = scale_image(rgb, side, side)
    side = rgb.shape[0]
    if side == width and side == height:
        return rgb
    top, left = (height - side) // 2, (width - side) // 2
    return np.pad(rgb, ((top, height - side - top), (left, width - side - left), (0, 0)), mode="edge")


def fit_canvas(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """A video avatar's frame [h, w, 3] uint8 on the room's canvas: scaled to fit it
    whole, aspect kept, centred, the frame's edge extended into any margin. Always a
    new array (the label is stamped into it; base frames are shared)."""
    h, w = rgb.shape[:2]
    if (w, h) == (width, height):
        return rgb.copy()
    scale = min(width / w, height / h)
    fw, fh = max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale)))
    if (fw, fh) != (w, h):
        rgb = cv2.resize(rgb, (fw, fh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top, left = (height - fh) // 2, (width - fw) // 2
    return np.pad(rgb, ((top, height - fh - top), (left, width - fw - left), (0, 0)), mode="edge")
