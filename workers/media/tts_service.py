"""Voices of a TTS service: text goes out over HTTP, speech streams back as it is made.

A service voice is a file ``voices/<name>.service.json`` in the worker's model folder::

    {"url": "http://tts.internal:9880/tts", "sample_rate": 24000,
     "params": {"voice": "anna"}, "text_field": "text"}

Each sentence is one ``POST`` of a JSON body (``params`` plus the sentence under
``text_field``), so servers that take their options as JSON fields (a voice or speaker
id, a language, a streaming switch) are configured without code. The answer streams
16-bit little-endian mono PCM at ``sample_rate`` (or a WAV stream, whose header says
its own rate) as the service synthesises it; the worker resamples it to the pipeline's
rate.

What the worker does when the service is slow or down:
- a connection that does not open in ``connect_timeout_seconds``, no first audio in
  ``first_audio_timeout_seconds`` or a stall of ``read_timeout_seconds`` between chunks
  fails the attempt, as does an answer of 5xx or 429 (an answer of another 4xx means the
  request is wrong: no retry, it will not get better);
- a failed attempt is retried ``retries`` times, ``retry_backoff_seconds`` doubled each
  time, starting afresh (nothing of a sentence plays before all of it has arrived, so a
  retry never repeats speech);
- failures in a row open a circuit breaker (`workers.media.breaker`): while it is open,
  sentences fail at once with `VoiceUnavailable`, the room holds on its idle loop and
  says why, and one probe is let through after ``open_seconds``.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

import aiohttp
import numpy as np

from avatarfarm.voices import ServiceVoiceConfig
from workers.media.audio import SAMPLE_RATE, resample
from workers.media.breaker import BreakerState, CircuitBreaker
from workers.media.tts import VoiceUnavailable

MAX_SENTENCE_SECONDS = 120.0  # more audio than this for one sentence is a broken service


class _Retryable(Exception):
    """An attempt that failed in a way a later one may not (a timeout, 5xx, a reset)."""


def pcm_from_stream(data: bytes, rate: int) -> tuple[np.ndarray, int]:
    """Samples (float32 -1..1) and their rate from what the service sent: raw 16-bit
    little-endian PCM at ``rate``, or a WAV stream (its header's rate; a streamed WAV's
    sizes are placeholders, so the data runs to the end)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        pos = 12
        while pos + 8 <= len(data):
            chunk, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
            if chunk == b"fmt ":
                fmt, channels, rate = struct.unpack_from("<HHI", data, pos + 8)
                bits = struct.unpack_from("<H", data, pos + 22)[0]
                if fmt != 1 or channels != 1 or bits != 16:
                    raise VoiceUnavailable(f"the service sent WAV that is not 16-bit mono PCM "
                                           f"(format {fmt}, {channels} channels, {bits} bits)")
            elif chunk == b"data":
                data = data[pos + 8:]
                break
            pos += 8 + size + (size & 1)
        else:
            raise VoiceUnavailable("the service sent a WAV header without audio data")
    n = len(data) // 2
    return np.frombuffer(data[:n * 2], "<i2").astype(np.float32) / 32768.0, rate


class ServiceVoice:
    """One voice of a TTS service, as rooms speak with it (`synthesize`)."""

    def __init__(self, name: str, config: ServiceVoiceConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.config, self.clock = name, config, clock
        self.breaker = CircuitBreaker(config.failures_to_open, config.open_seconds)
        self._http: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.requests = 0  # attempts sent to the service
        self.failures = 0  # attempts that failed

    @property
    def state(self) -> BreakerState:
        return self.breaker.state

    async def synthesize(self, text: str) -> tuple[np.ndarray, float]:
        """Speech for one sentence at SAMPLE_RATE, and the seconds it took; raises
        VoiceUnavailable (at once while the breaker is open)."""
        t0 = time.perf_counter()
        last = ""
        for attempt in range(self.config.retries + 1):
            if not self.breaker.allow(self.clock()):
                wait = self.breaker.retry_in(self.clock())
                raise VoiceUnavailable(f"TTS service for voice {self.name!r} is failing "
                                       f"({last or 'circuit open'}); next try in {wait:.1f} s")
            if attempt:
                await asyncio.sleep(self.config.retry_backoff_seconds * 2 ** (attempt - 1))
            self.requests += 1
            try:
                audio, rate = await self._attempt(text)
            except _Retryable as e:
                self.failures += 1
                self.breaker.failed(self.clock())
                last = str(e)
                continue
            except VoiceUnavailable:
                self.failures += 1
                self.breaker.failed(self.clock())
                raise
            self.breaker.succeeded()
            return resample(audio, rate, SAMPLE_RATE), time.perf_counter() - t0
        raise VoiceUnavailable(f"TTS service for voice {self.name!r} failed "
                               f"{self.config.retries + 1} times: {last}")

    async def _attempt(self, text: str) -> tuple[np.ndarray, int]:
        c = self.config
        loop = asyncio.get_running_loop()
        if self._http is None or self._http.closed or self._loop is not loop:
            # One connection pool per event loop (a pool cannot outlive its loop).
            self._http, self._loop = aiohttp.ClientSession(), loop
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=c.connect_timeout_seconds or None,
                                        sock_read=None)
        body = {**c.params, c.text_field: text}
        limit = int(MAX_SENTENCE_SECONDS * c.sample_rate * 2) + 4096
        try:
            async with asyncio.timeout(c.connect_timeout_seconds + c.first_audio_timeout_seconds):
                resp = await self._http.post(c.url, json=body, headers=c.headers, timeout=timeout)
            async with resp:
                if resp.status >= 500 or resp.status == 429:
                    raise _Retryable(f"HTTP {resp.status}")
                if resp.status >= 400:
                    detail = (await resp.text())[:200]
                    raise VoiceUnavailable(f"TTS service for voice {self.name!r} refused the "
                                           f"request: HTTP {resp.status} {detail}")
                parts: list[bytes] = []
                size, wait = 0, c.first_audio_timeout_seconds
                while True:
                    async with asyncio.timeout(wait):
                        chunk = await resp.content.readany()
                    if not chunk:
                        break
                    parts.append(chunk)
                    size += len(chunk)
                    wait = c.read_timeout_seconds
                    if size > limit:
                        raise VoiceUnavailable(f"TTS service for voice {self.name!r} sent more "
                                               f"than {MAX_SENTENCE_SECONDS:.0f} s for one sentence")
        except TimeoutError as e:
            raise _Retryable("no audio in time") from e
        except aiohttp.ClientError as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from e
        # An answer with no audio is taken as silence (a sentence of punctuation only):
        # trying it again would hold the room for a sentence nothing can speak.
        return pcm_from_stream(b"".join(parts), c.sample_rate)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
