"""The default avatar: a stylised presenter portrait drawn from the face template.

Drawn with numpy (anti-aliased signed-distance shapes) so the project ships no
binary assets and the image is identical on every machine.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from workers.models.template import TEMPLATE, FaceTemplate


def _ellipse(u: np.ndarray, v: np.ndarray, c: tuple[float, float], r: tuple[float, float],
             px: float) -> np.ndarray:
    d = np.sqrt(((u - c[0]) / r[0]) ** 2 + ((v - c[1]) / r[1]) ** 2)
    edge = px / min(r)
    return np.clip((1.0 - d) / edge + 0.5, 0.0, 1.0)


def _paint(img: np.ndarray, mask: np.ndarray, color: tuple[float, float, float]) -> None:
    img[:] = img * (1 - mask[..., None]) + np.array(color, np.float32) * mask[..., None]


def draw_default_avatar(side: int = 1024, t: FaceTemplate = TEMPLATE) -> np.ndarray:
    """Returns an RGB uint8 portrait of shape (side, side, 3)."""
    v, u = np.meshgrid((np.arange(side) + 0.5) / side, (np.arange(side) + 0.5) / side,
                       indexing="ij")
    px = 1.0 / side
    img = np.empty((side, side, 3), np.float32)
    # Studio backdrop: a soft vertical gradient.
    img[:] = (np.array([0.16, 0.22, 0.34]) * (1 - v[..., None]) +
              np.array([0.30, 0.36, 0.48]) * v[..., None])
    skin = (0.91, 0.74, 0.62)
    hc, hr = t.head_center, t.head_radii
    _paint(img, _ellipse(u, v, (0.5, 1.02), (0.36, 0.24), px), (0.18, 0.28, 0.55))  # jacket
    _paint(img, _ellipse(u, v, (0.5, 0.86), (0.05, 0.06), px), (0.95, 0.95, 0.97))  # collar
    neck = (np.abs(u - 0.5) < 0.075) & (v > t.chin_v - 0.05) & (v < 0.86)
    _paint(img, neck.astype(np.float32), (0.84, 0.66, 0.55))
    _paint(img, _ellipse(u, v, (hc[0], hc[1] - 0.05), (hr[0] * 1.08, hr[1] * 0.95), px),
           (0.20, 0.13, 0.10))  # hair behind
    _paint(img, _ellipse(u, v, hc, hr, px), skin)
    for ex, ey in (t.eye_left, t.eye_right):
        _paint(img, _ellipse(u, v, (ex, ey), t.eye_radii, px), (0.98, 0.98, 0.98))
        _paint(img, _ellipse(u, v, (ex, ey), (t.eye_radii[1], t.eye_radii[1]), px), (0.25, 0.17, 0.10))
        _paint(img, _ellipse(u, v, (ex, ey), (t.eye_radii[1] * 0.45,) * 2, px), (0.02, 0.02, 0.02))
        _paint(img, _ellipse(u, v, (ex, t.brow_v), (0.045, 0.008), px), (0.22, 0.14, 0.10))
    _paint(img, _ellipse(u, v, (hc[0], hc[1] - hr[1] * 0.78), (hr[0] * 1.02, hr[1] * 0.30), px),
           (0.20, 0.13, 0.10))  # fringe
    _paint(img, _ellipse(u, v, t.nose_tip, (0.022, 0.012), px), (0.80, 0.58, 0.48))
    mx, my = t.mouth_center
    _paint(img, _ellipse(u, v, (mx, my - 0.006), (t.mouth_half_width, 0.011), px), (0.72, 0.30, 0.32))
    _paint(img, _ellipse(u, v, (mx, my + 0.008), (t.mouth_half_width * 0.9, 0.013), px), (0.78, 0.36, 0.38))
    _paint(img, _ellipse(u, v, (mx, my), (t.mouth_half_width, 0.0025), px), (0.35, 0.10, 0.12))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("png")
        stream.width, stream.height = rgb.shape[1], rgb.shape[0]
        stream.pix_fmt = "rgb24"
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def scale_image(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scales an RGB uint8 image (bilinear, in swscale: cheap enough per frame)."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    return frame.reformat(width=width, height=height, interpolation="BILINEAR").to_ndarray()


def read_image(path: Path, side: int) -> np.ndarray:
    """Decodes an image (PNG, JPEG, ...) and scales it to a side x side RGB uint8 array."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.reformat(width=side, height=side, format="rgb24").to_ndarray()
