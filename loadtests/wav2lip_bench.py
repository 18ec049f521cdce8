"""Wav2Lip family: what one frame costs, device and host, measured in one run.

Its parts, measured on a prepared bundle made from a real photograph (rooms on video
avatars, per-room against batched, are measured by ``worker_bench.py --family wav2lip``):
  - the model (the project's Wav2Lip-signature graph at a preset's cost) per frame at
    batch 1..8, so per-room against batched inference is a ratio from one run;
  - the host path per frame at the output size, as a room runs it: feeds (masked copy,
    layout), the output read back, the face pasted into its base frame and fitted to
    the canvas (beyond encoding, the host work a GPU worker does per frame);
  - device time a script with normal pauses saves by skipping silent mel windows.

    python loadtests/wav2lip_bench.py                    # S=96, ~3.9 GMAC/frame, CPU
    python loadtests/wav2lip_bench.py --preset wav2lip_256 --side 256 --provider cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from skimage import data  # noqa: E402

from avatarfarm.preparation.bundle import VideoLimits, prepare  # noqa: E402
from avatarfarm.preparation.faces import TrackPolicy  # noqa: E402
from avatarfarm.preparation.sample import encode_clip, head_motion  # noqa: E402
from workers.device.binding import bind_lipsync, make_feeds, read_output  # noqa: E402
from workers.device.pipeline import fit_canvas  # noqa: E402
from workers.device.timing import median_seconds  # noqa: E402
from workers.media.tts import EspeakTTS  # noqa: E402
from workers.media.wav2lip_audio import is_silent, mel_windows, melspectrogram, n_video_frames  # noqa: E402
from workers.models.wav2lip import WAV2LIP_PRESETS, build_wav2lip, conv_gmac_per_frame  # noqa: E402
from workers.rooms.wav2lip_frames import FaceAvatar, FaceFrame  # noqa: E402

SCRIPT = ("Welcome back to the live room. Today we have three new offers for you. "
          "First, the running shoes, now twenty percent off. Second, the rain jacket. "
          "And finally, our best seller, back in stock. Thank you for watching.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wav2lip_96", choices=sorted(WAV2LIP_PRESETS))
    ap.add_argument("--side", type=int, default=96)
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--iterations", type=int, default=5)
    args = ap.parse_args()

    model = build_wav2lip(args.side, WAV2LIP_PRESETS[args.preset])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.provider == "cuda" \
        else ["CPUExecutionProvider"]
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    binding = bind_lipsync(session, name=args.preset)
    print(f"model {args.preset} at S={args.side}: {conv_gmac_per_frame(model):.2f} GMAC/frame; "
          f"provider in use {session.get_providers()[0]}")

    with tempfile.TemporaryDirectory() as tmp:
        frames, _ = head_motion(data.astronaut(), 25)
        bundle = prepare(encode_clip(frames), Path(tmp), (args.side,),
                         limits=VideoLimits(min_seconds=1.0), policy=TrackPolicy(min_side=64))
        avatar = FaceAvatar(bundle, args.side)
        crops = avatar.crops

    speech = EspeakTTS().synthesize(SCRIPT)
    windows = mel_windows(melspectrogram(speech), args.fps, n_video_frames(speech.size, args.fps))

    print("\nmodel per frame (device):")
    print("  batch  call ms  per frame ms  frames/s")
    per_frame: dict[int, float] = {}
    for b in (int(x) for x in args.batches.split(",")):
        idx = np.arange(b) % len(crops)
        feeds = make_feeds(binding, windows[:b], crops[idx])
        call = median_seconds(lambda f=feeds: session.run(None, f), args.iterations)  # type: ignore[misc]
        per_frame[b] = call / b
        print(f"  {b:5d}  {call * 1000:7.2f}  {call / b * 1000:12.2f}  {b / call:8.1f}")
    best = min(per_frame, key=per_frame.__getitem__)
    print(f"  batched (b={best}) vs per-room (b=1): {per_frame[1] / per_frame[best]:.2f}x frames per "
          f"device-second; rooms at {args.fps} fps per device: {1 / (per_frame[1] * args.fps):.2f} "
          f"per-room, {1 / (per_frame[best] * args.fps):.2f} batched")

    w, h = avatar.width, avatar.height
    print(f"\nhost path per frame at {w}x{h} (median of 200):")
    raw = session.run(None, make_feeds(binding, windows[:1], crops[:1]))[0]
    frame = FaceFrame(0, read_output(binding, raw)[0])
    t_feeds = median_seconds(lambda: make_feeds(binding, windows[:1], crops[:1]), 200)
    t_out = median_seconds(lambda: read_output(binding, raw), 200)
    t_paste = median_seconds(lambda: avatar.compose(frame), 200)
    composed = avatar.compose(frame)
    t_fit = median_seconds(lambda: fit_canvas(composed, w, h), 200)
    print(f"  feeds (masked copy, layout) {t_feeds * 1000:.3f} ms, output read back "
          f"{t_out * 1000:.3f} ms, paste-back {t_paste * 1000:.3f} ms, canvas {t_fit * 1000:.3f} ms; "
          f"total {(t_feeds + t_out + t_paste + t_fit) * 1000:.3f} ms (the crops come from the bundle)")

    silent = is_silent(windows)[:, 0]
    saved = silent.mean()
    print(f"\nsilent windows on a {speech.size / 16000:.1f} s script with its pauses: "
          f"{int(silent.sum())} of {len(silent)} frames ({saved:.0%}) skip the model: "
          f"{saved * per_frame[best] * args.fps * 1000:.1f} ms of device time saved per "
          f"second of stream at the batched cost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
