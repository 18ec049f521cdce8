"""The ``avatarfarm`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from avatarfarm import config as cfg


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run_server(process: str, serve: Coroutine[Any, Any, None],
                known: tuple[type[Exception], ...] = ()) -> int:
    """Runs a server process until it stops; start-up errors a user can fix are printed
    as one line (exit 2), not as a traceback."""
    try:
        asyncio.run(serve)
    except known as e:
        print(f"avatarfarm {process}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"avatarfarm {process}: {e} (check --listen and --metrics-port)", file=sys.stderr)
        return 2
    return 0


def _scheduler(args: argparse.Namespace) -> int:
    from avatarfarm.preparation.faces import PreparationError
    from scheduler.config import SchedulerConfig
    from scheduler.server import serve

    conf = cfg.load(SchedulerConfig, args=args, env_prefix="AVATARFARM_SCHEDULER_")
    # A face detector that does not load is a start-up error the user can fix.
    return _run_server("scheduler", serve(conf), (PreparationError,))


def _worker(args: argparse.Namespace) -> int:
    from workers.config import WorkerConfig
    from workers.models.folder import ModelFolderError
    from workers.server import serve

    conf = cfg.load(WorkerConfig, args=args, env_prefix="AVATARFARM_WORKER_")
    return _run_server("worker", serve(conf), (ModelFolderError,))


def _prepare_avatar(args: argparse.Namespace) -> int:
    from avatarfarm.avatars import BUNDLES, write_bundle_pointer
    from avatarfarm.domain import InvalidRequest, validate_id
    from avatarfarm.preparation.bundle import prepare
    from avatarfarm.preparation.faces import PreparationError, load_detector

    sides = [int(s) for s in args.sides.split(",") if s.strip()]
    last: dict[str, int] = {}

    def progress(stage: str, done: float) -> None:
        pct = int(done * 100)
        if last.get(stage) != pct:  # one line per stage and whole percent
            last[stage] = pct
            print(f"  {stage:<7} {pct:3d}%", flush=True)

    model, features = None, "hubert"
    if args.model is not None:
        # The person's own model (Ultralight family): bound now, so a model that does not
        # fit is refused before anything is prepared, with what it has and what was expected.
        import onnxruntime as ort

        from workers.device.binding import ModelBindingError, bind_lipsync
        from workers.families import ultralight
        from workers.families.features import WENET, FeatureKind

        kinds = (FeatureKind("hubert", args.feature_width, 2), WENET)
        try:
            model = args.model.read_bytes()
            session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            binding = bind_lipsync(session, ultralight.LAYOUT, name=args.model.name,
                                   audio=ultralight.audio_role(*kinds))
        except (ModelBindingError, OSError, ort.capi.onnxruntime_pybind11_state.Fail) as e:
            print(f"avatarfarm prepare-avatar: {e}", file=sys.stderr)
            return 2
        sides = sorted({*sides, binding.side})
        kind = ultralight.features_of(binding.audio_shape, *kinds)
        features = kind.name
        print(f"Ultralight model {args.model.name}: crop side {binding.side}, audio "
              f"{list(binding.audio_shape)} ({kind.frames(binding.audio_shape)} frames of "
              f"{kind.name} rows)")
    try:
        if args.avatar_id:
            validate_id("avatar_id", args.avatar_id)
        vae = args.vae_encoder.read_bytes() if args.vae_encoder is not None else None
        extractors = None
        if args.extractors is not None:
            appearance, _, motion = args.extractors.partition(",")
            extractors = (Path(appearance).read_bytes(), Path(motion).read_bytes())
        family = ("ultralight" if model is not None else "musetalk" if vae is not None
                  else "liveportrait" if extractors is not None else "wav2lip")
        bundle = prepare(args.video.read_bytes(), args.avatar_dir / BUNDLES, sides,
                         detector=load_detector(args.detector), progress=progress,
                         model=model, family=family, vae_encoder=vae, extractors=extractors,
                         features=features)
    except (PreparationError, InvalidRequest, OSError) as e:
        print(f"avatarfarm prepare-avatar: {e}", file=sys.stderr)
        return 2
    m = bundle.manifest
    print(f"bundle {m.bundle_id} in {bundle.root}: {m.frames} frames at {m.fps:g} fps, "
          f"{m.width}x{m.height}, face found in {m.faces_found}, crops at {list(m.sides)} px, "
          f"{m.family} family")
    if args.avatar_id:
        path = write_bundle_pointer(args.avatar_dir, args.avatar_id, m.bundle_id)
        print(f"video avatar {args.avatar_id} ({path}): rooms may use it as their avatar_id")
    return 0


def _make_batch_dynamic(args: argparse.Namespace) -> int:
    import onnx

    from workers.device.binding import BatchRewriteError, make_batch_dynamic

    try:
        rewritten = make_batch_dynamic(onnx.load(str(args.model)))
    except (BatchRewriteError, onnx.checker.ValidationError, OSError) as e:
        print(f"avatarfarm make-batch-dynamic: {args.model}: {e}", file=sys.stderr)
        return 2
    onnx.save(rewritten, str(args.out))
    print(f"{args.out}: the batch axis is dynamic (checked at batch 3 against the original item "
          f"by item); rooms batch it across rooms")
    return 0


def _build_models(args: argparse.Namespace) -> int:
    from workers.models.folder import build_reference
    from workers.models.reference import RENDERER_PRESETS

    wav2lip = None if args.wav2lip == "none" else args.wav2lip
    folder = build_reference(args.out, args.preset, wav2lip=wav2lip, force=args.force)
    size = RENDERER_PRESETS[args.preset]
    print(f"reference models ({args.preset}: {size.gmac_per_frame(256):.2f} GMAC per 256x256 frame, "
          f"{size.gmac_per_frame(512):.2f} at 512x512) in {folder.root}")
    if folder.wav2lip is not None:
        print(f"Wav2Lip-signature model {folder.wav2lip.name} in {folder.wav2lip.path}")
    if args.features != "hubert":
        from workers.models.folder import use_wenet

        folder = use_wenet(args.out, args.features.removeprefix("wenet-") or "wenet")
    if folder.features is not None:
        print(f"{folder.features.name} feature model (Ultralight, LivePortrait avatars) in "
              f"{folder.features.path}")
    if args.musetalk != "none":
        from workers.models.folder import add_musetalk

        folder = add_musetalk(args.out, args.musetalk)
        print(f"MuseTalk-signature models ({args.musetalk}) in {args.out / 'musetalk'}")
    if args.liveportrait != "none":
        from workers.models.folder import add_liveportrait

        folder = add_liveportrait(args.out, args.liveportrait)
        print(f"LivePortrait-signature models ({args.liveportrait}) in {args.out / 'liveportrait'}")
    if args.voice != "none":
        from workers.models.piper import write_voice

        path = write_voice(args.out / "voices", "stand-in", args.voice)
        print(f"Piper-signature voice ({args.voice}) in {path}: run workers with --tts-voice stand-in")
    print(f"avatars: {', '.join(folder.avatar_ids())}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from farm.demo import DemoOptions, run_demo

    opts = DemoOptions(rooms=args.rooms, seconds=args.seconds, workers=args.workers,
                       home=args.home, pacing=args.pacing, price_per_hour=args.price_per_hour,
                       preset=args.preset, wav2lip=args.wav2lip)
    return run_demo(opts)


def _token(args: argparse.Namespace) -> int:
    from scheduler.api import auth

    if args.hash_api_key:
        key = sys.stdin.readline().strip()
        if not key:
            print("avatarfarm token: give the API key on standard input", file=sys.stderr)
            return 2
        print(auth.hash_api_key(key))
        return 0
    if args.secret_file is None:
        print("avatarfarm token: --secret-file is required", file=sys.stderr)
        return 2
    if args.new_secret:
        # Created, never overwritten: replacing a key invalidates every token it signed.
        try:
            with open(args.secret_file, "x", encoding="ascii", opener=_private) as fh:
                fh.write(secrets.token_hex(32) + "\n")
        except FileExistsError:
            print(f"avatarfarm token: {args.secret_file} exists; not replaced", file=sys.stderr)
            return 2
        print(f"signing key written to {args.secret_file}", file=sys.stderr)
        return 0
    key = auth.read_signing_key(args.secret_file)
    if args.tenant is not None:
        kind, name = auth.SubjectKind.TENANT, args.tenant
    elif args.worker is not None:
        kind, name = auth.SubjectKind.WORKER, args.worker
    else:
        kind, name = auth.SubjectKind.ADMIN, args.admin
    if args.renew_every and (args.out is None or not 0 < args.renew_every <= args.ttl / 2):
        print("avatarfarm token: --renew-every needs --out and must be at most half of --ttl",
              file=sys.stderr)
        return 2
    if args.out is None:
        print(auth.mint_token(key, kind, name, ttl_seconds=args.ttl, now=time.time()))
        return 0
    while True:
        _write_private(args.out, auth.mint_token(key, kind, name, ttl_seconds=args.ttl,
                                                 now=time.time()) + "\n")
        if not args.renew_every:
            return 0
        time.sleep(args.renew_every)


def _write_private(path: Path, text: str) -> None:
    """Replaces `path` with `text` at once (a reader sees the old file or the new one,
    never half of one), readable by its owner only."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "x", encoding="ascii", opener=_private) as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _client_auth(args: argparse.Namespace) -> Any:
    from avatarfarm.client import ClientAuth

    return ClientAuth(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
                      tls=args.tls, token_file=args.token_file)


def _rpc_failed(command: str, e: Any) -> int:
    print(f"avatarfarm {command}: {e.code().name}: {e.details()}", file=sys.stderr)
    return 1


def _register_avatar(args: argparse.Namespace) -> int:
    import grpc

    from avatarfarm import avatar_client
    from avatarfarm.v1 import avatars_pb2

    licence = avatar_client.licence_from_toml(args.licence)
    try:
        image = args.image.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the image {args.image}: {e.strerror}") from e
    voice = avatars_pb2.VoiceSettings(voice=args.voice, rate=args.voice_rate, pitch=args.voice_pitch)
    try:
        a = asyncio.run(avatar_client.register_avatar(
            args.scheduler, avatar_id=args.avatar_id, image=image, licence=licence,
            tenant=args.tenant, voice=voice, auth=_client_auth(args)))
    except grpc.aio.AioRpcError as e:
        return _rpc_failed("register-avatar", e)
    print(f"avatar {a.avatar_id} registered for tenant {a.tenant}: {a.width}x{a.height}, "
          f"image sha256 {a.image_sha256}")
    return 0


def _avatar_usage(args: argparse.Namespace) -> int:
    import grpc

    from avatarfarm import avatar_client

    start = avatar_client.timestamp_of(args.start, "--start") if args.start else None
    end = avatar_client.timestamp_of(args.end, "--end") if args.end else None
    try:
        usage = asyncio.run(avatar_client.avatar_usage(
            args.scheduler, avatar_id=args.avatar, start=start, end=end, auth=_client_auth(args)))
    except grpc.aio.AioRpcError as e:
        return _rpc_failed("avatar-usage", e)
    avatar_client.write_usage_csv(usage.rows, sys.stdout)
    return 0


def _add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", required=True, metavar="HOST:PORT", help="the scheduler's gRPC address")
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding a bearer token (`avatarfarm token` mints one)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    p.add_argument("--ca-file", type=Path, default=None, help="PEM CA bundle to verify the scheduler")
    p.add_argument("--cert-file", type=Path, default=None, help="PEM client certificate (mTLS)")
    p.add_argument("--key-file", type=Path, default=None, help="PEM private key of --cert-file")


def build_parser() -> argparse.ArgumentParser:
    from farm.api_cli import add_commands
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
    d.add_argument("--rooms", type=int, default=5,
                   help="rooms to create (default 5: every drive mode and tier, one of them on a "
                        "video avatar of a real person)")
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
    d.add_argument("--wav2lip", default="wav2lip_96", choices=["wav2lip_96", "wav2lip_256", "tiny"],
                   help="cost of the Wav2Lip-signature model the video avatar's room runs "
                        "(default wav2lip_96, ~4 GMAC per frame)")
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

    pa = sub.add_parser(
        "prepare-avatar", help="prepare an avatar bundle from a base video of the person",
        description="Decodes a 5-60 s clip of one person (MP4, MOV, WebM), finds and tracks the "
                    "face in every frame, and writes a content-addressed bundle (face boxes, "
                    "crops at each lip-sync model's side, the frames, the clip) under the avatar "
                    "folder's bundles/. Preparing the same clip again finds the bundle and does "
                    "nothing.")
    pa.add_argument("--video", type=Path, required=True, help="the base video file")
    pa.add_argument("--avatar-dir", type=Path, default=Path("var/models/avatars"),
                    help="the avatar folder (default var/models/avatars); the bundle is written "
                         "under its bundles/, where RegisterAvatar with the same clip finds it")
    pa.add_argument("--avatar-id", default="",
                    help="also make this id a local video avatar (no licence on record: like a "
                         "portrait dropped into the folder)")
    pa.add_argument("--detector", type=Path, default=None,
                    help="your own ONNX face detector (input [1, 3, H, W], outputs scores "
                         "[1, N, 2] and boxes [1, N, 4]); default: OpenCV's bundled cascade")
    pa.add_argument("--sides", default="96,256",
                    help="comma-separated crop sides of the lip-sync models (default 96,256, as "
                         "the scheduler's avatar_crop_sides; 384 for the largest Wav2Lip variant)")
    pa.add_argument("--model", type=Path, default=None,
                    help="the person's own face model, for the Ultralight family (input [B, 6, 160, "
                         "160]: real crop then masked, BGR/255; audio [B, C, H, W]: a window of "
                         "HuBERT rows, e.g. [B, 16, 32, 32]; output [B, 3, 160, 160]); it is "
                         "checked, stored in the bundle, and its crop side added to --sides")
    pa.add_argument("--vae-encoder", type=Path, default=None,
                    help="for the MuseTalk family: the VAE encoder (sd-vae-ft-mse export: sample "
                         "[B, 3, 256, 256] RGB in [-1, 1] -> [B, 4, 32, 32]); every base frame's "
                         "latents are stored in the bundle, and workers whose folder names another "
                         "VAE encoder refuse it")
    pa.add_argument("--extractors", default=None, metavar="APPEARANCE,MOTION",
                    help="for the LivePortrait family: its appearance_feature_extractor and "
                         "motion_extractor ONNX files, comma-separated; they run once on the "
                         "clip's first frame and the bundle keeps the source's features and "
                         "keypoints (workers whose folder names other extractors refuse it)")
    pa.add_argument("--feature-width", type=int, default=1024,
                    help="width of the HuBERT rows the model's audio input holds (default 1024, "
                         "HuBERT-large's); the workers' feature model must give the same. A model "
                         "whose audio input holds wenet steps ([C, 16, 32]) is a wenet model: "
                         "its rooms go to workers with a wenet feature model")
    pa.set_defaults(func=_prepare_avatar)

    mb = sub.add_parser(
        "make-batch-dynamic", help="rewrite an ONNX export's batch axis fixed at 1 to dynamic",
        description="Many Wav2Lip exports fix the batch axis at 1: they load and run item by "
                    "item. Where the graph allows, this writes a copy whose batch axis is "
                    "dynamic, checked by running it at batch 3 against the original item by "
                    "item, so the worker batches it across rooms. A graph that hard-codes the "
                    "batch is refused, naming the node.")
    mb.add_argument("--model", type=Path, required=True, help="the ONNX export")
    mb.add_argument("--out", type=Path, required=True, help="where to write the rewritten model")
    mb.set_defaults(func=_make_batch_dynamic)

    b = sub.add_parser("build-models", help="write the reference ONNX models and default avatar",
                       description="Builds the project's reference audio-to-motion and renderer "
                                   "models, a stand-in with the Wav2Lip ONNX signature "
                                   "(deterministic) and the default avatar image. Replace "
                                   "wav2lip.onnx with your own Wav2Lip export to run it.")
    b.add_argument("--out", type=Path, default=Path("var/models"), help="model folder (default var/models)")
    b.add_argument("--preset", default="lite",
                   help="renderer cost: lite (CPU) or standard (~22 GMAC per 256x256 frame)")
    b.add_argument("--wav2lip", default="wav2lip_96",
                   choices=["wav2lip_96", "wav2lip_256", "tiny", "none"],
                   help="cost of the Wav2Lip-signature stand-in: wav2lip_96 (~4 GMAC per frame, "
                        "S=96, the default), wav2lip_256 (~28 GMAC, S=256), tiny (tests) or none")
    b.add_argument("--musetalk", default="none", choices=["musetalk", "tiny", "none"],
                   help="also write MuseTalk-signature stand-ins (Whisper-tiny encoder, UNet, VAE "
                        "decoder and encoder) under musetalk/: musetalk (~250 GFLOP a frame, "
                        "~330 MB), tiny (tests) or none (the default)")
    b.add_argument("--liveportrait", default="none", choices=["liveportrait", "tiny", "none"],
                   help="also write LivePortrait-signature stand-ins (appearance and motion "
                        "extractors, audio-to-motion, stitching, warping) under liveportrait/: "
                        "liveportrait (~18 GMAC a frame), tiny (tests) or none (the default)")
    b.add_argument("--features", default="hubert", choices=["hubert", "wenet", "wenet-tiny"],
                   help="the audio feature model Ultralight avatars are fed by: hubert (the "
                        "default; LivePortrait needs it too) or a wenet streaming encoder "
                        "(wenet: ~0.9 GMAC a 50 ms step; wenet-tiny for tests), for people's "
                        "models trained on wenet features")
    b.add_argument("--voice", default="none", choices=["medium", "tiny", "none"],
                   help="also write a Piper-signature neural voice (VITS export and its JSON "
                        "config) as voices/stand-in.onnx: medium (~58 MB, a medium voice's "
                        "cost), tiny (tests) or none (the default)")
    b.add_argument("--force", action="store_true", help="rebuild even if the folder is current")
    b.set_defaults(func=_build_models)

    t = sub.add_parser(
        "token", help="mint an access token, hash an API key, or make a signing key",
        description="Prints a signed token for a tenant, a worker or an operator (HMAC-SHA256 "
                    "with the scheduler's token_secret_file), the SHA-256 of an API key read "
                    "from standard input (for api_keys_sha256 in the scheduler's config), or "
                    "writes a new signing key file.")
    who = t.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", metavar="NAME", help="a token for tenant NAME")
    who.add_argument("--worker", metavar="ID", help="a token for worker ID")
    who.add_argument("--admin", metavar="NAME", nargs="?", const="operator",
                     help="an operator token (acts on every tenant; NAME for the logs)")
    who.add_argument("--hash-api-key", action="store_true",
                     help="print the SHA-256 of the API key on standard input")
    who.add_argument("--new-secret", action="store_true",
                     help="write a new random signing key to --secret-file (never overwrites)")
    t.add_argument("--ttl", type=float, default=3600.0,
                   help="seconds the token is valid (default 3600)")
    t.add_argument("--secret-file", type=Path, default=None,
                   help="file with the signing key (the scheduler's token_secret_file)")
    t.add_argument("--out", type=Path, default=None,
                   help="write the token to this file (owner-only, replaced atomically) "
                        "instead of printing it")
    t.add_argument("--renew-every", type=float, default=0.0, metavar="SECONDS",
                   help="with --out: keep running and write a fresh token every SECONDS "
                        "(under half of --ttl), e.g. beside a worker that re-reads its token "
                        "file; streams end when their token expires and reopen with the new one")
    t.set_defaults(func=_token)

    r = sub.add_parser(
        "register-avatar", help="register an avatar's image with the licence it may be used under",
        description="Uploads a PNG or JPEG portrait and its licence (a TOML file with the fields "
                    "of the API's Licence: allowed_platforms, allowed_categories, "
                    "forbidden_categories, allowed_languages, valid_from, valid_until, "
                    "person_ref, consent_record_id). Registering an id again replaces the "
                    "owner's image and licence.")
    _add_client_arguments(r)
    r.add_argument("--avatar-id", required=True, help="the avatar's id (rooms name it as avatar_id)")
    r.add_argument("--image", type=Path, required=True, help="PNG or JPEG portrait, face-aligned")
    r.add_argument("--licence", type=Path, required=True, help="TOML file with the licence")
    r.add_argument("--tenant", default="", help="owner (required for operators; tenants: their own)")
    r.add_argument("--voice", default="", help="TTS voice name (default: the worker's)")
    r.add_argument("--voice-rate", type=float, default=0.0, help="words per minute (0: default)")
    r.add_argument("--voice-pitch", type=float, default=0.0, help="0..99 (0: default)")
    r.set_defaults(func=_register_avatar)

    u = sub.add_parser(
        "avatar-usage",
        help="print stream-hours and cost per avatar, registered voice, platform and tenant as CSV",
        description="Prints CSV (avatar_id, voice, platform, tenant, sessions, stream_hours, cost) "
                    "of the avatars the caller may see: a tenant's own, every avatar for an "
                    "operator. voice is the registered voice the rooms spoke with (empty: none).")
    _add_client_arguments(u)
    u.add_argument("--avatar", default="", metavar="ID",
                   help="one avatar only, or one registered voice (the rooms that spoke with it)")
    u.add_argument("--start", default=None, metavar="ISO", help="window start, e.g. 2025-06-01T00:00:00Z")
    u.add_argument("--end", default=None, metavar="ISO", help="window end (default: now)")
    u.set_defaults(func=_avatar_usage)
    add_commands(sub)  # rooms, usage, tenant, workers, pools
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
