"""The face template the reference renderer is built around.

Coordinates are fractions of the square portrait (u right, v down). The
default avatar is drawn on this template; a user's avatar image for the
reference renderer must be a portrait aligned the same way (face centred,
eyes at ~40% of the height, mouth at ~58%), as face-alignment crops are.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FaceTemplate:
    head_center: tuple[float, float] = (0.5, 0.44)
    head_radii: tuple[float, float] = (0.20, 0.27)
    eye_left: tuple[float, float] = (0.42, 0.40)
    eye_right: tuple[float, float] = (0.58, 0.40)
    eye_radii: tuple[float, float] = (0.036, 0.020)
    brow_v: float = 0.355
    nose_tip: tuple[float, float] = (0.5, 0.50)
    mouth_center: tuple[float, float] = (0.5, 0.585)
    mouth_half_width: float = 0.06
    chin_v: float = 0.71


TEMPLATE = FaceTemplate()
