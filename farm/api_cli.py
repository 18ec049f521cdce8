"""The farm from the shell: tenants' rooms, usage and budgets; operators' workers and pools.

Every command speaks the gRPC API with the caller's credentials, taken from flags, then
the environment (AVATARFARM_SCHEDULER, AVATARFARM_TOKEN, AVATARFARM_TOKEN_FILE,
AVATARFARM_API_KEY), then a TOML config file (--config, AVATARFARM_CONFIG or
~/.config/avatarfarm/client.toml: scheduler, token_file, api_key, tls, ca_file,
cert_file, key_file). Output is a table, or JSON with --json (watch: one JSON object per
line). A refused call prints its gRPC status and exits with the status's number
(NOT_FOUND is 5, PERMISSION_DENIED 7, ...); a usage error exits with 2.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

CONFIG_ENV = "AVATARFARM_CONFIG"
DEFAULT_CONFIG = Path("~/.config/avatarfarm/client.toml")
DEFAULT_SCHEDULER = "127.0.0.1:50051"
DRIVES = ("text", "voice", "mocap", "camera")
TIERS = ("best_effort", "standard", "premium")
STATES = ("pending", "placed", "running", "ended", "failed")
DIMENSIONS = ("tenant", "tier", "avatar", "device_type", "platform")


# -- connection ---------------------------------------------------------------------------

def add_connection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection (flags, then the environment, then --config)")
    g.add_argument("--scheduler", metavar="HOST:PORT", default=None,
                   help=f"the scheduler's gRPC address (default {DEFAULT_SCHEDULER}); "
                        "replicated schedulers may be listed (host1:port,host2:port): the "
                        "command goes to the one that leads")
    g.add_argument("--token-file", type=Path, default=None, help="file holding a bearer token")
    g.add_argument("--api-key-file", type=Path, default=None, help="file holding an API key")
    g.add_argument("--tls", action="store_true", default=None, help="TLS with the system's roots")
    g.add_argument("--ca-file", type=Path, default=None, help="PEM CA bundle to verify the scheduler")
    g.add_argument("--cert-file", type=Path, default=None, help="PEM client certificate (mTLS)")
    g.add_argument("--key-file", type=Path, default=None, help="PEM private key of --cert-file")
    g.add_argument("--config", type=Path, default=None,
                   help=f"TOML file with the same settings (default ${CONFIG_ENV} or {DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    explicit = args.config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    path = explicit or DEFAULT_CONFIG.expanduser()
    if not path.exists():
        if explicit is not None:
            raise ValueError(f"config file {path} does not exist")
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read the config file {path}: {e}") from e
    known = {"scheduler", "token_file", "api_key", "tls", "ca_file", "cert_file", "key_file"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(known))})")
    return data


def connection(args: argparse.Namespace) -> tuple[str, Any]:
    """The scheduler's address and the ClientAuth to reach it with."""
    from avatarfarm.client import ClientAuth

    conf = _config(args)
    env = os.environ

    def path(flag: Path | None, env_name: str, key: str) -> Path | None:
        value = flag or env.get(env_name) or conf.get(key)
        return Path(value).expanduser() if value else None

    # The first credential found wins: flags, then the environment, then the config file.
    token = api_key = ""
    token_file: Path | None = None
    if args.token_file is not None:
        token_file = args.token_file
    elif args.api_key_file is not None:
        try:
            api_key = args.api_key_file.read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read {args.api_key_file}: {e.strerror}") from e
    elif env.get("AVATARFARM_TOKEN_FILE"):
        token_file = Path(env["AVATARFARM_TOKEN_FILE"]).expanduser()
    elif env.get("AVATARFARM_TOKEN"):
        token = env["AVATARFARM_TOKEN"].strip()
    elif env.get("AVATARFARM_API_KEY"):
        api_key = env["AVATARFARM_API_KEY"].strip()
    elif conf.get("token_file"):
        token_file = Path(str(conf["token_file"])).expanduser()
    elif conf.get("api_key"):
        api_key = str(conf["api_key"])
    auth = ClientAuth(
        ca_file=path(args.ca_file, "AVATARFARM_CA_FILE", "ca_file"),
        cert_file=path(args.cert_file, "AVATARFARM_CERT_FILE", "cert_file"),
        key_file=path(args.key_file, "AVATARFARM_KEY_FILE", "key_file"),
        tls=bool(args.tls if args.tls is not None else conf.get("tls", False)),
        token=token, token_file=token_file, api_key=api_key)
    address = args.scheduler or env.get("AVATARFARM_SCHEDULER") or conf.get("scheduler") \
        or DEFAULT_SCHEDULER
    return str(address), auth


def call(args: argparse.Namespace, command: str,
         body: Callable[[Any], Awaitable[int]]) -> int:
    """Runs `body(channel)`; a refused call prints its status and exits with its number."""
    import grpc

    from avatarfarm.client import addresses, leader_hint

    address, auth = connection(args)
    listed = addresses(address)

    async def run(target: str) -> int:
        async with auth.channel(target) as ch:
            return await body(ch)

    target, tried = listed[0], set()
    while True:
        tried.add(target)
        try:
            return asyncio.run(run(target))
        except grpc.aio.AioRpcError as e:
            # A follower refused before doing anything, naming the leader; a scheduler not
            # reached did nothing either: the command goes to the next one.
            hint = leader_hint(e)
            untried = [a for a in listed if a not in tried]
            if hint and hint not in tried:
                target = hint
                continue
            if e.code() == grpc.StatusCode.UNAVAILABLE and not hint and untried and \
                    "failed to connect" in (e.details() or "").lower():
                target = untried[0]
                continue
            if hint and untried:
                target = untried[0]
                continue
            print(f"avatarfarm {command}: {e.code().name}: {e.details()}", file=sys.stderr)
            return int(e.code().value[0])
        except KeyboardInterrupt:
            return 130


# -- printing -----------------------------------------------------------------------------

def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[_cell(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".") if v else "0"
    return str(v)


def as_json(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def emit(args: argparse.Namespace, messages: Iterable[Any], rows: Callable[[Any], Sequence[Any]],
         header: Sequence[str], *, many: bool = True) -> None:
    messages = list(messages)
    if args.json:
        data: Any = [as_json(m) for m in messages] if many else as_json(messages[0])
        print(json.dumps(data, indent=1, sort_keys=True))
    else:
        print(table([rows(m) for m in messages], header))


def _name(enum_value: int, enum_type: Any, prefix: str) -> str:
    return enum_type.Name(enum_value).removeprefix(prefix).lower()


def session_row(s: Any) -> Sequence[Any]:
    from avatarfarm.v1 import types_pb2

    out = s.spec.output
    target = out.file_path or out.hls_dir or (out.rtmp_url.split("/")[2] if out.rtmp_url else "")
    return (s.session_id, s.spec.tenant, s.spec.room_id,
            _name(s.state, types_pb2.SessionState, "SESSION_STATE_"),
            _name(s.spec.drive_mode, types_pb2.DriveMode, "DRIVE_MODE_"),
            _name(s.spec.tier, types_pb2.Tier, "TIER_"),
            f"{s.spec.quality.width}x{s.spec.quality.height}@{s.spec.quality.fps}",
            s.worker_id or "-", round(s.progress.stream_seconds, 1), s.progress.late_frames,
            target, s.reason[:60])


SESSION_HEADER = ("SESSION", "TENANT", "ROOM", "STATE", "DRIVE", "TIER", "QUALITY", "WORKER",
                  "STREAM_S", "LATE", "OUTPUT", "REASON")


# -- rooms --------------------------------------------------------------------------------

def spec_from(args: argparse.Namespace) -> Any:
    """The room's spec from --spec (TOML or JSON) overlaid with the flags given."""
    from avatarfarm import client
    from avatarfarm.v1 import types_pb2

    data: dict[str, Any] = {}
    if args.spec is not None:
        try:
            text = args.spec.read_text()
            data = json.loads(text) if args.spec.suffix == ".json" else tomllib.loads(text)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the spec {args.spec}: {e}") from e
    for key in ("tenant", "room", "drive", "tier", "size", "fps", "seconds", "avatar", "file",
                "hls", "rtmp", "platform", "category", "language"):
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    known = {"tenant", "room", "drive", "tier", "size", "fps", "seconds", "avatar", "file", "hls",
             "rtmp", "platform", "category", "language", "script"}
    if set(data) - known:
        raise ValueError(f"unknown spec fields {', '.join(sorted(set(data) - known))} "
                         f"(known: {', '.join(sorted(known))})")
    for required in ("tenant", "room"):
        if not data.get(required):
            raise ValueError(f"a room needs --{required} (or `{required}` in --spec)")
    outputs = [k for k in ("file", "hls", "rtmp") if data.get(k)]
    if len(outputs) != 1:
        raise ValueError("give exactly one output: --file PATH, --hls DIR or --rtmp URL")
    w, _, h = str(data.get("size", "512x512")).partition("x")
    if not (w.isdigit() and (h or w).isdigit()):
        raise ValueError(f"size must be WIDTHxHEIGHT, got {data.get('size')!r}")
    drive, tier = str(data.get("drive", "text")), str(data.get("tier", "standard"))
    if drive not in DRIVES or tier not in TIERS:
        raise ValueError(f"drive is one of {', '.join(DRIVES)}; tier one of {', '.join(TIERS)}")
    script = list(script_of(data.get("script", [])))
    if args.script is not None:
        script += client.load_script(args.script)
    spec = client.spec(
        str(data["tenant"]), str(data["room"]), drive=types_pb2.DriveMode.Value(f"DRIVE_MODE_{drive.upper()}"),
        tier=types_pb2.Tier.Value(f"TIER_{tier.upper()}"), width=int(w), height=int(h or w),
        fps=int(data.get("fps", 25)), seconds=float(data.get("seconds", 0.0)),
        avatar=str(data.get("avatar", "presenter")), file_path=str(data.get("file", "")),
        hls_dir=str(data.get("hls", "")), rtmp_url=str(data.get("rtmp", "")), script=script)
    spec.platform = str(data.get("platform", ""))
    spec.product_category = str(data.get("category", ""))
    spec.language = str(data.get("language", ""))
    return spec


def script_of(items: Iterable[Any]) -> Iterable[Any]:
    from avatarfarm.v1 import types_pb2

    for item in items:
        if isinstance(item, str):
            yield types_pb2.ScriptSegment(text=item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            yield types_pb2.ScriptSegment(text=item["text"],
                                          pause_after_seconds=float(item.get("pause", 0.0)))
        else:
            raise ValueError("script entries are lines of text or {text, pause} tables")


def _rooms(args: argparse.Namespace) -> int:
    from avatarfarm import client
    from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2

    action = args.action
    if action == "create":
        request = sessions_pb2.CreateSessionRequest(spec=spec_from(args), request_id=args.request_id)

    async def body(ch: Any) -> int:
        stub = sessions_pb2_grpc.SessionServiceStub(ch)
        if action == "create":
            emit(args, [await stub.CreateSession(request)], session_row, SESSION_HEADER, many=False)
        elif action == "get":
            emit(args, [await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=args.id))],
                 session_row, SESSION_HEADER, many=False)
        elif action == "list":
            states = [types_pb2.SessionState.Value(f"SESSION_STATE_{s.upper()}") for s in args.state]
            found, token = [], ""
            while True:
                page = await stub.ListSessions(sessions_pb2.ListSessionsRequest(
                    tenant=args.tenant, states=states, page_size=500, page_token=token))
                found += page.sessions
                token = page.next_page_token
                if not token or (args.limit and len(found) >= args.limit):
                    break
            emit(args, found[:args.limit or None], session_row, SESSION_HEADER)
        elif action == "end":
            emit(args, [await stub.EndSession(sessions_pb2.EndSessionRequest(
                session_id=args.id, reason=args.reason))], session_row, SESSION_HEADER, many=False)
        elif action == "append":
            segments = [types_pb2.ScriptSegment(text=t) for t in args.text]
            if args.script is not None:
                segments += client.load_script(args.script)
            if not segments:
                raise ValueError("give --text TEXT (repeatable) or --script FILE")
            r = await stub.AppendScript(sessions_pb2.AppendScriptRequest(session_id=args.id,
                                                                         segments=segments))
            print(json.dumps(as_json(r)) if args.json else f"{r.queued_segments} segment(s) queued")
        elif action == "watch":
            async for ev in stub.WatchSession(sessions_pb2.WatchSessionRequest(session_id=args.id)):
                if args.json:
                    print(json.dumps(as_json(ev), sort_keys=True), flush=True)
                else:
                    s = ev.session
                    kind = sessions_pb2.SessionEventKind.Name(ev.kind).removeprefix(
                        "SESSION_EVENT_KIND_").lower()
                    print(f"{ev.at.ToDatetime(datetime.UTC).isoformat(timespec='seconds')} "
                          f"{kind:<10} {_name(s.state, types_pb2.SessionState, 'SESSION_STATE_'):<8} "
                          f"stream {s.progress.stream_seconds:7.1f}s late {s.progress.late_frames} "
                          f"{ev.message or s.reason}", flush=True)
        return 0

    return call(args, f"rooms {action}", body)


# -- usage and budgets --------------------------------------------------------------------

def _when(text: str, flag: str) -> Any:
    from avatarfarm.avatar_client import timestamp_of

    return timestamp_of(text, flag)


def _usage(args: argparse.Namespace) -> int:
    from google.protobuf.timestamp_pb2 import Timestamp

    from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2

    by = [d.strip() for d in args.by.split(",") if d.strip()] if args.by else []
    if set(by) - set(DIMENSIONS):
        raise ValueError(f"--by takes {', '.join(DIMENSIONS)}")
    request = sessions_pb2.GetUsageRequest(tenant=args.tenant, group_by=[
        sessions_pb2.UsageDimension.Value(f"USAGE_DIMENSION_{d.upper()}") for d in by])
    if args.hours:
        start = Timestamp()
        start.FromDatetime(datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=args.hours))
        request.start.CopyFrom(start)
    if args.start:
        request.start.CopyFrom(_when(args.start, "--start"))
    if args.end:
        request.end.CopyFrom(_when(args.end, "--end"))

    async def body(ch: Any) -> int:
        r = await sessions_pb2_grpc.SessionServiceStub(ch).GetUsage(request)
        if args.json:
            print(json.dumps(as_json(r), indent=1, sort_keys=True))
            return 0
        keys = {"tenant": lambda u: u.tenant, "tier": lambda u: _name(u.tier, types_pb2.Tier, "TIER_"),
                "avatar": lambda u: u.avatar_id, "device_type": lambda u: u.device_type,
                "platform": lambda u: u.platform}
        print(table([[*(keys[d](u) for d in by), u.sessions, round(u.stream_seconds / 3600, 3),
                      round(u.device_seconds / 3600, 3), round(u.cost, 4),
                      round(u.cost_per_stream_hour, 4)] for u in r.rows],
                    [*(d.upper() for d in by), "SESSIONS", "STREAM_H", "DEVICE_H", "COST",
                     "COST_PER_STREAM_H"]))
        return 0

    return call(args, "usage", body)


def _tenant(args: argparse.Namespace) -> int:
    from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc

    async def body(ch: Any) -> int:
        t = await sessions_pb2_grpc.SessionServiceStub(ch).GetTenant(
            sessions_pb2.GetTenantRequest(tenant=args.name))
        emit(args, [t], lambda t: (
            t.tenant, t.units_in_use, t.concurrency_budget_units or "unlimited",
            t.reserved_units_in_use, t.reserved_units, round(t.spent_this_period, 4),
            t.spend_budget or "unlimited", t.budget_policy, t.rooms_pending, t.rooms_running),
            ("TENANT", "UNITS", "UNIT_BUDGET", "RESERVED_USED", "RESERVED", "SPENT", "SPEND_BUDGET",
             "ON_EXHAUSTED", "PENDING", "RUNNING"), many=False)
        return 0

    return call(args, "tenant", body)


# -- operators ----------------------------------------------------------------------------

WORKER_HEADER = ("WORKER", "DEVICE", "ROOMS", "LOAD", "CAPACITY", "UTILISATION", "STATE", "SEEN_S_AGO")


def worker_row(w: Any) -> Sequence[Any]:
    state = (f"draining ({w.drain_seconds_left:.0f}s left: {w.drain_reason})" if w.draining
             else "accepting" if w.accepting else "full")
    return (w.worker_id, w.device_type, w.rooms, round(w.load, 2), round(w.capacity, 2),
            f"{w.utilisation:.0%}", state, round(w.seen_seconds_ago, 1))


def _workers(args: argparse.Namespace) -> int:
    from avatarfarm.v1 import admin_pb2, admin_pb2_grpc

    async def body(ch: Any) -> int:
        stub = admin_pb2_grpc.AdminServiceStub(ch)
        if args.action == "drain":
            w = await stub.DrainWorker(admin_pb2.DrainWorkerRequest(
                worker_id=args.id, deadline_seconds=args.deadline, reason=args.reason))
            emit(args, [w], worker_row, WORKER_HEADER, many=False)
        else:
            r = await stub.ListWorkers(admin_pb2.ListWorkersRequest())
            emit(args, r.workers, worker_row, WORKER_HEADER)
        return 0

    return call(args, f"workers {args.action}", body)


def _pools(args: argparse.Namespace) -> int:
    from avatarfarm.v1 import admin_pb2, admin_pb2_grpc

    async def body(ch: Any) -> int:
        r = await admin_pb2_grpc.AdminServiceStub(ch).ListPools(admin_pb2.ListPoolsRequest())
        if not r.autoscaler and not args.json:
            print("this scheduler runs no autoscaler: no pools")
            return 0
        emit(args, r.pools, lambda p: (p.pool, p.device_type, p.desired, p.ready, p.booting,
                                       p.draining, p.reason),
             ("POOL", "DEVICE", "DESIRED", "READY", "BOOTING", "DRAINING", "WHY"))
        return 0

    return call(args, "pools", body)


# -- the parser ---------------------------------------------------------------------------

def add_commands(sub: Any) -> None:
    r = sub.add_parser("rooms", help="create, list, get, watch and end rooms; append script lines",
                       description="Rooms as the tenant API sees them. " + __doc__.split("\n\n")[1])
    acts = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = acts.add_parser("create", help="admit a room, from flags or a TOML/JSON spec",
                        description="Admits a room. --spec FILE holds the same fields as the flags "
                                    "(tenant, room, drive, tier, size, fps, seconds, avatar, file | "
                                    "hls | rtmp, platform, category, language, script = [lines or "
                                    "{text, pause}]); flags given override it.")
    add_connection(c)
    c.add_argument("--spec", type=Path, default=None, help="TOML or JSON (.json) spec file")
    c.add_argument("--tenant", default=None)
    c.add_argument("--room", default=None, help="the room's id within the tenant")
    c.add_argument("--drive", choices=DRIVES, default=None, help="what drives the avatar (default text)")
    c.add_argument("--tier", choices=TIERS, default=None, help="default standard")
    c.add_argument("--size", default=None, metavar="WxH", help="frame size (default 512x512)")
    c.add_argument("--fps", type=int, default=None, help="default 25")
    c.add_argument("--seconds", type=float, default=None, help="stop after this much video (0: until ended)")
    c.add_argument("--avatar", default=None, help="avatar id (default presenter)")
    c.add_argument("--file", default=None, metavar="PATH", help="an MP4 or FLV file in your output folder")
    c.add_argument("--hls", default=None, metavar="DIR", help="an HLS folder in your output folder")
    c.add_argument("--rtmp", default=None, metavar="URL", help="an RTMP ingest")
    c.add_argument("--platform", default=None)
    c.add_argument("--category", default=None, help="product category")
    c.add_argument("--language", default=None)
    c.add_argument("--script", type=Path, default=None,
                   help="script file: one segment per line, `text | pause seconds`")
    c.add_argument("--request-id", default="", help="retry key: the same id returns the same room")
    c.set_defaults(func=_rooms)
    ls = acts.add_parser("list", help="list rooms (yours; an operator's: every tenant's)")
    add_connection(ls)
    ls.add_argument("--tenant", default="", help="one tenant (operators)")
    ls.add_argument("--state", action="append", choices=STATES, default=[], help="repeatable")
    ls.add_argument("--limit", type=int, default=0, help="at most this many (0: all)")
    ls.set_defaults(func=_rooms)
    for name, what in (("get", "one room"), ("watch", "follow a room's events until it ends"),
                       ("end", "end a room"), ("append", "queue script lines on a text room")):
        a = acts.add_parser(name, help=what)
        add_connection(a)
        a.add_argument("id", metavar="SESSION_ID")
        if name == "end":
            a.add_argument("--reason", default="", help="recorded as the room's reason")
        if name == "append":
            a.add_argument("--text", action="append", default=[], help="a line to speak (repeatable)")
            a.add_argument("--script", type=Path, default=None, help="a script file")
        a.set_defaults(func=_rooms)

    u = sub.add_parser("usage", help="stream-hours and cost by tenant, tier, avatar, device or platform")
    add_connection(u)
    u.add_argument("--tenant", default="", help="one tenant (operators; tenants see their own)")
    u.add_argument("--by", default="", help=f"comma-separated: {', '.join(DIMENSIONS)}")
    u.add_argument("--hours", type=float, default=0.0, help="the last N hours")
    u.add_argument("--start", default=None, metavar="ISO")
    u.add_argument("--end", default=None, metavar="ISO")
    u.set_defaults(func=_usage)

    t = sub.add_parser("tenant", help="a tenant's budgets, reservation and rooms")
    add_connection(t)
    t.add_argument("name", nargs="?", default="", help="the tenant (default: yours)")
    t.set_defaults(func=_tenant)

    w = sub.add_parser("workers", help="operators: list workers, drain one by hand")
    wacts = w.add_subparsers(dest="action", required=True, metavar="ACTION")
    wl = wacts.add_parser("list", help="workers with load, capacity and state")
    add_connection(wl)
    wl.set_defaults(func=_workers)
    wd = wacts.add_parser("drain", help="stop placing on a worker and hand its rooms over",
                          description="Marks the worker for removal: it takes no new rooms and "
                                      "its rooms move to other workers (HLS seamlessly) within "
                                      "--deadline. It stays marked until it registers again: "
                                      "stop it once `workers list` shows no rooms on it, or "
                                      "restart it to take rooms again.")
    add_connection(wd)
    wd.add_argument("id", metavar="WORKER_ID")
    wd.add_argument("--deadline", type=float, default=0.0,
                    help="seconds to hand its rooms over within (default 60)")
    wd.add_argument("--reason", default="", help="shown on the status page and in the logs")
    wd.set_defaults(func=_workers)

    p = sub.add_parser("pools", help="operators: the autoscaler's pools and targets")
    add_connection(p)
    p.set_defaults(func=_pools)
