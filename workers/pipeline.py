"""The avatar pipeline's inference stages for one worker: TTS, audio-to-motion
and render, run on one inference executor so onnxruntime owns the device
without rooms fighting over it, and timed per call for cost attribution."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from dataclasses import dataclass

import numpy as np

from workers.inference import OrtModel, ProviderChoice
from workers.models.avatar import read_image
from workers.models.folder import AUDIO_TO_MOTION, RENDERER, ModelFolder
from workers.tts import EspeakTTS


@dataclass(frozen=True, slots=True)
class Timed:
    value: np.ndarray
    seconds: float


class Pipeline:
    def __init__(self, folder: ModelFolder, provider: ProviderChoice = ProviderChoice.AUTO,
                 intra_op_threads: int = 0, tts_voice: str = "en") -> None:
        self.folder = folder
        self.audio_to_motion_model = OrtModel("audio_to_motion", folder.audio_to_motion,
                                              AUDIO_TO_MOTION, provider, intra_op_threads)
        self.renderer_model = OrtModel(folder.renderer_name, folder.renderer, RENDERER, provider,
                                       intra_op_threads)
        self.tts = EspeakTTS(tts_voice)
        # One thread: calls are serialised on the device; onnxruntime's own
        # intra-op threads parallelise inside each call.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._avatars: dict[tuple[str, int], np.ndarray] = {}

    @property
    def provider(self) -> str:
        return self.renderer_model.provider

    @property
    def model_names(self) -> list[str]:
        return [self.audio_to_motion_model.name, self.renderer_model.name]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _call(self, fn: functools.partial[Timed]) -> Timed:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # -- blocking implementations (run on the executor; also used by profiling)

    def synthesize_sync(self, text: str) -> Timed:
        import time

        t0 = time.perf_counter()
        audio = self.tts.synthesize(text)
        return Timed(audio, time.perf_counter() - t0)

    def audio_to_motion_sync(self, mel: np.ndarray) -> Timed:
        (motion,), dt = self.audio_to_motion_model.run({"mel": mel[None].astype(np.float32)})
        return Timed(motion[0], dt)

    def render_sync(self, avatar: np.ndarray, motion: np.ndarray) -> Timed:
        (frame,), dt = self.renderer_model.run({"avatar": avatar,
                                                "motion": motion[None].astype(np.float32)})
        return Timed(frame[0], dt)

    def avatar_tensor_sync(self, avatar_id: str, side: int) -> np.ndarray:
        key = (avatar_id, side)
        if key not in self._avatars:
            rgb = read_image(self.folder.avatar_path(avatar_id), side)
            self._avatars[key] = (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()
        return self._avatars[key]

    # -- async API for rooms

    async def synthesize(self, text: str) -> Timed:
        return await self._call(functools.partial(self.synthesize_sync, text))

    async def audio_to_motion(self, mel: np.ndarray) -> Timed:
        return await self._call(functools.partial(self.audio_to_motion_sync, mel))

    async def render(self, avatar: np.ndarray, motion: np.ndarray) -> Timed:
        return await self._call(functools.partial(self.render_sync, avatar, motion))

    async def avatar_tensor(self, avatar_id: str, side: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.avatar_tensor_sync, avatar_id, side)


def to_canvas(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """[3, S, S] float in [0, 1] -> [height, width, 3] uint8, the portrait centred and the
    backdrop's edge extended to fill a non-square frame."""
    rgb = (frame.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
    side = rgb.shape[0]
    if side == width and side == height:
        return rgb
    top, left = (height - side) // 2, (width - side) // 2
    return np.pad(rgb, ((top, height - side - top), (left, width - side - left), (0, 0)), mode="edge")
