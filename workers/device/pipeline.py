"""The avatar pipeline's inference stages for one worker: TTS, audio-to-motion,
render and the lip-sync check for the reference family; for video avatars (a prepared
video, its mouth redrawn from the speech), the face families whose models the folder
names (`FAMILIES`: each family's adapter module loads its own runtime, and an avatar's
own model, as Ultralight's, when its first room starts), and the HuBERT feature model
they share.

The ONNX models run on the device thread of one `InferenceEngine`, which batches
items across rooms per model and input shape (the renderer once per portrait side,
each face model at its crop side) under their deadlines. TTS is CPU work on its own
thread so it never holds the device. Every call returns the device time attributed to the
item (its share of the batch) for cost accounting.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import math
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from avatarfarm.avatars import is_file_name
from avatarfarm.latency import LatencyCurve
from avatarfarm.preparation.bundle import Bundle
from avatarfarm.voices import VoiceError, find_service_voices, find_voices, registered_voices
from workers.device.batching import BatchPolicy
from workers.device.binding import LipSyncDeviceModel
from workers.device.engine import BatchKey, DeviceModel, InferenceEngine, ItemResult, Next
from workers.device.onnx import ModelInterfaceError, OrtModel, ProviderChoice
from workers.device.timing import Timed, measure_curve, run_batch_of
from workers.families import liveportrait, musetalk, ultralight, wav2lip
from workers.families.base import FaceFamily, FamilyRuntime, Points, Redraw, WorkerContext
from workers.families.features import FEATURES_KEY, AudioFeatures, open_features
from workers.media.audio import SAMPLE_RATE, resample
from workers.media.motion import compose
from workers.media.piper import (
    BUCKETS,
    PiperModel,
    audio_length,
    bucket,
    chunks,
    length_scale,
    sentences,
    voice_key,
)
from workers.media.tts import EspeakTTS
from workers.media.tts_service import ServiceVoice
from workers.models.avatar import read_image, scale_image
from workers.models.folder import AUDIO_TO_MOTION, LIPSYNC, RENDERER, ModelFolder
from workers.rooms.wav2lip_frames import FaceAvatar

log = logging.getLogger(__name__)

# The face families' adapter modules: each has a `load(folder, ctx)` giving its runtime.
FAMILIES = (wav2lip, ultralight, musetalk, liveportrait)

AUDIO_TO_MOTION_KEY = BatchKey("audio_to_motion")
# What a voice is timed speaking (its TTS profile's unit is a second of that speech).
VOICE_SAMPLE = "Welcome to the live room, today we have three new offers for you."
FACE_READER_KEY = BatchKey("face_reader", 128)
LIPSYNC_KEY = BatchKey("lipsync")
# What the pipeline caches per avatar and render side: the [3, S, S] float32 portrait.
AVATAR_BYTES_PER_PIXEL = 3 * np.dtype(np.float32).itemsize


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
        self.engine = InferenceEngine(policy)
        self.features_model: AudioFeatures | None = None
        if folder.features is not None:
            self.features_model = open_features(
                OrtModel(folder.features.name, folder.features.path, None, provider, intra_op_threads),
                folder.features.normalize)
        # Camera rooms read their driver's face with it (`workers.camera.motion`).
        self.face_reader_model = (OrtModel("face_reader", folder.face_reader, None, provider, intra_op_threads)
                                  if folder.face_reader is not None else None)
        # The face families whose models the folder names: each loads its own (a family's
        # adapter module, `workers.families`), the pipeline knows them only as runtimes.
        ctx = WorkerContext(self.engine, lambda name, path: OrtModel(name, path, None, provider, intra_op_threads),
                            self.features_model, self.features, self._redraw_crop, Timed)
        self.families: dict[str, FamilyRuntime] = {}
        for module in FAMILIES:
            runtime = module.load(folder, ctx)
            if runtime is not None:
                self.families[runtime.name] = runtime
        if self.face_model is not None:
            log.info("face model %s: crop side %d, batch axis %s", self.face_model.name,
                     self.face_model.side, self.face_model.runner.binding.batch or "dynamic")
        # Text-driven rooms speak with espeak-ng, or with a neural voice of the model
        # folder's voices/ (Piper's VITS exports, on the device, batched across rooms)
        # named by tts_voice.
        # ...or with a TTS service's voice (voices/NAME.service.json), streamed in. Voices
        # tenants registered (with their licences) are in the avatar folder's voices/, and
        # one registered after the worker started is loaded when a room first names it.
        self._open_voice = lambda name, path, config: PiperModel(
            OrtModel(f"voice-{name}", path, None, provider, intra_op_threads), config)
        self.voices: dict[str, PiperModel] = {
            name: self._open_voice(name, path, config)
            for name, (path, config) in find_voices(folder.root / "voices").items()}
        self.services = {name: ServiceVoice(name, config)
                         for name, config in find_service_voices(folder.root / "voices").items()}
        self._registered_voices = registered_voices(folder.avatar_dir)
        self.voice_costs: dict[str, Points] = {}  # measured neural voices (`measure_voice`)
        self._load_registered_voices()
        self.tts_voice = tts_voice
        self.voice = self.voices.get(tts_voice)
        self.tts = EspeakTTS(self.voice.config.espeak_voice if self.voice is not None else
                             "en" if tts_voice in self.services else tts_voice)
        self._tts = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tts")
        # Filled on the TTS thread, read by the agent on the event loop.
        self._avatars: dict[tuple[str, int], tuple[tuple[int, int, int], np.ndarray]] = {}
        self._faces: dict[str, tuple[Bundle, FaceAvatar, FaceFamily]] = {}  # video avatars, loaded
        self._avatars_lock = threading.Lock()
        # Loads and unloads of video avatars, one at a time (re-entered by a room's hold);
        # the rooms holding each face model, so that an avatar's own is unloaded with its last.
        self._faces_lock = threading.RLock()
        self._holders: collections.Counter[BatchKey] = collections.Counter()
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
        for runtime in self.families.values():
            for served in runtime.served():
                self.engine.serve(served.key, served.model, measure_curve(
                    functools.partial(run_batch_of, served.model, served.model.example_item()), (1, 2), 1))
        for name in self.voices:
            self._serve_voice(name)
        if self.face_reader_model is not None:
            face = {"face": np.zeros((3, 128, 128), np.float32)}
            self.serve(FACE_READER_KEY, measure_curve(
                functools.partial(run_batch_of, self.face_reader_model, face), (1, 4), 1))
        if self.features_model is not None:
            self.serve(FEATURES_KEY, measure_curve(
                functools.partial(run_batch_of, self.features_model, self.features_model.example_item()),
                (1, 4), 1))

    def _serve_voice(self, name: str) -> None:
        voice = self.voices[name]
        # One call's cost grows with its bucket: timed at the smallest, scaled.
        curve = measure_curve(functools.partial(run_batch_of, voice, voice.example_item()), (1, 2), 1)
        for b in BUCKETS:
            k = b / BUCKETS[0]
            self.engine.serve(voice_key(name, b), voice,
                              LatencyCurve(tuple((n, s * k) for n, s in curve.points)))

    def measure_voice(self, name: str, sizes: tuple[int, ...], iterations: int) -> Points:
        """A neural voice's device seconds per second of speech at each batch size (a
        clause of a typical sentence per item), kept in ``voice_costs`` for the scheduler."""
        voice = self.voices[name]
        item = voice.item(self.voice_ids(voice, VOICE_SAMPLE)[0])
        (audio,), _ = voice.run({k: v[None] for k, v in item.items()})
        hz = voice.config.sample_rate
        spoken = max(audio_length(audio[0], hz) / hz, 1e-3)
        curve = measure_curve(functools.partial(run_batch_of, voice, item), sizes, iterations)
        self.voice_costs[name] = tuple((b, s / spoken) for b, s in curve.points)
        return self.voice_costs[name]

    def _load_registered_voices(self, only: str = "") -> list[str]:
        """Loads the registered voices (``only``: that one) this worker does not have yet;
        a voice whose files cannot be used is left out, said in the log. Returns those
        loaded."""
        loaded: list[str] = []

        def unusable(path: Path, e: VoiceError) -> None:
            log.warning("registered voice %s cannot be used: %s", path.name, e)

        piper = find_voices(self._registered_voices, unusable)
        services = find_service_voices(self._registered_voices, unusable)
        for name, (path, config) in piper.items():
            if name in self.voices or name in self.services or (only and name != only):
                continue
            try:
                self.voices[name] = self._open_voice(name, path, config)
            except (VoiceError, ModelInterfaceError, OSError) as e:
                log.warning("registered voice %s cannot be used: %s", name, e)
                continue
            loaded.append(name)
        for name, service in services.items():
            if name not in self.voices and name not in self.services and (not only or name == only):
                self.services[name] = ServiceVoice(name, service)
                loaded.append(name)
        return loaded

    @property
    def provider(self) -> str:
        return self.renderer_model.provider

    @property
    def model_names(self) -> list[str]:
        names = [self.audio_to_motion_model.name, self.renderer_model.name]
        return names + ([self.lipsync_model.name] if self.lipsync_model else []) + \
            ([self.features_model.name] if self.features_model else []) + \
            ([self.face_reader_model.name] if self.face_reader_model else []) + \
            [s.model.name for rt in self.families.values() for s in rt.served()]

    @property
    def face_model(self) -> LipSyncDeviceModel | None:
        """The folder's Wav2Lip-family model, shared by its Wav2Lip avatars."""
        rt = self.families.get("wav2lip")
        return typing.cast(wav2lip.Runtime, rt).model if rt is not None else None

    @property
    def face_key(self) -> BatchKey:
        rt = self.families.get("wav2lip")
        assert rt is not None
        return typing.cast(wav2lip.Runtime, rt).key

    def warm_avatars(self) -> list[str]:
        """Avatars whose portrait tensors (at any side) or prepared frames are loaded."""
        with self._avatars_lock:
            return sorted({avatar_id for avatar_id, _ in self._avatars} | set(self._faces))

    def is_video_avatar(self, avatar_id: str) -> bool:
        return self.folder.bundle_path(avatar_id) is not None

    def video_avatar_family(self, avatar_id: str) -> str:
        """The face family a video avatar's bundle names ("" for a portrait)."""
        root = self.folder.bundle_path(avatar_id)
        return Bundle.open(root).manifest.family if root is not None else ""

    def video_avatar_refusal(self, avatar_id: str) -> str | None:
        """Why this worker cannot render a video avatar (None: it can): its bundle's
        family has no models in this worker's folder, or refuses it."""
        root = self.folder.bundle_path(avatar_id)
        if root is None:
            return f"avatar {avatar_id!r} is not a video avatar"
        manifest = Bundle.open(root).manifest
        runtime = self.families.get(manifest.family)
        if runtime is None:
            return (f"avatar {avatar_id!r} is a {manifest.family} avatar and this worker's model "
                    f"folder has no {manifest.family} models")
        return runtime.refusal(avatar_id, manifest)

    def face_profile(self, key: BatchKey) -> tuple[str, Points] | None:
        """A face model's profile as the scheduler places by it (None: ``key`` is not one
        a face profile is reported for): its family's name for it and its curve, the
        stages a frame goes through summed (`FamilyRuntime.face_profile`)."""
        for runtime in self.families.values():
            found = runtime.face_profile(key)
            if found is not None:
                return found
        return None

    def face_keys(self) -> list[BatchKey]:
        """The face models served now, one key each: the folder's families' and every
        avatar's own model loaded."""
        return [k for runtime in self.families.values() for k in runtime.face_keys()]

    def face_families(self) -> list[str]:
        """The video avatars' families this worker renders (`FamilyRuntime.renders`)."""
        return sorted({f for runtime in self.families.values() for f in runtime.renders()})

    def render_key(self, side: int) -> BatchKey:
        return BatchKey(self.renderer_model.name, side)

    def close(self) -> None:
        self.engine.close()
        self._tts.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """Closes the TTS services' connections (on the event loop that used them)."""
        for service in self.services.values():
            await service.aclose()

    # -- latency curves

    def serve(self, key: BatchKey, curve: LatencyCurve) -> None:
        models: dict[BatchKey, DeviceModel | None] = {
            AUDIO_TO_MOTION_KEY: self.audio_to_motion_model, LIPSYNC_KEY: self.lipsync_model,
            FEATURES_KEY: self.features_model, FACE_READER_KEY: self.face_reader_model}
        models.update({s.key: s.model for rt in self.families.values() for s in rt.served()})
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
            tensor.flags.writeable = False  # shared by the avatar's rooms; stacked once a batch
            cached = (version, tensor)
            with self._avatars_lock:
                self._avatars[key] = cached
        return cached[1]

    def face_avatar_sync(self, avatar_id: str) -> FaceAvatar:
        """A video avatar's prepared frames at its face model's side, loaded once and
        shared by its rooms (again when the id names another bundle); for a family with
        one model per person, that model too, bound and timed."""
        return self._load_face(avatar_id)[0]

    def hold_face_sync(self, avatar_id: str) -> tuple[FaceAvatar, FaceFamily]:
        """`face_avatar_sync` for a room: its family's model is held (not unloaded) until
        the room gives it back with `release_face_sync`."""
        with self._faces_lock:
            face, family = self._load_face(avatar_id)
            self._holders[family.key] += 1
            return face, family

    def release_face_sync(self, family: FaceFamily) -> None:
        """A room of the family's model has ended: with its last room, an avatar's own
        model is unloaded (the folder's models stay), with the avatars loaded on it."""
        with self._faces_lock:
            key = family.key
            self._holders[key] -= 1
            if self._holders[key] > 0:
                return
            del self._holders[key]
            if self.families[family.name].release(key):
                with self._avatars_lock:
                    for avatar_id in [a for a, c in self._faces.items() if c[2].key == key]:
                        del self._faces[avatar_id]

    def _load_face(self, avatar_id: str) -> tuple[FaceAvatar, FaceFamily]:
        refusal = self.video_avatar_refusal(avatar_id)
        if refusal is not None:
            raise ValueError(refusal)
        root = self.folder.bundle_path(avatar_id)
        assert root is not None
        with self._faces_lock:  # one load (or unload) at a time: a model is loaded once
            with self._avatars_lock:
                cached = self._faces.get(avatar_id)
            if cached is None or cached[0].root != root:
                bundle = Bundle.open(root)
                family = self.families[bundle.manifest.family].family(bundle)
                model_name, side = family.key.model, family.key.side
                if side not in bundle.manifest.sides:
                    raise ValueError(f"avatar {avatar_id!r} was prepared with crops at "
                                     f"{list(bundle.manifest.sides)} px; the face model "
                                     f"{model_name} takes {side} px: prepare it again "
                                     f"with --sides {side}")
                cached = (bundle, FaceAvatar(bundle, side), family)
                with self._avatars_lock:
                    self._faces[avatar_id] = cached
                log.info("video avatar %s loaded (%s family): bundle %s, %d frames (mapped), "
                         "crops %.1f MiB", avatar_id, family.name, bundle.manifest.bundle_id[:12],
                         len(cached[1]), cached[1].nbytes / 2**20)
            return cached[1], cached[2]

    def face_device_model(self, avatar_id: str) -> DeviceModel:
        """The face model of a loaded video avatar (for timing it alone)."""
        key = self.face_family(avatar_id).key
        return next(s.model for rt in self.families.values() for s in rt.served() if s.key == key)

    def face_family(self, avatar_id: str) -> FaceFamily:
        """The family of a loaded video avatar."""
        with self._avatars_lock:
            return self._faces[avatar_id][2]

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

    async def hold_face(self, avatar_id: str) -> tuple[FaceAvatar, FaceFamily]:
        held = asyncio.get_running_loop().run_in_executor(None, self.hold_face_sync, avatar_id)
        try:
            return await asyncio.shield(held)
        except asyncio.CancelledError:
            # The load goes on on its thread: what it holds is given back when it is done.
            def give_back(f: asyncio.Future[tuple[FaceAvatar, FaceFamily]]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self.release_face_sync(f.result()[1])
            held.add_done_callback(give_back)
            raise

    async def release_face(self, family: FaceFamily) -> None:
        await asyncio.to_thread(self.release_face_sync, family)

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
        """The audio feature model on one chunk of a room's audio -> its rows: HuBERT's
        two rows of 720 samples [2, F], or one wenet step [1, S * D]."""
        assert self.features_model is not None
        r = await self.engine.infer(FEATURES_KEY, {self.features_model.INPUT: chunk}, deadline, priority)
        return _timed(r)

    async def read_face(self, face: np.ndarray, deadline: float = math.inf, priority: int = 1) -> Timed:
        """The face reader on a camera driver's face crop [3, 128, 128] -> its measures [3]."""
        r = await self.engine.infer(FACE_READER_KEY, {"face": face}, deadline, priority)
        return _timed(r)

    def voice_names(self) -> list[str]:
        """The voices this worker speaks besides espeak-ng's: its neural voices and its
        TTS services' voices."""
        return sorted({*self.voices, *self.services})

    def voice_refusal(self, voice: str) -> str | None:
        """Why this worker cannot speak with ``voice`` (None: it can; "" is its default)."""
        if not voice or voice in self.voices or voice in self.services or self.tts.has_voice(voice):
            return None
        if is_file_name(voice) and voice in self._load_registered_voices(voice):  # registered since start
            if voice in self.voices:
                # Timed for the scheduler too: the start-up profile (`workers.device.profile`)
                # measured the voices there were then.
                self._serve_voice(voice)
                self.measure_voice(voice, (1, 2), 1)
            log.info("registered voice %s loaded", voice)
            return None
        return (f"this worker has no voice {voice!r}: neither a neural voice or a TTS service's "
                f"voice in its model folder's voices/ ({', '.join(self.voice_names()) or 'none'}) "
                "nor an espeak-ng voice")

    def _voice_key(self, voice: PiperModel, size: int, scale: float | None) -> BatchKey:
        """The batch key of a voice's items at a pace, served on first use (with the
        voice's own curve: the pace changes little of a call's cost)."""
        key = voice_key(voice.config.name, size, scale)
        if scale is not None and not self.engine.serves(key):
            self.engine.serve(key, voice, self.engine.curve(voice_key(voice.config.name, size)))
        return key

    def voice_ids(self, voice: PiperModel, text: str) -> list[list[int]]:
        """``text`` as ``voice``'s items: phoneme ids (espeak-ng's IPA in the voice's
        language) per clause, cut to fit the largest bucket."""
        config = voice.config
        clauses = [p for s in sentences(text) for p in self.tts.phonemes(s, config.espeak_voice)]
        return [ids for clause in clauses for ids in chunks(config.ids(clause), config)]

    async def synthesize(self, text: str, deadline: float = math.inf, priority: int = 1,
                         voice_name: str = "", rate: float = 0.0) -> Timed:
        """Speech for ``text`` at SAMPLE_RATE in ``voice_name`` (a neural voice this worker
        serves, or an espeak-ng voice; either at about ``rate`` words a minute; "": the worker's
        default): a neural voice's sentences are device items (batched with each other
        and other rooms'); a TTS service's voice streams in (`workers.media.tts_service`);
        espeak-ng runs on the TTS thread."""
        loop = asyncio.get_running_loop()
        service = self.services.get(voice_name or self.tts_voice)
        if service is not None:  # raises VoiceUnavailable while the service fails
            speech, _ = await service.synthesize(text)
            return Timed(speech, 0.0)  # the service's time, none of this device's
        voice = self.voices.get(voice_name) if voice_name else self.voice
        if voice is None:
            if not voice_name and not rate:
                return await loop.run_in_executor(self._tts, self.synthesize_sync, text)
            engine = EspeakTTS(voice_name or self.tts.voice, round(rate) if rate else 165)

            def speak() -> Timed:
                t0 = time.perf_counter()
                return Timed(engine.synthesize(text), time.perf_counter() - t0)

            return await loop.run_in_executor(self._tts, speak)
        config = voice.config
        items = await loop.run_in_executor(self._tts, self.voice_ids, voice, text)
        pace = length_scale(config, rate)
        scale = None if pace == config.scales[1] else pace
        results = await asyncio.gather(*(self.engine.infer(
            self._voice_key(voice, bucket(len(ids)), scale), voice.item(ids, scale), deadline,
            priority) for ids in items))
        parts = [r.outputs[0][:audio_length(r.outputs[0], config.sample_rate)] for r in results]
        audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return Timed(resample(audio, config.sample_rate, SAMPLE_RATE), sum(r.seconds for r in results),
                     max((r.batch_size for r in results), default=1))

    def speak(self, avatar: np.ndarray, idle: np.ndarray, mel: np.ndarray, motion_deadline: float,
              deadline: float, priority: int = 1
              ) -> asyncio.Future[tuple[ItemResult, ItemResult]]:
        """A spoken frame of the reference family as one device item to the room: its
        audio-to-motion, the idle motion composed in (the speech owns the mouth), then its
        render, chained on the device thread (`InferenceEngine.infer_then`); resolves with
        (motion, render)."""
        key = self.render_key(avatar.shape[-1])

        def render(motion: ItemResult) -> Next:
            composed = compose(idle, motion.outputs[0], mouth_only=True)
            return Next(key, {"avatar": avatar, "motion": composed.astype(np.float32, copy=False)},
                        deadline)

        return self.engine.infer_then(AUDIO_TO_MOTION_KEY, {"mel": mel.astype(np.float32, copy=False)},
                                       motion_deadline, render, priority)

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
