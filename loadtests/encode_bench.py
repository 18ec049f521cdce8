"""A room's encoder alone: CPU per frame of video and of its audio, by frame size.

Each run is one room's own `StreamEncoder` (the worker's code path: colour conversion,
H.264, the frame's 40 ms of speech resampled and in AAC, MP4 muxing) writing a file, timed
on its thread as the worker's start-up profile times it (`workers.device.profile`). The
frame is a real photograph of a person (scikit-image's astronaut) at each size, changing
each frame where the mouth is; the audio is the worker's own TTS voice. In one run it
prints, per size:

- video alone (no audio);
- video and audio with FFmpeg's AAC coders ``twoloop`` (FFmpeg's default) and ``fast``
  (the worker's), and the ratio of the two;
- what the audio costs per frame with each, as the difference from video alone.

On a worker without NVENC (CPUs, H100, H200) this is the host's second capacity limit
after the model, and on a small face the audio is half of it.

Then, at the first size, the encoders beside the interpreter lock (``--lock-seconds``;
0 leaves it out): frames/s of 1 and 2 encoder threads alone, and beside a thread that
runs Python all the time (as a loaded worker's event loop does), with that thread's
own rate beside them as a share of its rate alone. PyAV gives the lock up inside
FFmpeg, but an encode takes it back several times between FFmpeg's calls, and each
time waits for the busy thread to let go of it. The same with each thread's encoder in
an encoder process (``workers.output.encoder_process``): the thread only copies the
frame and waits for the answer, which still takes the lock a few times per frame.

    python loadtests/encode_bench.py
    python loadtests/encode_bench.py --sizes 128x128,1280x720 --frames 300 --preset superfast
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the packages importable
    sys.path.insert(0, str(ROOT))

from avatarfarm.domain import OutputKind  # noqa: E402
from workers.device.pipeline import VOICE_SAMPLE  # noqa: E402
from workers.device.profile import encode_seconds  # noqa: E402
from workers.media.audio import SAMPLE_RATE  # noqa: E402
from workers.media.tts import EspeakTTS  # noqa: E402
from workers.models.avatar import scale_image  # noqa: E402
from workers.output.encode import Encoder, EncoderSettings, OutputTarget, StreamEncoder  # noqa: E402
from workers.output.encoder_process import EncoderProcesses, RemoteEncoder  # noqa: E402

CODERS = ("twoloop", "fast")


def photograph(width: int, height: int) -> np.ndarray:
    """A real face at width x height, uint8 RGB."""
    from skimage import data  # a test dependency: the benchmark runs where tests do

    return scale_image(data.astronaut(), width, height)


def measure(width: int, height: int, speech: np.ndarray, settings: EncoderSettings,
            frames: int, repeats: int) -> dict[str, float]:
    """ms of CPU per frame for video alone and with each AAC coder (best of `repeats`,
    alternated so that a slow moment of the host hits every column alike)."""
    rgb = photograph(width, height)
    silent = np.zeros(0, np.float32)
    runs: dict[str, list[float]] = {"video": [], **{c: [] for c in CODERS}}
    for _ in range(repeats):
        runs["video"].append(encode_seconds(rgb, silent, settings, frames))
        for coder in CODERS:
            runs[coder].append(encode_seconds(rgb, speech, replace(settings, aac_coder=coder), frames))
    return {k: min(v) * 1e3 for k, v in runs.items()}


def _python_rate(seconds: float) -> float:
    """Iterations/s of a loop of pure Python: it holds the interpreter lock but for the
    switch interval's hand-overs."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
    return n / seconds


def beside_the_lock(rgb: np.ndarray, speech: np.ndarray, settings: EncoderSettings, threads: int,
                    seconds: float, busy: bool, processes: bool = False) -> tuple[float, float]:
    """Frames/s of `threads` rooms' encoders (one per thread, as the worker's pool runs
    them; with `processes`, each thread's encoder in an encoder process of its own), and
    the busy thread's Python rate (NaN when there is none)."""
    h, w = rgb.shape[:2]
    step = SAMPLE_RATE // 25
    stop, counts = threading.Event(), [0] * threads
    children = EncoderProcesses(threads) if processes else None
    if children is not None:
        children.start()  # started and ready before the clock starts

    def encode(i: int, folder: str) -> None:
        target = OutputTarget(OutputKind.FILE, f"{folder}/{i}.mp4")
        enc: Encoder = (RemoteEncoder(children, target, w, h, 25, settings) if children is not None
                        else StreamEncoder(target, w, h, 25, settings))
        enc.open()
        k = 0
        while not stop.is_set():
            at = k * step % (speech.size - step)
            enc.encode(rgb, speech[at: at + step])
            k += 1
        counts[i] = k
        enc.close()

    with tempfile.TemporaryDirectory() as folder:
        workers = [threading.Thread(target=encode, args=(i, folder)) for i in range(threads)]
        for t in workers:
            t.start()
        t0 = time.perf_counter()
        rate = _python_rate(seconds) if busy else float("nan")
        if not busy:
            time.sleep(seconds)
        stop.set()
        for t in workers:
            t.join()
        if children is not None:
            children.stop()
        return sum(counts) / (time.perf_counter() - t0), rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128x128,256x256,512x512,1280x720",
                    help="frame sizes, WIDTHxHEIGHT, comma separated")
    ap.add_argument("--frames", type=int, default=200, help="frames per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per column; the best is printed")
    ap.add_argument("--preset", default=EncoderSettings().preset, help="x264 preset (default: the worker's)")
    ap.add_argument("--lock-seconds", type=float, default=2.0,
                    help="seconds per run of the interpreter-lock measurement (0: leave it out)")
    args = ap.parse_args(argv)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",") if s]
    if not sizes or any(len(s) != 2 or min(s) < 16 for s in sizes):
        ap.error("--sizes takes WIDTHxHEIGHT values of at least 16x16")
    if args.frames < 10 or args.repeats < 1:
        ap.error("--frames must be >= 10 and --repeats >= 1")
    speech = EspeakTTS().synthesize(VOICE_SAMPLE)
    settings = EncoderSettings(codec="libx264", preset=args.preset)
    print(f"CPU ms per frame of one room's encoder (libx264 {args.preset}, AAC "
          f"{settings.audio_bitrate // 1000} kbps mono, {args.frames} frames, best of {args.repeats})")
    print(f"{'size':>10} {'video':>7} {'+twoloop':>9} {'+fast':>7} {'twoloop/fast':>13} "
          f"{'audio twoloop':>14} {'audio fast':>11}")
    for w, h in sizes:
        ms = measure(w, h, speech, settings, args.frames, args.repeats)
        print(f"{w}x{h:<6} {ms['video']:7.3f} {ms['twoloop']:9.3f} {ms['fast']:7.3f} "
              f"{ms['twoloop'] / ms['fast']:12.2f}x {ms['twoloop'] - ms['video']:14.3f} "
              f"{ms['fast'] - ms['video']:11.3f}", flush=True)
    if args.lock_seconds > 0:
        w, h = sizes[0]
        rgb = photograph(w, h)
        alone = _python_rate(args.lock_seconds)
        print(f"\nencoders beside the interpreter lock at {w}x{h} (frames/s of all encoder threads; "
              f"a Python thread's rate beside them, as a share of its {alone:,.0f}/s alone)")
        for processes in (False, True):
            for threads in (1, 2):
                free, _ = beside_the_lock(rgb, speech, settings, threads, args.lock_seconds,
                                          busy=False, processes=processes)
                held, rate = beside_the_lock(rgb, speech, settings, threads, args.lock_seconds,
                                             busy=True, processes=processes)
                what = "encoder processes" if processes else "encoder threads"
                print(f"  {what:>17} {threads}: alone {free:.0f} frames/s, beside busy Python "
                      f"{held:.0f} ({held / max(free, 1e-9):.0%}); Python kept {rate / alone:.0%}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
