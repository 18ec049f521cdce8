"""HLS publishing: one assignment's segments moved into the public HLS folder, and the
public playlist rewritten atomically after each.

Each assignment's muxer writes into a private staging folder (``.e{epoch}/``;
``.c{continuation}/`` when unfenced) with its own playlist. Completed segments are
moved into the public folder as ``segment_e{epoch}_{n:05d}.ts`` (unique per
assignment, so names never collide) and ``index.m3u8`` is rewritten atomically:
what the earlier assignments published, ``#EXT-X-DISCONTINUITY``, then this
assignment's segments. ``#EXT-X-ENDLIST`` is written at a clean close and dropped
when a continuation appends. A crash leaves the published segments and the staging
folder (the segment it was writing is lost).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers.output.fence import Superseded
from workers.output.targets import write_new


@dataclass(frozen=True, slots=True)
class HlsSegment:
    name: str
    duration: float  # seconds, from #EXTINF
    discontinuity_before: bool


# Tags the playlist writer owns and writes itself; every other line is kept in order.
_EXTM3U, _VERSION, _TARGET, _SEQUENCE, _ENDLIST = (
    "#EXTM3U", "#EXT-X-VERSION:", "#EXT-X-TARGETDURATION:", "#EXT-X-MEDIA-SEQUENCE:", "#EXT-X-ENDLIST")
_EXTINF, _DISCONTINUITY = "#EXTINF:", "#EXT-X-DISCONTINUITY"


@dataclass(slots=True)
class _Playlist:
    """An HLS media playlist: its lines in order, less the tags rendered from the fields."""

    lines: list[str]
    version: int = 3
    media_sequence: int = 0
    ended: bool = False

    @staticmethod
    def parse(text: str) -> _Playlist:
        pl = _Playlist([])
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line == _EXTM3U or line.startswith(_TARGET):
                continue  # the target duration is recomputed from the segments
            if line == _ENDLIST:
                pl.ended = True
            elif line.startswith((_VERSION, _SEQUENCE)):
                try:
                    value = int(line.split(":", 1)[1])
                except ValueError:
                    pl.lines.append(line)
                    continue
                if line.startswith(_VERSION):
                    pl.version = value
                else:
                    pl.media_sequence = value
            else:
                pl.lines.append(line)
        return pl

    def header(self) -> list[str]:
        """The lines before the first segment."""
        out = []
        for line in self.lines:
            if line.startswith(_EXTINF) or line == _DISCONTINUITY or not line.startswith("#"):
                break
            out.append(line)
        return out

    def segments(self) -> list[HlsSegment]:
        out, duration, discontinuity = [], 0.0, False
        for line in self.lines:
            if line.startswith(_EXTINF):
                try:
                    duration = float(line[len(_EXTINF):].split(",", 1)[0])
                except ValueError:
                    duration = 0.0
            elif line == _DISCONTINUITY:
                discontinuity = True
            elif not line.startswith("#"):
                out.append(HlsSegment(line, duration, discontinuity))
                duration, discontinuity = 0.0, False
        return out

    def render(self) -> str:
        longest = max((s.duration for s in self.segments()), default=1.0)
        # Rounded first: 2.0000001 s of float noise must not make the target 3.
        target = max(1, math.ceil(round(longest, 3)))
        lines = [_EXTM3U, f"{_VERSION}{self.version}", f"{_TARGET}{target}",
                 f"{_SEQUENCE}{self.media_sequence}", *self.lines]
        if self.ended:
            lines.append(_ENDLIST)
        return "\n".join(lines) + "\n"


def hls_segments(folder: Path | str, playlist: str = "index.m3u8") -> list[HlsSegment]:
    """The segments an HLS folder's playlist lists, in order."""
    return _Playlist.parse((Path(folder) / playlist).read_text()).segments()


class HlsPublisher:
    """Moves one assignment's completed segments from its staging folder into the public
    HLS folder and keeps the public playlist: what earlier assignments published when
    this one published its first segment, then this assignment's own segments.

    Rendering from its own record rather than re-reading the public playlist each time
    means a stray write by a stale writer lasts until this writer's next segment only.
    ``check`` runs before every move and every playlist replace and raises Superseded.
    """

    def __init__(self, playlist: Path, tag: str, check: Callable[[], None], append: bool) -> None:
        self.playlist = playlist
        self.folder = playlist.parent
        self.staging = self.folder / f".{tag}"
        self.tag, self.check, self.append = tag, check, append
        self._staged_seen: tuple[int, int, int] | None = None
        self._staged_done = 0  # staging entries published
        self._base: _Playlist | None = None
        self._mine: list[str] = []
        self._published = 0

    @property
    def staging_playlist(self) -> Path:
        return self.staging / self.playlist.name

    def prepare(self) -> None:
        # Only this assignment writes here: what is left came from its own earlier attempt
        # (or is a planted link, removed rather than followed).
        if self.staging.is_symlink():
            self.staging.unlink()
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)

    def poll(self) -> None:
        """Publishes what the muxer has completed since the last poll."""
        try:
            st = os.stat(self.staging_playlist)
        except FileNotFoundError:
            return
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._staged_seen:
            return
        self._staged_seen = seen
        staged = _Playlist.parse(self.staging_playlist.read_text())
        new = staged.segments()[self._staged_done:]
        if not new:
            return
        if self._base is None:
            self._base = self._start(staged)
        for seg in new:
            self.check()
            name = f"segment_{self.tag}_{self._published:05d}.ts"
            os.replace(self.staging / Path(seg.name).name, self.folder / name)
            self._mine += [f"{_EXTINF}{seg.duration:.6f},", name]
            self._published += 1
            self._staged_done += 1
        self._base.version = max(self._base.version, staged.version)
        self._write(ended=False)

    def finish(self, ended: bool = True) -> None:
        """After the muxer's trailer: publishes the last segment and ends the playlist
        (``ended=False``: leaves it open, for a continuation handed the room over)."""
        try:
            self._staged_seen = None
            self.poll()
            if self._published:
                self._write(ended=ended)
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _start(self, staged: _Playlist) -> _Playlist:
        if self.append and self.playlist.exists():
            base = _Playlist.parse(self.playlist.read_text())
            base.ended = False
            if base.segments():
                self._mine.append(_DISCONTINUITY)
            return base
        return _Playlist(staged.header(), staged.version, 0)

    def _write(self, ended: bool) -> None:
        assert self._base is not None
        pl = _Playlist(self._base.lines + self._mine, self._base.version, self._base.media_sequence, ended)
        tmp = self.folder / f".{self.playlist.name}.{self.tag}.tmp"
        write_new(tmp, pl.render())
        try:
            self.check()
        except Superseded:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.playlist)

