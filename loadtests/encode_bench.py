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

    python loadtests/encode_bench.py
    python loadtests/encode_bench.py --sizes 128x128,1280x720 --frames 300 --preset superfast
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the packages importable
    sys.path.insert(0, str(ROOT))

from workers.device.pipeline import VOICE_SAMPLE  # noqa: E402
from workers.device.profile import encode_seconds  # noqa: E402
from workers.media.tts import EspeakTTS  # noqa: E402
from workers.models.avatar import scale_image  # noqa: E402
from workers.output.encode import EncoderSettings  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128x128,256x256,512x512,1280x720",
                    help="frame sizes, WIDTHxHEIGHT, comma separated")
    ap.add_argument("--frames", type=int, default=200, help="frames per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per column; the best is printed")
    ap.add_argument("--preset", default=EncoderSettings().preset, help="x264 preset (default: the worker's)")
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
