"""Replicated schedulers with the real processes, on a real PostgreSQL store: the
leader killed with SIGKILL, a leader frozen with SIGSTOP past its lease and woken with
SIGCONT, and a leader cut off from the database. A follower takes over within seconds, a real worker follows it, the rooms
stream on where they were and end whole, usage is counted once, and the old leader,
woken, leaves without acting."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2
from farm.local import LocalFarm
from scheduler.server import LOST_LEAD_EXIT
from tests.tcp_proxy import CuttableLink

pytestmark = pytest.mark.slow

T = TypeVar("T")
RUNNING = types_pb2.SESSION_STATE_RUNNING
ENDED = types_pb2.SESSION_STATE_ENDED
LEASE = 2.0  # seconds: a follower takes over at most this long after the leader stops


def call(port: int, fn: Callable[[sessions_pb2_grpc.SessionServiceStub], Awaitable[T]]) -> T:
    async def go() -> T:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            return await fn(sessions_pb2_grpc.SessionServiceStub(ch))
    return asyncio.run(go())


def health(port: int) -> int | None:
    async def go() -> int | None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=1)
            except grpc.aio.AioRpcError:
                return None
            return int(r.status)
    return asyncio.run(go())


def wait_following(port: int, timeout: float = 60) -> None:
    """Until the scheduler on `port` answers as a follower."""
    deadline = time.monotonic() + timeout
    while health(port) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, f"no follower on port {port}"


def create(port: int, room: str, seconds: float, tenant: str) -> Any:
    async def go(stub: sessions_pb2_grpc.SessionServiceStub) -> Any:
        s = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
            tenant, room, width=128, height=128, fps=25, hls_dir=room, seconds=seconds)))
        return await client.wait_for(
            stub, s.session_id, lambda x: x.state == RUNNING and x.progress.frames_rendered > 25, 60)
    return call(port, go)


def ended(port: int, sid: str) -> Any:
    return call(port, lambda stub: client.wait_for(stub, sid, lambda s: s.state == ENDED, 90))


def billed(port: int, tenant: str) -> float:
    async def go(stub: sessions_pb2_grpc.SessionServiceStub) -> float:
        r = await stub.GetUsage(sessions_pb2.GetUsageRequest(tenant=tenant))
        return sum(row.stream_seconds for row in r.rows)
    return call(port, go)


def billed_when_reported(port: int, tenant: str, expected: float, timeout: float = 30) -> float:
    """A tenant's billed stream-seconds once they reach `expected` (or at the deadline,
    as they are then). Usage comes in the worker's numbered reports, and after a change
    of leader those not yet acknowledged as durable are sent again, so the last of them
    may land after the room's end is visible. Lost usage never arrives and doubled usage
    overshoots, so either still fails the caller's check."""
    deadline = time.monotonic() + timeout
    while True:
        seconds = billed(port, tenant)
        if seconds >= expected - 0.1 or time.monotonic() >= deadline:
            return seconds


def replicated_farm(home: Path, model_dir: Path, database_url: str,
                    replica_urls: dict[int, str] | None = None) -> LocalFarm:
    """Two schedulers sharing the database, and one real worker that knows both."""
    (home / "models").symlink_to(model_dir)
    return LocalFarm(home, workers=1, pacing="realtime", overcommit=4.0, replicas=2,
                     database_url=database_url, replica_urls=replica_urls or {},
                     lease_seconds=LEASE,
                     scheduler_args=["--worker-timeout", "3", "--orphan-grace", "10",
                                     "--usage-flush-interval", "1"],
                     worker_args=["--profile-render-sides", "128", "--profile-encode-sizes",
                                  "128x128", "--profile-iterations", "1"])


def port_of(farm: LocalFarm, index: int) -> int:
    return int(farm.worker_address.split(",")[index].rsplit(":", 1)[1])


def test_a_follower_takes_over_a_killed_or_frozen_leader_and_no_room_or_usage_is_lost(
        tmp_path: Path, model_dir: Path, postgres_url: str) -> None:
    farm = replicated_farm(tmp_path, model_dir, postgres_url)
    with farm:
        a, b = farm.schedulers
        assert a is not None and b is not None and farm.scheduler is a
        wait_following(port_of(farm, 1))
        # A follower refuses calls, naming the leader.
        with pytest.raises(grpc.aio.AioRpcError, match=f"the leader is at {farm.address}"):
            call(port_of(farm, 1), lambda stub: stub.ListSessions(sessions_pb2.ListSessionsRequest()))
        first = [create(port_of(farm, 0), r, 12, f"t-{r}") for r in ("a", "b")]

        # SIGKILL of the leader: the follower leads within seconds.
        killed = time.monotonic()
        a.kill()
        assert farm.wait_leader(30) is b
        takeover_after_kill = time.monotonic() - killed
        farm.start_scheduler(index=0, wait=False)  # the killed one comes back, as a follower
        wait_following(port_of(farm, 0))
        # A tenant's command sent to the follower goes on to the leader it names.
        listed = subprocess.run(
            [sys.executable, "-m", "farm.cli", "rooms", "list", "--json",
             "--scheduler", f"127.0.0.1:{port_of(farm, 0)}"],
            capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert {s.session_id for s in first} <= {r["session_id"] for r in json.loads(listed.stdout)}
        second = create(port_of(farm, 1), "c", 14, "t-c")

        # SIGSTOP of the leader past its lease: the other takes over, and the worker,
        # whose pings go unanswered, follows it.
        assert b.proc is not None
        b.proc.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        assert farm.wait_leader(30) is farm.schedulers[0]
        takeover_after_stop = time.monotonic() - frozen
        # Woken, the old leader finds the lease gone and leaves at once.
        b.proc.send_signal(signal.SIGCONT)
        assert b.proc.wait(15) == LOST_LEAD_EXIT

        done = [ended(port_of(farm, 0), s.session_id) for s in (*first, second)]
        usage = [billed_when_reported(port_of(farm, 0), t, e)
                 for t, e in zip(("t-a", "t-b", "t-c"), (12, 12, 14), strict=True)]
        # The frozen one back, as a follower: SIGTERM stops a follower cleanly too.
        follower = farm.start_scheduler(index=1, wait=False)
        wait_following(port_of(farm, 1))
        assert follower.stop() == 0
    assert takeover_after_kill < 10 and takeover_after_stop < 10
    for s, seconds, expected in zip(done, usage, (12, 12, 14), strict=True):
        # Kept where it ran through both changes of leader, and ended whole.
        assert s.worker_id == "worker-0" and "re-plac" not in s.reason, s.reason
        assert s.progress.stream_seconds == pytest.approx(expected, abs=0.1)
        assert seconds == pytest.approx(expected, abs=0.1)  # not lost, not doubled
    worker_log = (tmp_path / "logs" / "worker-0.log").read_text()
    assert "from an older leader" not in worker_log  # the woken leader sent nothing


def test_a_leader_cut_off_from_the_database_stops_and_a_follower_takes_over(
        tmp_path: Path, model_dir: Path, postgres_url: str) -> None:
    server = urllib.parse.urlsplit(postgres_url)
    assert server.hostname is not None and server.port is not None
    link = CuttableLink((server.hostname, server.port))
    via_link = postgres_url.replace(f":{server.port}/", f":{link.port}/")
    farm = replicated_farm(tmp_path, model_dir, postgres_url, replica_urls={0: via_link})
    try:
        with farm:
            a, b = farm.schedulers
            assert a is not None and b is not None and farm.scheduler is a
            wait_following(port_of(farm, 1))
            room = create(port_of(farm, 0), "p", 12, "t-p")
            link.cut.set()  # the leader's packets to the database go nowhere
            cut = time.monotonic()
            assert farm.wait_leader(30) is b
            takeover = time.monotonic() - cut
            # Unable to renew, the old leader stopped acting when its lease ran out, by
            # itself: it could not have written anything, and says so by its exit.
            assert a.proc is not None and a.proc.wait(15) == LOST_LEAD_EXIT
            done = ended(port_of(farm, 1), room.session_id)
            usage = billed_when_reported(port_of(farm, 1), "t-p", 12)
    finally:
        link.close()
    assert takeover < 10
    assert done.worker_id == "worker-0" and "re-plac" not in done.reason, done.reason
    assert done.progress.stream_seconds == pytest.approx(12, abs=0.1)
    assert usage == pytest.approx(12, abs=0.1)
