"""The MuseTalk 1.5 family's adapter: Whisper rows on the device, one UNet step in the
VAE's latent space, the VAE decoder: three device stages, each batched across rooms.

Audio: the Whisper-tiny encoder (``input_features`` [B, 80, 3000] -> five hidden states
[B, 1500, 384], one row per 20 ms) runs on chunks of 16 rows (0.32 s of stream) read
with 1 s of context before them and 0.12 s after, the window's log-mel computed on the
device thread for the batch (`workers.media.whisper_audio`). Video frame ``i`` takes the
10 rows from 4 before its own to 4 after (MuseTalk's +-2 video frames at 25 fps), all five
states of each: ``[50, 384]``.

Faces: the bundle holds every base frame's latents, masked and reference
([8, 32, 32], prepared once by `avatarfarm.preparation.latents`). A speaking frame is a
UNet item (``sample`` [8, 32, 32], ``encoder_hidden_states`` [50, 384], ``timestep`` 0 ->
[4, 32, 32]) then a VAE decoder item (latents / 0.18215 -> [3, 256, 256] RGB in [-1, 1]),
pasted back into the frame like any family's face.
"""

from __future__ import annotations

import hashlib
import math
import time
import typing
from collections.abc import Callable

import numpy as np

from workers.device.binding import WAV2LIP_LAYOUT, AudioRole, describe
from workers.device.engine import BatchKey
from workers.device.onnx import ModelInterfaceError, OrtModel
from workers.families.base import FaceFamily, Points, Served, WorkerContext
from workers.families.rows import ROW_STRIDE, RowGrid, RowStream
from workers.media.whisper_audio import log_mel_30s

if typing.TYPE_CHECKING:
    from avatarfarm.preparation.bundle import Bundle, Manifest
    from workers.models.folder import ModelFolder, MuseTalkSpec

SCALING = 0.18215
HIDDEN = 384
STATES = 5
ENCODER_ROWS = 1500
CHUNK_ROWS = 16
LEFT = 16_000  # 1 s of context before a chunk
RIGHT = 1_920  # 0.12 s after it
GRID = RowGrid(rows=CHUNK_ROWS, left=LEFT, right=RIGHT, first=-4, count=10, shape=(50, HIDDEN))
WHISPER_KEY = BatchKey("whisper-encoder")
AUDIO = AudioRole("encoder_hidden_states float32 [B, 50, 384] (10 rows x 5 hidden states)",
                  lambda shape: shape == (50, HIDDEN))


class WhisperEncoder:
    """The Whisper encoder as the engine runs it (`DeviceModel`): per item the chunk's
    audio with its context (``audio`` [LEFT + 5120 + RIGHT] float32) -> its rows
    [B, 16, 5 x 384]. The hidden states are the outputs shaped [B, 1500, 384], in order."""

    AUDIO = "audio"

    def __init__(self, model: OrtModel) -> None:
        self.name, self.provider, self.session = model.name, model.provider, model.session
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        expected = ("expected input input_features float32 [B, 80, 3000] and five outputs "
                    "[B, 1500, 384] (the hidden states: embeddings, then each layer)")
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [80, 3000]:
            raise ModelInterfaceError(f"Whisper encoder {self.name}: {expected}; it has inputs "
                                      f"{describe(inputs)}")
        states = [o for o in outputs if list(o.shape[1:]) == [ENCODER_ROWS, HIDDEN]]
        if len(states) != STATES:
            raise ModelInterfaceError(f"Whisper encoder {self.name}: {len(states)} outputs are "
                                      f"[B, 1500, 384]; {expected}; it has outputs {describe(outputs)}")
        self._input = inputs[0].name
        self._states = [o.name for o in states]
        self.silence = self._rows(np.zeros((1, GRID.item), np.float32))[0]

    def _rows(self, audio: np.ndarray) -> np.ndarray:
        feats = np.stack([log_mel_30s(a) for a in audio])
        outs = self.session.run(self._states, {self._input: feats})
        first = LEFT // ROW_STRIDE
        rows = np.stack([np.asarray(o)[:, first:first + CHUNK_ROWS] for o in outs], axis=2)
        return rows.reshape(len(audio), CHUNK_ROWS, STATES * HIDDEN)  # [B, 16, 5 x 384]

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[typing.Any], float]:
        t0 = time.perf_counter()
        return [self._rows(feeds[self.AUDIO])], time.perf_counter() - t0

    def example_item(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        return {self.AUDIO: rng.uniform(-0.3, 0.3, GRID.item).astype(np.float32)}


class MuseTalkUNet:
    """The UNet as the engine runs it: per item ``sample`` [8, 32, 32] and ``audio``
    [50, 384] -> latents [B, 4, 32, 32]. Inputs are bound by shape: the [B, 8, h, w]
    latents, the [B, 50, 384] audio, and a ``timestep`` of rank 0 or 1 if the export
    has one (fed 0: one step)."""

    SAMPLE, AUDIO = "sample", "audio"

    def __init__(self, model: OrtModel) -> None:
        self.name, self.provider, self.session = model.name, model.provider, model.session
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        expected = ("expected inputs sample float32 [B, 8, 32, 32] (masked + reference latents), "
                    "encoder_hidden_states float32 [B, 50, 384], optionally timestep [1]; output "
                    "[B, 4, 32, 32]")

        def refuse(why: str) -> ModelInterfaceError:
            return ModelInterfaceError(f"MuseTalk UNet {self.name}: {why}; {expected}; it has inputs "
                                       f"{describe(inputs)} and outputs {describe(outputs)}")

        samples = [a for a in inputs if len(a.shape) == 4 and a.shape[1] == 8]
        audio = [a for a in inputs if len(a.shape) == 3]
        steps = [a for a in inputs if len(a.shape) <= 1]
        if len(samples) != 1 or len(steps) > 1 or len(samples) + len(audio) + len(steps) != len(inputs):
            raise refuse("inputs do not bind")
        if len(audio) != 1 or list(audio[0].shape[1:]) != [50, HIDDEN]:
            other = audio[0] if audio else None
            raise refuse(f"input {other.name} is {list(other.shape)} where encoder_hidden_states "
                         f"[B, 50, 384] was expected" if other else "no encoder_hidden_states input")
        lat = [o for o in outputs if len(o.shape) == 4 and o.shape[1] == 4]
        if len(lat) != 1:
            raise refuse("no [B, 4, h, w] output")
        self._sample, self._audio, self._output = samples[0].name, audio[0].name, lat[0].name
        self._step = None
        if steps:
            dtype = np.int64 if "int64" in steps[0].type else np.float32
            self._step = (steps[0].name, np.zeros([1] * len(steps[0].shape), dtype))

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[typing.Any], float]:
        t0 = time.perf_counter()
        ins = {self._sample: feeds[self.SAMPLE], self._audio: feeds[self.AUDIO]}
        if self._step is not None:
            ins[self._step[0]] = self._step[1]
        (out,) = self.session.run([self._output], ins)
        return [np.asarray(out)], time.perf_counter() - t0

    def example_item(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        return {self.SAMPLE: rng.normal(0, 0.2, (8, 32, 32)).astype(np.float32),
                self.AUDIO: rng.normal(0, 0.5, (50, HIDDEN)).astype(np.float32)}


class VaeDecoder:
    """The VAE decoder as the engine runs it: per item ``latent`` [4, 32, 32] (UNet
    output, scaled) -> the face [B, 3, 256, 256] BGR in 0..1, as faces are pasted back."""

    LATENT = "latent"

    def __init__(self, model: OrtModel) -> None:
        self.name, self.provider, self.session = model.name, model.provider, model.session
        (inp,), outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inp.shape) != 4 or inp.shape[1] != 4 or len(outputs[0].shape) != 4 or outputs[0].shape[1] != 3:
            raise ModelInterfaceError(
                f"VAE decoder {self.name}: expected input latent_sample float32 [B, 4, h, w] and "
                f"output sample [B, 3, 8h, 8w]; it has input {describe([inp])} and outputs "
                f"{describe(outputs)}")
        self._input, self._output = inp.name, outputs[0].name
        side = outputs[0].shape[2]
        self.side = side if isinstance(side, int) else 256

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[typing.Any], float]:
        t0 = time.perf_counter()
        (rgb,) = self.session.run([self._output], {self._input: feeds[self.LATENT] / np.float32(SCALING)})
        bgr = np.clip((np.asarray(rgb, np.float32)[:, ::-1] + 1.0) * 0.5, 0.0, 1.0)
        return [bgr], time.perf_counter() - t0

    def example_item(self) -> dict[str, np.ndarray]:
        return {self.LATENT: np.random.default_rng(0).normal(0, 0.2, (4, 32, 32)).astype(np.float32)}


class Runtime:
    """MuseTalk on one worker: the folder's Whisper encoder, UNet and VAE decoder, shared by
    its avatars; each avatar brings its latents."""

    name = "musetalk"

    def __init__(self, ctx: WorkerContext, spec: MuseTalkSpec) -> None:
        self._ctx = ctx
        self.spec = spec
        self.whisper = WhisperEncoder(ctx.load(f"{spec.name}-whisper", spec.whisper))
        self.unet = MuseTalkUNet(ctx.load(f"{spec.name}-unet", spec.unet))
        self.decoder = VaeDecoder(ctx.load(f"{spec.name}-vae-decoder", spec.vae_decoder))
        self.keys = (WHISPER_KEY, BatchKey(f"{spec.name}-unet", self.decoder.side),
                     BatchKey(f"{spec.name}-vae-decoder", self.decoder.side))
        # Hashed once: bundles are checked against it as rooms are created.
        self._vae_encoder = (hashlib.sha256(spec.vae_encoder.read_bytes()).hexdigest()
                             if spec.vae_encoder is not None else "")

    def served(self) -> list[Served]:
        whisper_key, unet_key, decoder_key = self.keys
        return [Served(whisper_key, self.whisper), Served(unet_key, self.unet), Served(decoder_key, self.decoder)]

    def refusal(self, avatar_id: str, manifest: Manifest) -> str | None:
        if self._vae_encoder and manifest.vae_encoder != self._vae_encoder:
            return (f"avatar {avatar_id!r} was prepared with another VAE encoder than this "
                    "worker's: its latents would not decode right; prepare it again with "
                    f"{self.spec.vae_encoder}")
        return None

    def family(self, bundle: Bundle) -> FaceFamily:
        engine, timed = self._ctx.engine, self._ctx.timed
        whisper_key, unet_key, decoder_key = self.keys
        latents = bundle.latents()

        async def rows(item: np.ndarray, deadline: float, priority: int) -> typing.Any:
            r = await engine.infer(whisper_key, {WhisperEncoder.AUDIO: item}, deadline, priority)
            return timed(r.outputs[0], r.seconds, r.batch_size)

        def speech(fps: int, priority: int, on_seconds: Callable[[float], None]) -> RowStream:
            return RowStream(fps, GRID, self.whisper.silence, rows, priority, on_seconds)

        async def redraw(audio: np.ndarray, face: typing.Any, index: int, deadline: float,
                         priority: int) -> typing.Any:
            # The UNet must leave the decoder its time before the frame's deadline.
            reserve = engine.curve(decoder_key).seconds(1) if math.isfinite(deadline) else 0.0
            step = await engine.infer(unet_key, {MuseTalkUNet.SAMPLE: np.asarray(latents[index]),
                                                 MuseTalkUNet.AUDIO: audio}, deadline - reserve, priority)
            drawn = await engine.infer(decoder_key, {VaeDecoder.LATENT: step.outputs[0]}, deadline, priority)
            return timed(drawn.outputs[0], step.seconds + drawn.seconds, drawn.batch_size)

        return FaceFamily(self.name, unet_key, WAV2LIP_LAYOUT, AUDIO, speech, redraw)

    def renders(self) -> list[str]:
        return ["musetalk"]

    def release(self, key: BatchKey) -> bool:
        return False  # the folder's models serve every avatar of the family

    def face_keys(self) -> list[BatchKey]:
        return [self.keys[1]]

    def face_profile(self, key: BatchKey) -> tuple[str, Points] | None:
        if key not in self.keys[1:]:
            return None
        step, dec = (self._ctx.engine.curve(k) for k in self.keys[1:])
        return f"musetalk/{self.spec.name}", tuple((b, s + dec.seconds(b)) for b, s in step.points)


def load(folder: ModelFolder, ctx: WorkerContext) -> Runtime | None:
    """The folder's MuseTalk models (its ``"musetalk"`` entry)."""
    return Runtime(ctx, folder.musetalk) if folder.musetalk is not None else None
