"""H.264 + AAC encoding with PyAV, and the three outputs: file, HLS folder, RTMP.

An encoder runs in its own thread per room (PyAV releases the GIL while it
encodes), behind a bounded queue, so a slow encoder or a stalled RTMP ingest
never blocks inference for other rooms. It measures its own CPU cost per frame,
because on GPUs without NVENC (H100, H200) encoding is a capacity limit of its own.

A room may change its frame rate mid-stream (a live degradation step): each
frame carries its own rate, video timestamps count stream time on a fine clock
(90 kHz) rather than frames, and keyframes follow stream time, so the stream's
duration, its audio and its segment lengths stay right across a change.

An output outlives the worker that started it. When the scheduler moves a room
to another worker it does so under a new *assignment epoch* (1 for the first
placement, one more for each), and the new worker continues the same output:

- RTMP: the same URL; nothing to do here.
- HLS folder: each assignment's muxer writes into a private staging folder
  (``.e{epoch}/``; ``.c{continuation}/`` when unfenced) with its own playlist.
  Completed segments are moved into the public folder as
  ``segment_e{epoch}_{n:05d}.ts`` (unique per assignment, so names never
  collide) and ``index.m3u8`` is rewritten atomically: what the earlier
  assignments published, ``#EXT-X-DISCONTINUITY``, then this assignment's
  segments. ``#EXT-X-ENDLIST`` is written at a clean close and dropped when a
  continuation appends. A crash leaves the published segments and the staging
  folder (the segment it was writing is lost).
- File: continuation k writes ``{stem}.{k}{suffix}`` next to the original:
  ``show.mp4``, then ``show.1.mp4``, ``show.2.mp4``, ...

Fencing keeps a stale worker (frozen, or partitioned and back) out of an output a
newer assignment has taken over. A fence file per logical output (``.fence`` in
the HLS folder; ``.show.mp4.fence`` next to a file) holds the highest epoch that
has claimed it. An encoder claims it at open, before touching the output, and
checks it (one stat, a read only when it changed) before every frame and every
publish; finding a higher epoch it raises Superseded and touches no public file
again. Epoch 0 means unfenced (a single writer: tests, local runs). What remains:
a writer frozen between its last check and one rename can still land that rename
when it resumes; the owner rewrites the playlist from its own record at its next
segment, so such a stray entry lasts one segment at most. On NFS the fence is
only as fresh as the attribute cache (``actimeo``).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import threading
import time
import typing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from avatarfarm.domain import InvalidRequest, Output, OutputKind, validate_output
from avatarfarm.egress import EgressPolicy, ForbiddenTarget
from workers.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

AUDIO_OUT_RATE = 48_000
# The video clock: fine enough that every frame rate up to 60 fps lands within
# 11 microseconds of its exact time, and the MPEG-TS clock, so HLS needs no rescale.
VIDEO_TIME_BASE = Fraction(1, 90_000)
ENCODER_QUEUE = 8  # frames an EncoderThread holds before the room sees back-pressure


class OutputError(ValueError):
    """An output target that is malformed or not allowed."""


@dataclass(frozen=True, slots=True)
class OutputTarget:
    kind: OutputKind
    location: str  # resolved file path, HLS playlist path or RTMP URL

    @staticmethod
    def resolve(kind: OutputKind, value: str, root: Path,
                egress: EgressPolicy | None = None) -> OutputTarget:
        """Resolves a tenant-supplied target; paths must stay inside ``root`` and RTMP
        URLs must pass ``egress`` (the built-in policy when None) as far as their text
        tells (``avatarfarm.egress.check_resolved`` checks a host name's addresses)."""
        try:
            validate_output(Output(kind, value))
            if kind is OutputKind.RTMP:
                (egress or EgressPolicy()).check_url(value)
        except (InvalidRequest, ForbiddenTarget) as e:
            raise OutputError(str(e)) from e
        if kind is OutputKind.RTMP:
            return OutputTarget(kind, value)
        # Resolving follows symlinks, dangling ones too: a link inside the folder cannot
        # lead outside it. The files FFmpeg will open are checked as well as the folder.
        base = root.resolve()
        path = (root / value).resolve()
        opened = [path]
        if kind is OutputKind.HLS:
            opened = [path / "index.m3u8"]
            if path.is_dir():
                opened += sorted(path.glob("segment_*.ts"))
        for p in opened:
            if p.resolve() == base or not p.resolve().is_relative_to(base):
                raise OutputError(f"output path {value!r} leaves the output folder")
        if kind is OutputKind.FILE:
            return OutputTarget(kind, str(path))
        return OutputTarget(kind, str(path / "index.m3u8"))


class Superseded(RuntimeError):
    """A newer assignment of the room holds the output: this writer must stop writing."""

    def __init__(self, location: str, epoch: int, holder: int) -> None:
        super().__init__(f"output {location} (assignment {epoch}) taken over by assignment {holder}")
        self.location, self.epoch, self.holder = location, epoch, holder


def fence_path(target: OutputTarget) -> Path | None:
    """The fence file of a logical output; None for RTMP (the ingest is not in our folder)."""
    if target.kind is OutputKind.RTMP:
        return None
    path = Path(target.location)
    if target.kind is OutputKind.HLS:
        return path.parent / ".fence"
    return path.with_name(f".{path.name}.fence")


def continuation_path(path: Path, continuation: int) -> Path:
    """Where continuation k of a file output goes: ``show.mp4``, ``show.1.mp4``, ..."""
    return path if continuation == 0 else path.with_name(f"{path.stem}.{continuation}{path.suffix}")


class _Fence:
    """An output's fence file, read cheaply: one stat per check, a read only when it changed."""

    def __init__(self, path: Path, epoch: int, location: str) -> None:
        self.path, self.epoch, self.location = path, epoch, location
        self._seen: tuple[int, int, int] | None = None
        self._holder = 0

    def holder(self) -> int:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen = None
            return 0
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return 0
            try:
                self._holder = int(text.split()[0])
            except (ValueError, IndexError):
                log.warning("fence %s holds %r, not an epoch", self.path, text[:40])
                self._holder = 0
            self._seen = seen
        return self._holder

    def hold(self) -> None:
        """Claims the fence, or confirms this epoch still holds it.

        Raises Superseded where a higher epoch holds it. A lower one is overwritten:
        the first claim, a fence removed by hand, or an older claim that raced this
        one and replaced the file last (its writer sees this epoch at its next check).
        """
        holder = self.holder()
        if holder > self.epoch:
            raise Superseded(self.location, self.epoch, holder)
        if holder < self.epoch:
            tmp = self.path.with_name(f"{self.path.name}.{self.epoch}.{os.getpid()}.tmp")
            _write_new(tmp, f"{self.epoch}\n", sync=True)
            os.replace(tmp, self.path)
            self._seen = None


def _write_new(path: Path, text: str, sync: bool = False) -> None:
    """Writes a fresh file: whatever had the name (a leftover, a planted link) is removed,
    not written through."""
    path.unlink(missing_ok=True)
    with open(path, "x") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())


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


class _HlsPublisher:
    """Moves one assignment's completed segments from its staging folder into the public
    HLS folder and keeps the public playlist: what earlier assignments published when
    this one published its first segment, then this assignment's own segments.

    Rendering from its own record rather than re-reading the public playlist each time
    means a stray write by a stale writer lasts until this writer's next segment only.
    ``check`` runs before every move and every playlist replace and raises Superseded.
    """

    def __init__(self, playlist: Path, tag: str, check: typing.Callable[[], None], append: bool) -> None:
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
        _write_new(tmp, pl.render())
        try:
            self.check()
        except Superseded:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.playlist)


_NVENC_OPENS: bool | None = None


def nvenc_available() -> bool:
    """Whether h264_nvenc really opens here. FFmpeg lists it on every build; it opens
    only on a GPU with NVENC (L4, L40S; not H100 or H200). Probed once per process."""
    global _NVENC_OPENS
    if _NVENC_OPENS is None:
        try:
            ctx = av.CodecContext.create("h264_nvenc", "w")
            ctx.width, ctx.height, ctx.pix_fmt = 256, 256, "yuv420p"
            ctx.time_base = Fraction(1, 25)
            ctx.open()
            _NVENC_OPENS = True
        except Exception:  # noqa: BLE001 - any failure means no usable NVENC
            _NVENC_OPENS = False
        log.info("h264_nvenc %s", "available" if _NVENC_OPENS else "not available: libx264 encodes")
    return _NVENC_OPENS


def encoder_options(codec: str, preset: str, crf: int | None = None) -> dict[str, str]:
    if codec == "libx264":
        # One thread per stream: many rooms' encoders share the host, and frame or
        # slice threads per stream would only oversubscribe it.
        opts = {"preset": preset, "tune": "zerolatency", "threads": "1"}
        if crf is not None:
            opts["crf"] = str(crf)
        return opts
    if codec == "h264_nvenc":
        return {"preset": "p4", "tune": "ll", "zerolatency": "1"}
    return {}


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    codec: str = "auto"  # auto: h264_nvenc where the device has NVENC, else libx264
    preset: str = "veryfast"
    gop_seconds: float = 2.0
    crf: int = 23
    audio_bitrate: int = 96_000
    hls_segment_seconds: float = 2.0

    def video_codec(self) -> str:
        if self.codec == "auto":
            return "h264_nvenc" if nvenc_available() else "libx264"
        return self.codec


class StreamEncoder:
    """Encodes RGB frames and float32 audio at SAMPLE_RATE into one output.

    Not thread-safe: one thread owns it (see EncoderThread).

    ``epoch`` is the room's assignment epoch (0: unfenced) and ``continuation`` how
    many placements of the room came before this one (0: the first start; the output
    starts afresh). ``location`` is what this encoder writes: the continuation file,
    the public HLS playlist or the RTMP URL. open, encode and close raise Superseded
    once a newer assignment holds the output; after that nothing public is touched.
    """

    def __init__(self, target: OutputTarget, width: int, height: int, fps: int,
                 settings: EncoderSettings = EncoderSettings(), *,
                 epoch: int = 0, continuation: int = 0,
                 metadata: dict[str, str] | None = None) -> None:
        # Container metadata (e.g. the AI-generated marking): MP4 and FLV carry a comment;
        # MPEG-TS (HLS segments) carries it as the service's name.
        self.metadata = dict(metadata or {})
        if epoch < 0 or continuation < 0:
            raise ValueError(f"epoch {epoch} and continuation {continuation} must be >= 0")
        self.target = target
        self.width, self.height, self.fps = width, height, fps
        self.settings = settings
        self.epoch, self.continuation = epoch, continuation
        self.location = target.location
        if target.kind is OutputKind.FILE:
            self.location = str(continuation_path(Path(target.location), continuation))
        fence = fence_path(target)
        self._fence = _Fence(fence, epoch, target.location) if fence is not None and epoch > 0 else None
        self._superseded: Superseded | None = None
        self._withdrawn = False  # set from another thread: a plain flag, read per frame
        self.leave_open = False  # a clean close that leaves the output to a continuation
        self._hls: _HlsPublisher | None = None
        self._container: Any = None
        self._video: Any = None
        self._audio: Any = None
        self._resampler: Any = None
        self._time = Fraction(0)  # stream time of the next video frame, exact
        self._next_key = Fraction(0)
        # Frame durations by pts, for the packets the codec hands back (it drops them, and
        # a muxer would otherwise guess the last frame's duration from the spec's rate).
        self._durations: dict[int, int] = {}
        self._audio_samples = 0

    def open(self) -> None:
        fmt: str | None
        options: dict[str, str] = {}
        url = self.location
        if self.target.kind is not OutputKind.RTMP:
            Path(self.target.location).parent.mkdir(parents=True, exist_ok=True)
            # Claimed before anything is opened: a stale writer must not even truncate a file.
            self._hold()
        if self.target.kind is OutputKind.FILE:
            if self.continuation:
                # resolve() vetted the original name only: never write through a link here.
                Path(self.location).unlink(missing_ok=True)
            fmt = "mp4" if Path(self.location).suffix == ".mp4" else "flv"
            if fmt == "mp4":
                # Fragmented MP4: everything written so far stays playable if the worker dies.
                options["movflags"] = "frag_keyframe+empty_moov+default_base_moof"
        elif self.target.kind is OutputKind.HLS:
            tag = f"e{self.epoch}" if self.epoch else f"c{self.continuation}"
            self._hls = _HlsPublisher(Path(self.target.location), tag, self._hold,
                                      append=self.continuation > 0)
            self._hls.prepare()
            url = str(self._hls.staging_playlist)
            fmt = "hls"
            options.update(hls_time=str(self.settings.hls_segment_seconds), hls_list_size="0",
                           hls_segment_filename=str(self._hls.staging / "segment_%05d.ts"),
                           hls_flags="independent_segments")
        else:
            fmt = "flv"
            options["rw_timeout"] = "5000000"  # microseconds: a stalled ingest fails the room
        try:
            self._container = av.open(url, mode="w", format=fmt, options=options)
        except BaseException:
            if self._hls is not None:
                self._hls.discard()
            raise
        if self.metadata:
            tags = dict(self.metadata)
            if fmt == "hls" and "comment" in tags:
                tags.setdefault("service_name", tags["comment"][:64])
                tags.setdefault("service_provider", "avatarfarm")
            self._container.metadata.update(tags)
        s = self.settings
        codec = s.video_codec()
        v = self._container.add_stream(codec, rate=self.fps)
        v.width, v.height, v.pix_fmt = self.width, self.height, "yuv420p"
        v.time_base = VIDEO_TIME_BASE
        v.codec_context.time_base = VIDEO_TIME_BASE
        # The GOP in frames is the ceiling at the spec's rate; at a lower rate keyframes
        # are forced every gop_seconds of stream time (see encode).
        v.codec_context.gop_size = max(1, round(s.gop_seconds * self.fps))
        v.codec_context.options = encoder_options(codec, s.preset, s.crf)
        self._video = v
        a = self._container.add_stream("aac", rate=AUDIO_OUT_RATE, layout="mono")
        a.codec_context.bit_rate = s.audio_bitrate
        self._audio = a
        self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=AUDIO_OUT_RATE)

    def encode(self, rgb: np.ndarray, audio: np.ndarray, fps: int | None = None) -> None:
        """Appends one frame lasting 1/fps (default: the stream's rate) and its audio."""
        if self._withdrawn:
            return
        self._hold()
        duration = Fraction(1, fps or self.fps)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = round(self._time / VIDEO_TIME_BASE)
        frame.time_base = VIDEO_TIME_BASE
        frame.duration = round((self._time + duration) / VIDEO_TIME_BASE) - frame.pts
        self._durations[frame.pts] = frame.duration
        gop = Fraction(self.settings.gop_seconds).limit_denominator(1000)
        if gop > 0 and self._time >= self._next_key:
            frame.pict_type = av.video.frame.PictureType.I
            while self._next_key <= self._time:
                self._next_key += gop
        self._time += duration
        self._mux_video(self._video.encode(frame))
        if audio.size:
            af = av.AudioFrame.from_ndarray(audio.reshape(1, -1).astype(np.float32), format="flt",
                                            layout="mono")
            af.sample_rate = SAMPLE_RATE
            af.pts = self._audio_samples
            af.time_base = Fraction(1, SAMPLE_RATE)
            self._audio_samples += audio.size
            for out in self._resampler.resample(af):
                for packet in self._audio.encode(out):
                    self._container.mux(packet)
        if self._hls is not None and not self._withdrawn:
            self._hls.poll()

    def _mux_video(self, packets: list[Any]) -> None:
        for packet in packets:
            packet.duration = self._durations.pop(packet.pts, packet.duration)
            self._container.mux(packet)

    def _hold(self) -> None:
        """Raises Superseded once a newer assignment holds the output (and from then on)."""
        if self._superseded is not None:
            raise self._superseded
        if self._fence is None:
            return
        try:
            self._fence.hold()
        except Superseded as e:
            self._superseded = e
            log.warning("%s", e)
            raise

    def withdraw(self) -> None:
        """Leaves the output to the assignment that continues it: from now on frames are
        dropped, and close publishes nothing more and does not end the HLS playlist (a
        player that saw ``#EXT-X-ENDLIST`` would stop before the continuation). Safe to
        call from another thread."""
        self._withdrawn = True

    def close(self) -> None:
        """Flushes and closes the output; a clean close ends the HLS playlist.

        Once superseded or withdrawn, only the muxer's private output is closed (its
        staging folder, or its own file) and nothing is raised again; a takeover found
        here raises.
        """
        if self._container is None:
            return
        container, self._container = self._container, None
        try:
            if self._superseded is None and not self._withdrawn:
                for out in self._resampler.resample(None):
                    for packet in self._audio.encode(out):
                        container.mux(packet)
                for packet in self._video.encode():
                    packet.duration = self._durations.pop(packet.pts, packet.duration)
                    container.mux(packet)
                for packet in self._audio.encode():
                    container.mux(packet)
        finally:
            container.close()
        if self._hls is not None:
            if self._superseded is None and not self._withdrawn:
                self._hls.finish(ended=not self.leave_open)
            else:
                self._hls.discard()


class EncoderThread:
    """Runs a StreamEncoder on its own thread behind a bounded queue.

    ``prepare`` turns what the room submits into the RGB frame (the room hands
    over the renderer's float output; converting it is CPU work that belongs
    here, off the event loop, and is counted as the encoder's). ``submit`` never blocks the caller's event loop for long: a full queue means
    the encoder is behind, which the caller sees as back-pressure. The first
    error is kept and reported; later frames are discarded.
    """

    _STOP = object()

    def __init__(self, encoder: StreamEncoder, max_queue: int = ENCODER_QUEUE,
                 prepare: typing.Callable[[np.ndarray], np.ndarray] = lambda rgb: rgb) -> None:
        self.encoder = encoder
        self.prepare = prepare
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.encode_seconds = 0.0
        self.frames_encoded = 0
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._run, name="encoder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.encoder.open()
        except Exception as e:  # noqa: BLE001 - any failure becomes the room's failure reason
            self.error = e
            self._drain()
            return
        finally:
            self._opened.set()
        try:
            while True:
                item = self._queue.get()
                if item is self._STOP:
                    break
                if self.error is not None:
                    continue
                rgb, audio, fps = typing.cast(tuple[np.ndarray, np.ndarray, int | None], item)
                t0 = time.thread_time()
                self.encoder.encode(self.prepare(rgb), audio, fps)
                self.encode_seconds += time.thread_time() - t0
                self.frames_encoded += 1
        except Exception as e:  # noqa: BLE001 - reported through self.error
            self.error = e
            self._drain()
        finally:
            try:
                self.encoder.close()
            except Exception as e:  # noqa: BLE001 - reported through self.error
                if self.error is None:
                    self.error = e

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return

    def submit(self, rgb: np.ndarray, audio: np.ndarray, timeout: float | None = None,
               fps: int | None = None) -> None:
        """Queues a frame lasting 1/fps (default: the stream's rate); blocks while the
        encoder is behind (call from a thread)."""
        self._queue.put((rgb, audio, fps), timeout=timeout)

    def try_submit(self, rgb: np.ndarray, audio: np.ndarray, fps: int | None = None) -> bool:
        try:
            self._queue.put_nowait((rgb, audio, fps))
            return True
        except queue.Full:
            return False

    def close(self, timeout: float = 30.0, *, end_output: bool = True,
              leave_open: bool = False) -> None:
        """Flushes and closes the output; waits for the thread. ``end_output=False`` when
        the room has moved to another assignment: queued frames are dropped and the output
        is left for the continuation to append to (see StreamEncoder.withdraw).
        ``leave_open``: every frame is written and published, but the output is not ended
        (a handover: the next assignment continues it from exactly here)."""
        if not end_output:
            self.encoder.withdraw()
        self.encoder.leave_open = leave_open
        self._queue.put(self._STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("encoder for %s did not finish within %.0fs", self.encoder.target, timeout)
