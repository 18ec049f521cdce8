"""The visible "AI-generated" label burned into a room's frames.

Platforms require AI-generated content to be labelled, and labels added by a
player or an overlay are easy to strip: burned into the pixels before encoding,
the label is part of every frame of every output. Text is drawn with a small
built-in bitmap font (5x7 cells, upper case, digits and a little punctuation; no
font files, so it renders the same on every worker) on a dark plate, scaled to a
whole number of pixels per font pixel and never below what stays legible after
H.264 compression.

`LabelStamp` precomputes the mask for one frame size, so stamping a frame is two
array operations on the label's box (on the encoder thread).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GLYPH_W, GLYPH_H = 5, 7
MIN_SCALE = 2  # font pixels below 2x2 frame pixels do not survive encoding legibly
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")

# Each glyph: 7 rows of 5 columns, "#" ink. Lower-case text is drawn in capitals.
_FONT_ROWS: dict[str, tuple[str, ...]] = {
    "A": (" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "B": ("#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "),
    "C": (" ####", "#    ", "#    ", "#    ", "#    ", "#    ", " ####"),
    "D": ("#### ", "#   #", "#   #", "#   #", "#   #", "#   #", "#### "),
    "E": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"),
    "F": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "),
    "G": (" ####", "#    ", "#    ", "#  ##", "#   #", "#   #", " ####"),
    "H": ("#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "I": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "#####"),
    "J": ("  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "),
    "K": ("#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"),
    "L": ("#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"),
    "M": ("#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"),
    "N": ("#   #", "##  #", "# # #", "#  ##", "#   #", "#   #", "#   #"),
    "O": (" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "P": ("#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "),
    "Q": (" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"),
    "R": ("#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"),
    "S": (" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "),
    "T": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "),
    "U": ("#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "V": ("#   #", "#   #", "#   #", "#   #", " # # ", " # # ", "  #  "),
    "W": ("#   #", "#   #", "#   #", "# # #", "# # #", "## ##", "#   #"),
    "X": ("#   #", " # # ", "  #  ", "  #  ", "  #  ", " # # ", "#   #"),
    "Y": ("#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "),
    "Z": ("#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"),
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#### ", "    #", "    #", " ### ", "    #", "    #", "#### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": (" ### ", "#    ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", "  #  ", "  #  ", "  #  "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "    #", " ### "),
    " ": ("     ",) * 7,
    "-": ("     ", "     ", "     ", "#####", "     ", "     ", "     "),
    ".": ("     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "),
    ":": ("     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "),
    "/": ("    #", "    #", "   # ", "  #  ", " #   ", "#    ", "#    "),
    "!": ("  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "     ", "  #  "),
    "?": (" ### ", "#   #", "    #", "   # ", "  #  ", "     ", "  #  "),
    "(": ("   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "),
    ")": (" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "),
    "#": (" # # ", "#####", " # # ", " # # ", " # # ", "#####", " # # "),
}
_UNKNOWN = ("#####", "#   #", "#   #", "#   #", "#   #", "#   #", "#####")


def glyph(ch: str) -> np.ndarray:
    """[7, 5] bool: the character's cell (an empty box for characters not in the font)."""
    rows = _FONT_ROWS.get(ch.upper(), _UNKNOWN)
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def text_mask(text: str) -> np.ndarray:
    """[7, 6n - 1] bool: the text in font pixels, one blank column between characters."""
    cells = []
    for i, ch in enumerate(text):
        if i:
            cells.append(np.zeros((GLYPH_H, 1), bool))
        cells.append(glyph(ch))
    return np.concatenate(cells, axis=1) if cells else np.zeros((GLYPH_H, 0), bool)


@dataclass(frozen=True, slots=True)
class LabelSpec:
    text: str = "AI-generated"
    position: str = "top-right"
    size: float = 0.05  # text height as a fraction of the frame height

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"label position must be one of {', '.join(POSITIONS)}")
        if not 0 < self.size <= 0.5:
            raise ValueError("label size must be a fraction of the frame height in (0, 0.5]")


class LabelStamp:
    """The label laid out for one frame size: where its plate goes and which pixels are ink.

    The scale is a whole number of frame pixels per font pixel, at least MIN_SCALE, and
    shrunk (never below MIN_SCALE) until the text fits the frame's width."""

    def __init__(self, spec: LabelSpec, width: int, height: int) -> None:
        self.spec = spec
        mask = text_mask(spec.text)
        scale = max(MIN_SCALE, round(spec.size * height / GLYPH_H))
        pad = 1  # font pixels of plate around the text
        while scale > MIN_SCALE and (mask.shape[1] + 2 * pad) * scale > width:
            scale -= 1
        self.scale = scale
        plate = np.zeros((mask.shape[0] + 2 * pad, mask.shape[1] + 2 * pad), bool)
        plate[pad:-pad, pad:-pad] = mask
        ink = np.kron(plate, np.ones((scale, scale), bool))
        h, w = ink.shape
        h, w = min(h, height), min(w, width)
        self.ink = ink[:h, :w]
        margin = max(2, height // 50)
        top = margin if spec.position.startswith("top") else height - h - margin
        left = margin if spec.position.endswith("left") else width - w - margin
        self.top, self.left = max(0, top), max(0, left)
        self.shape = (h, w)
        # Where the text's first font pixel lands (for reading it back).
        self.text_origin = (self.top + pad * scale, self.left + pad * scale)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """Burns the label into an [H, W, 3] uint8 frame (in place; returned for chaining)."""
        h, w = self.shape
        box = rgb[self.top:self.top + h, self.left:self.left + w]
        box[...] = 24  # a dark plate: legible on any backdrop
        box[self.ink] = 255
        return rgb


def read_label(rgb: np.ndarray, stamp: LabelStamp, length: int) -> str:
    """Reads ``length`` characters back from a (decoded) frame at the stamp's place: each
    cell is thresholded and matched to the closest glyph of the font. What a test (or
    an auditor) uses to check that a stream carries its label."""
    gray = rgb.astype(np.float32).mean(axis=2)
    s = stamp.scale
    y0, x0 = stamp.text_origin
    chars = sorted(_FONT_ROWS)
    glyphs = np.stack([glyph(c) for c in chars]).astype(np.float32)
    out = []
    for i in range(length):
        x = x0 + i * (GLYPH_W + 1) * s
        cell = gray[y0:y0 + GLYPH_H * s, x:x + GLYPH_W * s]
        if cell.shape != (GLYPH_H * s, GLYPH_W * s):
            break
        # Each font pixel's mean brightness, then ink where it is bright.
        bits = cell.reshape(GLYPH_H, s, GLYPH_W, s).mean(axis=(1, 3)) > 128
        dist = np.abs(glyphs - bits.astype(np.float32)).sum(axis=(1, 2))
        out.append(chars[int(np.argmin(dist))])
    return "".join(out)
