"""Leadership over a real PostgreSQL store: one leader at a time, a follower that takes
over when the leader stops renewing, an old leader that knows it lost, and what a
follower answers on the API port; workers that find the leader from a list and refuse
an older leader's commands."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, workers_pb2, workers_pb2_grpc
from scheduler.api.follower import REPLICA_HEALTH, FollowerServer
from scheduler.state.leadership import Leadership, LeaseConfig
from scheduler.state.postgres import PostgresStore
from scheduler.state.store import Lease, SqliteStore
from workers.agent.link import STALE_EPOCH_RESET, SchedulerLink

FAST = LeaseConfig(ttl=1.0, renew_every=0.1, poll_every=0.05)


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_a_follower_leads_once_the_leader_stops_renewing_and_the_old_leader_knows(
        postgres_url: str) -> None:
    async def body() -> None:
        a = Leadership(PostgresStore(postgres_url), "10.0.0.1:50051", FAST)
        b = Leadership(PostgresStore(postgres_url), "10.0.0.2:50051", FAST)
        assert await a.acquire() == 1 and a.valid()
        heard: list[Lease | None] = []
        claim = asyncio.create_task(b.acquire(following=heard.append))
        # While a renews, b follows it: it never takes the lead.
        keeping = asyncio.create_task(a.keep())
        done, _ = await asyncio.wait({claim, keeping}, timeout=3 * FAST.ttl)
        assert not done
        assert heard and heard[-1] is not None and heard[-1].address == "10.0.0.1:50051"
        # a stops renewing (as if paused): b leads as soon as the lease runs out, and
        # a may no longer act by then.
        keeping.cancel()
        assert await claim == 2 and b.valid()
        assert not a.valid()
        # Resumed, a finds the lease is someone else's.
        assert await a.keep() in ("another scheduler holds the lease",
                                  "the lease ran out before the store confirmed a renewal")
        await b.release()

    run(body())


def test_a_leader_that_stops_cleanly_hands_the_lead_over_at_once(postgres_url: str) -> None:
    async def body() -> None:
        slow = LeaseConfig(ttl=60.0, renew_every=1.0, poll_every=0.05)
        a = Leadership(PostgresStore(postgres_url), "a:1", slow)
        b = Leadership(PostgresStore(postgres_url), "b:1", slow)
        await a.acquire()
        claim = asyncio.create_task(b.acquire())
        await a.release()  # well before the 60 s lease would run out
        assert await asyncio.wait_for(claim, 5) == 2

    run(body())


def test_a_scheduler_on_an_sqlite_file_leads_at_once_and_for_good(tmp_path: Path) -> None:
    async def body() -> None:
        crashed = SqliteStore(tmp_path / "s.db")
        assert crashed.claim_lead("crashed", "", 3600.0) == 1  # left an unexpired lease
        crashed.close()
        lead = Leadership(SqliteStore(tmp_path / "s.db"), "", FAST, exclusive=True)
        assert await asyncio.wait_for(lead.acquire(), 1) == 2
        keeping = asyncio.create_task(lead.keep())
        done, _ = await asyncio.wait({keeping}, timeout=2 * FAST.ttl)
        assert not done and lead.valid()  # nothing to renew: no one else can open it
        keeping.cancel()

    run(body())


def test_a_follower_refuses_every_call_naming_the_leader(tmp_path: Path) -> None:
    async def body() -> None:
        follower = await FollowerServer.start("127.0.0.1:0", None, [])
        follower.follow(Lease("x", 7, "10.1.2.3:50051", 4.0))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{follower.port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await sessions_pb2_grpc.SessionServiceStub(ch).GetSession(
                    sessions_pb2.GetSessionRequest(session_id="s1"))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the leader is at 10.1.2.3:50051" in (refused.value.details() or "")
            assert (client.LEADER_METADATA, "10.1.2.3:50051") in tuple(
                refused.value.trailing_metadata() or ())
            check = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING  # not the API
            check = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=REPLICA_HEALTH))
            assert check.status == health_pb2.HealthCheckResponse.SERVING  # but a live replica
            follower.follow(None)  # between leaders
            with pytest.raises(grpc.aio.AioRpcError, match="no scheduler leads"):
                await sessions_pb2_grpc.SessionServiceStub(ch).ListSessions(
                    sessions_pb2.ListSessionsRequest())
        await follower.stop()

    run(body())


class _Peer:
    """The worker's side of a link, recording what the schedulers said."""

    def __init__(self) -> None:
        self.registrations: list[workers_pb2.Registered] = []
        self.received: list[workers_pb2.SchedulerMessage] = []
        self.news = asyncio.Event()

    def register(self) -> workers_pb2.WorkerMessage:
        return workers_pb2.WorkerMessage(register=workers_pb2.Register(worker_id="w1"))

    def registered(self, reg: workers_pb2.Registered) -> list[workers_pb2.WorkerMessage]:
        self.registrations.append(reg)
        self.news.set()
        return []

    def tick(self) -> list[workers_pb2.WorkerMessage]:
        return [workers_pb2.WorkerMessage(heartbeat=workers_pb2.Heartbeat())]

    def receive(self, msg: workers_pb2.SchedulerMessage) -> None:
        self.received.append(msg)
        self.news.set()


class _Leader(workers_pb2_grpc.WorkerServiceServicer):
    """A scheduler's worker stream reduced to its epochs: registers the worker under
    `epoch`, then sends whatever the test puts in `commands`."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.commands: asyncio.Queue[workers_pb2.SchedulerMessage] = asyncio.Queue()

    async def Connect(self, requests: AsyncIterator[workers_pb2.WorkerMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[workers_pb2.SchedulerMessage]:
        await anext(requests)
        yield workers_pb2.SchedulerMessage(registered=workers_pb2.Registered(
            heartbeat_interval_seconds=0.2), leader_epoch=self.epoch)
        while True:
            yield await self.commands.get()


async def _serve(servicer: _Leader) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    workers_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_a_worker_finds_the_leader_from_a_follower_and_refuses_an_older_leader(
        tmp_path: Path) -> None:
    async def body() -> None:
        new, new_port = await _serve(new_leader := _Leader(epoch=5))
        follower = await FollowerServer.start("127.0.0.1:0", None, [])
        follower.follow(Lease("x", 5, f"127.0.0.1:{new_port}", 4.0))
        peer = _Peer()
        # The worker knows only the follower: it is sent on to the leader.
        link = SchedulerLink(f"127.0.0.1:{follower.port}", peer)
        running = asyncio.create_task(link.run())
        await asyncio.wait_for(peer.news.wait(), 10)
        assert link.address == f"127.0.0.1:{new_port}" and link.leader_epoch == 5
        # A command stamped with an older epoch is refused; the leader's own goes through.
        peer.news.clear()
        stale = workers_pb2.SchedulerMessage(usage_ack=workers_pb2.UsageAck(seq=1), leader_epoch=4)
        await new_leader.commands.put(stale)
        current = workers_pb2.SchedulerMessage(usage_ack=workers_pb2.UsageAck(seq=2), leader_epoch=5)
        await new_leader.commands.put(current)
        await asyncio.wait_for(peer.news.wait(), 10)
        assert [m.usage_ack.seq for m in peer.received] == [2]
        # An older leader that registers the worker is left for the next scheduler.
        old, old_port = await _serve(_Leader(epoch=3))
        link.addresses = [f"127.0.0.1:{old_port}", f"127.0.0.1:{new_port}"]
        link.address = link.addresses[0]
        peer.news.clear()
        link.restart()
        await asyncio.wait_for(peer.news.wait(), 10)
        assert link.address == f"127.0.0.1:{new_port}" and len(peer.registrations) == 2
        # An epoch that stays back far beyond any lease is the schedulers' own (a database
        # restored or replaced): the link follows it rather than refuse it for ever.
        link.addresses = [f"127.0.0.1:{old_port}"]
        link.address = link.addresses[0]
        link._stale_since = time.monotonic() - STALE_EPOCH_RESET
        peer.news.clear()
        link.restart()
        await asyncio.wait_for(peer.news.wait(), 10)
        assert link.address == f"127.0.0.1:{old_port}" and link.leader_epoch == 3
        running.cancel()
        for s in (new, old):
            await s.stop(0)
        await follower.stop()

    run(body())
