"""A sample base video of a real person, for the demo and the tests: scikit-image's
``astronaut`` (a public-domain NASA portrait) with a small head sway and blinks, as a
presenter's idle clip would have. Needs scikit-image (in the dev environment)."""

from __future__ import annotations

import io
import typing

import av
import numpy as np


def shifted(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The photo moved by (dx, dy), the uncovered edge filled from the border."""
    h, w = img.shape[:2]
    pad = np.pad(img, ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    return pad[abs(dy) - dy: abs(dy) - dy + h, abs(dx) - dx: abs(dx) - dx + w]


def head_motion(photo: np.ndarray, n: int = 40) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """n frames of the astronaut photo: the head sways a few pixels and blinks every 12
    frames; with each frame's (dx, dy)."""
    frames, moves = [], []
    for i in range(n):
        dx, dy = round(6 * np.sin(i / 5)), round(3 * np.sin(i / 7))
        f = shifted(photo, dx, dy).copy()
        if i % 12 == 11:  # eyelids: darken a band across the eyes for one frame
            f[118 + dy: 126 + dy, 190 + dx: 260 + dx] //= 3
        frames.append(f)
        moves.append((dx, dy))
    return frames, moves


def encode_clip(frames: list[np.ndarray], fps: int = 25, codec: str = "libx264",
                container: str = "mp4") -> bytes:
    """RGB frames as a video file's bytes (H.264 in MP4 by default)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = typing.cast(av.VideoStream, out.add_stream(codec, rate=fps))
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def astronaut_clip(seconds: float = 8.0, fps: int = 25) -> bytes:
    """The sample base video: the astronaut (512x512) as an MP4 of ``seconds``."""
    from skimage import data

    return encode_clip(head_motion(data.astronaut(), round(seconds * fps))[0], fps)
