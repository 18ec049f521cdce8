"""Draining a worker over the real protocol: no new rooms on it, running rooms handed
over (the old assignment stops at a clean point, the next continues from exactly
there, the room never leaves the air), usage counted once across the handover, and
the drain's outcome in the metrics."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, types_pb2, workers_pb2
from tests.scheduler.api.test_service import ProtocolWorker, create_req, run, scheduler


def drain(worker: ProtocolWorker, seconds: float = 60.0) -> None:
    worker.outbox.put_nowait(workers_pb2.WorkerMessage(
        drain=workers_pb2.Drain(deadline_seconds=seconds, reason="node maintenance")))


def metric(port: int, line: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    for row in text.splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    return None


async def until(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_a_draining_worker_hands_a_running_room_over_without_a_gap(tmp_path: Path,
                                                                   model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (running, stub, ch):
            states: list[int] = []

            w1 = ProtocolWorker(ch, "w1")
            s = await stub.CreateSession(create_req("show", hls_dir="show", file_path="",
                                                    seconds=0.0))
            first = (await w1.next("assign")).assign
            w1.report(s.session_id, types_pb2.SESSION_STATE_RUNNING)
            w1.usage(1, [(s.session_id, 100, 1.0)])  # 4 s
            await client.wait_for(stub, s.session_id, lambda x: x.progress.frames_rendered == 100, 10)

            async def watch() -> None:
                async for ev in stub.WatchSession(sessions_pb2.WatchSessionRequest(
                        session_id=s.session_id)):
                    states.append(ev.session.state)
            watcher = asyncio.create_task(watch())

            w2 = ProtocolWorker(ch, "w2")
            await until(lambda: "w2" in running.core.workers)
            drain(w1)
            # The old worker is asked to stop at a clean point and leave the output open;
            # the room stays on it, and on the air, until it has.
            release = (await w1.next("release")).release
            assert release.session_id == s.session_id and release.handover
            new_room = await stub.CreateSession(create_req("later", seconds=0.0))
            assert (await w2.next("assign")).assign.session_id == new_room.session_id
            w1.usage(2, [(s.session_id, 125, 1.25)])  # it rendered on meanwhile: 5 s
            w1.report(s.session_id, types_pb2.SESSION_STATE_ENDED, frames=150, device=1.5,
                      reason="handed over")  # 6 s: the end of the HLS segment it was writing
            second = (await w2.next("assign")).assign
            assert second.session_id == s.session_id
            assert second.epoch > first.epoch and second.continuation == 1
            assert second.resumed_at_seconds == 6.0  # exactly where the old one stopped
            w2.report(s.session_id, types_pb2.SESSION_STATE_RUNNING)
            w2.usage(1, [(s.session_id, 50, 0.5)])
            now = await client.wait_for(stub, s.session_id,
                                        lambda x: x.progress.frames_rendered == 200, 10)
            assert now.worker_id == "w2" and now.state == types_pb2.SESSION_STATE_RUNNING
            usage = await stub.GetUsage(sessions_pb2.GetUsageRequest())
            assert sum(r.stream_seconds for r in usage.rows) == 8.0  # 6 on w1 + 2 on w2
            assert types_pb2.SESSION_STATE_PENDING not in states  # never off the air
            assert types_pb2.SESSION_STATE_ENDED not in states
            await until(lambda: running.core.drained("w1"))
            await until(lambda: metric(running.metrics_port,
                                       'avatarfarm_worker_drains_total{outcome="completed"}') == 1.0)
            assert metric(running.metrics_port, 'avatarfarm_handovers_total{kind="seamless"}') == 1.0
            assert metric(running.metrics_port,
                          'avatarfarm_usage_reports_total{outcome="stale"}') in (None, 0.0)
            watcher.cancel()
            for w in (w1, w2):
                await w.close()
            # w2 was lost (its stream closed undrained); w1, drained, does not count.
            await until(lambda: metric(running.metrics_port,
                                       'avatarfarm_workers_lost_total{device_type="cpu"}') == 1.0)
            await until(lambda: not running.core.workers)
            assert metric(running.metrics_port,
                          'avatarfarm_workers_lost_total{device_type="cpu"}') == 1.0

    run(body)


def test_an_rtmp_room_stops_before_it_starts_elsewhere(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir, rtmp_allowed_hosts=["203.0.113.7"]) as (
                running, stub, ch):
            w1 = ProtocolWorker(ch, "w1")
            s = await stub.CreateSession(create_req(
                "live", file_path="", rtmp_url="rtmp://203.0.113.7/live/key", seconds=0.0))
            await w1.next("assign")
            w1.report(s.session_id, types_pb2.SESSION_STATE_RUNNING)
            await client.wait_for(stub, s.session_id,
                                  lambda x: x.state == types_pb2.SESSION_STATE_RUNNING, 10)
            w2 = ProtocolWorker(ch, "w2")
            await until(lambda: "w2" in running.core.workers)
            drain(w1)
            # One publisher per stream key: the old one stops before the new one starts.
            release = (await w1.next("release")).release
            assert release.session_id == s.session_id and release.handover
            assert all(m.WhichOneof("kind") == "registered" for m in list(w2.inbox._queue))  # type: ignore[attr-defined]
            w1.report(s.session_id, types_pb2.SESSION_STATE_ENDED, frames=75, device=0.75,
                      reason="handed over")
            assign = (await w2.next("assign")).assign
            assert assign.session_id == s.session_id and assign.resumed_at_seconds == 3.0
            assert metric(running.metrics_port, 'avatarfarm_handovers_total{kind="restart"}') == 1.0
            for w in (w1, w2):
                await w.close()

    run(body)


def test_a_drain_with_nowhere_to_go_keeps_the_room_until_its_deadline(tmp_path: Path,
                                                                      model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir, heartbeat_interval=0.2) as (running, stub, ch):
            w1 = ProtocolWorker(ch, "w1")
            s = await stub.CreateSession(create_req("solo", seconds=0.0))
            await w1.next("assign")
            w1.report(s.session_id, types_pb2.SESSION_STATE_RUNNING)
            await client.wait_for(stub, s.session_id,
                                  lambda x: x.state == types_pb2.SESSION_STATE_RUNNING, 10)
            drain(w1, seconds=0.5)
            await until(lambda: metric(running.metrics_port,
                                       'avatarfarm_worker_drains_total{outcome="deadline"}') == 1.0)
            got = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=s.session_id))
            assert got.worker_id == "w1" and got.state == types_pb2.SESSION_STATE_RUNNING
            assert not running.core.drained("w1")
            assert w1.inbox.empty()  # not released: a room on the air is not dropped by a drain
            # And a draining worker takes no new room.
            other = await stub.CreateSession(create_req("other", seconds=0.0))
            waiting = await client.wait_for(stub, other.session_id,
                                            lambda x: "no worker" in x.reason or bool(x.reason), 10)
            assert waiting.state == types_pb2.SESSION_STATE_PENDING
            await w1.close()

    run(body)


def test_a_room_that_reaches_its_end_while_being_handed_over_just_ends(tmp_path: Path,
                                                                       model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (running, stub, ch):
            w1 = ProtocolWorker(ch, "w1")
            s = await stub.CreateSession(create_req("short", hls_dir="short", file_path="",
                                                    seconds=4.0))
            await w1.next("assign")
            w1.report(s.session_id, types_pb2.SESSION_STATE_RUNNING)
            w2 = ProtocolWorker(ch, "w2")
            await until(lambda: "w2" in running.core.workers)
            drain(w1)
            assert (await w1.next("release")).release.handover
            w1.report(s.session_id, types_pb2.SESSION_STATE_ENDED, frames=100, device=1.0,
                      reason="reached max duration")
            done = await client.wait_for(stub, s.session_id,
                                         lambda x: x.state == types_pb2.SESSION_STATE_ENDED, 10)
            assert done.progress.stream_seconds == 4.0 and done.worker_id == "w1"
            assert all(m.WhichOneof("kind") != "assign" for m in list(w2.inbox._queue))  # type: ignore[attr-defined]
            for w in (w1, w2):
                await w.close()

    run(body)
