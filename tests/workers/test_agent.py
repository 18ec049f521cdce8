"""The worker agent over a real gRPC link: what it registers, numbered usage reports and
their resending after a reconnect, live reconfiguration of a room.

The peer is a small recording WorkerService, not the scheduler: it plays the scheduler's
side of the contract (a `Registered` with the last applied usage seq, commands) so the
worker's side is checked on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from avatarfarm import convert
from avatarfarm.domain import Quality
from avatarfarm.v1 import types_pb2, workers_pb2, workers_pb2_grpc
from tests.builders import make_spec
from workers.agent import WorkerAgent
from workers.pipeline import Pipeline
from workers.room import Pacing
from workers.server import device_memory_bytes


class RecordingScheduler(workers_pb2_grpc.WorkerServiceServicer):
    """Accepts worker streams one after another, recording each stream's messages."""

    def __init__(self) -> None:
        self.streams: list[list[workers_pb2.WorkerMessage]] = []
        self.commands: asyncio.Queue[workers_pb2.SchedulerMessage | None] = asyncio.Queue()
        self.last_usage_seq = 0

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
                heartbeat_interval_seconds=0.05, last_usage_seq=self.last_usage_seq))
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


def test_agent_registers_reports_usage_and_reconfigures_live(pipeline: Pipeline,
                                                             tmp_path: Path) -> None:
    async def body() -> None:
        fake = RecordingScheduler()
        server = grpc.aio.server()
        workers_pb2_grpc.add_WorkerServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        agent = WorkerAgent("w1", f"127.0.0.1:{port}", pipeline, [], "127.0.0.1:1", "cpu",
                            tmp_path, pacing=Pacing.REALTIME, progress_interval=0.05,
                            memory_bytes=device_memory_bytes(pipeline.provider))
        link = asyncio.create_task(agent.run())
        try:
            await until(lambda: len(fake.of(0, "heartbeat")) >= 3)
            reg = fake.of(0, "register")[0].register
            assert reg.usage_epoch == agent.usage_epoch > 0
            assert reg.device.memory_bytes > 1 << 20
            f = pipeline.folder
            assert f.lipsync is not None
            assert reg.memory.models_bytes == sum(
                p.stat().st_size for p in (f.audio_to_motion, f.renderer, f.lipsync)) > 0
            assert reg.memory.avatar_bytes_per_pixel == 12.0
            assert reg.memory.room_bytes_per_pixel > 12.0
            # No rooms, no usage reports.
            assert fake.of(0, "usage_report") == []

            spec = make_spec("r", quality=Quality(256, 256, 25), seconds=0.0)
            fake.commands.put_nowait(workers_pb2.SchedulerMessage(
                assign=workers_pb2.Assign(session_id="s1", spec=convert.spec_to_pb(spec))))
            await until(lambda: len(fake.of(0, "usage_report")) >= 4)
            first = fake.of(0, "session_update")
            assert [u.session_update.state for u in first] == [types_pb2.SESSION_STATE_RUNNING]
            reports = [m.usage_report for m in fake.of(0, "usage_report")]
            assert [r.seq for r in reports] == list(range(1, len(reports) + 1))
            assert all([u.session_id for u in r.updates] == ["s1"] for r in reports)
            assert all(u.state == types_pb2.SESSION_STATE_RUNNING
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
                        quality=types_pb2.Quality(width=q.width, height=q.height, fps=q.fps))))

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
            sent_before = {r.seq: r for r in reports}
            fake.commands.put_nowait(None)
            await until(lambda: len(fake.of(1, "usage_report")) >= 3)
            reg2 = fake.of(1, "register")[0].register
            assert reg2.usage_epoch == reg.usage_epoch
            assert list(reg2.active_session_ids) == ["s1"]
            assert "presenter" in reg2.warm_avatars
            again = [m.usage_report for m in fake.of(1, "usage_report")]
            seqs = [r.seq for r in again]
            assert seqs[0] == 3 and seqs == list(range(3, 3 + len(seqs)))
            assert all(r == sent_before[r.seq] for r in again if r.seq in sent_before)
            assert room.rendering == Quality(192, 192, 12)  # the room kept streaming, degraded

            fake.commands.put_nowait(workers_pb2.SchedulerMessage(
                release=workers_pb2.Release(session_id="s1", reason="done")))
            await until(lambda: any(m.session_update.state == types_pb2.SESSION_STATE_ENDED
                                    for m in fake.of(1, "session_update")))
            assert room.stats.stream_seconds > 0
        finally:
            await agent.shutdown()
            link.cancel()
            await asyncio.gather(link, return_exceptions=True)
            fake.commands.put_nowait(None)
            await server.stop(0.1)

    asyncio.run(asyncio.wait_for(body(), 60))
