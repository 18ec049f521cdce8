"""The scheduler's gRPC API on a real server and port: statuses for bad input,
idempotency, persistence across a restart, and the worker protocol (driven by a
protocol-level test client that registers and reports like a worker)."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2, workers_pb2, workers_pb2_grpc
from scheduler.api.follower import REPLICA_HEALTH
from scheduler.config import SchedulerConfig
from scheduler.server import RunningScheduler, start
from scheduler.state.postgres import PostgresStore
from scheduler.state.store import SqliteStore


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 60))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def scheduler(tmp_path: Path, model_dir: Path, **kw: Any) -> AsyncIterator[
        tuple[RunningScheduler, sessions_pb2_grpc.SessionServiceStub, grpc.aio.Channel]]:
    conf = SchedulerConfig(**{"listen": "127.0.0.1:0", "metrics_port": -1,
                              "database": tmp_path / "state.db",
                              "avatar_dir": model_dir / "avatars", **kw})
    running = await start(conf)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield running, sessions_pb2_grpc.SessionServiceStub(channel), channel
    finally:
        await channel.close()
        await running.stop(grace=0.1)


def create_req(room_id: str = "room-1", request_id: str = "", **kw: Any) -> sessions_pb2.CreateSessionRequest:
    kw.setdefault("file_path", f"{room_id}.mp4")
    kw.setdefault("seconds", 2.0)
    return sessions_pb2.CreateSessionRequest(spec=client.spec("vendor", room_id, **kw),
                                             request_id=request_id)


async def expect_status(code: grpc.StatusCode, call: Awaitable[Any]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    return err.value.details() or ""


class ProtocolWorker:
    """Speaks the worker protocol over a real stream, rendering nothing."""

    def __init__(self, channel: grpc.aio.Channel, worker_id: str, render_seconds: float = 0.004,
                 active: tuple[tuple[str, int], ...] = (),
                 tweak: Callable[[workers_pb2.Register], None] = lambda reg: None) -> None:
        self.worker_id = worker_id
        self.tweak = tweak  # changes what the worker says of itself
        self.active = active
        self.epochs: dict[str, int] = dict(active)  # session -> assignment it renders under
        self.outbox: asyncio.Queue[workers_pb2.WorkerMessage | None] = asyncio.Queue()
        self.inbox: asyncio.Queue[workers_pb2.SchedulerMessage] = asyncio.Queue()
        self.render_seconds = render_seconds
        self._call = workers_pb2_grpc.WorkerServiceStub(channel).Connect(self._out())
        self._reader = asyncio.create_task(self._read())

    def _register(self) -> workers_pb2.WorkerMessage:
        def prof(stage: int, w: int, h: int, s: float) -> workers_pb2.LatencyProfile:
            return workers_pb2.LatencyProfile(stage=stage, width=w, height=h,  # type: ignore[arg-type]
                                              latencies=[workers_pb2.BatchLatency(batch_size=1, seconds=s)])
        msg = workers_pb2.WorkerMessage(register=workers_pb2.Register(
            worker_id=self.worker_id, input_endpoint="127.0.0.1:1",
            active_rooms=[workers_pb2.ActiveRoom(session_id=sid, epoch=e) for sid, e in self.active],
            usage_epoch=1,
            device=workers_pb2.Device(provider="CPUExecutionProvider", device_type="cpu",
                                      latency_budget_seconds=0.2),
            profiles=[prof(workers_pb2.STAGE_RENDER, 512, 512, self.render_seconds),
                      prof(workers_pb2.STAGE_ENCODE, 512, 512, 0.001),
                      prof(workers_pb2.STAGE_AUDIO_TO_MOTION, 0, 0, 0.0005),
                      prof(workers_pb2.STAGE_TTS, 0, 0, 0.01)]))
        self.tweak(msg.register)
        return msg

    async def _out(self) -> AsyncIterator[workers_pb2.WorkerMessage]:
        yield self._register()
        while (msg := await self.outbox.get()) is not None:
            yield msg

    async def _read(self) -> None:
        async for msg in self._call:
            if msg.WhichOneof("kind") == "assign":
                self.epochs[msg.assign.session_id] = msg.assign.epoch
            await self.inbox.put(msg)

    async def next(self, kind: str) -> workers_pb2.SchedulerMessage:
        while True:
            msg = await asyncio.wait_for(self.inbox.get(), 10)
            if msg.WhichOneof("kind") == kind:
                return msg

    def usage(self, seq: int, rooms: list[tuple[str, int, float]]) -> None:
        """One numbered usage report: (session, frames so far, device seconds so far) per room."""
        self.outbox.put_nowait(workers_pb2.WorkerMessage(usage_report=workers_pb2.UsageReport(
            seq=seq, updates=[workers_pb2.SessionUpdate(
                session_id=sid, state=types_pb2.SESSION_STATE_RUNNING, epoch=self.epochs.get(sid, 1),
                progress=types_pb2.SessionProgress(frames_rendered=frames, stream_seconds=frames / 25,
                                                   device_seconds=device))
                for sid, frames, device in rooms])))

    def report(self, sid: str, state: int, frames: int = 0, device: float = 0.0, reason: str = "",
               **sync: float) -> None:
        self.outbox.put_nowait(workers_pb2.WorkerMessage(session_update=workers_pb2.SessionUpdate(
            session_id=sid, state=state, reason=reason, epoch=self.epochs.get(sid, 1),  # type: ignore[arg-type]
            progress=types_pb2.SessionProgress(frames_rendered=frames, stream_seconds=frames / 25,
                                               device_seconds=device, **sync))))

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        self._call.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


def test_bad_requests_get_precise_statuses_and_change_nothing(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, stub, _ch):
            cases = [
                (grpc.StatusCode.NOT_FOUND, create_req(avatar="nobody")),
                (grpc.StatusCode.INVALID_ARGUMENT, create_req(width=100000, height=512)),
                (grpc.StatusCode.INVALID_ARGUMENT, create_req(width=513, height=512)),
                (grpc.StatusCode.INVALID_ARGUMENT, create_req(fps=0)),
                (grpc.StatusCode.INVALID_ARGUMENT, create_req(fps=240)),
                (grpc.StatusCode.INVALID_ARGUMENT, create_req(file_path="../../etc/passwd.mp4")),
                (grpc.StatusCode.INVALID_ARGUMENT, create_req(file_path="/abs/x.mp4")),
                (grpc.StatusCode.INVALID_ARGUMENT, create_req(file_path="x.exe")),
                (grpc.StatusCode.INVALID_ARGUMENT, create_req(file_path="", rtmp_url="http://x/y")),
                (grpc.StatusCode.INVALID_ARGUMENT, create_req(seconds=-1.0)),
                (grpc.StatusCode.INVALID_ARGUMENT, create_req(room_id="bad room/id")),
                (grpc.StatusCode.INVALID_ARGUMENT, create_req(drive=types_pb2.DRIVE_MODE_MOCAP,
                                                              script=[types_pb2.ScriptSegment(text="hi")])),
            ]
            for code, req in cases:
                details = await expect_status(code, stub.CreateSession(req))
                assert details  # every refusal says why
            assert "nobody" in await expect_status(grpc.StatusCode.NOT_FOUND,
                                                   stub.CreateSession(create_req(avatar="nobody")))
            listed = await stub.ListSessions(sessions_pb2.ListSessionsRequest())
            assert list(listed.sessions) == []
            await expect_status(grpc.StatusCode.NOT_FOUND,
                                stub.GetSession(sessions_pb2.GetSessionRequest(session_id="missing")))
            await expect_status(grpc.StatusCode.NOT_FOUND,
                                stub.EndSession(sessions_pb2.EndSessionRequest(session_id="missing")))

    run(body)


def test_retries_are_idempotent_and_rooms_are_unique(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, stub, _ch):
            a = await stub.CreateSession(create_req("r1", request_id="req-1"))
            b = await stub.CreateSession(create_req("r1", request_id="req-1"))
            assert a.session_id == b.session_id
            assert a.state == types_pb2.SESSION_STATE_PENDING
            assert "no worker" in a.reason
            # Same key, different request: refused, not silently merged.
            await expect_status(grpc.StatusCode.ALREADY_EXISTS,
                                stub.CreateSession(create_req("r1", request_id="req-1", fps=30)))
            # The same room cannot stream twice, nor two rooms into one output.
            await expect_status(grpc.StatusCode.ALREADY_EXISTS,
                                stub.CreateSession(create_req("r1", request_id="req-2")))
            assert "in use" in await expect_status(grpc.StatusCode.ALREADY_EXISTS, stub.CreateSession(
                create_req("r2", file_path="r1.mp4")))
            # Another tenant's "r1.mp4" is in that tenant's own folder: no conflict. An RTMP
            # ingest is one place whoever names it.
            other = sessions_pb2.CreateSessionRequest(spec=client.spec(
                "other-brand", "r1", file_path="r1.mp4", seconds=2.0))
            assert (await stub.CreateSession(other)).state == types_pb2.SESSION_STATE_PENDING
            url = "rtmp://ingest.example/live/k"
            await stub.CreateSession(create_req("r3", file_path="", rtmp_url=url))
            assert "in use" in await expect_status(grpc.StatusCode.ALREADY_EXISTS, stub.CreateSession(
                sessions_pb2.CreateSessionRequest(spec=client.spec(
                    "other-brand", "r3", rtmp_url=url, seconds=2.0))))
            ended = await stub.EndSession(sessions_pb2.EndSessionRequest(session_id=a.session_id))
            again = await stub.EndSession(sessions_pb2.EndSessionRequest(session_id=a.session_id))
            assert ended.state == again.state == types_pb2.SESSION_STATE_ENDED
            assert ended.updated_at == again.updated_at
            # Once ended, the room id is free again.
            c = await stub.CreateSession(create_req("r1", request_id="req-3"))
            assert c.session_id != a.session_id

    run(body)


def test_list_pages_and_filters(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, stub, _ch):
            ids = [(await stub.CreateSession(create_req(f"r{i}"))).session_id for i in range(5)]
            await stub.EndSession(sessions_pb2.EndSessionRequest(session_id=ids[0]))
            seen: list[str] = []
            token = ""
            while True:
                page = await stub.ListSessions(sessions_pb2.ListSessionsRequest(page_size=2, page_token=token))
                seen += [s.session_id for s in page.sessions]
                token = page.next_page_token
                if not token:
                    break
            assert seen == ids
            pending = await stub.ListSessions(sessions_pb2.ListSessionsRequest(
                states=[types_pb2.SESSION_STATE_PENDING]))
            assert [s.session_id for s in pending.sessions] == ids[1:]
            other = await stub.ListSessions(sessions_pb2.ListSessionsRequest(tenant="someone-else"))
            assert list(other.sessions) == []
            await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.ListSessions(
                sessions_pb2.ListSessionsRequest(page_token="garbage")))

    run(body)


def test_sessions_survive_a_scheduler_restart(tmp_path: Path, model_dir: Path,
                                             store_config: dict[str, Any]) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir, **store_config) as (_, stub, _ch):
            created = await stub.CreateSession(create_req("r1", request_id="req-1"))
        async with scheduler(tmp_path, model_dir, **store_config) as (_, stub, _ch):
            got = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=created.session_id))
            assert got.spec == created.spec
            assert got.state == types_pb2.SESSION_STATE_PENDING
            retried = await stub.CreateSession(create_req("r1", request_id="req-1"))
            assert retried.session_id == created.session_id

    run(body)


def test_every_message_to_a_worker_carries_the_leaders_epoch_which_each_start_raises(
        tmp_path: Path, model_dir: Path, store_config: dict[str, Any]) -> None:
    async def body() -> None:
        epochs = []
        for _ in range(2):
            async with scheduler(tmp_path, model_dir, **store_config) as (running, stub, ch):
                worker = ProtocolWorker(ch, "w1")
                registered = await worker.next("registered")
                await stub.CreateSession(create_req(f"r{len(epochs)}"))
                assign = await worker.next("assign")
                assert registered.leader_epoch == assign.leader_epoch == running.leadership.epoch
                epochs.append(running.leadership.epoch)
                await worker.close()
        assert epochs[0] >= 1 and epochs[1] == epochs[0] + 1

    run(body)


def test_a_scheduler_a_newer_leader_fenced_out_answers_unavailable_and_changes_nothing(
        tmp_path: Path, model_dir: Path, store_config: dict[str, Any]) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir, **store_config) as (running, stub, _ch):
            kept = await stub.CreateSession(create_req("r1"))
            # Another scheduler takes the store (by force, as a second process on the
            # same SQLite file would, or as a follower once the lease ran out).
            url = store_config.get("database_url")
            other = PostgresStore(url) if url else SqliteStore(store_config["database"])
            assert other.claim_lead("intruder", "", 60.0, force=True) == running.leadership.epoch + 1
            other.close()
            # On PostgreSQL the intruder's claim also ended this scheduler's sessions: the
            # first commit fails on the cut connection, the next on the fence. Either way
            # the caller is told to retry (with the leader).
            for room in ("r2", "r3"):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.CreateSession(create_req(room))
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "a newer leader took over" in (refused.value.details() or "")
            # What `serve` waits on to exit and start again from the store.
            assert running.core.commits.failed.is_set()
        check = PostgresStore(url) if url else SqliteStore(store_config["database"])
        assert [s.session_id for s in check.load_sessions()] == [kept.session_id]
        check.close()

    run(body)


def test_a_batch_admits_each_room_as_alone_and_refuses_only_the_bad_ones(
        tmp_path: Path, model_dir: Path, store_config: dict[str, Any]) -> None:
    codes = grpc.StatusCode

    def batch(*reqs: sessions_pb2.CreateSessionRequest) -> sessions_pb2.CreateSessionsRequest:
        return sessions_pb2.CreateSessionsRequest(requests=list(reqs))

    async def body() -> None:
        async with scheduler(tmp_path, model_dir, **store_config) as (_, stub, ch):
            worker = ProtocolWorker(ch, "w1")
            await worker.next("registered")
            wave = batch(create_req("r1", request_id="q1"),
                         create_req("r2", width=100000, height=512),  # invalid
                         create_req("r1", request_id="q3"),  # r1 is streaming already
                         create_req("r4", avatar="nobody"),
                         create_req("r5", request_id="q5"))
            done = await stub.CreateSessions(wave)
            assert [r.code for r in done.results] == [
                0, codes.INVALID_ARGUMENT.value[0], codes.ALREADY_EXISTS.value[0],
                codes.NOT_FOUND.value[0], 0]
            assert all(r.message for r in done.results if r.code)
            ok = [r.session for r in done.results if r.code == 0]
            assert [s.spec.room_id for s in ok] == ["r1", "r5"]
            # Each room goes where CreateSession would have sent it, said in the answer.
            assigned = {(await worker.next("assign")).assign.session_id for _ in ok}
            assert assigned == {s.session_id for s in ok}
            assert all(s.state == types_pb2.SESSION_STATE_PLACED and s.worker_id == "w1" for s in ok)
            # Retried whole, the batch finds the same rooms and refuses the same ones.
            again = await stub.CreateSessions(wave)
            assert [r.code for r in again.results] == [r.code for r in done.results]
            assert [r.session.session_id for r in again.results if r.code == 0] == \
                [s.session_id for s in ok]
            for empty_or_huge in (batch(), batch(*[create_req(f"x{i}") for i in range(1001)])):
                assert "between 1 and 1000" in await expect_status(
                    codes.INVALID_ARGUMENT, stub.CreateSessions(empty_or_huge))
            await worker.close()
        # Answered once on disk: a restarted scheduler has both rooms.
        async with scheduler(tmp_path, model_dir, **store_config) as (_, stub, _ch):
            listed = await stub.ListSessions(sessions_pb2.ListSessionsRequest())
            assert sorted(s.spec.room_id for s in listed.sessions) == ["r1", "r5"]

    run(body)


def test_health_is_served(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, _stub, ch):
            h = health_pb2_grpc.HealthStub(ch)
            for service in ("", "avatarfarm.v1.SessionService", "avatarfarm.v1.WorkerService",
                            REPLICA_HEALTH):
                r = await h.Check(health_pb2.HealthCheckRequest(service=service))
                assert r.status == health_pb2.HealthCheckResponse.SERVING

    run(body)


def test_rooms_flow_through_a_worker_and_are_billed(tmp_path: Path, model_dir: Path,
                                                   store_config: dict[str, Any]) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir, device_prices={"cpu": 3.6},
                             **store_config) as (running, stub, ch):
            s = await stub.CreateSession(create_req("r1", tier=types_pb2.TIER_PREMIUM))
            states: list[int] = []
            watching = asyncio.Event()

            async def watch() -> None:
                async for ev in stub.WatchSession(sessions_pb2.WatchSessionRequest(session_id=s.session_id)):
                    states.append(ev.session.state)
                    watching.set()

            watcher = asyncio.create_task(watch())
            await asyncio.wait_for(watching.wait(), 10)
            worker = ProtocolWorker(ch, "w1")
            assign = await worker.next("assign")
            assert assign.assign.session_id == s.session_id
            assert assign.assign.spec.room_id == "r1"
            placed = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=s.session_id))
            assert placed.state == types_pb2.SESSION_STATE_PLACED
            assert placed.worker_id == "w1" and placed.input_endpoint == "127.0.0.1:1"
            worker.report(s.session_id, types_pb2.SESSION_STATE_RUNNING, frames=25, device=0.25)
            worker.report(s.session_id, types_pb2.SESSION_STATE_ENDED, frames=50, device=0.5,
                          reason="reached max duration", av_offset_seconds=0.04,
                          av_correction_seconds=-0.04, sync_checks=3)
            await asyncio.wait_for(watcher, 10)
            assert states == [types_pb2.SESSION_STATE_PENDING, types_pb2.SESSION_STATE_PLACED,
                              types_pb2.SESSION_STATE_RUNNING, types_pb2.SESSION_STATE_ENDED]
            final = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=s.session_id))
            assert final.progress.frames_rendered == 50
            # Lip sync reaches the tenant as the worker measured it.
            p = final.progress
            assert (p.av_offset_seconds, p.av_correction_seconds, p.sync_checks) == (0.04, -0.04, 3)
            text = urllib.request.urlopen(
                f"http://127.0.0.1:{running.metrics_port}/metrics").read().decode()
            # 0.5 device-seconds over 2 stream-seconds at 3.6/h -> 0.9 per stream-hour.
            assert 'avatarfarm_cost_per_stream_hour{device_type="cpu",tier="premium"} 0.9' in text
            assert 'avatarfarm_stream_seconds_total{device_type="cpu",tier="premium"} 2.0' in text
            assert 'avatarfarm_sessions{state="ended",tier="premium"} 1.0' in text
            assert "avatarfarm_workers{device_type=\"cpu\"} 1.0" in text
            assert f"avatarfarm_scheduler_leader_epoch {float(running.leadership.epoch)}" in text
            await worker.close()

    run(body)


def test_a_room_whose_lips_stay_out_of_sync_raises_an_event(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_running, stub, ch):
            s = await stub.CreateSession(create_req("r1"))
            events: asyncio.Queue[sessions_pb2.SessionEvent] = asyncio.Queue()

            async def watch() -> None:
                async for ev in stub.WatchSession(sessions_pb2.WatchSessionRequest(session_id=s.session_id)):
                    await events.put(ev)

            watcher = asyncio.create_task(watch())
            worker = ProtocolWorker(ch, "w1")
            await worker.next("assign")
            running_state = types_pb2.SESSION_STATE_RUNNING
            # Two conclusive checks 120 ms apart in a row (the worker could not correct it).
            for n, frames in ((1, 250), (2, 500)):
                worker.report(s.session_id, running_state, frames=frames, av_offset_seconds=0.12,
                              sync_checks=n)
            while True:
                ev = await asyncio.wait_for(events.get(), 10)
                if ev.kind == sessions_pb2.SESSION_EVENT_KIND_SYNC:
                    break
            assert "120 ms apart (video behind)" in ev.message
            assert ev.session.progress.sync_checks == 2
            watcher.cancel()
            await worker.close()

    run(body)


def test_a_worker_losing_frames_gets_its_best_effort_room_stepped_down(tmp_path: Path,
                                                                       model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir, heartbeat_interval=0.1,
                             worker_timeout=30.0) as (_running, stub, ch):
            tiers = {"p": types_pb2.TIER_PREMIUM, "s": types_pb2.TIER_STANDARD,
                     "b": types_pb2.TIER_BEST_EFFORT}
            sids = {}
            for name, tier in tiers.items():
                s = await stub.CreateSession(create_req(f"room-{name}", tier=tier, seconds=0.0))
                sids[name] = s.session_id
            worker = ProtocolWorker(ch, "w1")
            for _ in tiers:
                await worker.next("assign")
            # Every room a third of its frames late, report after report: the worker is past
            # what it delivers.
            frames = 0
            reconfigured = None
            for _ in range(100):
                frames += 25
                for sid in sids.values():
                    worker.report(sid, types_pb2.SESSION_STATE_RUNNING, frames=frames,
                                  late_frames=frames // 3)
                try:
                    reconfigured = await asyncio.wait_for(worker.next("reconfigure"), 0.1)
                    break
                except TimeoutError:
                    continue
            assert reconfigured is not None, "no room was stepped down"
            r = reconfigured.reconfigure
            # One step down the ladder (512 -> 384 at 25 fps), the best-effort room's.
            assert r.session_id == sids["b"] and r.quality.width == 384 and r.step > 0
            assert "over capacity" in r.reason
            b = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=sids["b"]))
            assert b.degradation_step == r.step and b.rendering.width == 384
            await worker.close()

    run(body)


def test_a_room_that_fits_nowhere_waits_then_is_placed(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir, degradation_ladder=[]) as (_, stub, ch):
            # ~0.5 of the worker per 512x512@25 room: one fits under the 0.9 target, two do not
            # (and with no degradation ladder the second cannot step down to fit).
            worker = ProtocolWorker(ch, "w1", render_seconds=0.018)
            a = await stub.CreateSession(create_req("a", drive=types_pb2.DRIVE_MODE_VOICE))
            first = await worker.next("assign")
            assert first.assign.session_id == a.session_id
            b = await stub.CreateSession(create_req("b", drive=types_pb2.DRIVE_MODE_VOICE))
            waiting = await client.wait_for(stub, b.session_id, lambda s: "needs" in s.reason, 10)
            assert waiting.state == types_pb2.SESSION_STATE_PENDING
            assert "free" in waiting.reason and waiting.queue_position == 1
            worker.report(a.session_id, types_pb2.SESSION_STATE_ENDED, frames=50)
            second = await worker.next("assign")
            assert second.assign.session_id == b.session_id
            await worker.close()

    run(body)


def test_placement_uses_batched_profiles_and_their_updates(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir, degradation_ladder=[]) as (_, stub, ch):
            # Measured at batch 1 only: a 512x512@25 voice room needs 25 x (20 + 1 + 0.5) ms
            # = 0.54 of the worker; a second one does not fit under the 0.9 target.
            worker = ProtocolWorker(ch, "w1", render_seconds=0.020)
            rooms = {}
            for room in ("a", "b"):
                rooms[room] = await stub.CreateSession(
                    create_req(room, drive=types_pb2.DRIVE_MODE_VOICE))
            assert (await worker.next("assign")).assign.session_id == rooms["a"].session_id
            await client.wait_for(stub, rooms["b"].session_id, lambda s: "needs" in s.reason, 10)
            # Live timings: a batch of 8 takes 40 ms; 16 takes 120 ms, more than half the 0.2 s
            # latency budget, so it must not count. Rooms sharing batches now cost
            # call(n)/n per frame: four fit (0.86 of the worker), a fifth does not.
            worker.outbox.put_nowait(workers_pb2.WorkerMessage(
                profile_update=workers_pb2.ProfileUpdate(profiles=[workers_pb2.LatencyProfile(
                    stage=workers_pb2.STAGE_RENDER, width=512, height=512, latencies=[
                        workers_pb2.BatchLatency(batch_size=1, seconds=0.020),
                        workers_pb2.BatchLatency(batch_size=8, seconds=0.040),
                        workers_pb2.BatchLatency(batch_size=16, seconds=0.120)])])))
            assert (await worker.next("assign")).assign.session_id == rooms["b"].session_id
            for room in ("c", "d"):
                s = await stub.CreateSession(create_req(room, drive=types_pb2.DRIVE_MODE_VOICE))
                assert (await worker.next("assign")).assign.session_id == s.session_id
            e = await stub.CreateSession(create_req("e", drive=types_pb2.DRIVE_MODE_VOICE))
            waiting = await client.wait_for(stub, e.session_id, lambda s: "needs" in s.reason, 10)
            # The fifth room's marginal cost: the batch grows from 4 to 5.
            assert "needs 0.11" in waiting.reason, waiting.reason
            assert waiting.compute_units > 0
            await worker.close()

    run(body)


def test_scripts_reach_the_worker_and_wrong_inputs_are_refused(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, stub, ch):
            worker = ProtocolWorker(ch, "w1")
            text = await stub.CreateSession(create_req("t", script=[types_pb2.ScriptSegment(text="hi")]))
            assign = await worker.next("assign")
            assert [s.text for s in assign.assign.spec.script] == ["hi"]
            r = await stub.AppendScript(sessions_pb2.AppendScriptRequest(
                session_id=text.session_id, segments=[types_pb2.ScriptSegment(text="more", pause_after_seconds=1)]))
            assert r.queued_segments == 1
            forwarded = await worker.next("script")
            assert forwarded.script.segments[0].text == "more"
            mocap = await stub.CreateSession(create_req("m", drive=types_pb2.DRIVE_MODE_MOCAP))
            await expect_status(grpc.StatusCode.FAILED_PRECONDITION, stub.AppendScript(
                sessions_pb2.AppendScriptRequest(session_id=mocap.session_id,
                                                 segments=[types_pb2.ScriptSegment(text="hi")])))
            await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.AppendScript(
                sessions_pb2.AppendScriptRequest(session_id=text.session_id,
                                                 segments=[types_pb2.ScriptSegment(text="a\x07b")])))
            await expect_status(grpc.StatusCode.NOT_FOUND, stub.AppendScript(
                sessions_pb2.AppendScriptRequest(session_id="nope", segments=[types_pb2.ScriptSegment(text="x")])))
            await worker.close()

    run(body)


def test_a_lost_worker_puts_its_rooms_back_in_the_queue(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, stub, ch):
            w1 = ProtocolWorker(ch, "w1")
            s = await stub.CreateSession(create_req("r"))
            await w1.next("assign")
            await w1.close()
            back = await client.wait_for(stub, s.session_id,
                                         lambda x: x.state == types_pb2.SESSION_STATE_PENDING, 10)
            assert back.worker_id == "" and back.input_endpoint == ""
            w2 = ProtocolWorker(ch, "w2")
            again = await w2.next("assign")
            assert again.assign.session_id == s.session_id
            await w2.close()

    run(body)


def test_a_worker_that_reconnects_keeps_the_rooms_it_still_renders(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, stub, ch):
            w1 = ProtocolWorker(ch, "w1")
            s = await stub.CreateSession(create_req("r"))
            epoch = (await w1.next("assign")).assign.epoch
            await w1.close()  # the stream drops; the worker keeps rendering
            await client.wait_for(stub, s.session_id, lambda x: x.state == types_pb2.SESSION_STATE_PENDING, 10)
            back = ProtocolWorker(ch, "w1", active=((s.session_id, epoch), ("stale-session", 1)))
            released = await back.next("release")  # a room it should not hold is released
            assert released.release.session_id == "stale-session"
            adopted = await client.wait_for(stub, s.session_id,
                                            lambda x: x.state == types_pb2.SESSION_STATE_PLACED, 10)
            assert adopted.worker_id == "w1" and "re-adopted" in adopted.reason
            assert back.inbox.empty()  # no second assignment: the room was not restarted
            await back.close()

    run(body)


def test_a_room_that_ended_while_the_scheduler_was_away_ends_whole_where_it_ran(
        tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir, usage_flush_interval=0.1) as (_, stub, ch):
            w1 = ProtocolWorker(ch, "w1")
            s = await stub.CreateSession(create_req("r"))
            epoch = (await w1.next("assign")).assign.epoch
            w1.report(s.session_id, types_pb2.SESSION_STATE_RUNNING)
            w1.usage(1, [(s.session_id, 25, 0.1)])
            await w1.next("usage_ack")
            await w1.close()
        # The room ended while no scheduler was there to hear it: the worker holds the
        # report of its end, and registers with the room until it is acknowledged.
        async with scheduler(tmp_path, model_dir, usage_flush_interval=0.1) as (_, stub, ch):
            back = ProtocolWorker(ch, "w1", active=((s.session_id, epoch),))
            registered = await back.next("registered")
            assert [r.session_id for r in registered.registered.confirmed_rooms] == [s.session_id]
            back.outbox.put_nowait(workers_pb2.WorkerMessage(usage_report=workers_pb2.UsageReport(
                seq=2, updates=[workers_pb2.SessionUpdate(
                    session_id=s.session_id, state=types_pb2.SESSION_STATE_ENDED, epoch=epoch,
                    reason="reached max duration", progress=types_pb2.SessionProgress(
                        frames_rendered=50, stream_seconds=2.0, device_seconds=0.2))])))
            done = await client.wait_for(stub, s.session_id,
                                         lambda x: x.state == types_pb2.SESSION_STATE_ENDED, 10)
            assert done.worker_id == "w1" and done.reason == "reached max duration"
            assert done.progress.stream_seconds == 2.0  # whole: the end's report counted
            assert back.inbox.empty()  # nothing placed again, nothing released
            await back.close()

    run(body)


def test_a_worker_the_room_moved_from_is_released_and_bills_nothing(tmp_path: Path,
                                                                     model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, stub, ch):
            async def usage() -> float:
                r = await stub.GetUsage(sessions_pb2.GetUsageRequest())
                return sum(row.stream_seconds for row in r.rows)

            w1 = ProtocolWorker(ch, "w1")
            s = await stub.CreateSession(create_req("r", seconds=0.0))
            first = (await w1.next("assign")).assign
            w1.report(s.session_id, types_pb2.SESSION_STATE_RUNNING)
            w1.usage(1, [(s.session_id, 50, 0.5)])  # 2 s
            await client.wait_for(stub, s.session_id, lambda x: x.progress.frames_rendered == 50, 10)
            await w1.close()  # lost: the room moves to w2 under a new assignment
            w2 = ProtocolWorker(ch, "w2")
            second = (await w2.next("assign")).assign
            assert second.epoch > first.epoch and second.continuation == 1
            assert second.resumed_at_seconds == 2.0
            w2.report(s.session_id, types_pb2.SESSION_STATE_RUNNING)
            w2.usage(1, [(s.session_id, 25, 0.25)])  # 1 s, counted from zero on w2
            await client.wait_for(stub, s.session_id, lambda x: x.progress.frames_rendered == 75, 10)
            # w1 comes back still rendering it under the old assignment: released, and
            # what it reports for it counts for nothing.
            back = ProtocolWorker(ch, "w1", active=((s.session_id, first.epoch),))
            assert (await back.next("release")).release.session_id == s.session_id
            back.epochs[s.session_id] = first.epoch
            back.usage(5, [(s.session_id, 500, 5.0)])
            assert (await back.next("release")).release.session_id == s.session_id
            w2.usage(2, [(s.session_id, 50, 0.5)])
            w2.usage(2, [(s.session_id, 50, 0.5)])  # a retry
            w2.usage(1, [(s.session_id, 25, 0.25)])  # a replay of an old one
            now = await client.wait_for(stub, s.session_id,
                                        lambda x: x.progress.frames_rendered == 100, 10)
            assert now.worker_id == "w2" and now.progress.stream_seconds == 4.0
            assert await usage() == 4.0  # 2 s on w1, 2 s on w2: nothing lost, nothing twice
            for w in (w2, back):
                await w.close()

    run(body)


def test_a_room_comes_with_an_input_token_its_worker_can_check_alone(tmp_path: Path,
                                                                     model_dir: Path) -> None:
    import time

    from avatarfarm import input_tokens

    async def body() -> None:
        async with scheduler(tmp_path, model_dir, input_token_ttl=120.0) as (_, stub, ch):
            s = await stub.CreateSession(create_req("r1", drive=types_pb2.DRIVE_MODE_VOICE))
            other = await stub.CreateSession(create_req("r2", drive=types_pb2.DRIVE_MODE_VOICE))
            worker = ProtocolWorker(ch, "w1")
            keys = {}
            for _ in range(2):
                a = (await worker.next("assign")).assign
                keys[a.session_id] = a.input_key
            key = keys[s.session_id]
            assert len(key) == 32 and key != keys[other.session_id]
            now = time.time()
            assert s.input_token_expires_at.seconds == pytest.approx(now + 120, abs=5)
            assert input_tokens.verify(key, s.input_token, s.session_id, now=now) == "vendor"
            with pytest.raises(input_tokens.InputRefused):  # one room's token opens no other
                input_tokens.verify(keys[other.session_id], s.input_token, other.session_id, now=now)
            with pytest.raises(input_tokens.InputTokenExpired):
                input_tokens.verify(key, s.input_token, s.session_id, now=now + 121)
            # Renewed by reading the session again; ended rooms get none.
            again = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=s.session_id))
            assert input_tokens.verify(key, again.input_token, s.session_id, now=now + 1) == "vendor"
            ended = await stub.EndSession(sessions_pb2.EndSessionRequest(session_id=s.session_id))
            assert ended.input_token == "" and not ended.HasField("input_token_expires_at")
            await worker.close()
        # The room keeps its key across a scheduler restart (workers hold it): the secret
        # is kept beside the database.
        async with scheduler(tmp_path, model_dir) as (_, stub, _ch):
            got = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=other.session_id))
            assert input_tokens.verify(keys[other.session_id], got.input_token, other.session_id,
                                       now=time.time()) == "vendor"
        assert (tmp_path / "state.db.input-secret").stat().st_mode & 0o777 == 0o600

    run(body)
