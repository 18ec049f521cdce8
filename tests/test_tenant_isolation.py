"""A generated matrix of one tenant's attempts on another's rooms: every API call on
them, every output kind and spelling of a path into the other's folder, every live
input with every token that is not the room's own. None is accepted, and nothing of
the other tenant's changes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from avatarfarm import client
from avatarfarm.domain import DriveMode, InvalidRequest, Output, OutputKind, Quality
from avatarfarm.input_tokens import mint, room_key
from avatarfarm.v1 import live_input_pb2, live_input_pb2_grpc, sessions_pb2, sessions_pb2_grpc, types_pb2
from scheduler.api import auth
from scheduler.api.auth import SubjectKind
from scheduler.config import SchedulerConfig
from scheduler.policy.tenants import TenantConfig
from scheduler.server import start
from tests.builders import make_spec
from tests.scheduler.api.test_service import ProtocolWorker
from workers.agent.agent import assignment_from_pb
from workers.device.pipeline import Pipeline
from workers.output.targets import OutputError, OutputTarget, tenant_root
from workers.rooms.live_input import SERVER_OPTIONS, LiveInputService
from workers.rooms.room import Pacing, Room

KEY = b"isolation-test-signing-key-0123456789"
A, B = "brand-a", "brand-b"
API_KEYS = {A: "key-of-brand-a-0123456789", B: "key-of-brand-b-0123456789"}
B_OUTPUTS = {"file": "show.mp4", "hls": "live/show"}

# Ways to spell a path that leads out of a tenant's folder, into another's or above.
ESCAPES = [
    "../@{t}/{p}", "@{t}/{p}", "../../@{t}/{p}", "./../@{t}/{p}", "a/../../@{t}/{p}",
    "%2e%2e/@{t}/{p}", "..%2f@{t}%2f{p}", "%40{t}/{p}", "..\\@{t}\\{p}", "/{p}", "//{p}",
    "~/{p}", "../{p}", "..", ".", "a/..", "{p}/..", "@{t}", "{p}\x00", "../@{t}/../@{t}/{p}",
    " ../@{t}/{p}", "..;/@{t}/{p}", "\u2025/@{t}/{p}", "..\u2215@{t}\u2215{p}", "a/./../../{p}",
]


def token(kind: SubjectKind, name: str, ttl: float = 600) -> str:
    return auth.mint_token(KEY, kind, name, ttl_seconds=ttl, now=time.time())


def credentials(tenant: str) -> list[client.ClientAuth]:
    return [client.ClientAuth(token=token(SubjectKind.TENANT, tenant)),
            client.ClientAuth(api_key=API_KEYS[tenant])]


# -- the output namespace, as the worker resolves it (no scheduler in the way) -----------

TENANTS = ["brand-a", "brand-b", "a", "a.b", "a:b", "A", "-", "_x", "a..b", "b-"]
PATHS = ["show.mp4", "live/show", "x/y/z.mp4", "a.b/c.flv", "show.1.mp4"]


def test_no_tenant_resolves_into_another_tenants_folder(tmp_path: Path) -> None:
    cases = 0
    for x, y in itertools.permutations(TENANTS, 2):
        theirs = tenant_root(tmp_path, y).resolve()
        for kind, path in itertools.product((OutputKind.FILE, OutputKind.HLS), PATHS + ESCAPES):
            value = path.format(t=y, p="show.mp4")
            if kind is OutputKind.HLS and value.endswith(".mp4"):
                value = value[:-4]
            spec = make_spec("r", tenant=x, output=Output(kind, value))
            try:
                target = assignment_from_pb(assign(spec), tmp_path, _egress()).target
            except (OutputError, InvalidRequest):
                cases += 1
                continue
            where = Path(target.location).resolve()
            assert where.is_relative_to(tenant_root(tmp_path, x).resolve()), (x, value, where)
            assert not where.is_relative_to(theirs), (x, y, value, where)
            cases += 1
    assert cases >= 1000, cases


def assign(spec: Any) -> Any:
    from avatarfarm import convert
    from avatarfarm.v1 import workers_pb2

    return workers_pb2.Assign(session_id="s", spec=convert.spec_to_pb(spec), epoch=1)


def _egress() -> Any:
    from avatarfarm.egress import EgressPolicy

    return EgressPolicy()


# -- the API, on a real scheduler with tenant credentials -----------------------------------

@contextlib.asynccontextmanager
async def farm(tmp_path: Path, model_dir: Path) -> AsyncIterator[tuple[Any, grpc.aio.Channel]]:
    secret = tmp_path / "token.key"
    secret.write_bytes(KEY)
    conf = SchedulerConfig(
        listen="127.0.0.1:0", metrics_port=0, database=tmp_path / "state.db",
        avatar_dir=model_dir / "avatars", token_secret_file=secret, rate_limit_per_second=0,
        tenants={t: TenantConfig(api_keys_sha256=[auth.hash_api_key(k)]) for t, k in API_KEYS.items()})
    running = await start(conf)
    worker_channel = client.ClientAuth(token=token(SubjectKind.WORKER, "w1")).channel(
        f"127.0.0.1:{running.port}")
    try:
        yield running, worker_channel
    finally:
        await worker_channel.close()
        await running.stop(grace=0.1)


async def refusal(call: Callable[[], Awaitable[Any]]) -> grpc.StatusCode | None:
    """The status a call was refused with, or None if it was accepted."""
    try:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                return None
            return None
        await result
    except grpc.aio.AioRpcError as e:
        return e.code()
    return None


def test_no_api_call_of_one_tenant_reaches_anothers_rooms(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as (running, worker_channel):
            address = f"127.0.0.1:{running.port}"
            worker = ProtocolWorker(worker_channel, "w1")
            await worker.next("registered")
            async with client.ClientAuth(api_key=API_KEYS[B]).channel(address) as ch:
                b = sessions_pb2_grpc.SessionServiceStub(ch)
                rooms = []
                for i, (drive, out) in enumerate(itertools.product(
                        (types_pb2.DRIVE_MODE_TEXT, types_pb2.DRIVE_MODE_VOICE),
                        ({"file_path": B_OUTPUTS["file"]}, {"hls_dir": B_OUTPUTS["hls"]},
                         {"rtmp_url": "rtmp://ingest.example/live/b-key"}))):
                    kw = dict(out)
                    kw = {k: (v if i < 3 else v.replace("show", "show2").replace("b-key", "b-key2"))
                          for k, v in kw.items()}
                    rooms.append(await b.CreateSession(sessions_pb2.CreateSessionRequest(
                        spec=client.spec(B, f"b-room-{i}", drive=drive, seconds=0.0, **kw))))
                for s in rooms:  # placed and quiet: nothing of theirs changes from here on
                    await client.wait_for(b, s.session_id,
                                          lambda x: x.state == types_pb2.SESSION_STATE_PLACED, 30)
                before = {s.session_id: await b.GetSession(sessions_pb2.GetSessionRequest(
                    session_id=s.session_id)) for s in rooms}

                guessed = [uuid.uuid4().hex for _ in range(3)]
                total = 0
                for cred in credentials(A):
                    cases: list[tuple[str, grpc.StatusCode, Callable[[], Any]]] = []
                    ach = cred.channel(address)
                    a = sessions_pb2_grpc.SessionServiceStub(ach)
                    for sid in [*before, *guessed]:
                        for name, call in (
                            ("get", lambda a=a, sid=sid: a.GetSession(
                                sessions_pb2.GetSessionRequest(session_id=sid))),
                            ("end", lambda a=a, sid=sid: a.EndSession(
                                sessions_pb2.EndSessionRequest(session_id=sid, reason="taken"))),
                            ("append", lambda a=a, sid=sid: a.AppendScript(
                                sessions_pb2.AppendScriptRequest(session_id=sid, segments=[
                                    types_pb2.ScriptSegment(text="hijacked")]))),
                            ("watch", lambda a=a, sid=sid: a.WatchSession(
                                sessions_pb2.WatchSessionRequest(session_id=sid))),
                        ):
                            cases.append((f"{name} {sid}", grpc.StatusCode.NOT_FOUND, call))
                    # In the other tenant's name: create, list, usage, budgets.
                    for i, out in enumerate(({"file_path": "x.mp4"}, {"hls_dir": "x"},
                                             {"rtmp_url": "rtmp://ingest.example/live/a"})):
                        cases.append((f"create as {B} {out}", grpc.StatusCode.PERMISSION_DENIED,
                                      lambda a=a, i=i, out=out: a.CreateSession(
                                          sessions_pb2.CreateSessionRequest(spec=client.spec(
                                              B, f"a-as-b-{i}", seconds=1.0, **out)))))
                    cases += [
                        ("list", grpc.StatusCode.PERMISSION_DENIED, lambda a=a: a.ListSessions(
                            sessions_pb2.ListSessionsRequest(tenant=B))),
                        ("usage", grpc.StatusCode.PERMISSION_DENIED, lambda a=a: a.GetUsage(
                            sessions_pb2.GetUsageRequest(tenant=B))),
                        ("budget", grpc.StatusCode.PERMISSION_DENIED, lambda a=a: a.GetTenant(
                            sessions_pb2.GetTenantRequest(tenant=B))),
                    ]
                    # Its own rooms, with outputs spelled to reach the other's folder.
                    for k, ((kind, path), escape) in enumerate(
                            itertools.product(B_OUTPUTS.items(), ESCAPES)):
                        value = escape.format(t=B, p=path)
                        out = {"file_path": value} if kind == "file" else {"hls_dir": value}
                        cases.append((f"create {kind} {value!r}", grpc.StatusCode.INVALID_ARGUMENT,
                                      lambda a=a, out=out, k=k: a.CreateSession(
                                          sessions_pb2.CreateSessionRequest(spec=client.spec(
                                              A, f"a-room-{k}", seconds=1.0, **out)))))
                    accepted = []
                    for what, expected, call in cases:
                        got = await refusal(call)
                        if got != expected:
                            accepted.append((what, expected, got))
                    await ach.close()
                    assert not accepted, accepted[:10]
                    total += len(cases)
                assert total >= 150
                # Nothing of the other tenant's changed; the attacker has no room.
                for sid, was in before.items():
                    now = await b.GetSession(sessions_pb2.GetSessionRequest(session_id=sid))
                    assert (now.state, now.updated_at, now.spec) == (was.state, was.updated_at, was.spec)
                async with client.ClientAuth(api_key=API_KEYS[A]).channel(address) as ach:
                    mine = await sessions_pb2_grpc.SessionServiceStub(ach).ListSessions(
                        sessions_pb2.ListSessionsRequest())
                    assert not mine.sessions
                # No script reached the worker for the other's rooms.
                while not worker.inbox.empty():
                    assert worker.inbox.get_nowait().WhichOneof("kind") != "script"
            await worker.close()

    asyncio.run(asyncio.wait_for(body(), 120))


# -- live inputs, on a real LiveInputService ------------------------------------------------

SECRET = b"the scheduler's live-input secret, 32+"


def test_no_token_but_the_rooms_own_feeds_it(pipeline: Pipeline, tmp_path: Path) -> None:
    def room(tenant: str, sid: str, drive: DriveMode) -> Room:
        spec = replace(make_spec(sid, tenant=tenant, quality=Quality(256, 256, 25)), drive_mode=drive)
        target = OutputTarget.resolve(OutputKind.FILE, f"{sid}.mp4", tenant_root(tmp_path, tenant))
        return Room(sid, spec, target, pipeline, pacing=Pacing.REALTIME,
                    input_key=room_key(SECRET, sid))

    rooms = {sid: room(t, sid, d) for t, sid, d in (
        (A, "a-voice", DriveMode.VOICE), (A, "a-mocap", DriveMode.MOCAP),
        (B, "b-voice", DriveMode.VOICE), (B, "b-mocap", DriveMode.MOCAP),
        (B, "b-voice-2", DriveMode.VOICE))}
    now = time.time()
    tokens = {
        **{f"own token of {sid}": mint(room_key(SECRET, sid), sid, r.spec.tenant, now=now).token
           for sid, r in rooms.items()},
        "forged (other secret)": mint(room_key(b"x" * 40, "b-voice"), "b-voice", B, now=now).token,
        "room named in claims, signed for another": mint(room_key(SECRET, "a-voice"), "b-voice",
                                                         B, now=now).token,
        "expired of another room": mint(room_key(SECRET, "a-voice"), "a-voice", A, ttl=1,
                                        now=now - 60).token,
        "tenant token": token(SubjectKind.TENANT, B),
        "admin token": token(SubjectKind.ADMIN, "ops"),
        "garbage": "afi1.x.y", "empty": "",
    }

    async def body() -> None:
        server = grpc.aio.server(options=list(SERVER_OPTIONS))
        live_input_pb2_grpc.add_LiveInputServiceServicer_to_server(LiveInputService(rooms.get), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        cases = accepted = 0
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = live_input_pb2_grpc.LiveInputServiceStub(ch)
                for target, (what, tok) in itertools.product(rooms, tokens.items()):
                    if what in (f"own token of {target}", "expired of another room") and \
                            (what != "expired of another room" or target == "a-voice"):
                        continue  # the room's own token (fresh or expired) is not an attack
                    metadata = (("authorization", f"Bearer {tok}"),) if tok else ()
                    for method in ("audio", "motion"):
                        async def one(method: str = method, target: str = target) -> AsyncIterator[Any]:
                            if method == "audio":
                                yield live_input_pb2.AudioChunk(session_id=target, sample_rate=16000,
                                                                pcm_s16le=b"\1\0" * 160)
                            else:
                                yield live_input_pb2.MotionFrame(session_id=target,
                                                                 coefficients=[0.5] * 8)
                        call = stub.PushAudio if method == "audio" else stub.PushMotion
                        code = await refusal(lambda call=call, one=one, metadata=metadata:
                                             call(one(), metadata=metadata))
                        cases += 1
                        accepted += code is None
                        assert code == grpc.StatusCode.NOT_FOUND, (target, what, method, code)
        finally:
            await server.stop(0)
        assert cases >= 100 and accepted == 0
        for r in rooms.values():  # nothing reached any room's buffers
            assert r.audio_in.buffered == 0 and r.motion_in.buffered == 0

    asyncio.run(body())
