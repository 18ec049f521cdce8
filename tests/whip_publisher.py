"""A live driver for tests, publishing over WHIP (WebRTC) as a browser or OBS's WHIP output
would: aiortc's own WebRTC stack sends the test driver's camera (`tests.driver_publisher`:
the real photograph, its mouth opening, a webcam's noise) at 25 fps and their microphone
(a tone while the mouth is open) at 48 kHz, paced in real time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from fractions import Fraction

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

from tests.driver_publisher import driver_frame, mouth_open

FPS = 25
RATE = 48_000
CHUNK = RATE // 50  # 20 ms of sound a packet, as WebRTC sends it


class _Clock:
    """The publisher's start, shared by its tracks (their media times agree)."""

    def __init__(self) -> None:
        self.start: float | None = None

    async def at(self, seconds: float) -> None:
        if self.start is None:
            self.start = time.monotonic()
        await asyncio.sleep(max(0.0, self.start + seconds - time.monotonic()))


class Camera(MediaStreamTrack):
    kind = "video"

    def __init__(self, clock: _Clock, pattern: str) -> None:
        super().__init__()
        self.clock, self.pattern, self.i = clock, pattern, 0

    async def recv(self) -> av.VideoFrame:
        await self.clock.at(self.i / FPS)
        frame = av.VideoFrame.from_ndarray(driver_frame(self.i, self.pattern), format="rgb24")
        frame.pts, frame.time_base = self.i * (90_000 // FPS), Fraction(1, 90_000)
        self.i += 1
        return frame


class Microphone(MediaStreamTrack):
    kind = "audio"

    def __init__(self, clock: _Clock, pattern: str) -> None:
        super().__init__()
        self.clock, self.pattern, self.n = clock, pattern, 0

    async def recv(self) -> av.AudioFrame:
        await self.clock.at(self.n / RATE)
        t = (np.arange(CHUNK) + self.n) / RATE
        on = mouth_open(int(self.n / RATE * FPS), self.pattern)
        tone = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t) * on).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(tone[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self.n, Fraction(1, RATE)
        self.n += CHUNK
        return frame


async def publish(url: str, seconds: float, pattern: str = "live", *, token: str = "",
                  audio: bool = True, video: bool = True, content_type: str = "application/sdp",
                  blendshapes: Callable[[int], dict[str, float]] | None = None) -> tuple[int, str]:
    """Publishes for ``seconds`` (then DELETEs its session); returns the POST's status and,
    when refused, its body. With ``blendshapes`` (frame index -> ARKit names and values),
    the publisher's own face tracker sends them over a data channel, frame by frame."""
    clock = _Clock()
    pc = RTCPeerConnection()
    if video:
        pc.addTrack(Camera(clock, pattern))
    if audio:
        pc.addTrack(Microphone(clock, pattern))
    sending: list[asyncio.Task[None]] = []
    if blendshapes is not None:
        channel = pc.createDataChannel("face-motion")
        shapes = blendshapes

        async def track() -> None:
            for i in range(10**6):
                await clock.at(i / FPS)
                channel.send(json.dumps({"blendshapes": shapes(i), "head": {"yaw": 0.0}}))

        channel.on("open", lambda: sending.append(asyncio.ensure_future(track())))
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=pc.localDescription.sdp, headers=headers) as r:
                if r.status != 201:
                    return r.status, await r.text()
                answer, location = await r.text(), r.headers["Location"]
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            await asyncio.sleep(seconds)  # the driver's performance, this long
            for task in sending:
                task.cancel()
            base = url.split("/whip")[0]
            async with http.delete(base + location):
                pass
            return 201, ""
    finally:
        await pc.close()
