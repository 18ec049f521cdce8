"""Uploaded avatar images, refused or normalised before anything stores them.

An upload is untrusted bytes: it is accepted as PNG or JPEG by its magic bytes
(never by a name), its size is bounded, and its width and height are read from
the header (PNG IHDR, JPEG SOF) and bounded *before* any decoder sees it, so a
small file declaring a huge canvas (a decompression bomb) costs nothing. Only
the chunks or segments a decoder needs are passed on (colour profiles, text,
EXIF and anything unknown are dropped unread), the decoder runs with strict
error detection on one frame, and what it produced is re-encoded as a plain RGB
PNG: metadata, trailing payloads and polyglot tails do not survive.

`store` writes the result as ``<folder>/<avatar_id>.png`` atomically (a new
temporary file, synced, then renamed over the old name, which replaces a link
rather than following it).
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import av

from avatarfarm.avatars import BUNDLE_SUFFIX
from avatarfarm.domain import InvalidRequest, validate_id

MAX_IMAGE_BYTES = 3 * 1024 * 1024
MAX_SIDE = 4096
MAX_PIXELS = 4096 * 4096
MIN_SIDE = 64

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
# What a PNG decoder needs to draw the image; every other chunk is dropped unread.
_PNG_KEPT = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})
# JPEG start-of-frame markers (not DHT C4, JPG C8 or DAC CC).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Application segments that change how pixels decode (JFIF, Adobe's colour transform);
# the other APPn and comments are metadata, dropped.
_JPEG_APP_KEPT = frozenset({0xE0, 0xEE})


class ImageRefused(InvalidRequest):
    """Not an image this farm accepts (maps to INVALID_ARGUMENT)."""


class ImageTooLarge(ImageRefused):
    """More bytes than the upload limit (maps to RESOURCE_EXHAUSTED, as gRPC answers a
    message over its own size limit)."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int = MAX_IMAGE_BYTES
    max_side: int = MAX_SIDE
    max_pixels: int = MAX_PIXELS
    min_side: int = MIN_SIDE


@dataclass(frozen=True, slots=True)
class Normalised:
    png: bytes
    width: int
    height: int
    source: str  # "png" or "jpeg"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.png).hexdigest()


def sniff(data: bytes) -> str:
    if data.startswith(_PNG):
        return "png"
    if data.startswith(_JPEG):
        return "jpeg"
    raise ImageRefused("the reference image must be a PNG or JPEG file (its first bytes are "
                       "neither)")


def _png_chunks(data: bytes) -> tuple[tuple[int, int], bytes]:
    """The declared size and a copy holding only the chunks a decoder needs. Every
    chunk's length and CRC are checked, and IEND must come: a truncated or corrupted
    file is refused here."""
    pos = len(_PNG)
    kept = [_PNG]
    size: tuple[int, int] | None = None
    while True:
        if pos + 12 > len(data):
            raise ImageRefused("the PNG is truncated (it ends before its IEND chunk)")
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > len(data):
            raise ImageRefused("the PNG is truncated (a chunk runs past the end of the file)")
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:end])
        if zlib.crc32(kind + body) != crc:
            raise ImageRefused(f"the PNG is corrupt (chunk {kind!r} fails its checksum)")
        if size is None:
            if kind != b"IHDR" or length != 13:
                raise ImageRefused("the PNG does not start with its IHDR header")
            size = struct.unpack(">II", body[:8])
        if kind in _PNG_KEPT:
            kept.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break  # anything after it is not part of the image
    return size, b"".join(kept)


def _jpeg_segments(data: bytes) -> tuple[tuple[int, int], bytes]:
    """The frame size from the first SOF marker and a copy without metadata segments;
    the scans (from the first SOS on) are passed as they are."""
    pos = 2
    kept = [data[:2]]
    size: tuple[int, int] | None = None
    while True:
        # Markers may be preceded by fill bytes (0xFF).
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise ImageRefused("the JPEG is truncated or corrupt (no image data after its header)")
        marker = data[pos + 1]
        if marker == 0xD9:
            raise ImageRefused("the JPEG ends before any image data")
        if marker in (0x01, *range(0xD0, 0xD8)):
            pos += 2  # markers without a length
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise ImageRefused("the JPEG is truncated (a segment runs past the end of the file)")
        if marker in _SOF and size is None:
            if length < 8:
                raise ImageRefused("the JPEG's frame header is malformed")
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            size = (width, height)
        if marker == 0xDA:  # start of scan: the rest is image data
            if size is None:
                raise ImageRefused("the JPEG has image data before its frame header")
            if b"\xff\xd9" not in data[end:]:
                raise ImageRefused("the JPEG is truncated (it has no end-of-image marker)")
            kept.append(data[pos:])
            return size, b"".join(kept)
        if not (0xE0 <= marker <= 0xEF or marker == 0xFE) or marker in _JPEG_APP_KEPT:
            kept.append(data[pos:end])
        pos = end


def _check_size(width: int, height: int, limits: Limits) -> None:
    if width < limits.min_side or height < limits.min_side:
        raise ImageRefused(f"the image is {width}x{height}; a portrait needs at least "
                           f"{limits.min_side}x{limits.min_side} pixels")
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise ImageRefused(f"the image declares {width}x{height} pixels; at most "
                           f"{limits.max_side} per side and {limits.max_pixels} in all are "
                           f"accepted (scale it down, e.g. to 1024x1024)")


def _decode_rgb(data: bytes, demuxer: str, size: tuple[int, int]) -> av.VideoFrame:
    try:
        with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
            stream = container.streams.video[0]
            stream.codec_context.options = {"err_detect": "explode+crccheck+bitstream+buffer"}
            for frame in container.decode(stream):
                if (frame.width, frame.height) != size:
                    raise ImageRefused(f"the image decodes to {frame.width}x{frame.height} but its "
                                       f"header declares {size[0]}x{size[1]}")
                return frame.reformat(format="rgb24")
    except (av.FFmpegError, IndexError, ValueError) as e:
        if isinstance(e, ImageRefused):
            raise
        raise ImageRefused("the image is corrupt or truncated: it does not decode") from e
    raise ImageRefused("the image holds no picture")


def _encode_png(frame: av.VideoFrame) -> bytes:
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = frame.width, frame.height, "rgb24"
    packets = [*ctx.encode(frame), *ctx.encode(None)]
    return b"".join(bytes(p) for p in packets)


def normalise(data: bytes, limits: Limits = Limits()) -> Normalised:
    """The upload as a plain RGB PNG, or ImageRefused / ImageTooLarge saying why not.
    CPU-bound (a decode and an encode): call it off the event loop."""
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"the reference image is {len(data)} bytes; at most "
                            f"{limits.max_bytes} are accepted")
    kind = sniff(data)
    if kind == "png":
        size, clean = _png_chunks(data)
    else:
        size, clean = _jpeg_segments(data)
    _check_size(*size, limits)  # before any decoder allocates a canvas
    frame = _decode_rgb(clean, "png_pipe" if kind == "png" else "jpeg_pipe", size)
    return Normalised(_encode_png(frame), frame.width, frame.height, kind)


def avatar_file(folder: Path, avatar_id: str) -> Path:
    validate_id("avatar_id", avatar_id)  # no separators: the name stays in the folder
    return folder / f"{avatar_id}.png"


def stage(folder: Path, avatar_id: str, png: bytes) -> Path:
    """Writes `png` to a new temporary file in `folder` (never through a link), synced;
    `install` moves it into place, `discard` removes it. Names starting with '.' and
    ending in '.upload' are never taken for avatars."""
    avatar_file(folder, avatar_id)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{avatar_id}.{secrets.token_hex(8)}.upload"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(png)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def install(staged: Path, folder: Path, avatar_id: str) -> Path:
    """Renames a staged file over ``<folder>/<avatar_id>.png`` (atomic: readers see the
    old image or the new one, never part of one)."""
    final = avatar_file(folder, avatar_id)
    os.replace(staged, final)
    # An id is one avatar: a video avatar of the same id is replaced by the portrait.
    (folder / f"{avatar_id}{BUNDLE_SUFFIX}").unlink(missing_ok=True)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself survives a crash
    finally:
        os.close(dfd)
    return final


def discard(staged: Path) -> None:
    staged.unlink(missing_ok=True)
