"""Uploaded avatar images with real hostile inputs: what is refused before any
decoder runs, what the decoder refuses, what is normalised, and how the result
is written (atomically, never through a link)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import pytest

from avatarfarm import images
from tests.builders import jpeg_image, png_bomb, png_chunk, png_image


def decode(png: bytes) -> tuple[int, int, str]:
    with av.open(io.BytesIO(png), format="png_pipe") as c:
        frame = next(c.decode(video=0))
        return frame.width, frame.height, frame.format.name


def test_png_and_jpeg_become_plain_pngs() -> None:
    for data, source in ((png_image(96), "png"), (jpeg_image(128), "jpeg")):
        out = images.normalise(data)
        assert out.source == source
        assert decode(out.png) == (out.width, out.height, "rgb24")
        assert out.png.endswith(png_chunk(b"IEND", b""))
        assert len(out.sha256) == 64


def test_trailing_payloads_and_metadata_do_not_survive() -> None:
    jpeg = jpeg_image(96)
    # A comment segment and an EXIF segment before the scan, a zip after the image.
    exif = b"\xff\xe1" + (len(b"Exif\0\0secret-gps") + 2).to_bytes(2, "big") + b"Exif\0\0secret-gps"
    dirty = jpeg[:2] + exif + jpeg[2:] + b"PK\x03\x04" + b"payload" * 200
    out = images.normalise(dirty)
    assert b"secret-gps" not in out.png and b"payload" not in out.png
    assert out.png == images.normalise(jpeg).png  # the same pixels, nothing else
    png = png_image(96)
    text = png_chunk(b"tEXt", b"Comment\0hidden")
    tagged = png[:33] + text + png[33:] + b"<script>"  # after IHDR (8 + 25 bytes)
    out = images.normalise(tagged)
    assert b"hidden" not in out.png and b"<script>" not in out.png


@pytest.mark.parametrize(("data", "says"), [
    (b"GIF89a" + bytes(200), "PNG or JPEG"),
    (b"just text, whatever its name says", "PNG or JPEG"),
    (png_image(96)[:600], "truncated"),
    (jpeg_image(96)[:700], "truncated"),
    (jpeg_image(96)[:700] + b"\xff\xd9", "does not decode"),  # cut, with an end marker pasted on
    (png_bomb(), "50000x50000"),
    (png_bomb(4096, 4097), "4096x4097"),
    (png_image(32), "at least 64x64"),
], ids=["gif", "text", "truncated-png", "truncated-jpeg", "corrupt-jpeg", "bomb", "too-tall", "tiny"])
def test_hostile_images_are_refused(data: bytes, says: str) -> None:
    with pytest.raises(images.ImageRefused, match=says):
        images.normalise(data)


def test_a_corrupted_chunk_fails_its_checksum() -> None:
    png = bytearray(png_image(96))
    png[60] ^= 0xFF  # inside the first IDAT
    with pytest.raises(images.ImageRefused, match="checksum"):
        images.normalise(bytes(png))


def test_size_is_checked_before_anything_else() -> None:
    with pytest.raises(images.ImageTooLarge, match="at most 1000"):
        images.normalise(png_image(96) + bytes(2000), images.Limits(max_bytes=1000))


def test_stored_atomically_replacing_a_link_not_its_target(tmp_path: Path) -> None:
    folder = tmp_path / "avatars"
    folder.mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not yours")
    (folder / "anna.png").symlink_to(outside)
    png = images.normalise(png_image(96)).png
    staged = images.stage(folder, "anna", png)
    assert staged.name.startswith(".anna.") and staged.suffix == ".upload"
    final = images.install(staged, folder, "anna")
    assert final == folder / "anna.png" and not final.is_symlink()
    assert final.read_bytes() == png
    assert outside.read_bytes() == b"not yours"
    assert sorted(os.listdir(folder)) == ["anna.png"]  # nothing left behind
    staged = images.stage(folder, "bob", png)
    images.discard(staged)
    assert sorted(os.listdir(folder)) == ["anna.png"]
    with pytest.raises(ValueError, match="avatar_id"):
        images.stage(folder, "../escape", png)
