"""Per-frame jaw masks: the face's skin below the nose, feathered, zero at the crop's
edges; background beside the jaw left out; the fixed shape where no skin is found."""

from __future__ import annotations

import numpy as np

from avatarfarm.preparation.masks import UPPER, jaw_mask

SIDE = 128
SKIN = (120, 150, 200)  # BGR: Cr 155, Cb 105
BACKDROP = (200, 80, 40)  # BGR blue: Cr 98, not skin


def test_the_mask_is_the_skin_below_the_nose_and_leaves_the_backdrop_beside_the_jaw() -> None:
    crop = np.empty((SIDE, SIDE, 3), np.uint8)
    crop[:] = SKIN
    crop[SIDE // 2:, :SIDE // 4] = BACKDROP  # the background shows left of the jaw
    crop[int(SIDE * 0.7):int(SIDE * 0.76), 48:80] = (60, 40, 140)  # the lips
    m = jaw_mask(crop).astype(np.float32) / 255
    assert m.shape == (SIDE, SIDE)
    assert m[int(SIDE * 0.73), 64] > 0.95  # the mouth, lips filled in
    assert m[int(SIDE * 0.8), SIDE // 2:int(SIDE * 0.85)].min() > 0.6  # the jaw and cheek
    assert m[int(SIDE * 0.8), 4:SIDE // 4 - 10].max() < 0.05  # the backdrop beside it
    assert m[:int(SIDE * UPPER) - 12].max() < 0.05  # eyes and nose stay the base frame's
    assert m[0].max() == m[-1].max() == m[:, 0].max() == m[:, -1].max() == 0  # no outline


def test_without_skin_the_fixed_lower_face_shape_stands_in() -> None:
    crop = np.empty((SIDE, SIDE, 3), np.uint8)
    crop[:] = BACKDROP
    m = jaw_mask(crop).astype(np.float32) / 255
    assert m[int(SIDE * 0.72), SIDE // 2] > 0.95
    assert m[int(SIDE * 0.72), 6] < 0.2 and m[:int(SIDE * UPPER) - 12].max() < 0.05
