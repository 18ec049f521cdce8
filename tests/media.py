"""Reading rendered streams back for assertions: container facts and how much
the avatar's mouth moves over time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from workers.models.template import TEMPLATE


@dataclass(frozen=True)
class StreamFacts:
    video_codec: str
    width: int
    height: int
    fps: float
    frames: int
    audio_codec: str
    audio_rate: int
    duration: float
    audio_rms: float


def probe(path: Path | str) -> StreamFacts:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio[0]
        video = (v.codec_context.name, v.codec_context.width, v.codec_context.height,
                 float(v.base_rate or v.guessed_rate or v.average_rate or 0))
        audio = (a.codec_context.name, a.codec_context.sample_rate)
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        samples = np.concatenate([f.to_ndarray().ravel() for f in c.decode(audio=0)])
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if samples.size else 0.0
    return StreamFacts(video[0], video[1], video[2], video[3], frames, audio[0], audio[1],
                       frames / video[3] if video[3] else 0.0, rms)


def _mouth_regions(path: Path | str, top: float, bottom: float, half_width: float) -> np.ndarray:
    """[frames, h, w, 3] crops around the template's mouth, in fractions of the portrait side
    (the portrait is the centred square of the frame)."""
    mx, my = TEMPLATE.mouth_center
    crops = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            img = f.to_ndarray(format="rgb24").astype(np.float32)
            h, w = img.shape[:2]
            side = min(h, w)
            y0, x0 = (h - side) // 2, (w - side) // 2
            crops.append(img[y0 + int((my + top) * side):y0 + int((my + bottom) * side),
                             x0 + int((mx - half_width) * side):x0 + int((mx + half_width) * side)])
    return np.stack(crops)


def mouth_motion(path: Path | str) -> np.ndarray:
    """Per frame, the mean absolute change of the mouth region from the previous frame."""
    stack = _mouth_regions(path, -0.04, 0.08, 0.08)
    return np.concatenate([[0.0], np.abs(np.diff(stack, axis=0)).mean(axis=(1, 2, 3))])


def mouth_openness(path: Path | str) -> np.ndarray:
    """Per frame, how dark the mouth cavity is (higher = more open)."""
    return 255.0 - _mouth_regions(path, 0.01, 0.04, 0.03).mean(axis=(1, 2, 3))


# -- base videos of a real person, made from scikit-image's astronaut photograph ---------

def shifted(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The photo moved by (dx, dy), the uncovered edge filled from the border."""
    h, w = img.shape[:2]
    pad = np.pad(img, ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    return pad[abs(dy) - dy: abs(dy) - dy + h, abs(dx) - dx: abs(dx) - dx + w]


def head_motion(photo: np.ndarray, n: int = 40) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """A base video: the head sways a few pixels and blinks every 12 frames."""
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
    import io

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()
