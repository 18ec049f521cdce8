"""Text-to-speech on one worker: each backend's real-time factor, and a neural voice's
segments from many rooms at once, batched on the device vs one call per sentence.

Backends: espeak-ng (on the worker's TTS thread), a Piper-signature neural voice (the
project's stand-in at a medium voice's cost, or your own ``--voice model.onnx`` with its
``.onnx.json``) on the device, and a TTS service's voice (``http``: a local streaming
server speaking with espeak-ng, so what it measures is the worker's side: the request,
the stream and the resampling). For ``--rooms`` rooms each starting a two-sentence
segment at the same moment it prints, per mode, the seconds until each room had its
first audio to play (median and 95th percentile: a segment is spoken sentence by
sentence, so this is its first sentence's), the audio produced per second of wall time
once every room's whole segment is made, and the mean batch of the voice's calls.

    python loadtests/tts_bench.py --rooms 1,4,8
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from avatarfarm.domain import ScriptSegment  # noqa: E402
from workers.device.batching import BatchPolicy  # noqa: E402
from workers.device.onnx import ProviderChoice, auto_intra_op_threads  # noqa: E402
from workers.device.pipeline import Pipeline  # noqa: E402
from workers.media.audio import SAMPLE_RATE  # noqa: E402
from workers.media.tts import EspeakTTS  # noqa: E402
from workers.models.folder import ModelFolder, build_reference  # noqa: E402
from workers.models.piper import write_voice  # noqa: E402
from workers.rooms.drivers import ScriptPlayer  # noqa: E402

SEGMENT = "Welcome back to the live room, everyone. This serum is twenty percent off until midnight."


def espeak_rtf(repeats: int = 5) -> float:
    tts = EspeakTTS("en-us")
    tts.synthesize(SEGMENT)
    t0 = time.perf_counter()
    audio = sum(tts.synthesize(SEGMENT).size for _ in range(repeats))
    return (time.perf_counter() - t0) / (audio / SAMPLE_RATE)


async def rooms_at_once(pipeline: Pipeline, rooms: int) -> dict[str, float]:
    voice = pipeline.voices[pipeline.voice.config.name] if pipeline.voice is not None else None
    model = voice.name if voice is not None else ""
    keys = [k for k in pipeline.engine.stats() if k.model == model]
    before = {k: pipeline.engine.stats()[k] for k in keys}
    t0 = time.perf_counter()
    ready: list[float] = []

    async def synthesize(text: str) -> tuple[np.ndarray, float]:
        r = await pipeline.synthesize(text)
        return r.value, r.seconds

    async def room() -> float:
        script = ScriptPlayer(synthesize)
        script.append([ScriptSegment(SEGMENT)])
        await script.take(SAMPLE_RATE // 25)  # the room's first frame of speech
        ready.append(time.perf_counter() - t0)
        played = SAMPLE_RATE // 25
        while script.segments_done == 0:
            played += (await script.take(SAMPLE_RATE))[0].size
        return played / SAMPLE_RATE

    audio = sum(await asyncio.gather(*(room() for _ in range(rooms))))
    wall = time.perf_counter() - t0
    stats = pipeline.engine.stats()
    items = sum(stats[k].items - (before[k].items if k in before else 0) for k in stats if k.model == model)
    calls = sum(sum(stats[k].batch_sizes.values()) - (sum(before[k].batch_sizes.values()) if k in before else 0)
                for k in stats if k.model == model)
    return {"p50": float(np.percentile(ready, 50)), "p95": float(np.percentile(ready, 95)),
            "rate": audio / wall, "batch": items / max(calls, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rooms", default="1,4,8", help="rooms asking at once, comma-separated")
    ap.add_argument("--voice", type=Path, help="a Piper voice (.onnx, its .onnx.json beside it)")
    ap.add_argument("--preset", default="medium", choices=["medium", "tiny"], help="the stand-in's cost")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        build_reference(root, "lite", wav2lip=None)
        if args.voice is not None:
            (root / "voices").mkdir()
            shutil.copy(args.voice, root / "voices" / args.voice.name)
            shutil.copy(args.voice.with_name(args.voice.name + ".json"), root / "voices")
            name = args.voice.stem
        else:
            name = write_voice(root / "voices", "stand-in", args.preset).stem
        folder = ModelFolder.open(root)
        threads = auto_intra_op_threads()
        print(f"{os.cpu_count()} cores; segment: {len(SEGMENT)} characters, two sentences")
        print(f"espeak-ng: real-time factor {espeak_rtf():.4f} (seconds of CPU per second of speech)")
        print(f"{'mode':<9} {'rooms':>5} {'first p50 s':>11} {'p95 s':>7} {'speech s/s':>10} {'batch':>6}")
        rooms = [int(x) for x in args.rooms.split(",")]
        for mode, policy in (("batched", BatchPolicy(max_batch=8)),
                             ("per-call", BatchPolicy(max_batch=1, max_wait=0.0))):
            pipeline = Pipeline(folder, ProviderChoice.CPU, threads, tts_voice=name, policy=policy)
            try:
                asyncio.run(rooms_at_once(pipeline, 1))  # warm up
                for n in rooms:
                    report(mode, n, asyncio.run(rooms_at_once(pipeline, n)))
            finally:
                pipeline.close()
        asyncio.run(over_http(root, threads, rooms))


def report(mode: str, n: int, r: dict[str, float]) -> None:
    print(f"{mode:<9} {n:>5} {r['p50']:>11.3f} {r['p95']:>7.3f} {r['rate']:>10.1f} "
          f"{r['batch']:>6.2f}", flush=True)


async def over_http(root: Path, threads: int, rooms: list[int]) -> None:
    """The rooms speak with a TTS service's voice, a local server streaming espeak-ng."""
    import json

    from tests.tts_server import RATE, TtsServer

    server = await TtsServer().start()
    voices = root / "voices"
    voices.mkdir(exist_ok=True)
    for p in voices.glob("*.onnx*"):  # the service's voice only
        p.unlink()
    (voices / "service.service.json").write_text(json.dumps({"url": server.url, "sample_rate": RATE}))
    pipeline = Pipeline(ModelFolder.open(root), ProviderChoice.CPU, threads, tts_voice="service")
    try:
        await rooms_at_once(pipeline, 1)  # warm up
        for n in rooms:
            report("http", n, await rooms_at_once(pipeline, n))
    finally:
        await pipeline.aclose()
        pipeline.close()
        await server.stop()


if __name__ == "__main__":
    main()
