"""Crop and paste-back of a lip-sync model's face on a real photograph: the mouth region
takes the model's pixels, the box's outline shows no seam, colours stay the base's."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from avatarfarm.preparation.faces import Box, HaarFaceDetector, crop
from workers.media.face_paste import face_pixels, lower_face_mask, paste, seam


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, Box]:
    photo = np.ascontiguousarray(data.astronaut()[:, :, ::-1])  # BGR, as the models take it
    (box,) = HaarFaceDetector().detect(photo[:, :, ::-1])
    return photo, box


def test_the_crop_is_the_box_at_the_models_side(scene: tuple[np.ndarray, Box]) -> None:
    photo, box = scene
    face = crop(photo, box, 96)
    assert face.shape == (96, 96, 3) and face.dtype == np.uint8
    # The masked copy the model also sees is made with its feeds (test_wav2lip's layout test).


def test_a_redrawn_mouth_is_pasted_without_a_seam(scene: tuple[np.ndarray, Box]) -> None:
    photo, box = scene
    face = crop(photo, box, 96)
    # A model's output: the mouth opened (a dark ellipse), colours a little off (+12).
    pred = np.clip(face.astype(np.int16) + 12, 0, 255).astype(np.uint8)
    pred[62:80, 34:62] = 20
    out = paste(photo, box, pred)
    assert out.shape == photo.shape and not np.shares_memory(out, photo)
    # Outside the box nothing changed.
    outside = np.ones(photo.shape[:2], bool)
    outside[box.y: box.y + box.h, box.x: box.x + box.w] = False
    assert np.array_equal(out[outside], photo[outside])
    # The mouth took the model's pixels: much darker than the base there.
    mouth = (slice(box.y + int(box.h * 0.68), box.y + int(box.h * 0.80)),
             slice(box.x + int(box.w * 0.38), box.x + int(box.w * 0.60)))
    assert out[mouth].mean() < photo[mouth].mean() - 40
    # No seam: the step across the box's outline is the base photo's own.
    assert seam(out, box) == pytest.approx(seam(photo, box), abs=0.5)
    # Pasting the crop back as a whole rectangle (no mask, no colour match) would show.
    naive = photo.copy()
    naive[box.y: box.y + box.h, box.x: box.x + box.w] = cv2.resize(pred, (box.w, box.h))
    assert seam(naive, box) > seam(out, box) + 3
    # The colour shift of the prediction does not reach the pasted cheeks.
    cheek = (slice(box.y + int(box.h * 0.55), box.y + int(box.h * 0.62)),
             slice(box.x + int(box.w * 0.22), box.x + int(box.w * 0.30)))
    assert abs(float(out[cheek].mean()) - float(photo[cheek].mean())) < 6


def test_the_mask_is_feathered_and_inside_the_box() -> None:
    m = lower_face_mask(120, 100)[:, :, 0]
    assert m.max() == pytest.approx(1.0) and m.min() >= 0
    assert m[0].max() < 0.01 and m[:, 0].max() < 0.05 and m[:, -1].max() < 0.05
    assert m[:40].max() < 0.2  # the eyes keep the base frame
    row = m[84]
    assert np.all(np.diff(row[:50]) >= -1e-6)  # rises smoothly towards the middle


def test_model_output_becomes_pixels() -> None:
    out = np.stack([np.full((3, 4, 4), 0.5, np.float32), np.full((3, 4, 4), 1.2, np.float32)])
    px = face_pixels(out)
    assert px.shape == (2, 4, 4, 3) and px.dtype == np.uint8
    assert (px[0] == 128).all() and (px[1] == 255).all()
