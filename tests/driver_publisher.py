"""A live driver for tests, publishing over RTMP as OBS or ffmpeg would (FFmpeg's own
RTMP client, through PyAV): the real photograph (scikit-image's astronaut) whose mouth
opens and shuts, and a tone while it is open, H.264 and AAC in FLV, paced in real time.

    python -m tests.driver_publisher rtmp://127.0.0.1:PORT/live/KEY --seconds 3
    python -m tests.driver_publisher driver.flv --record --seconds 10 --pattern live
    python -m tests.driver_publisher rtmp://127.0.0.1:PORT/live/KEY --replay driver.flv

Patterns (``--pattern``): ``talk`` opens the mouth every other 5 frames; ``live`` opens
it at random, with a webcam's sensor noise on every frame (as a person on camera);
``still`` repeats one noisy frame, mouth open, tone on (a frozen feed); ``loop`` replays a 2 s recording of
``live`` over and over (a pre-recorded feed).

Run as a process of its own (FFmpeg's RTMP client blocks while it connects). Prints
"published N" when done, or "refused: ..." and exits 3 if the ingest refused it.
"""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction

import av
import cv2
import numpy as np
from skimage import data

SIDE = 256
RATE = 48_000
PERIOD = 10  # frames: open for the second half of each period
MOUTH = (128, 170)  # centre of the astronaut's mouth in the 256 px frame (x, y)
FRAMING = (slice(0, 220), slice(116, 336))  # a webcam's framing of her face in the photograph


PATTERNS = ("talk", "live", "still", "loop")
LOOP_FRAMES = 50  # the recording a `loop` driver replays
NOISE = 3.0  # a webcam's sensor noise, luma levels (standard deviation)
_SPEECH = np.random.default_rng(7).random(100_000) < 0.5  # `live`: mouth open or not, per 3 frames


_STILL = 3 * int(np.argmax(_SPEECH))  # `still` shows a frame with the mouth open (and the tone)


def _source(i: int, pattern: str = "talk") -> int:
    """The frame of the `live` performance that frame ``i`` of ``pattern`` shows."""
    return {"still": _STILL, "loop": i % LOOP_FRAMES}.get(pattern, i)


def mouth_open(i: int, pattern: str = "talk") -> bool:
    if pattern == "talk":
        return i % PERIOD >= PERIOD // 2
    return bool(_SPEECH[_source(i, pattern) // 3])


def driver_frame(i: int, pattern: str = "talk") -> np.ndarray:
    """Frame ``i``: her face as a webcam frames it, the mouth drawn open (a dark ellipse)
    when `mouth_open`; with a sensor's noise but for ``talk``."""
    img = cv2.resize(data.astronaut()[FRAMING], (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    if mouth_open(i, pattern):
        cv2.ellipse(img, MOUTH, (16, 9), 0, 0, 360, (40, 10, 15), -1)
    if pattern != "talk":
        noise = np.random.default_rng(_source(i, pattern)).normal(0.0, NOISE, img.shape)
        img = np.clip(img + noise, 0, 255).astype(np.uint8)
    return img


def _publish(url: str, seconds: float, fps: int, pattern: str = "talk", paced: bool = True) -> int:
    """Encodes the driver to ``url`` (an RTMP address, or a file when not ``paced``)."""
    out = av.open(url, "w", format="flv")
    video = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "tune": "zerolatency"})
    video.width = video.height = SIDE
    video.pix_fmt = "yuv420p"
    audio = out.add_stream("aac", rate=RATE, layout="mono")
    n = int(seconds * fps)
    per = RATE // fps
    t0 = time.monotonic()
    for i in range(n):
        if paced:
            time.sleep(max(0.0, t0 + i / fps - time.monotonic()))
        frame = av.VideoFrame.from_ndarray(driver_frame(i, pattern), format="rgb24")
        frame.pts, frame.time_base = i, Fraction(1, fps)
        for p in video.encode(frame):
            out.mux(p)
        t = (np.arange(per) + i * per) / RATE
        tone = (0.3 * np.sin(2 * np.pi * 440 * t) * mouth_open(i, pattern)).astype(np.float32)
        af = av.AudioFrame.from_ndarray(tone[None], format="flt", layout="mono")
        af.sample_rate, af.pts, af.time_base = RATE, i * per, Fraction(1, RATE)
        for p in audio.encode(af):
            out.mux(p)
    for stream in (video, audio):
        for p in stream.encode(None):
            out.mux(p)
    out.close()
    return n


def _replay(url: str, recording: str) -> int:
    """Publishes a recording made with ``--record``, its packets as they are (no encoding:
    a driver whose camera encodes in hardware costs the host next to nothing), paced by
    their timestamps."""
    n = 0
    with av.open(recording) as src:
        out = av.open(url, "w", format="flv")
        streams = {s.index: out.add_stream_from_template(s) for s in src.streams}
        t0 = time.monotonic()
        for packet in src.demux():
            if packet.dts is None:
                continue
            if packet.pts is not None and packet.time_base is not None:
                time.sleep(max(0.0, t0 + float(packet.pts * packet.time_base) - time.monotonic()))
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
            n += packet.stream.type == "video"
        out.close()
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url", help="rtmp://host:port/live/KEY, or a file to record to with --record")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--pattern", choices=PATTERNS, default="talk")
    ap.add_argument("--record", action="store_true", help="encode to the file URL, unpaced")
    ap.add_argument("--replay", metavar="FILE", help="publish a recording (no encoding)")
    args = ap.parse_args(argv)
    try:
        if args.replay:
            n = _replay(args.url, args.replay)
        else:
            n = _publish(args.url, args.seconds, args.fps, args.pattern, paced=not args.record)
    except (av.FFmpegError, OSError) as e:  # FFmpeg's RTMP client connects at the first packet
        print(f"refused: {e}", flush=True)
        return 3
    print(f"published {n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
