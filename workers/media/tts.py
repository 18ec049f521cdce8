"""Text to speech with espeak-ng, loaded from the espeakng-loader wheel.

espeak-ng keeps global state, so one process has one engine: every call goes
through a lock. Synthesis is far faster than real time (a sentence in a few
milliseconds), so a worker runs it inline in its inference executor. espeak-ng also
turns text into phonemes (IPA), which is what neural voices of the VITS family (Piper's)
read: `EspeakTTS.phonemes`.
"""

from __future__ import annotations

import ctypes
import threading
from typing import ClassVar

import numpy as np

from workers.media.audio import SAMPLE_RATE, resample

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE_PARAM = 1
_PHONEMES_IPA = 0x02  # espeak_TextToPhonemes: IPA, as UTF-8

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class TTSError(RuntimeError):
    pass


class VoiceUnavailable(TTSError):
    """A voice that cannot speak now (its TTS service failing): the room holds on its idle
    loop, says why, and tries again later; nothing of the script is lost."""


class EspeakTTS:
    """Synthesises text to float32 mono audio at the pipeline's SAMPLE_RATE."""

    # espeak-ng is a per-process singleton, so its handle and buffers are class state.
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _lib: ClassVar[ctypes.CDLL | None] = None
    _native_rate: ClassVar[int] = 0
    _chunks: ClassVar[list[np.ndarray]] = []
    _callback_ref: ClassVar[object] = None

    def __init__(self, voice: str = "en", words_per_minute: int = 165) -> None:
        self.voice = voice
        self.words_per_minute = words_per_minute
        with self._lock:
            if EspeakTTS._lib is None:
                EspeakTTS._load()

    @classmethod
    def _load(cls) -> None:
        try:
            import espeakng_loader
        except ImportError as e:  # pragma: no cover - a packaging error
            raise TTSError("espeakng-loader is not installed") from e
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
        )
        if rate <= 0:
            raise TTSError(f"espeak-ng failed to initialise ({rate})")

        def on_audio(wav: ctypes.Array[ctypes.c_short], n: int, _events: int) -> int:
            if n > 0:
                cls._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        cls._callback_ref = _CALLBACK(on_audio)  # kept alive for the C side
        lib.espeak_SetSynthCallback(cls._callback_ref)
        cls._lib = lib
        cls._native_rate = rate

    def has_voice(self, voice: str) -> bool:
        """Whether espeak-ng knows ``voice`` (a name such as en, en-us, de)."""
        with self._lock:
            lib = EspeakTTS._lib
            assert lib is not None
            known = lib.espeak_SetVoiceByName(voice.encode()) == 0
            lib.espeak_SetVoiceByName(self.voice.encode())
        return bool(known)

    def phonemes(self, text: str, voice: str | None = None) -> list[str]:
        """``text``'s phonemes in IPA, one string per clause (espeak-ng's, as Piper voices
        are trained on), in ``voice`` (an espeak-ng voice name; default this engine's)."""
        data = ctypes.create_string_buffer(text.strip().encode("utf-8"))
        if not data.value:
            return []
        out: list[str] = []
        with self._lock:
            lib = EspeakTTS._lib
            assert lib is not None
            name = voice or self.voice
            if lib.espeak_SetVoiceByName(name.encode()) != 0:
                raise TTSError(f"espeak-ng has no voice {name!r}")
            ptr = ctypes.c_void_p(ctypes.addressof(data))
            while ptr.value:  # espeak-ng moves the pointer past each clause it reads
                clause = lib.espeak_TextToPhonemes(ctypes.byref(ptr), _CHARS_UTF8, _PHONEMES_IPA)
                if clause:
                    out.append(clause.decode("utf-8", errors="replace").strip())
        return [c for c in out if c]

    def synthesize(self, text: str) -> np.ndarray:
        """Speech for ``text`` as float32 samples at SAMPLE_RATE (empty for empty text)."""
        data = text.strip().encode("utf-8")
        if not data:
            return np.zeros(0, dtype=np.float32)
        with self._lock:
            lib = EspeakTTS._lib
            assert lib is not None
            if lib.espeak_SetVoiceByName(self.voice.encode()) != 0:
                raise TTSError(f"espeak-ng has no voice {self.voice!r}")
            lib.espeak_SetParameter(_RATE_PARAM, self.words_per_minute, 0)
            EspeakTTS._chunks = []
            err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            lib.espeak_Synchronize()
            chunks, EspeakTTS._chunks = EspeakTTS._chunks, []
        if err != 0:
            raise TTSError(f"espeak-ng synthesis failed ({err})")
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        pcm = np.concatenate(chunks).astype(np.float32) / 32768.0
        return resample(pcm, EspeakTTS._native_rate, SAMPLE_RATE)
