"""Hypothesis against a real scheduler's gRPC handlers: SessionService calls with
arbitrary specs (extreme numbers, odd unicode, unknown enum values), random ids,
segments, filters, page tokens and usage windows, and WorkerService streams with
generated first messages. Whatever comes in, the answer is a deliberate status
(never UNKNOWN or INTERNAL, which mean a handler raised), the server keeps
answering its health check with the placement loop alive, and a refused call
leaves the sessions, as the API and the database show them, as they were.

One scheduler per service serves every example (started on a loop in its own
thread, so hypothesis drives it from plain test code)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2, workers_pb2, workers_pb2_grpc
from scheduler.server import RunningScheduler
from tests.scheduler.api.test_service import scheduler

T = TypeVar("T")
# Statuses that say a handler failed rather than refused: a fuzzed call must never get them.
CRASHES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
U32 = 2**32 - 1
I32 = (-(2**31), 2**31 - 1)
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class LoopThread:
    """An event loop on its own thread; plain code runs coroutines on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzzed-scheduler",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Served:
    thread: LoopThread
    running: RunningScheduler
    sessions: sessions_pb2_grpc.SessionServiceStub
    workers: workers_pb2_grpc.WorkerServiceStub
    health: health_pb2_grpc.HealthStub
    database: Path

    def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Runs ``make()`` on the scheduler's loop (gRPC calls bind to the loop they are
        made on) and waits for its result."""
        async def wait() -> T:
            return await make()
        return self.thread.run(wait())

    def state(self) -> tuple[Any, ...]:
        """The sessions as the API lists them and as the database holds them, and the
        workers the core knows."""
        async def listed() -> list[tuple[str, bytes, int]]:
            out, token = [], ""
            while True:
                page = await self.sessions.ListSessions(
                    sessions_pb2.ListSessionsRequest(page_size=1000, page_token=token))
                out += [(s.session_id, s.spec.SerializeToString(deterministic=True), s.state)
                        for s in page.sessions]
                if not (token := page.next_page_token):
                    return out

        async def workers() -> frozenset[str]:
            return frozenset(self.running.core.workers)

        with contextlib.closing(sqlite3.connect(self.database, timeout=10)) as db:
            rows = db.execute("SELECT session_id, request_id, spec, state FROM sessions "
                              "ORDER BY session_id").fetchall()
            scripts = db.execute("SELECT session_id, COUNT(*) FROM script_segments "
                                 "GROUP BY session_id ORDER BY session_id").fetchall()
        return self.call(listed), rows, scripts, self.call(workers)

    async def no_workers(self, timeout: float = 10.0) -> None:
        """Waits (polling, with a deadline) until the core holds no worker."""
        async with asyncio.timeout(timeout):
            while self.running.core.workers:  # noqa: ASYNC110 - the core has no event for it
                await asyncio.sleep(0.005)

    def assert_alive(self) -> None:
        async def check() -> int:
            r = await self.health.Check(health_pb2.HealthCheckRequest(service=""))
            return r.status

        assert self.call(check) == health_pb2.HealthCheckResponse.SERVING
        assert not self.running.loop_task.done(), "the placement loop died"


@contextlib.contextmanager
def served(tmp_path: Path, model_dir: Path) -> Iterator[Served]:
    thread = LoopThread()
    # No rate limit: the fuzzer calls far faster than a tenant may.
    cm = scheduler(tmp_path, model_dir, rate_limit_per_second=0.0)
    try:
        running, stub, channel = thread.run(cm.__aenter__())
        try:
            yield Served(thread, running, stub, workers_pb2_grpc.WorkerServiceStub(channel),
                         health_pb2_grpc.HealthStub(channel), tmp_path / "state.db")
        finally:
            thread.run(cm.__aexit__(None, None, None))
    finally:
        thread.close()


@pytest.fixture(scope="module")
def sessions_api(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Served]:
    with served(tmp_path_factory.mktemp("fuzz-sessions"), model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def workers_api(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Served]:
    with served(tmp_path_factory.mktemp("fuzz-workers"), model_dir) as s:
        # Rooms waiting for a worker, so fuzzed registrations are placed against.
        def waiting_room(i: int) -> sessions_pb2.CreateSessionRequest:
            return sessions_pb2.CreateSessionRequest(spec=types_pb2.SessionSpec(
                tenant="vendor", room_id=f"waiting-{i}", avatar_id="presenter",
                drive_mode=types_pb2.DRIVE_MODE_TEXT, tier=types_pb2.TIER_PREMIUM,
                quality=types_pb2.Quality(width=256, height=256, fps=25),
                output=types_pb2.Output(file_path=f"waiting-{i}.mp4")))

        for i in range(3):
            s.call(lambda i=i: s.sessions.CreateSession(waiting_room(i)))  # type: ignore[misc]
        yield s


# -- strategies ------------------------------------------------------------------------------

def texts(plain: list[str]) -> st.SearchStrategy[str]:
    """Mostly plausible values, sometimes anything: odd unicode, control characters, huge."""
    return st.one_of(
        st.sampled_from(plain),
        st.text(max_size=40),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
        st.text(alphabet="./\\~%:@\x00\n\u202e\u200b", max_size=20),
        st.integers(129, 20_000).map(lambda n: "x" * n),
    )


uint32s = st.one_of(st.sampled_from([0, 1, 2, 127, 128, 256, 511, 512, 513, 720, 1280, 3840, 3842,
                                     2**31, U32]), st.integers(0, U32))
int32s = st.one_of(st.sampled_from([0, 1, 2, 3, 4, -1, 99, *I32]), st.integers(*I32))
doubles = st.one_of(st.sampled_from([0.0, -0.0, 1.0, 2.0, -1.0, 1e-300, 1e300, 86400.0, 86401.0]),
                    st.floats(allow_nan=True, allow_infinity=True))
paths = texts(["room.mp4", "rooms/a.mp4", "show", "../x.mp4", "/etc/x.mp4", "a\\b.mp4",
               "show%d", "x.exe", "~/x.mp4", ""])
urls = texts(["rtmp://127.0.0.1:1935/live/k", "rtmp://169.254.169.254/live/k", "rtmp://2852039166/l/k",
              "rtmp://[::1]/live/k", "http://x/y", "rtmp://u@h/a/b", "rtmp://h"])
outputs = st.one_of(
    st.just(None), st.builds(types_pb2.Output),
    st.builds(types_pb2.Output, file_path=paths), st.builds(types_pb2.Output, hls_dir=paths),
    st.builds(types_pb2.Output, rtmp_url=urls))
segments = st.lists(st.builds(types_pb2.ScriptSegment, text=texts(["hello", " ", "", "a\x07b"]),
                              pause_after_seconds=doubles), max_size=4)


SPEC_FIELDS = ("tenant", "room_id", "avatar_id", "drive_mode", "tier", "quality", "output",
               "max_duration_seconds", "script")


@st.composite
def specs(draw: st.DrawFn) -> types_pb2.SessionSpec:
    """A valid spec with a few fields (often none) replaced by anything at all, so calls
    are admitted often enough to give later calls state to act on."""
    bad = draw(st.sets(st.sampled_from(SPEC_FIELDS), max_size=3))
    room = draw(st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True))
    drive = draw(st.sampled_from([types_pb2.DRIVE_MODE_TEXT, types_pb2.DRIVE_MODE_VOICE,
                                  types_pb2.DRIVE_MODE_MOCAP]))
    w, h, fps = draw(st.sampled_from([(256, 256, 25), (512, 512, 30), (1280, 720, 25), (128, 3840, 1)]))
    spec = types_pb2.SessionSpec(
        tenant=draw(st.sampled_from(["vendor", "other"])), room_id=room, avatar_id="presenter",
        drive_mode=drive, tier=draw(st.integers(0, 3)),  # type: ignore[arg-type]
        quality=types_pb2.Quality(width=w, height=h, fps=fps),
        max_duration_seconds=draw(st.sampled_from([0.0, 2.0, 3600.0])))
    spec.output.CopyFrom(draw(st.sampled_from([
        types_pb2.Output(file_path=f"{room}.mp4"), types_pb2.Output(hls_dir=f"hls/{room}"),
        types_pb2.Output(rtmp_url=f"rtmp://127.0.0.1:1935/live/{room}")])))
    if drive == types_pb2.DRIVE_MODE_TEXT:
        spec.script.extend(draw(st.lists(st.builds(types_pb2.ScriptSegment, text=st.just("hello"),
                                                   pause_after_seconds=st.just(0.5)), max_size=2)))
    for name in bad:
        if name in ("tenant", "room_id", "avatar_id"):
            setattr(spec, name, draw(texts(["", "presenter"])))
        elif name in ("drive_mode", "tier"):
            setattr(spec, name, draw(int32s))
        elif name == "max_duration_seconds":
            spec.max_duration_seconds = draw(doubles)
        elif name == "script":
            spec.ClearField("script")
            spec.script.extend(draw(segments))
        elif name == "quality":
            spec.ClearField("quality")
            if draw(st.booleans()):
                spec.quality.CopyFrom(types_pb2.Quality(width=draw(uint32s), height=draw(uint32s),
                                                        fps=draw(uint32s)))
        else:
            spec.ClearField("output")
            out = draw(outputs)
            if out is not None:
                spec.output.CopyFrom(out)
    return spec


def timestamps() -> st.SearchStrategy[Timestamp | None]:
    return st.one_of(st.none(), st.builds(
        Timestamp, seconds=st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(0, 4_000_000_000)),
        nanos=st.one_of(st.integers(0, 999_999_999), st.integers(*I32))))


@st.composite
def session_calls(draw: st.DrawFn, known: list[str]) -> tuple[str, Any]:
    # The draw does not depend on what exists (hypothesis replays draws), only its value.
    ids = st.integers(0, 2**16).map(lambda i: known[i % len(known)] if known else "missing") | texts(
        ["", "missing", "0" * 32])
    kind = draw(st.sampled_from(["create", "create", "create", "get", "end", "watch", "append",
                                 "list", "usage", "tenant"]))
    if kind == "create":
        return kind, sessions_pb2.CreateSessionRequest(
            spec=draw(specs()), request_id=draw(texts(["", "req-1", "req-2"])))
    if kind == "get":
        return kind, sessions_pb2.GetSessionRequest(session_id=draw(ids))
    if kind == "end":
        return kind, sessions_pb2.EndSessionRequest(session_id=draw(ids), reason=draw(texts(["", "bye"])))
    if kind == "watch":
        return kind, sessions_pb2.WatchSessionRequest(session_id=draw(ids))
    if kind == "append":
        return kind, sessions_pb2.AppendScriptRequest(session_id=draw(ids), segments=draw(segments))
    if kind == "list":
        return kind, sessions_pb2.ListSessionsRequest(
            tenant=draw(texts(["", "vendor"])), states=draw(st.lists(int32s, max_size=4)),  # type: ignore[arg-type]
            page_size=draw(uint32s), page_token=draw(texts(["", "1", "-1", "9" * 5000, "١٢", " 3 "])))
    if kind == "usage":
        req = sessions_pb2.GetUsageRequest(tenant=draw(texts(["", "vendor"])),
                                           group_by=draw(st.lists(int32s, max_size=5)))  # type: ignore[arg-type]
        for name in ("start", "end"):
            ts = draw(timestamps())
            if ts is not None:
                getattr(req, name).CopyFrom(ts)
        return kind, req
    return kind, sessions_pb2.GetTenantRequest(tenant=draw(texts(["vendor", "", "nobody"])))


async def _call(stub: sessions_pb2_grpc.SessionServiceStub, kind: str, req: Any) -> Any:
    if kind == "watch":
        call = stub.WatchSession(req)
        try:
            return await asyncio.wait_for(call.read(), 10)  # the current state, first
        finally:
            call.cancel()
    method = {"create": stub.CreateSession, "get": stub.GetSession, "end": stub.EndSession,
              "append": stub.AppendScript, "list": stub.ListSessions, "usage": stub.GetUsage,
              "tenant": stub.GetTenant}[kind]
    return await asyncio.wait_for(method(req), 10)


def finite_usage(api: Served) -> None:
    """Nothing a caller sent made the ledger's figures NaN or infinite."""
    usage = api.call(lambda: api.sessions.GetUsage(sessions_pb2.GetUsageRequest(
        group_by=[sessions_pb2.USAGE_DIMENSION_TENANT])))
    for row in usage.rows:
        for value in (row.stream_seconds, row.device_seconds, row.cost, row.cost_per_stream_hour,
                      row.compute_unit_seconds):
            assert math.isfinite(value), row


# -- the tests -------------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_session_calls_are_answered_deliberately_and_refusals_change_nothing(
        sessions_api: Served, data: st.DataObject) -> None:
    api = sessions_api
    known = [sid for sid, _spec, _state in api.state()[0]]
    kind, req = data.draw(session_calls(known), label="call")
    before = api.state()
    try:
        api.call(lambda: _call(api.sessions, kind, req))
        event(f"{kind}: OK")
    except grpc.aio.AioRpcError as e:
        event(f"{kind}: {e.code().name}")
        assert e.code() not in CRASHES, (kind, e.code(), e.details())
        assert e.details(), "a refusal says why"
        assert len(e.details() or "") <= 2048, "a refusal does not echo a huge input back"
        assert api.state() == before, f"a refused {kind} changed state"
    api.assert_alive()


def worker_messages() -> st.SearchStrategy[workers_pb2.WorkerMessage]:
    profile = st.builds(
        workers_pb2.LatencyProfile, stage=int32s, model=texts(["m"]), width=uint32s, height=uint32s,
        latencies=st.lists(st.builds(workers_pb2.BatchLatency, batch_size=uint32s, seconds=doubles),
                           max_size=4))
    register = st.builds(
        workers_pb2.Register,
        worker_id=texts(["w1", "w2", ""]), input_endpoint=texts(["127.0.0.1:1", ""]),
        device=st.builds(workers_pb2.Device, provider=texts(["CPUExecutionProvider"]),
                         device_type=texts(["cpu", "h200", ""]), cpu_cores=uint32s,
                         latency_budget_seconds=doubles,
                         memory_bytes=st.one_of(st.just(0), st.integers(0, 2**64 - 1))),
        profiles=st.lists(profile, max_size=5), avatars=st.lists(texts(["presenter"]), max_size=3),
        memory=st.builds(workers_pb2.MemoryProfile, models_bytes=st.integers(0, 2**64 - 1),
                         avatar_bytes_per_pixel=doubles, room_bytes_per_pixel=doubles),
        warm_avatars=st.lists(texts(["presenter"]), max_size=2),
        usage_epoch=st.integers(0, 2**64 - 1))
    progress = st.builds(types_pb2.SessionProgress, frames_rendered=st.integers(0, 2**64 - 1),
                         late_frames=st.integers(0, 2**64 - 1), stream_seconds=doubles,
                         device_seconds=doubles)
    update = st.builds(workers_pb2.SessionUpdate, session_id=texts(["missing"]), state=int32s,
                       reason=texts([""]), progress=progress)
    plain_register = st.builds(
        workers_pb2.Register, worker_id=st.sampled_from(["w1", "w2"]),
        input_endpoint=st.just("127.0.0.1:1"), avatars=st.just(["presenter"]),
        device=st.builds(workers_pb2.Device, provider=st.just("CPUExecutionProvider"),
                         device_type=st.just("cpu"), latency_budget_seconds=st.just(0.2)),
        profiles=st.lists(profile, max_size=5), usage_epoch=st.integers(1, 10))
    return st.one_of(
        st.builds(workers_pb2.WorkerMessage),
        st.builds(workers_pb2.WorkerMessage, register=register),
        st.builds(workers_pb2.WorkerMessage, register=plain_register),
        st.builds(workers_pb2.WorkerMessage, register=plain_register),
        st.builds(workers_pb2.WorkerMessage, heartbeat=st.builds(
            workers_pb2.Heartbeat, active_sessions=uint32s, load=doubles)),
        st.builds(workers_pb2.WorkerMessage, session_update=update),
        st.builds(workers_pb2.WorkerMessage, usage_report=st.builds(
            workers_pb2.UsageReport, seq=st.integers(0, 2**64 - 1), updates=st.lists(update, max_size=3))),
        st.builds(workers_pb2.WorkerMessage, profile_update=st.builds(
            workers_pb2.ProfileUpdate, profiles=st.lists(profile, max_size=3))))


async def _connect(stub: workers_pb2_grpc.WorkerServiceStub, messages: list[workers_pb2.WorkerMessage]
                   ) -> tuple[list[str], grpc.StatusCode, str]:
    """Sends the first message and waits for the answer (a refusal ends the call, and a
    client still writing then would fail its own write and see INTERNAL), then the rest;
    closes its side, reads what comes back until the end, and returns it with the
    server's final status."""
    call = stub.Connect()
    got: list[str] = []
    async with asyncio.timeout(15):
        with contextlib.suppress(grpc.aio.AioRpcError):
            if messages:
                await call.write(messages[0])
                first = await call.read()
                if first is grpc.aio.EOF:
                    return got, await call.code(), await call.details()
                got.append(first.WhichOneof("kind") or "")
                for m in messages[1:]:
                    await call.write(m)
            await call.done_writing()
            while (msg := await call.read()) is not grpc.aio.EOF:
                got.append(msg.WhichOneof("kind") or "")
        return got, await call.code(), await call.details()


@FUZZ
@given(first=worker_messages(), rest=st.lists(worker_messages(), max_size=3),
       empty=st.booleans())
def test_worker_streams_are_answered_deliberately(workers_api: Served, first: workers_pb2.WorkerMessage,
                                                  rest: list[workers_pb2.WorkerMessage],
                                                  empty: bool) -> None:
    api = workers_api
    api.call(api.no_workers)  # the previous example's stream has been let go
    messages = [] if empty else [first, *rest]
    before = api.state()
    got, code, details = api.call(lambda: _connect(api.workers, messages))
    event(code.name)
    assert code not in CRASHES, (code, details)
    if code is grpc.StatusCode.OK:
        assert got[:1] == ["registered"], got  # accepted: the first answer says so
    else:
        assert details, "a refusal says why"
        if "registered" not in got:
            # Refused before registering: no worker joined and no session moved.
            after = api.state()
            assert after[3] == before[3] and after[1] == before[1]
    api.assert_alive()
    finite_usage(api)
