"""Reading rendered streams back for assertions: container facts and how much
the avatar's mouth moves over time."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from avatarfarm.preparation.sample import encode_clip, head_motion, shifted  # noqa: F401 (for tests)
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


def video_avatar_mouths(path: Path | str, bundle: typing.Any, canvas: tuple[int, int] = (320, 256),
                        rows: tuple[float, float] = (0.66, 0.78),
                        cols: tuple[float, float] = (0.42, 0.58)) -> tuple[list[np.ndarray], np.ndarray]:
    """A video avatar room's decoded frames and, per frame, how dark its mouth region is
    (255 - mean pixel; higher: more open): the region ``rows`` x ``cols`` of the base
    frame's face box, where the clip is fitted (scaled, centred) into ``canvas``."""
    from workers.rooms.wav2lip_frames import loop_index

    with av.open(str(path)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    m = bundle.manifest
    scale = min(canvas[0] / m.width, canvas[1] / m.height)
    left, top = (canvas[0] - round(m.width * scale)) // 2, (canvas[1] - round(m.height * scale)) // 2
    out = []
    for i, frame in enumerate(decoded):
        b = bundle.boxes[loop_index(i, m.frames)]
        y0, y1 = top + int((b.y + b.h * rows[0]) * scale), top + int((b.y + b.h * rows[1]) * scale)
        x0, x1 = left + int((b.x + b.w * cols[0]) * scale), left + int((b.x + b.w * cols[1]) * scale)
        out.append(255.0 - float(frame[y0:y1, x0:x1].mean()))
    return decoded, np.array(out)


def speaking_and_quiet(path: Path | str, bundle: typing.Any, redrawn: int) -> tuple[float, float]:
    """A video avatar room that spoke and then paused (`redrawn`: its frames the face model
    redrew): the median mouth opening of the first half of its speech, and of its last
    20 frames (the pause)."""
    _, opened = video_avatar_mouths(path, bundle)
    return float(np.median(opened[:redrawn // 2])), float(np.median(opened[-20:]))


def video_end(path: Path) -> float:
    """Where the video ends: its last packet's time plus its duration (the stream may
    hold frames of different lengths, so frames/fps would not say)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        ends = [(p.pts + p.duration) * s.time_base for p in c.demux(s) if p.pts is not None]
    return float(max(ends))
