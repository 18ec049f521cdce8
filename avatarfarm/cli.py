"""The ``avatarfarm`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from avatarfarm import config as cfg


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _scheduler(args: argparse.Namespace) -> int:
    from scheduler.config import SchedulerConfig
    from scheduler.server import serve

    conf = cfg.load(SchedulerConfig, args=args, env_prefix="AVATARFARM_SCHEDULER_")
    try:
        asyncio.run(serve(conf))
    except OSError as e:
        print(f"avatarfarm scheduler: {e} (check --listen and --metrics-port)", file=sys.stderr)
        return 2
    return 0


def _worker(args: argparse.Namespace) -> int:
    from workers.config import WorkerConfig
    from workers.models.folder import ModelFolderError
    from workers.server import serve

    conf = cfg.load(WorkerConfig, args=args, env_prefix="AVATARFARM_WORKER_")
    try:
        asyncio.run(serve(conf))
    except ModelFolderError as e:
        print(f"avatarfarm worker: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"avatarfarm worker: {e} (check --listen and --metrics-port)", file=sys.stderr)
        return 2
    return 0


def _build_models(args: argparse.Namespace) -> int:
    from workers.models.folder import build_reference
    from workers.models.reference import RENDERER_PRESETS

    folder = build_reference(args.out, args.preset, force=args.force)
    size = RENDERER_PRESETS[args.preset]
    print(f"reference models ({args.preset}: {size.gmac_per_frame(256):.2f} GMAC per 256x256 frame, "
          f"{size.gmac_per_frame(512):.2f} at 512x512) in {folder.root}")
    print(f"avatars: {', '.join(folder.avatar_ids())}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from avatarfarm.demo import DemoOptions, run_demo

    opts = DemoOptions(rooms=args.rooms, seconds=args.seconds, workers=args.workers,
                       home=args.home, pacing=args.pacing, price_per_hour=args.price_per_hour,
                       preset=args.preset)
    return run_demo(opts)


def build_parser() -> argparse.ArgumentParser:
    from scheduler.config import SchedulerConfig
    from workers.config import WorkerConfig

    p = argparse.ArgumentParser(
        prog="avatarfarm",
        description="Render farm for AI avatar livestreams: a gRPC scheduler places rooms on "
                    "onnxruntime workers that render, encode (H.264/AAC) and push each stream.")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run a local farm (scheduler + workers) and render a few rooms",
                       description="Starts a scheduler and worker processes on this machine, "
                                   "creates rooms of every drive mode and tier, streams them to "
                                   "files and prints a summary with cost per stream-hour.")
    d.add_argument("--rooms", type=int, default=4, help="rooms to create (default 4)")
    d.add_argument("--seconds", type=float, default=20.0, help="seconds of video per room (default 20)")
    d.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    d.add_argument("--home", type=Path, default=Path("var/demo"),
                   help="folder for models, state and outputs (default var/demo)")
    d.add_argument("--pacing", choices=["fast", "realtime"], default="fast",
                   help="fast renders as fast as the machine allows (default); realtime paces "
                        "each room at its fps as a live stream does")
    d.add_argument("--price-per-hour", type=float, default=0.10,
                   help="price of one device-hour of this machine (default 0.10)")
    d.add_argument("--preset", default="lite", help="reference renderer preset: lite or standard")
    d.set_defaults(func=_demo)

    s = sub.add_parser("scheduler", help="run the scheduler (gRPC API, placement, metrics)",
                       description="Runs the control plane. Options also come from a TOML file "
                                   "(--config) or AVATARFARM_SCHEDULER_<OPTION> variables.")
    cfg.add_arguments(s, SchedulerConfig)
    s.set_defaults(func=_scheduler)

    w = sub.add_parser("worker", help="run a worker that renders rooms",
                       description="Runs one worker (one per GPU). Options also come from a TOML "
                                   "file (--config) or AVATARFARM_WORKER_<OPTION> variables.")
    cfg.add_arguments(w, WorkerConfig)
    w.set_defaults(func=_worker)

    b = sub.add_parser("build-models", help="write the reference ONNX models and default avatar",
                       description="Builds the project's reference audio-to-motion and renderer "
                                   "models (deterministic) and the default avatar image.")
    b.add_argument("--out", type=Path, default=Path("var/models"), help="model folder (default var/models)")
    b.add_argument("--preset", default="lite",
                   help="renderer cost: lite (CPU) or standard (~22 GMAC per 256x256 frame)")
    b.add_argument("--force", action="store_true", help="rebuild even if the folder is current")
    b.set_defaults(func=_build_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _logging(args.log_level)
    try:
        return int(args.func(args))
    except ValueError as e:
        print(f"avatarfarm: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
