"""Voices as files, read by both planes: a Piper export (``NAME.onnx`` with its
``NAME.onnx.json``: sample rate, espeak-ng voice, inference scales, phoneme ids) or a TTS
service's voice (``NAME.service.json``: where to ask and how; `workers.media.tts_service`
speaks with it).

A worker finds voices in its model folder's ``voices/`` (installed by its operator) and
in the avatar folder's ``voices/`` (registered by tenants through the AvatarService, with
their licences: `scheduler.api.avatar_service`). The scheduler checks a voice's files
here before it registers them, without running them.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import onnx

PAD, BOS, EOS = "_", "^", "$"
REGISTERED = "voices"  # the avatar folder's sub-folder of registered voices
PIPER_INPUTS = frozenset({"input", "input_lengths", "scales"})


class VoiceError(ValueError):
    """A voice file or config that cannot be used, saying why."""


@dataclass(frozen=True, slots=True)
class PiperConfig:
    """What a Piper voice's JSON config says that synthesis needs."""

    name: str
    sample_rate: int
    espeak_voice: str
    scales: tuple[float, float, float]  # noise scale, length scale, noise width
    phoneme_ids: dict[str, tuple[int, ...]]

    @staticmethod
    def read(path: Path) -> PiperConfig:
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            inference = d.get("inference", {})
            ids = {str(k): tuple(int(i) for i in v) for k, v in d["phoneme_id_map"].items()}
            config = PiperConfig(
                path.name.removesuffix(".onnx.json"), int(d["audio"]["sample_rate"]),
                str(d.get("espeak", {}).get("voice", "en-us")),
                (float(inference.get("noise_scale", 0.667)), float(inference.get("length_scale", 1.0)),
                 float(inference.get("noise_w", 0.8))), ids)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise VoiceError(f"voice config {path}: {type(e).__name__}: {e}; expected Piper's "
                             "(audio.sample_rate, espeak.voice, inference, phoneme_id_map)") from None
        for sym in (PAD, BOS, EOS):
            if sym not in ids:
                raise VoiceError(f"voice config {path}: phoneme_id_map has no {sym!r}")
        if not 8000 <= config.sample_rate <= 48000:
            raise VoiceError(f"voice config {path}: sample rate {config.sample_rate} is not a voice's")
        return config

    def ids(self, phonemes: str) -> list[int]:
        """Piper's ids for one clause's phonemes (characters the map lacks are skipped)."""
        out = list(self.phoneme_ids[BOS])
        for ch in phonemes:
            got = self.phoneme_ids.get(ch)
            if got is not None:
                out += got
                out += self.phoneme_ids[PAD]
        return out + list(self.phoneme_ids[EOS])


OnError = typing.Callable[[Path, "VoiceError"], None]


def find_voices(folder: Path, on_error: OnError | None = None) -> dict[str, tuple[Path, PiperConfig]]:
    """The Piper voices in ``folder`` (``<name>.onnx`` with ``<name>.onnx.json``), by name.
    A config that cannot be used raises VoiceError, or with ``on_error`` is told to it
    and left out."""
    out = {}
    for model in sorted(folder.glob("*.onnx")) if folder.is_dir() else []:
        config = model.with_name(model.name + ".json")
        if config.is_file():
            try:
                out[model.stem] = (model, PiperConfig.read(config))
            except VoiceError as e:
                if on_error is None:
                    raise
                on_error(config, e)
    return out


SERVICE_SUFFIX = ".service.json"


class ServiceConfigError(VoiceError):
    """A service voice's file that cannot be used, saying why."""


@dataclass(frozen=True, slots=True)
class ServiceVoiceConfig:
    url: str
    sample_rate: int = 24000
    text_field: str = "text"
    params: dict[str, typing.Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    connect_timeout_seconds: float = 1.0
    first_audio_timeout_seconds: float = 3.0
    read_timeout_seconds: float = 2.0
    retries: int = 2
    retry_backoff_seconds: float = 0.05
    failures_to_open: int = 3
    open_seconds: float = 5.0

    @staticmethod
    def read(path: Path) -> ServiceVoiceConfig:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ServiceConfigError(f"{path.name}: not a JSON file ({e})") from e
        if not isinstance(data, dict):
            raise ServiceConfigError(f"{path.name}: expected a JSON object")
        known = set(ServiceVoiceConfig.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ServiceConfigError(f"{path.name}: unknown keys {unknown} (known: {sorted(known)})")
        try:
            config = ServiceVoiceConfig(**data)
        except TypeError as e:
            raise ServiceConfigError(f"{path.name}: {e}") from e
        config.check(path.name)
        return config

    def check(self, where: str) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ServiceConfigError(f"{where}: url must be an http:// or https:// address")
        if not isinstance(self.sample_rate, int) or not 8000 <= self.sample_rate <= 192000:
            raise ServiceConfigError(f"{where}: sample_rate must be 8000..192000 Hz")
        if not isinstance(self.params, dict) or not isinstance(self.headers, dict):
            raise ServiceConfigError(f"{where}: params and headers must be JSON objects")
        for name in ("connect_timeout_seconds", "first_audio_timeout_seconds", "read_timeout_seconds",
                     "retry_backoff_seconds", "open_seconds"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ServiceConfigError(f"{where}: {name} must be a number >= 0")
        if not isinstance(self.retries, int) or not 0 <= self.retries <= 10:
            raise ServiceConfigError(f"{where}: retries must be 0..10")
        if not isinstance(self.failures_to_open, int) or self.failures_to_open < 1:
            raise ServiceConfigError(f"{where}: failures_to_open must be >= 1")


def find_service_voices(folder: Path, on_error: OnError | None = None) -> dict[str, ServiceVoiceConfig]:
    """The service voices in ``folder`` (``<name>.service.json``), by name (a config that
    cannot be used: as `find_voices`)."""
    out = {}
    for path in sorted(folder.glob("*" + SERVICE_SUFFIX)) if folder.is_dir() else []:
        try:
            out[path.name[:-len(SERVICE_SUFFIX)]] = ServiceVoiceConfig.read(path)
        except VoiceError as e:
            if on_error is None:
                raise
            on_error(path, e)
    return out


def check_piper_model(path: Path) -> None:
    """Refuses (VoiceError) a model that is not a Piper export: inputs ``input`` int64
    [B, T], ``input_lengths`` int64 [B], ``scales`` float32 [3] and one audio output."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # noqa: BLE001 (onnx raises DecodeError and others for a file that is not a model)
        raise VoiceError(f"voice model {path.name}: not an ONNX model ({type(e).__name__})") from None
    initialised = {i.name for i in graph.initializer}
    inputs = {i.name for i in graph.input if i.name not in initialised}
    if inputs != PIPER_INPUTS or len(graph.output) != 1:
        raise VoiceError(f"voice model {path.name}: expected Piper's export (inputs input, "
                         f"input_lengths, scales; one audio output); it has inputs "
                         f"{sorted(inputs)} and {len(graph.output)} outputs")


# -- registered voices: written by the scheduler into the avatar folder's voices/ --------

STAGED = ".part"  # a file being written: no worker reads it until it is renamed into place


def registered_voices(avatar_dir: Path) -> Path:
    return avatar_dir / REGISTERED


def stage_piper(avatar_dir: Path, voice_id: str, model: bytes, config: bytes) -> list[tuple[Path, Path]]:
    """Writes a Piper voice's files under temporary names and checks them (VoiceError);
    returns (staged, final) pairs in the order `install` must rename them: the model
    first, its config last (a worker takes a voice whose config is in place)."""
    folder = registered_voices(avatar_dir)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(folder / f"{voice_id}.onnx{STAGED}", folder / f"{voice_id}.onnx"),
             (folder / f"{voice_id}.onnx.json{STAGED}", folder / f"{voice_id}.onnx.json")]
    try:
        pairs[0][0].write_bytes(model)
        pairs[1][0].write_bytes(config)
        check_piper_model(pairs[0][0])
        PiperConfig.read(pairs[1][0])
    except BaseException:
        discard(pairs)
        raise
    return pairs


def stage_service(avatar_dir: Path, voice_id: str, config: bytes) -> list[tuple[Path, Path]]:
    """Writes a TTS service voice's config under a temporary name and checks it."""
    folder = registered_voices(avatar_dir)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(folder / f"{voice_id}{SERVICE_SUFFIX}{STAGED}", folder / f"{voice_id}{SERVICE_SUFFIX}")]
    try:
        pairs[0][0].write_bytes(config)
        ServiceVoiceConfig.read(pairs[0][0])
    except BaseException:
        discard(pairs)
        raise
    return pairs


def install(pairs: list[tuple[Path, Path]], avatar_dir: Path, voice_id: str) -> None:
    """Renames staged files into place; a voice of the other kind by the same id goes."""
    folder = registered_voices(avatar_dir)
    finals = {final for _, final in pairs}
    for old in (folder / f"{voice_id}.onnx.json", folder / f"{voice_id}.onnx",
                folder / f"{voice_id}{SERVICE_SUFFIX}"):
        if old not in finals:
            old.unlink(missing_ok=True)
    for staged, final in pairs:
        staged.replace(final)


def discard(pairs: list[tuple[Path, Path]]) -> None:
    for staged, _ in pairs:
        staged.unlink(missing_ok=True)
