"""Putting a lip-sync model's face back into the base frame without a seam.

A Wav2Lip-family model sees an S x S crop of the face box (S = 96, 256, 384;
`avatarfarm.preparation.faces.crop`, masked by `workers.device.binding.make_feeds`) and
returns the same crop with the mouth redrawn. The crop is resized into the box and
blended with a feathered lower-face mask (the frame's own jaw mask where the bundle
has one, as MuseTalk's have; else a fixed shape): inside the mouth region the model's pixels,
towards the mask's edges more and more of the base frame's, outside it the base frame
untouched, so neither the box's rectangle nor a change of colour shows. The model's
colours can drift from the base frame's (they are trained on other faces): the
prediction is shifted to the base crop's colour where the two blend first.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from avatarfarm.preparation.faces import Box


def face_pixels(faces: np.ndarray) -> np.ndarray:
    """A model's output [B, 3, S, S] in 0..1 as uint8 [B, S, S, 3] pixels for `paste`."""
    return (np.clip(faces, 0.0, 1.0).transpose(0, 2, 3, 1) * 255.0 + 0.5).astype(np.uint8)


@functools.lru_cache(maxsize=256)
def lower_face_mask(height: int, width: int, feather: float = 0.06) -> np.ndarray:
    """float32 [height, width, 1]: 1 over the lower-middle of the box (mouth and jaw),
    falling smoothly (Gaussian, sigma a share of the box) to exactly 0 at the box's
    edges, so the outline of the box never shows."""
    mask = np.zeros((height, width), np.float32)
    y0, y1 = int(height * 0.50), int(height * 0.84)
    x0, x1 = int(width * 0.20), int(width * 0.80)
    mask[y0:y1, x0:x1] = 1.0
    sigma = max(1.0, feather * min(height, width))
    blurred = cv2.GaussianBlur(mask, (0, 0), sigma).astype(np.float32)
    blurred /= max(float(blurred.max()), 1e-6)
    # What the blur left at the edges goes to 0 over a few pixels.
    ramp = max(2.0, 0.05 * min(height, width))
    ys = np.minimum(np.arange(height), np.arange(height)[::-1])[:, None]
    xs = np.minimum(np.arange(width), np.arange(width)[::-1])[None, :]
    edged = (blurred * np.clip(np.minimum(ys, xs) / ramp, 0.0, 1.0)).astype(np.float32)
    return edged[:, :, None]


def paste(frame: np.ndarray, box: Box, face: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """`frame` with the model's `face` (uint8 S x S, the frame's channel order) blended
    into `box` through ``mask`` (the base frame's own jaw mask, uint8 0..255 at any
    side, `avatarfarm.preparation.masks`) or, without one, the fixed lower-face mask;
    a new array, the base frame untouched."""
    out = frame.copy()
    region = out[box.y: box.y + box.h, box.x: box.x + box.w]
    pred = cv2.resize(face, (box.w, box.h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    base = region.astype(np.float32)
    if mask is None:
        mask = lower_face_mask(box.h, box.w)
    else:
        mask = (cv2.resize(np.asarray(mask), (box.w, box.h), interpolation=cv2.INTER_LINEAR)
                .astype(np.float32) * np.float32(1 / 255))[:, :, None]
    # Colour kept to the base frame's, matched where the two blend (the feather's band):
    # the median difference there, so a redrawn mouth reaching into it does not count.
    band = (mask[:, :, 0] > 0.2) & (mask[:, :, 0] < 0.8)
    shift = np.median(base[band] - pred[band], axis=0) if band.any() else np.zeros(3)
    pred += shift
    region[:] = np.clip(base * (1.0 - mask) + pred * mask + 0.5, 0, 255).astype(np.uint8)
    return out


def seam(frame: np.ndarray, box: Box) -> float:
    """Mean absolute step across the box's outline (1 px out vs 1 px in), over its four
    edges: a pasted rectangle shows as a step no base frame has."""
    f = frame.astype(np.float32)
    x0, y0, x1, y1 = box.x, box.y, box.x + box.w - 1, box.y + box.h - 1
    h, w = f.shape[:2]
    steps = []
    if y0 > 0:
        steps.append(np.abs(f[y0, x0:x1 + 1] - f[y0 - 1, x0:x1 + 1]).mean())
    if y1 < h - 1:
        steps.append(np.abs(f[y1, x0:x1 + 1] - f[y1 + 1, x0:x1 + 1]).mean())
    if x0 > 0:
        steps.append(np.abs(f[y0:y1 + 1, x0] - f[y0:y1 + 1, x0 - 1]).mean())
    if x1 < w - 1:
        steps.append(np.abs(f[y0:y1 + 1, x1] - f[y0:y1 + 1, x1 + 1]).mean())
    return float(np.mean(steps)) if steps else 0.0
