"""What an ingest hands a camera room in the tests: the driver's frames, sound and end."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from workers.ingest.feed import DriverCallbacks, DriverFrame
from workers.ingest.rtmp import Publisher

KEY = "k3y-0f-th3-r00m-c4m3r4"


@dataclass
class Received:
    frames: list[DriverFrame] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    driving: asyncio.Event = field(default_factory=asyncio.Event)  # a first frame came
    reasons: list[str] = field(default_factory=list)
    publishers: list[Publisher] = field(default_factory=list)

    def feed(self, publisher: Publisher) -> DriverCallbacks:
        self.publishers.append(publisher)

        def frame(f: DriverFrame) -> None:
            self.frames.append(f)
            self.driving.set()

        def end(reason: str) -> None:
            self.reasons.append(reason)
            self.ended.set()
        return DriverCallbacks(frame, lambda t, samples: self.audio.append(samples), end)
