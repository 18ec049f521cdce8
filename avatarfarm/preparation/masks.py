"""Per-frame jaw masks: where a redrawn lower face is blended into each base frame.

MuseTalk pastes its decoder's face back through a mask of the jaw made per base frame
at preparation (its own from a face-parsing model). Here the mask is the face's skin
in the lower part of the crop: skin by colour (the YCrCb range that holds skin of
every tone under normal light, lips and teeth filled in by closing), the component
that holds the mouth, below the line under the nose, then feathered and taken to
zero at the crop's edges so no outline shows. It follows the person's jaw, cheeks and
chin frame by frame, leaves background, hair and collar alone, and where the colour
test finds too little skin (odd light) the fixed lower-face shape stands in.
"""

from __future__ import annotations

import cv2
import numpy as np

# Skin in YCrCb (Cr, Cb); Y is left free so shadows and highlights stay in.
CR = (133, 173)
CB = (77, 127)
UPPER = 0.52  # the mask starts this far down the crop: below the nose
MOUTH = (0.72, 0.5)  # the mouth's usual place in a face crop (row, column shares)
MIN_SKIN = 0.15  # of the lower crop's area: less, and the colour test is not trusted


def fallback(side: int) -> np.ndarray:
    """float32 [side, side]: the fixed lower-face shape (mouth and jaw, centred)."""
    mask = np.zeros((side, side), np.float32)
    mask[int(side * UPPER):int(side * 0.9), int(side * 0.2):int(side * 0.8)] = 1.0
    return mask


def jaw_mask(crop: np.ndarray) -> np.ndarray:
    """uint8 [S, S] (0..255) jaw mask of one BGR face crop [S, S, 3]."""
    side = crop.shape[0]
    ycc = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_BGR2YCrCb)
    skin = cv2.inRange(ycc, (0, CR[0], CB[0]), (255, CR[1], CB[1]))
    k = max(3, side // 24) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    skin = cv2.morphologyEx(skin, cv2.MORPH_CLOSE, kernel)  # lips, teeth, nostrils
    skin = cv2.morphologyEx(skin, cv2.MORPH_OPEN, kernel)  # specks of skin-coloured background
    top = int(side * UPPER)
    skin[:top] = 0
    n, labels = cv2.connectedComponents(skin, connectivity=8)
    mask = np.zeros((side, side), np.float32)
    if n > 1:
        # The component nearest the mouth's usual place (the face, not a hand or a wall).
        my, mx = int(side * MOUTH[0]), int(side * MOUTH[1])
        best = labels[my, mx]
        if best == 0:
            ys, xs = np.nonzero(labels)
            nearest = np.argmin((ys - my) ** 2 + (xs - mx) ** 2)
            best = labels[ys[nearest], xs[nearest]]
        mask[labels == best] = 1.0
        # Holes inside the face (an open mouth's dark inside) belong to it.
        filled = mask.astype(np.uint8)
        contours, _ = cv2.findContours(filled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
        mask = filled.astype(np.float32)
    if mask[top:].mean() < MIN_SKIN:
        mask = fallback(side)
    sigma = max(1.0, 0.04 * side)
    mask = np.asarray(cv2.GaussianBlur(mask, (0, 0), sigma), np.float32)
    mask /= max(float(mask.max()), 1e-6)
    ramp = max(2.0, 0.05 * side)
    edge = np.minimum(np.arange(side), np.arange(side)[::-1])
    mask *= np.clip(np.minimum(edge[:, None], edge[None, :]) / ramp, 0.0, 1.0)
    return (mask * 255.0 + 0.5).astype(np.uint8)


def jaw_masks(crops: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S] jaw masks of BGR face crops [N, S, S, 3]."""
    return np.stack([jaw_mask(c) for c in crops])
