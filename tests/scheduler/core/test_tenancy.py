"""Tenants on a real scheduler over gRPC: budgets refused with RESOURCE_EXHAUSTED,
reserved capacity reclaimed from borrowers, the degradation ladder applied live
with events both ways, spend running out mid-stream, and exactly-once metering."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2
from scheduler.policy.tenants import BudgetPolicy, TenantConfig
from tests.scheduler.api.test_service import ProtocolWorker, create_req, expect_status, run, scheduler

VOICE = types_pb2.DRIVE_MODE_VOICE
K = sessions_pb2


def req(tenant: str, room: str, **kw: object) -> sessions_pb2.CreateSessionRequest:
    r = create_req(room, **kw)  # type: ignore[arg-type]
    r.spec.tenant = tenant
    return r


@contextlib.asynccontextmanager
async def events(stub: sessions_pb2_grpc.SessionServiceStub, sid: str
                 ) -> AsyncIterator[list[sessions_pb2.SessionEvent]]:
    """Collects a session's WatchSession events while the block runs."""
    seen: list[sessions_pb2.SessionEvent] = []
    started = asyncio.Event()

    async def follow() -> None:
        async for ev in stub.WatchSession(sessions_pb2.WatchSessionRequest(session_id=sid)):
            seen.append(ev)
            started.set()

    task = asyncio.create_task(follow())
    await asyncio.wait_for(started.wait(), 10)
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def until(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Polls a condition with a deadline (the events arrive over a stream)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def kinds(evs: list[sessions_pb2.SessionEvent]) -> list[int]:
    return [e.kind for e in evs if e.kind != K.SESSION_EVENT_KIND_STATE]


def test_budgets_refuse_with_resource_exhausted_and_say_by_how_much(tmp_path: Path,
                                                                    model_dir: Path) -> None:
    async def body() -> None:
        conf = {"small": TenantConfig(concurrency_units=1.5)}
        async with scheduler(tmp_path, model_dir, tenants=conf,
                             allow_unknown_tenants=False) as (_, stub, _ch):
            first = await stub.CreateSession(req("small", "a"))
            assert first.compute_units == 1.0  # 512x512@25 text is the unit room
            details = await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                          stub.CreateSession(req("small", "b")))
            assert "concurrency budget of 1.50" in details and "by 0.50" in details
            # A smaller room still fits in what is left.
            await stub.CreateSession(req("small", "c", width=256, height=256))
            await expect_status(grpc.StatusCode.PERMISSION_DENIED,
                                stub.CreateSession(req("stranger", "x")))
            status = await stub.GetTenant(sessions_pb2.GetTenantRequest(tenant="small"))
            assert status.concurrency_budget_units == 1.5
            assert 1.2 < status.units_in_use <= 1.5 and status.rooms_pending == 2
            listed = await stub.ListSessions(sessions_pb2.ListSessionsRequest(tenant="small"))
            assert len(listed.sessions) == 2  # the refused room left nothing behind

    run(body)


def test_reserved_capacity_is_reclaimed_from_borrowers_in_order(tmp_path: Path,
                                                               model_dir: Path) -> None:
    async def body() -> None:
        conf = {"brand": TenantConfig(reserved_units=1.0), "ka2": TenantConfig(reserved_units=1.0)}
        async with scheduler(tmp_path, model_dir, tenants=conf, heartbeat_interval=0.2,
                             step_dwell=0.0) as (_, stub, ch):
            # 25 x 11.5 ms per voice room: three fit under the 0.9 target, a fourth does not.
            worker = ProtocolWorker(ch, "w1", render_seconds=0.010)
            s1 = await stub.CreateSession(req("vendor", "s1", drive=VOICE))
            be = await stub.CreateSession(req("vendor", "be", drive=VOICE,
                                              tier=types_pb2.TIER_BEST_EFFORT))
            s2 = await stub.CreateSession(req("vendor", "s2", drive=VOICE))
            for _ in range(3):
                await worker.next("assign")
            async with events(stub, be.session_id) as be_events, \
                    events(stub, s2.session_id) as s2_events:
                # The brand's reserved room: the best-effort borrower goes, nothing else.
                vip = await stub.CreateSession(req("brand", "vip", drive=VOICE,
                                                   tier=types_pb2.TIER_PREMIUM))
                assert vip.state == types_pb2.SESSION_STATE_PLACED
                assert (await worker.next("release")).release.session_id == be.session_id
                await until(lambda: K.SESSION_EVENT_KIND_PREEMPTED in kinds(be_events))
                moved = await stub.GetSession(K.GetSessionRequest(session_id=be.session_id))
                assert moved.state == types_pb2.SESSION_STATE_PENDING and "brand" in moved.reason
                # Premium beyond the reservation takes nothing from anyone: it waits.
                extra = await stub.CreateSession(req("brand", "extra", drive=VOICE,
                                                     tier=types_pb2.TIER_PREMIUM))
                assert extra.state == types_pb2.SESSION_STATE_PENDING
                # Another reservation's owner: the standard rooms step down, live, and none
                # is preempted.
                vip3 = await stub.CreateSession(req("ka2", "vip3", drive=VOICE,
                                                    tier=types_pb2.TIER_PREMIUM))
                assert vip3.state == types_pb2.SESSION_STATE_PLACED
                recs = [await worker.next("reconfigure") for _ in range(2)]
                assert {r.reconfigure.session_id for r in recs} == {s1.session_id, s2.session_id}
                assert all(r.reconfigure.quality.width < 512 and r.reconfigure.step > 0
                           for r in recs)
                await until(lambda: K.SESSION_EVENT_KIND_DEGRADED in kinds(s2_events))
                low = await stub.GetSession(K.GetSessionRequest(session_id=s2.session_id))
                assert low.state == types_pb2.SESSION_STATE_PLACED and low.degradation_step > 0
                assert low.rendering.width < 512 and low.spec.quality.width == 512
                for room in (be, extra, vip, vip3):
                    await stub.EndSession(K.EndSessionRequest(session_id=room.session_id))
                # Capacity is back: the standard rooms climb back to their own quality.
                up = await client.wait_for(stub, s2.session_id,
                                           lambda s: s.degradation_step == 0, 15)
                assert up.rendering.width == 512
                assert K.SESSION_EVENT_KIND_RESTORED in kinds(s2_events)
            vip_status = await stub.GetSession(K.GetSessionRequest(session_id=vip.session_id))
            assert vip_status.degradation_step == 0
            await worker.close()

    run(body)


def test_a_spent_budget_stops_rooms_after_the_grace_period_with_an_event(
        tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        conf = {"spender": TenantConfig(spend_budget=0.001, on_budget_exhausted=BudgetPolicy.STOP,
                                        grace_seconds=0.5)}
        async with scheduler(tmp_path, model_dir, tenants=conf,
                             heartbeat_interval=0.1) as (_, stub, ch):
            worker = ProtocolWorker(ch, "w1")
            room = await stub.CreateSession(req("spender", "r", seconds=0.0))
            await worker.next("assign")
            async with events(stub, room.session_id) as evs:
                # 50 device-seconds at 0.10 per device-hour: 0.0014, past the 0.001 budget.
                worker.usage(1, [(room.session_id, 250, 50.0)])
                ended = await client.wait_for(
                    stub, room.session_id, lambda s: s.state == types_pb2.SESSION_STATE_ENDED, 10)
                assert "spend budget" in ended.reason and "grace" in ended.reason
                await until(lambda: K.SESSION_EVENT_KIND_BUDGET in kinds(evs))
            details = await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                          stub.CreateSession(req("spender", "again")))
            assert "spend budget" in details
            await worker.close()

    run(body)


def test_usage_reports_are_counted_once_and_reported_by_tenant_tier_and_avatar(
        tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (running, stub, ch):
            worker = ProtocolWorker(ch, "w1")
            a = await stub.CreateSession(req("acme", "a", tier=types_pb2.TIER_PREMIUM))
            b = await stub.CreateSession(req("shop", "b"))
            for _ in range(2):
                await worker.next("assign")
            worker.usage(1, [(a.session_id, 50, 0.5), (b.session_id, 25, 0.25)])
            worker.usage(1, [(a.session_id, 50, 0.5), (b.session_id, 25, 0.25)])  # a retry
            worker.usage(3, [(a.session_id, 100, 1.0), (b.session_id, 50, 0.5)])  # seq 2 lost

            async def by_tenant() -> dict[str, sessions_pb2.UsageRow]:
                r = await stub.GetUsage(K.GetUsageRequest(
                    group_by=[K.USAGE_DIMENSION_TENANT, K.USAGE_DIMENSION_TIER,
                              K.USAGE_DIMENSION_AVATAR]))
                return {row.tenant: row for row in r.rows}

            rows: dict[str, sessions_pb2.UsageRow] = {}

            async def settled() -> bool:
                rows.update(await by_tenant())
                return "acme" in rows and rows["acme"].stream_seconds >= 4.0 - 1e-9

            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while not await settled():
                assert loop.time() < end
                await asyncio.sleep(0.02)
            assert rows["acme"].stream_seconds == 4.0 and rows["acme"].device_seconds == 1.0
            assert rows["acme"].tier == types_pb2.TIER_PREMIUM
            assert rows["acme"].avatar_id == "presenter" and rows["acme"].sessions == 1
            assert rows["shop"].stream_seconds == 2.0 and rows["shop"].device_seconds == 0.5
            # 1 device-second at 0.10 per device-hour over 4 stream-seconds.
            assert abs(rows["acme"].cost_per_stream_hour - 0.025) < 1e-9
            only = await stub.GetUsage(K.GetUsageRequest(tenant="shop"))
            assert len(only.rows) == 1 and only.rows[0].stream_seconds == 2.0
            text = urllib.request.urlopen(
                f"http://127.0.0.1:{running.metrics_port}/metrics").read().decode()
            assert 'avatarfarm_usage_reports_total{outcome="duplicate"} 1.0' in text
            assert 'avatarfarm_usage_reports_total{outcome="lost"} 1.0' in text
            await worker.close()

    run(body)
