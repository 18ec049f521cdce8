"""The hand-off between the event loop and the device thread, alone: what it costs a
worker per item to send an item to the device and get its result back on the loop.

Rooms on the event loop submit items to the real device thread (`InferenceEngine`), which
runs them in batches through onnxruntime on a graph that costs nothing (an identity of a
mel window), so that what is measured is the hand-off, not the model. Each room awaits
its item, spends `--loop-work-us` of Python on the loop (a room's own per-frame work) and
submits the next. Two ways back, alternated in one run:

- ``wrapped``: a thread's future (`InferenceEngine.submit`) wrapped for the loop
  (`asyncio.wrap_future`): each item wakes the loop on its own;
- ``loop``: the loop's own future (`InferenceEngine.infer`): the items of one batch
  wake their loop once.

It prints items/s, the process's CPU per item and the mean batch per path and batch
size, and the ratios of the two. On a GPU (`--provider cuda`) the same run shows the
hand-off at the batch sizes a GPU runs.

    python loadtests/handoff_bench.py
    python loadtests/handoff_bench.py --batches 8,32,64 --loop-work-us 0,200 --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the packages importable
    sys.path.insert(0, str(ROOT))

from avatarfarm.latency import LatencyCurve  # noqa: E402
from loadtests.worker_bench import write_identity_model  # noqa: E402
from workers.device.batching import BatchPolicy  # noqa: E402
from workers.device.engine import BatchKey, InferenceEngine  # noqa: E402
from workers.device.onnx import OrtModel, ProviderChoice  # noqa: E402
from workers.media.audio import MEL_WINDOW, N_MELS  # noqa: E402

KEY = BatchKey("null-mel")
PATHS = ("wrapped", "loop")


@dataclass(frozen=True, slots=True)
class Run:
    path: str
    batch: int
    work_us: int
    items_per_second: float
    cpu_us_per_item: float
    mean_batch: float


def busy(us: int) -> None:
    """A room's own Python work per item, on the loop."""
    until = time.perf_counter() + us / 1e6
    while time.perf_counter() < until:
        pass


async def measure(model: OrtModel, path: str, batch: int, work_us: int, seconds: float) -> Run:
    # One room per batch slot, and a short wait for company: full batches when the
    # rooms keep up, smaller ones when the hand-off is what they wait for.
    engine = InferenceEngine(BatchPolicy(max_batch=batch, max_wait=0.002, margin=0.0))
    engine.serve(KEY, model, LatencyCurve(((1, 0.0001), (batch, 0.0002))))
    feeds = {"mel": np.zeros((N_MELS, MEL_WINDOW), np.float32)}
    done = 0
    stop = time.monotonic() + seconds

    async def room() -> None:
        nonlocal done
        while time.monotonic() < stop:
            if path == "wrapped":
                await asyncio.wrap_future(engine.submit(KEY, feeds, float("inf")))
            else:
                await engine.infer(KEY, feeds, float("inf"))
            busy(work_us)
            done += 1

    try:
        c0, t0 = time.process_time(), time.monotonic()
        await asyncio.gather(*(room() for _ in range(batch)))
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
        mean_batch = engine.stats()[KEY].mean_batch
    finally:
        engine.close()
    return Run(path, batch, work_us, done / wall, cpu / max(done, 1) * 1e6, mean_batch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--batches", default="8,32", help="batch sizes (one room per slot)")
    ap.add_argument("--loop-work-us", default="0,100",
                    help="a room's own Python work per item on the loop, in microseconds")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per path; the best is kept")
    ap.add_argument("--provider", default="auto", choices=[p.value for p in ProviderChoice])
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    works = [int(w) for w in args.loop_work_us.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "null_mel.onnx"
        # An identity of a mel window: a device call that costs (almost) nothing.
        write_identity_model(path, "null_mel", ("mel", ["B", N_MELS, MEL_WINDOW]), "out")
        model = OrtModel("null-mel", path, None, ProviderChoice(args.provider), intra_op_threads=1)
        print(f"device: {model.provider}; an identity of a [{N_MELS},{MEL_WINDOW}] mel window per item")
        print(f"{'batch':>5} {'loop work':>9}  {'path':8} {'items/s':>9} {'cpu us/item':>11} {'mean batch':>10}")
        for batch in batches:
            for work in works:
                best: dict[str, Run] = {}
                for _ in range(args.repeats):
                    for p in PATHS:
                        run = asyncio.run(measure(model, p, batch, work, args.seconds))
                        if p not in best or run.items_per_second > best[p].items_per_second:
                            best[p] = run
                for p in PATHS:
                    r = best[p]
                    print(f"{batch:>5} {work:>7}us  {p:8} {r.items_per_second:>9.0f} "
                          f"{r.cpu_us_per_item:>11.1f} {r.mean_batch:>10.1f}")
                w, lp = best["wrapped"], best["loop"]
                print(f"{'':>17}loop / wrapped: {lp.items_per_second / w.items_per_second:.2f}x items/s, "
                      f"{lp.cpu_us_per_item - w.cpu_us_per_item:+.1f} us of CPU per item")
    return 0


if __name__ == "__main__":
    sys.exit(main())
