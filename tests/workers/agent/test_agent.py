"""The worker agent over a real gRPC link: what it registers, numbered usage reports and
their resending after a reconnect, live reconfiguration of a room. And how it decodes
an assignment: trusting the scheduler's validation, refusing only what it cannot do.

The peer is a small recording WorkerService, not the scheduler: it plays the scheduler's
side of the contract (a `Registered` with the last applied usage seq, commands) so the
worker's side is checked on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from avatarfarm import convert
from avatarfarm.domain import (
    LIMITS,
    DriveMode,
    InvalidRequest,
    Output,
    OutputKind,
    Quality,
    ScriptSegment,
    SessionSpec,
    Tier,
)
from avatarfarm.egress import EgressPolicy
from avatarfarm.v1 import types_pb2, workers_pb2, workers_pb2_grpc
from tests.builders import make_spec
from workers.agent.agent import WorkerAgent, assignment_from_pb
from workers.device.pipeline import Pipeline
from workers.output.targets import OutputError
from workers.rooms.room import InvalidQuality, Pacing, RoomState
from workers.server import device_memory_bytes


class RecordingScheduler(workers_pb2_grpc.WorkerServiceServicer):
    """Accepts worker streams one after another, recording each stream's messages."""

    def __init__(self) -> None:
        self.streams: list[list[workers_pb2.WorkerMessage]] = []
        self.commands: asyncio.Queue[workers_pb2.SchedulerMessage | None] = asyncio.Queue()
        self.last_usage_seq = 0
        self.confirm: dict[str, int] = {}  # rooms the next Registered keeps on the worker
        self.worker_timeout = 5.0
        self.heartbeat_interval = 0.05

    async def Connect(self, request_iterator: AsyncIterator[workers_pb2.WorkerMessage],
                      context: grpc.aio.ServicerContext[object, object]
                      ) -> AsyncIterator[workers_pb2.SchedulerMessage]:
        received: list[workers_pb2.WorkerMessage] = []
        self.streams.append(received)

        async def read() -> None:
            async for msg in request_iterator:
                received.append(msg)

        reader = asyncio.create_task(read())
        try:
            yield workers_pb2.SchedulerMessage(registered=workers_pb2.Registered(
                heartbeat_interval_seconds=self.heartbeat_interval,
                last_usage_seq=self.last_usage_seq,
                worker_timeout_seconds=self.worker_timeout,
                confirmed_rooms=[workers_pb2.ActiveRoom(session_id=sid, epoch=e)
                                 for sid, e in self.confirm.items()]))
            while (cmd := await self.commands.get()) is not None:
                yield cmd
        finally:
            reader.cancel()

    def of(self, stream: int, kind: str) -> list[workers_pb2.WorkerMessage]:
        if stream >= len(self.streams):
            return []
        return [m for m in self.streams[stream] if m.WhichOneof("kind") == kind]


async def until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def linked_agent(fake: RecordingScheduler, pipeline: Pipeline, tmp_path: Path,
                       memory_bytes: int = 0, progress_interval: float = 0.05
                       ) -> AsyncIterator[WorkerAgent]:
    """A real-time WorkerAgent linked to ``fake`` over a real gRPC server; on the way out
    its rooms are shut down and the link and the server stopped."""
    server = grpc.aio.server()
    workers_pb2_grpc.add_WorkerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    agent = WorkerAgent("w1", f"127.0.0.1:{port}", pipeline, [], "127.0.0.1:1", "cpu",
                        tmp_path, pacing=Pacing.REALTIME, progress_interval=progress_interval,
                        memory_bytes=memory_bytes)
    link = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        await agent.shutdown()
        link.cancel()
        await asyncio.gather(link, return_exceptions=True)
        fake.commands.put_nowait(None)
        await server.stop(0.1)


def test_the_agent_reports_at_the_interval_the_scheduler_paces_it_to(pipeline: Pipeline,
                                                                     tmp_path: Path) -> None:
    async def body() -> None:
        fake = RecordingScheduler()
        fake.heartbeat_interval = 600.0  # nothing would be heard for ten minutes
        async with linked_agent(fake, pipeline, tmp_path, progress_interval=math.inf) as agent:
            await until(lambda: agent.link.connected.is_set())
            assert fake.of(0, "heartbeat") == []
            fake.commands.put_nowait(workers_pb2.SchedulerMessage(
                pace=workers_pb2.Pace(heartbeat_interval_seconds=0.05)))
            await until(lambda: len(fake.of(0, "heartbeat")) >= 3)  # from now, not in 600 s
            assert agent.link.heartbeat_interval == 0.05

    asyncio.run(asyncio.wait_for(body(), 60))


def test_agent_registers_reports_usage_and_reconfigures_live(pipeline: Pipeline,
                                                             tmp_path: Path) -> None:
    async def body() -> None:
        fake = RecordingScheduler()
        async with linked_agent(fake, pipeline, tmp_path,
                                memory_bytes=device_memory_bytes(pipeline.provider)) as agent:
            await until(lambda: len(fake.of(0, "heartbeat")) >= 3)
            reg = fake.of(0, "register")[0].register
            assert reg.usage_epoch == agent.usage.epoch > 0
            assert reg.device.memory_bytes > 1 << 20
            f = pipeline.folder
            assert f.lipsync is not None
            assert f.wav2lip is not None
            assert f.features is not None and f.face_reader is not None
            assert reg.memory.models_bytes == sum(p.stat().st_size for p in (
                f.audio_to_motion, f.renderer, f.lipsync, f.wav2lip.path, f.features.path,
                f.face_reader)) > 0
            assert reg.memory.avatar_bytes_per_pixel == 12.0
            assert reg.memory.room_bytes_per_pixel > 12.0
            # No rooms, no usage reports.
            assert fake.of(0, "usage_report") == []

            spec = make_spec("r", quality=Quality(256, 256, 25), seconds=0.0)
            fake.commands.put_nowait(workers_pb2.SchedulerMessage(
                assign=workers_pb2.Assign(session_id="s1", spec=convert.spec_to_pb(spec),
                                          epoch=7)))
            await until(lambda: len(fake.of(0, "usage_report")) >= 4)
            first = fake.of(0, "session_update")
            assert [u.session_update.state for u in first] == [types_pb2.SESSION_STATE_RUNNING]
            reports = [m.usage_report for m in fake.of(0, "usage_report")]
            assert [r.seq for r in reports] == list(range(1, len(reports) + 1))
            assert all([u.session_id for u in r.updates] == ["s1"] for r in reports)
            assert all(u.state == types_pb2.SESSION_STATE_RUNNING and u.epoch == 7
                       for r in reports for u in r.updates)
            frames = [r.updates[0].progress.frames_rendered for r in reports]
            assert frames == sorted(frames) and frames[-1] > 0

            # Reconfigure: an unknown room and an impossible quality are ignored, a step
            # down is applied to the running room.
            room = agent.rooms["s1"]

            def reconfigure(sid: str, q: Quality, step: int) -> None:
                fake.commands.put_nowait(workers_pb2.SchedulerMessage(
                    reconfigure=workers_pb2.Reconfigure(
                        session_id=sid, step=step, reason="test",
                        quality=convert.quality_to_pb(q))))

            reconfigure("ghost", Quality(192, 192, 12), 1)
            reconfigure("s1", Quality(256, 256, 50), 1)
            reconfigure("s1", Quality(192, 192, 12), 2)
            await until(lambda: room.rendering == Quality(192, 192, 12))
            assert room.degradation_step == 2
            key = pipeline.render_key(192)
            await until(lambda: key in pipeline.engine.stats()
                        and pipeline.engine.stats()[key].items > 0)

            # The link breaks; the scheduler had applied up to seq 2: the worker resends the
            # reports after it, in order, before new ones, in the same epoch.
            fake.last_usage_seq = 2
            fake.confirm = {"s1": 7}
            sent_before = {r.seq: r for r in reports}
            fake.commands.put_nowait(None)
            await until(lambda: len(fake.of(1, "usage_report")) >= 3)
            reg2 = fake.of(1, "register")[0].register
            assert reg2.usage_epoch == reg.usage_epoch
            assert [(r.session_id, r.epoch) for r in reg2.active_rooms] == [("s1", 7)]
            assert "presenter" in reg2.warm_avatars
            again = [m.usage_report for m in fake.of(1, "usage_report")]
            seqs = [r.seq for r in again]
            assert seqs[0] == 3 and seqs == list(range(3, 3 + len(seqs)))
            assert all(r == sent_before[r.seq] for r in again if r.seq in sent_before)
            assert room.rendering == Quality(192, 192, 12)  # the room kept streaming, degraded
            assert not room.held and agent.rooms["s1"] is room  # confirmed: it goes on

            # Acknowledged reports are forgotten; the others are still held for resending.
            last = again[-1].seq
            fake.commands.put_nowait(workers_pb2.SchedulerMessage(
                usage_ack=workers_pb2.UsageAck(seq=last)))
            await until(lambda: not agent.usage.unapplied(0)
                        or agent.usage.unapplied(0)[0].seq > last)

            fake.commands.put_nowait(workers_pb2.SchedulerMessage(
                release=workers_pb2.Release(session_id="s1", reason="done")))
            # The final state goes in a numbered report (held until acknowledged).
            await until(lambda: any(u.state == types_pb2.SESSION_STATE_ENDED and u.epoch == 7
                                    for m in fake.of(1, "usage_report")
                                    for u in m.usage_report.updates))
            assert room.stats.stream_seconds > 0
            assert any(u.state == types_pb2.SESSION_STATE_ENDED
                       for r in agent.usage.unapplied(0) for u in r.updates)

    asyncio.run(asyncio.wait_for(body(), 60))


def test_a_stalled_worker_holds_its_rooms_until_the_scheduler_says_which_are_its_own(
        pipeline: Pipeline, tmp_path: Path) -> None:
    async def body() -> None:
        fake = RecordingScheduler()
        fake.worker_timeout = 0.5
        async with linked_agent(fake, pipeline, tmp_path) as agent:
            await until(lambda: agent.connected.is_set())
            for sid, room_id, epoch in (("kept", "a", 3), ("moved", "b", 4)):
                spec = make_spec(room_id, quality=Quality(128, 128, 25), seconds=0.0,
                                 output=Output(OutputKind.HLS, room_id))
                fake.commands.put_nowait(workers_pb2.SchedulerMessage(assign=workers_pb2.Assign(
                    session_id=sid, spec=convert.spec_to_pb(spec), epoch=epoch)))
            await until(lambda: len(fake.of(0, "usage_report")) >= 3
                        and len(fake.of(0, "usage_report")[-1].usage_report.updates) == 2)
            await until(lambda: (tmp_path / "@vendor" / "b" / "index.m3u8").exists())
            kept, moved = agent.rooms["kept"], agent.rooms["moved"]
            # While frozen, the scheduler gave "moved" to another worker: it confirms only
            # "kept" when the worker registers again.
            fake.confirm = {"kept": 3}
            time.sleep(0.8)  # noqa: ASYNC251 - fault injection: the event loop freezes past the timeout
            await until(lambda: len(fake.of(1, "register")) == 1)
            reg = fake.of(1, "register")[0].register
            assert {(r.session_id, r.epoch) for r in reg.active_rooms} == {("kept", 3), ("moved", 4)}
            await until(lambda: "moved" not in agent.rooms)
            sent = agent.usage.seq  # reports made before the worker knew may name it
            assert moved.superseded and not kept.held and agent.rooms["kept"] is kept
            frames = kept.stats.frames_rendered
            await until(lambda: kept.stats.frames_rendered > frames + 5)  # kept goes on
            # The moved room reports nothing more, and leaves its playlist open (no ENDLIST)
            # for the worker that continues it.
            await until(lambda: fake.of(1, "usage_report")[-1].usage_report.seq > sent + 2)
            assert not any(u.session_id == "moved" for m in fake.of(1, "usage_report")
                           if m.usage_report.seq > sent for u in m.usage_report.updates)
            assert "#EXT-X-ENDLIST" not in (tmp_path / "@vendor" / "b" / "index.m3u8").read_text()

    asyncio.run(asyncio.wait_for(body(), 60))


# -- decoding an assignment -----------------------------------------------------------------

def assign(spec: SessionSpec, session_id: str = "s1", epoch: int = 1) -> workers_pb2.Assign:
    return workers_pb2.Assign(session_id=session_id, spec=convert.spec_to_pb(spec), epoch=epoch)


# Specs the tenant edge refuses (a limit there may have been tightened after the scheduler
# admitted them, or differ from the worker's release) that a worker can render all the same.
BEYOND_THE_EDGE = {
    "duration": make_spec("r", seconds=2 * LIMITS.max_duration_seconds),
    "script length": make_spec("r", script=(ScriptSegment("la " * LIMITS.max_script_chars),)),
    "segment count": make_spec("r", script=(ScriptSegment("la"),) * (LIMITS.max_segments + 1)),
    "room id form": replace(make_spec("r"), room_id="a room id with spaces"),
    "tenant id length": replace(make_spec("r"), tenant="t" * (LIMITS.max_id_length + 1)),
    "frame size": make_spec("r", quality=Quality(3840, 3840, 25)),
}


@pytest.mark.parametrize("spec", BEYOND_THE_EDGE.values(), ids=BEYOND_THE_EDGE.keys())
def test_the_worker_takes_an_admitted_spec_the_edge_would_refuse_now(spec: SessionSpec,
                                                                     tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        convert.spec_from_pb(convert.spec_to_pb(spec))  # the edge's decode refuses it
    assigned = assignment_from_pb(assign(spec), tmp_path, EgressPolicy())
    assert assigned.spec == spec
    assert assigned.target.location == str((tmp_path / f"@{spec.tenant}" / spec.output.target).resolve())


@pytest.mark.parametrize("spec, refusal", [
    (make_spec("r", quality=Quality(8, 8, 25)), InvalidQuality),  # no portrait that small
    (make_spec("r", quality=Quality(257, 256, 25)), InvalidQuality),  # H.264 4:2:0
    (make_spec("r", quality=Quality(256, 256, 0)), InvalidQuality),
    (make_spec("r", output=Output(OutputKind.FILE, "../elsewhere.mp4")), OutputError),
    (make_spec("r", output=Output(OutputKind.RTMP, "rtmp://169.254.169.254/live/k")), OutputError),
], ids=["side", "odd width", "no rate", "path out", "forbidden ingest"])
def test_the_worker_still_refuses_what_it_cannot_render_or_write(
        spec: SessionSpec, refusal: type[Exception], tmp_path: Path) -> None:
    with pytest.raises(refusal):
        assignment_from_pb(assign(spec), tmp_path, EgressPolicy())


def test_an_assignment_beyond_the_edge_limits_runs_as_a_room(pipeline: Pipeline,
                                                             tmp_path: Path) -> None:
    async def body() -> None:
        agent = WorkerAgent("w1", "127.0.0.1:1", pipeline, [], "127.0.0.1:1", "cpu", tmp_path,
                            pacing=Pacing.FAST)
        spec = replace(BEYOND_THE_EDGE["duration"], quality=Quality(128, 128, 25),
                       drive_mode=DriveMode.TEXT, room_id="a room id with spaces")
        try:
            agent.receive(workers_pb2.SchedulerMessage(assign=assign(spec)))
            room = agent.rooms["s1"]
            await until(lambda: room.stats.frames_rendered > 0)
            assert room.state is RoomState.RUNNING
            assert agent.usage.unapplied(0) == []  # no "bad assignment" report
        finally:
            await agent.shutdown()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_each_tenant_writes_in_a_folder_of_its_own(tmp_path: Path) -> None:
    a = assignment_from_pb(assign(make_spec("r", tenant="brand-a")), tmp_path, EgressPolicy())
    b = assignment_from_pb(assign(make_spec("r", tenant="brand-b")), tmp_path, EgressPolicy())
    assert a.target.location == str((tmp_path / "@brand-a" / "r.mp4").resolve())
    assert b.target.location == str((tmp_path / "@brand-b" / "r.mp4").resolve())
    hls = make_spec("r", tenant="brand-a", output=Output(OutputKind.HLS, "live/show"))
    assert assignment_from_pb(assign(hls), tmp_path, EgressPolicy()).target.location == \
        str((tmp_path / "@brand-a" / "live" / "show" / "index.m3u8").resolve())
    # No path a tenant can write names another tenant's folder, or the top of the output
    # folder, where outputs from before tenant folders stay.
    for path in ("../@brand-b/r.mp4", "@brand-b/r.mp4", "../r.mp4", "/r.mp4", "..", "%2e%2e/r.mp4"):
        with pytest.raises((OutputError, InvalidRequest)):
            assignment_from_pb(assign(make_spec("r", tenant="brand-a", output=Output(
                OutputKind.FILE, path))), tmp_path, EgressPolicy())


def test_the_worker_exports_what_a_room_behind_shed_by_tier(pipeline: Pipeline, tmp_path: Path) -> None:
    """Frames given up unmade and repeats held on a waiting frame reach the worker's
    metrics as counters per tier, each report adding what the room shed since the last."""
    from workers.output.targets import OutputTarget
    from workers.rooms.room import Room

    agent = WorkerAgent("w1", "127.0.0.1:1", pipeline, [], "127.0.0.1:1", "cpu", tmp_path)
    room = Room("s1", make_spec("r", tier=Tier.PREMIUM), OutputTarget.resolve(
        OutputKind.FILE, "r.mp4", tmp_path), pipeline, pacing=Pacing.REALTIME)

    def exported(name: str) -> float:
        value = agent.metrics.registry.get_sample_value(name, {"tier": "premium"})
        return value or 0.0

    room.stats.frames_rendered, room.stats.late_frames = 50, 20
    room.stats.skipped_frames, room.stats.merged_frames = 12, 7
    agent._account(room)
    room.stats.frames_rendered, room.stats.late_frames = 75, 22
    room.stats.skipped_frames, room.stats.merged_frames = 13, 9
    agent._account(room)
    assert exported("avatarfarm_worker_frames_given_up_total") == 13
    assert exported("avatarfarm_worker_frames_held_total") == 9
    assert exported("avatarfarm_worker_late_frames_total") == 22
    assert exported("avatarfarm_worker_frames_rendered_total") == 75
