"""Neural voices of the VITS family as Piper exports them: ``<voice>.onnx`` and its
``<voice>.onnx.json`` (sample rate, espeak-ng voice, inference scales, phoneme ids).

Text becomes speech in three steps:
1. espeak-ng turns it into IPA phonemes, clause by clause (`EspeakTTS.phonemes`, on the
   worker's TTS thread);
2. the voice's ``phoneme_id_map`` turns those into ids as Piper does (`PiperConfig.ids`:
   ``^`` first, each phoneme followed by the pad ``_``, ``$`` last);
3. the model runs on the device as a batcher item, batched across rooms: each item is
   padded with zeros to its length bucket (`BUCKETS`, one batch key each, so sentences
   of similar length share a call) and tells its own length (``input_lengths``); its
   audio is what the model gives up to the item's end (VITS leaves the rest silent).

A segment of text is spoken sentence by sentence (`sentences`): the first sentence's
audio is ready after that sentence alone, not the whole segment.
"""

from __future__ import annotations

import math
import re
import time
import typing

import numpy as np

from avatarfarm.voices import BOS, EOS, PAD, PiperConfig
from workers.device.engine import BatchKey
from workers.device.onnx import ModelInterfaceError, OrtModel

BUCKETS = (32, 64, 128, 256, 512)  # ids an item is padded to; a longer sentence is split
_SENTENCE = re.compile(r"(?<=[.!?;])\s+")


# espeak-ng's default rate: an avatar's VoiceSettings.rate (words a minute) is a Piper
# voice's own pace scaled by default/rate (its length scale), in steps of LENGTH_STEP so
# that rooms at nearly the same rate share batches.
DEFAULT_WPM = 165
LENGTH_STEP = 0.05


def length_scale(config: PiperConfig, words_per_minute: float) -> float:
    """The length scale that speaks ``config``'s voice at about ``words_per_minute``
    (0: the voice's own), within 0.5..2 times the voice's own."""
    own = config.scales[1]
    if not words_per_minute:
        return own
    factor = min(max(DEFAULT_WPM / words_per_minute, 0.5), 2.0)
    return round(own * factor / LENGTH_STEP) * LENGTH_STEP


def voice_key(voice: str, bucket: int, scale: float | None = None) -> BatchKey:
    """The batch key of a voice's items padded to ``bucket`` ids, at a length scale other
    than the voice's own (items of one call share its scales)."""
    return BatchKey(f"voice-{voice}" if scale is None else f"voice-{voice}x{scale:.2f}", bucket)


def bucket(n: int) -> int:
    """The padded length of an item of ``n`` ids (n <= BUCKETS[-1])."""
    return next(b for b in BUCKETS if b >= n)


def sentences(text: str) -> list[str]:
    """A segment's sentences, in order (each is synthesised, and plays, on its own)."""
    return [s for s in (p.strip() for p in _SENTENCE.split(text.strip())) if s]


def chunks(ids: list[int], config: PiperConfig) -> list[list[int]]:
    """``ids`` in pieces that fit the largest bucket, cut after a pad where possible."""
    limit = BUCKETS[-1]
    if len(ids) <= limit:
        return [ids]
    pad = config.phoneme_ids[PAD][-1]
    out, rest = [], ids
    while len(rest) > limit:
        cut = max((i + 1 for i in range(limit - 1) if rest[i] == pad), default=limit - 1)
        out.append(rest[:cut] + list(config.phoneme_ids[EOS]))
        rest = list(config.phoneme_ids[BOS]) + rest[cut:]
    return [*out, rest]


class PiperModel:
    """A Piper voice as the inference engine runs it (`workers.device.engine.DeviceModel`):
    per-item feeds ``input`` int64 [bucket] (zero-padded ids) and ``input_lengths`` int64
    (its own count), and optionally ``length_scale`` (a pace other than the voice's own:
    all items of a call share it, their batch key says which); output per item: the audio
    [N] at the voice's rate, the batch's longest (the caller keeps its own item's length,
    `audio_length`)."""

    INPUT, LENGTH, PACE = "input", "input_lengths", "length_scale"

    def __init__(self, model: OrtModel, config: PiperConfig) -> None:
        self.name, self.provider, self.session = model.name, model.provider, model.session
        self.config = config
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = self.session.get_outputs()
        if set(inputs) != {"input", "input_lengths", "scales"} or len(inputs["input"].shape) != 2 \
                or len(outputs) != 1 or len(outputs[0].shape) not in (2, 3, 4):
            from workers.device.binding import describe

            raise ModelInterfaceError(
                f"voice {model.name}: expected Piper's export, input int64 [B, T], input_lengths "
                f"int64 [B], scales float32 [3] -> audio [B, 1, (1,) N]; it has inputs "
                f"{describe(list(inputs.values()))} and outputs {describe(outputs)}")
        self._output = outputs[0].name
        self._scales = np.array(config.scales, np.float32)

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[typing.Any], float]:
        t0 = time.perf_counter()
        scales = self._scales
        if self.PACE in feeds:  # every item of a call has the same (its batch key's)
            scales = scales.copy()
            scales[1] = feeds[self.PACE].flat[0]
        (audio,) = self.session.run([self._output], {
            "input": feeds[self.INPUT].astype(np.int64), "input_lengths": feeds[self.LENGTH].astype(np.int64),
            "scales": scales})
        audio = np.asarray(audio, np.float32)
        return [audio.reshape(audio.shape[0], -1)], time.perf_counter() - t0

    def item(self, ids: list[int], pace: float | None = None) -> dict[str, np.ndarray]:
        """One item's feeds: ``ids`` zero-padded to their bucket, and their count."""
        padded = np.zeros(bucket(len(ids)), np.int64)
        padded[:len(ids)] = ids
        feeds = {self.INPUT: padded, self.LENGTH: np.array(len(ids), np.int64)}
        if pace is not None:
            feeds[self.PACE] = np.array(pace, np.float32)
        return feeds

    def example_item(self, n: int = 32) -> dict[str, np.ndarray]:
        return self.item([self.config.phoneme_ids[BOS][0]] * n)


def audio_length(audio: np.ndarray, rate: int, floor: float = 1e-3) -> int:
    """Where an item's audio ends in a padded batch's output: past its last sample louder
    than ``floor`` (VITS leaves an item silent past its own end), plus 10 ms."""
    loud = np.flatnonzero(np.abs(audio) > floor)
    return 0 if loud.size == 0 else min(audio.size, int(loud[-1]) + 1 + math.ceil(0.01 * rate))
