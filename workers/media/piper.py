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


def voice_key(voice: str, bucket: int) -> BatchKey:
    """The batch key of a voice's items padded to ``bucket`` ids."""
    return BatchKey(f"voice-{voice}", bucket)


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
    (its own count); output per item: the audio [N] at the voice's rate, the batch's
    longest (the caller keeps its own item's length, `audio_length`)."""

    INPUT, LENGTH = "input", "input_lengths"

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
        (audio,) = self.session.run([self._output], {
            "input": feeds[self.INPUT].astype(np.int64), "input_lengths": feeds[self.LENGTH].astype(np.int64),
            "scales": self._scales})
        audio = np.asarray(audio, np.float32)
        return [audio.reshape(audio.shape[0], -1)], time.perf_counter() - t0

    def item(self, ids: list[int]) -> dict[str, np.ndarray]:
        """One item's feeds: ``ids`` zero-padded to their bucket, and their count."""
        padded = np.zeros(bucket(len(ids)), np.int64)
        padded[:len(ids)] = ids
        return {self.INPUT: padded, self.LENGTH: np.array(len(ids), np.int64)}

    def example_item(self, n: int = 32) -> dict[str, np.ndarray]:
        return self.item([self.config.phoneme_ids[BOS][0]] * n)


def audio_length(audio: np.ndarray, rate: int, floor: float = 1e-3) -> int:
    """Where an item's audio ends in a padded batch's output: past its last sample louder
    than ``floor`` (VITS leaves an item silent past its own end), plus 10 ms."""
    loud = np.flatnonzero(np.abs(audio) > floor)
    return 0 if loud.size == 0 else min(audio.size, int(loud[-1]) + 1 + math.ceil(0.01 * rate))
