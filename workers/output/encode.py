"""The encoder: H.264 + AAC with PyAV into one output (a file, an HLS folder, RTMP).

A room's encoder runs behind a bounded queue (EncoderThread), so a slow encoder or a
stalled RTMP ingest never blocks inference for other rooms: on a few threads the rooms
share, on a thread of its own (RTMP), or in an encoder process off the worker's
interpreter lock (``workers.output.encoder_process``). It measures its own CPU cost per
frame, because on GPUs without NVENC (H100, H200) encoding is a capacity limit of its own.

A room may change its frame rate mid-stream (a live degradation step): each
frame carries its own rate, video timestamps count stream time on a fine clock
(90 kHz) rather than frames, and keyframes follow stream time, so the stream's
duration, its audio and its segment lengths stay right across a change.

Where the output is and how a continuation writes it: ``workers.output.targets``; how an
HLS folder is published: ``workers.output.hls``; how a stale writer is kept out:
``workers.output.fence``.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import typing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from avatarfarm.domain import OutputKind
from workers.media.audio import SAMPLE_RATE
from workers.output.fence import Fence, Superseded, fence_path
from workers.output.hls import HlsPublisher

# The `name as name` imports keep those names importable from here for code outside
# workers/ written before this module was split into output, hls and fence
# (tests/test_hostile_input.py, loadtests/).
from workers.output.hls import hls_segments as hls_segments
from workers.output.targets import OutputError as OutputError
from workers.output.targets import OutputTarget as OutputTarget
from workers.output.targets import continuation_path

log = logging.getLogger(__name__)

AUDIO_OUT_RATE = 48_000
# The video clock: fine enough that every frame rate up to 60 fps lands within
# 11 microseconds of its exact time, and the MPEG-TS clock, so HLS needs no rescale.
VIDEO_TIME_BASE = Fraction(1, 90_000)
# FFmpeg's AAC encoder emits its first packet 1024 samples before the audio it was given
# (priming). Fed as is, that packet starts before the video, every muxer shifts both
# streams to keep it, and a fragmented MP4 stretches its first video frame by the shift
# (61 ms instead of 40). So the first 1024 samples of each output's audio are not encoded
# and the rest keep their true time: the priming packet lands at 0 with the video, and
# sound stays aligned to the sample. What is lost is the output's first 21 ms of audio.
AAC_PRIMING = 1024  # samples at AUDIO_OUT_RATE
ENCODER_QUEUE = 8  # frames an EncoderThread holds before the room sees back-pressure
# The longest a still frame's repeats are merged into one (see EncoderThread).
MERGE_SECONDS = 1.0


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
    # FFmpeg's AAC encoder searches its quantisers in a loop by default ("twoloop"), which
    # on a voice costs more CPU per frame than x264 does on a 256x256 face: about 0.95 ms a
    # frame here against 0.26 ms for "fast" (loadtests/encode_bench.py), which at 96 kbps
    # mono keeps the waveform closer too (tests/workers/output/test_encode.py).
    aac_coder: str = "fast"
    hls_segment_seconds: float = 2.0
    # Where outputs on local disk are encoded: in this many processes of their own, off
    # the worker's interpreter lock (-1: one per core, see pool_threads; 0: on threads of
    # the worker process). RTMP outputs always keep a thread of their own (a stalled ingest
    # would hold up every room of a shared process). See workers.output.encoder_process.
    processes: int = 0

    def video_codec(self) -> str:
        if self.codec == "auto":
            return "h264_nvenc" if nvenc_available() else "libx264"
        return self.codec


class Encoder(typing.Protocol):
    """What an EncoderThread runs: a StreamEncoder here, or one in an encoder process
    (``workers.output.encoder_process.RemoteEncoder``)."""

    target: OutputTarget
    location: str
    fps: int
    leave_open: bool
    # CPU seconds spent on this output outside the thread that calls it (another process's).
    offloaded_seconds: float

    def open(self) -> None: ...
    def encode(self, rgb: np.ndarray, audio: np.ndarray, fps: int | None = None,
               frames: int = 1) -> None: ...
    def withdraw(self) -> None: ...
    def close(self) -> None: ...


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
                 metadata: dict[str, str] | None = None, connect_to: str | None = None) -> None:
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
        # RTMP: the URL to connect to, its host an address the egress check passed
        # (avatarfarm.egress.pinned_url); `location` stays the URL the tenant gave.
        self.connect_to = connect_to
        if target.kind is OutputKind.FILE:
            self.location = str(continuation_path(Path(target.location), continuation))
        fence = fence_path(target)
        self._fence = Fence(fence, epoch, target.location) if fence is not None and epoch > 0 else None
        self._superseded: Superseded | None = None
        self._withdrawn = False  # set from another thread: a plain flag, read per frame
        self.leave_open = False  # a clean close that leaves the output to a continuation
        self.offloaded_seconds = 0.0  # all its work runs on the calling thread
        self._hls: HlsPublisher | None = None
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
        self._priming_left = AAC_PRIMING  # output samples still to leave out (see AAC_PRIMING)

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
            self._hls = HlsPublisher(Path(self.target.location), tag, self._hold,
                                      append=self.continuation > 0)
            self._hls.prepare()
            url = str(self._hls.staging_playlist)
            fmt = "hls"
            options.update(hls_time=str(self.settings.hls_segment_seconds), hls_list_size="0",
                           hls_segment_filename=str(self._hls.staging / "segment_%05d.ts"),
                           hls_flags="independent_segments")
        else:
            fmt = "flv"
            url = self.connect_to or url
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
        a.codec_context.options = {"aac_coder": s.aac_coder}
        self._audio = a
        self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=AUDIO_OUT_RATE)

    def encode(self, rgb: np.ndarray, audio: np.ndarray, fps: int | None = None,
               frames: int = 1) -> None:
        """Appends one frame lasting frames/fps (fps default: the stream's rate) and its
        audio (``frames`` periods of it: a still frame held that long)."""
        if self._withdrawn:
            return
        self._hold()
        duration = Fraction(frames, fps or self.fps)
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
            self._encode_audio(self._resampler.resample(af))
        if self._hls is not None and not self._withdrawn:
            self._hls.poll()

    def _encode_audio(self, frames: list[Any], container: Any = None) -> None:
        container = container or self._container
        for out in frames:
            if self._priming_left:
                out = self._after_priming(out)
                if out is None:
                    continue
            for packet in self._audio.encode(out):
                container.mux(packet)

    def _after_priming(self, frame: Any) -> Any:
        """The part of a resampled frame past the output's first AAC_PRIMING samples,
        stamped with its own time (None if all of it is within them)."""
        samples = frame.to_ndarray()
        skip = min(self._priming_left, samples.shape[1])
        self._priming_left -= skip
        if skip == samples.shape[1]:
            return None
        rest = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, skip:]),
                                          format=frame.format.name, layout="mono")
        rest.sample_rate = frame.sample_rate
        rest.time_base = frame.time_base
        rest.pts = frame.pts + skip
        return rest

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
                self._encode_audio(self._resampler.resample(None), container)
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


class EncoderPool:
    """A few threads that run many rooms' encoders, each room's frames in order and one
    room at a time. A thread per room lets every encoder contend for the interpreter
    lock at once (PyAV holds it between FFmpeg calls): at tens of rooms per process that
    contention, not encoding, limits the worker; as many threads as cores keep it to
    what the cores can run. Only for outputs on local disk: a stalled network ingest
    would hold a shared thread (RTMP rooms keep a thread of their own)."""

    # A turn of priority p is served as if queued p x this many seconds later: when the
    # pool is behind, higher tiers go first, and a lower tier's turn still comes once it
    # has waited that much longer (no tier starves).
    HEAD_START = 0.1

    def __init__(self, threads: int) -> None:
        self._jobs: queue.PriorityQueue[tuple[float, int, typing.Callable[[], None]]] = queue.PriorityQueue()
        self._order = itertools.count()
        self.threads = [threading.Thread(target=self._work, name=f"encoder-pool-{i}", daemon=True)
                        for i in range(max(1, threads))]
        for t in self.threads:
            t.start()

    def submit(self, job: typing.Callable[[], None], priority: int = 1) -> None:
        self._jobs.put((time.monotonic() + priority * self.HEAD_START, next(self._order), job))

    def _work(self) -> None:
        while True:
            _, _, job = self._jobs.get()
            try:
                job()
            except Exception:  # a job reports its own errors; this keeps the thread alive
                log.exception("encoder job failed")


_SHARED_POOL: EncoderPool | None = None
_SHARED_POOL_LOCK = threading.Lock()


MAX_POOL_THREADS = 16  # beyond this, more threads mostly contend for the interpreter lock


def pool_threads() -> int:
    """The cores this process may run on (its affinity, not the machine's count: a
    container pinned to a few cores of a large node gets a few), at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_POOL_THREADS))


def shared_encoder_pool() -> EncoderPool:
    """The process's encoder pool (`pool_threads` threads)."""
    global _SHARED_POOL
    with _SHARED_POOL_LOCK:
        if _SHARED_POOL is None:
            _SHARED_POOL = EncoderPool(pool_threads())
        return _SHARED_POOL


@dataclass(slots=True)
class _Queued:
    """A frame waiting for its encoder: ``frames`` periods of 1/fps, their audio in order."""

    rgb: np.ndarray
    audio: list[np.ndarray]
    fps: int | None
    frames: int = 1


class EncoderThread:
    """Runs a StreamEncoder behind a bounded queue, on its own thread or on an
    EncoderPool's (frames in order either way).

    ``prepare`` turns what the room submits into the RGB frame (the room hands
    over the renderer's float output; converting it is CPU work that belongs
    here, off the event loop, and is counted as the encoder's). ``submit`` never blocks the caller's event loop for long: a full queue means
    the encoder is behind, which the caller sees as back-pressure. The first
    error is kept and reported; later frames are discarded. ``on_encoded`` sees each
    RGB frame once it is encoded (on the encoder's thread: a camera room's preview).

    A frame submitted again while it still waits in the queue (the room repeats its last
    good frame for each late one) is not queued again: the waiting frame is held one
    period longer and carries the new audio too, up to MERGE_SECONDS. The stream is the
    same to a viewer (a still picture, the sound going on), but an encoder that fell
    behind catches up at the cost of one frame, not one per period: under overload the
    repeats were what kept it behind. An encoder that keeps up encodes every frame.
    """

    _STOP = object()
    BURST = 4  # frames a pooled encoder takes per turn before other rooms get theirs

    def __init__(self, encoder: Encoder, max_queue: int = ENCODER_QUEUE,
                 prepare: typing.Callable[[np.ndarray], np.ndarray] = lambda rgb: rgb,
                 pool: EncoderPool | None = None, priority: int = 1,
                 on_encoded: typing.Callable[[np.ndarray], None] | None = None) -> None:
        self.encoder = encoder
        self.prepare = prepare
        self.on_encoded = on_encoded
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self._thread_seconds = 0.0  # CPU time of this thread on frames, preparing included
        self.prepare_seconds = 0.0  # of which turning the room's output into the RGB frame
        self.frames_encoded = 0
        self.frames_merged = 0  # submitted frames held on a waiting one, not encoded apart
        self._opened = False  # open() was tried (by the thread or pool turn that owns it)
        self._open_ok = False
        self._done = threading.Event()
        # A frame submitted again (a late frame's replacement repeats the last good one)
        # is prepared once: under overload, repeats cost the host only their encoding.
        self._last: tuple[object, np.ndarray] | None = None
        self._pool = pool
        self.priority = priority  # its turns' place on the pool (0: premium first)
        self._lock = threading.Lock()
        self._scheduled = False
        self._thread: threading.Thread | None = None
        if pool is None:
            self._thread = threading.Thread(target=self._run, name="encoder", daemon=True)
            self._thread.start()
        else:
            self._kick()

    @property
    def encode_seconds(self) -> float:
        """CPU seconds spent on this output's frames, preparing included, wherever they ran."""
        return self._thread_seconds + self.encoder.offloaded_seconds

    def _open(self) -> None:
        try:
            self.encoder.open()
            self._open_ok = True
        except Exception as e:  # noqa: BLE001 - any failure becomes the room's failure reason
            self.error = e
        finally:
            self._opened = True

    def _handle(self, item: object) -> bool:
        """Encodes one queued frame (discarded after an error); False at the end."""
        if item is self._STOP:
            return False
        if self.error is not None:
            return True
        q = typing.cast(_Queued, item)
        rgb = q.rgb
        audio = q.audio[0] if len(q.audio) == 1 else np.concatenate(q.audio)
        try:
            t0 = time.thread_time()
            if self._last is None or self._last[0] is not rgb:
                self._last = (rgb, self.prepare(rgb))
                self.prepare_seconds += time.thread_time() - t0
            self.encoder.encode(self._last[1], audio, q.fps, q.frames)
            self._thread_seconds += time.thread_time() - t0
            self.frames_encoded += 1
            if self.on_encoded is not None:
                self.on_encoded(self._last[1])
        except Exception as e:  # noqa: BLE001 - reported through self.error
            self.error = e
        return True

    def _finish(self) -> None:
        try:
            if self._open_ok:
                self.encoder.close()
        except Exception as e:  # noqa: BLE001 - reported through self.error
            if self.error is None:
                self.error = e
        finally:
            self._done.set()

    def _run(self) -> None:
        self._open()
        while self._handle(self._queue.get()):
            pass
        self._finish()

    def _kick(self) -> None:
        """Pooled: makes sure a turn of this encoder is queued on the pool."""
        assert self._pool is not None
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        self._pool.submit(self._turn, self.priority)

    def _turn(self) -> None:
        """Pooled: opens the output on the first turn, then encodes up to BURST frames
        and queues another turn if more are waiting."""
        if not self._opened:
            self._open()
        for _ in range(self.BURST):
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if not self._handle(item):
                self._finish()
                return
        with self._lock:
            self._scheduled = False
        if not self._queue.empty():
            self._kick()

    def submit(self, rgb: np.ndarray, audio: np.ndarray, timeout: float | None = None,
               fps: int | None = None) -> None:
        """Queues a frame lasting 1/fps (default: the stream's rate); blocks while the
        encoder is behind (call from a thread)."""
        if self._merge(rgb, audio, fps):
            return
        self._queue.put(_Queued(rgb, [audio], fps), timeout=timeout)
        if self._pool is not None:
            self._kick()

    def try_submit(self, rgb: np.ndarray, audio: np.ndarray, fps: int | None = None) -> bool:
        """Queues a frame unless the queue is full (False: call `submit` from a thread)."""
        if self._merge(rgb, audio, fps):
            return True
        try:
            self._queue.put_nowait(_Queued(rgb, [audio], fps))
        except queue.Full:
            return False
        if self._pool is not None:
            self._kick()
        return True

    def _merge(self, rgb: np.ndarray, audio: np.ndarray, fps: int | None) -> bool:
        """Holds the last waiting frame one period longer if it is this one (see the class)."""
        with self._queue.mutex:  # the encoder takes items under it: what is queued is not taken
            waiting = self._queue.queue
            last = waiting[-1] if waiting else None
            if not isinstance(last, _Queued) or last.rgb is not rgb or last.fps != fps or \
                    last.frames >= MERGE_SECONDS * (fps or self.encoder.fps):
                return False
            last.audio.append(audio)
            last.frames += 1
            self.frames_merged += 1
            return True

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
        if self._pool is not None:
            self._kick()
        if not self._done.wait(timeout):
            log.warning("encoder for %s did not finish within %.0fs", self.encoder.target, timeout)
