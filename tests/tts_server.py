"""A small streaming TTS service for tests, speaking with espeak-ng: a JSON ``POST`` with
the text in, 16-bit PCM at 24 kHz out in 20 ms chunks as a streaming service sends it
(raw, or after a streamed WAV header). It can be told to fail: answer 503, accept and
never answer, or cut the stream after its first chunk."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web

from workers.media.audio import SAMPLE_RATE, resample
from workers.media.tts import EspeakTTS

RATE = 24000


@dataclass
class TtsServer:
    wav: bool = False  # a streamed WAV header first (sizes unknown: 0xFFFFFFFF)
    fail: int = 0  # answer 503 to this many requests
    down: bool = False  # answer 503 to every request
    hang: bool = False  # accept requests and never answer
    cut: bool = False  # send one chunk, then drop the connection
    silent: bool = False  # answer 200 with no audio (a sentence with nothing to say)
    requests: list[dict[str, Any]] = field(default_factory=list)
    sent: list[np.ndarray] = field(default_factory=list)  # the speech of each answer, int16
    port: int = 0
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/tts"

    @staticmethod
    def speech(text: str) -> np.ndarray:
        """What the service says for ``text``, at RATE, as int16."""
        audio = resample(EspeakTTS("en-us").synthesize(text), SAMPLE_RATE, RATE)
        return (np.clip(audio, -1, 1) * 32767).astype("<i2")

    async def _tts(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.hang:
            await self._release.wait()
        if self.down or self.fail > 0:
            self.fail -= 1
            return web.Response(status=503, text="overloaded")
        if not isinstance(body.get("text"), str):
            return web.Response(status=400, text="text is required")
        speech = self.speech(body["text"]) if not self.silent else np.zeros(0, "<i2")
        self.sent.append(speech)
        pcm = speech.tobytes()
        resp = web.StreamResponse(headers={"Content-Type": "audio/L16; rate=24000"})
        await resp.prepare(request)
        if self.wav:
            await resp.write(b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " +
                             struct.pack("<IHHIIHH", 16, 1, 1, RATE, RATE * 2, 2, 16) +
                             b"data" + struct.pack("<I", 0xFFFFFFFF))
        step = RATE * 2 // 50
        for i in range(0, len(pcm), step):
            await resp.write(pcm[i:i + step])
            if self.cut:
                assert request.transport is not None
                request.transport.close()
                return resp
        await resp.write_eof()
        return resp

    async def start(self) -> TtsServer:
        app = web.Application()
        app.router.add_post("/tts", self._tts)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
