"""The operator API (admin credentials only, see the gate): workers with their load and
state, draining a worker by hand, the autoscaler's pools. It reads what the status page
reads (``status_page.snapshot`` of the core's read model), so both say the same."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import grpc

from avatarfarm.v1 import admin_pb2, admin_pb2_grpc
from scheduler.api.status_page import WorkerRow, snapshot
from scheduler.autoscale.controller import PoolRow
from scheduler.core import Scheduler

DEFAULT_DRAIN_SECONDS = 60.0
MAX_DRAIN_SECONDS = 3600.0


def worker_to_pb(w: WorkerRow) -> admin_pb2.WorkerInfo:
    return admin_pb2.WorkerInfo(
        worker_id=w.worker_id, device_type=w.device_type, provider=w.provider,
        utilisation=w.utilisation, load=w.load, capacity=w.capacity, rooms=w.rooms,
        accepting=w.accepting, draining=w.draining, drain_reason=w.drain_reason,
        drain_seconds_left=w.drain_seconds_left, seen_seconds_ago=w.seen_seconds_ago)


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: Scheduler,
                 pools: Callable[[], Sequence[PoolRow]] | None = None) -> None:
        self.core = core
        self.pools = pools  # the autoscaler's rows; None: no autoscaler

    def _workers(self) -> list[WorkerRow]:
        cluster = self.core.snapshot()
        return list(snapshot(cluster, worker_limit=len(cluster.workers)).workers)

    async def ListWorkers(self, request: admin_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ListWorkersResponse:
        rows = sorted(self._workers(), key=lambda w: w.worker_id)
        return admin_pb2.ListWorkersResponse(workers=[worker_to_pb(w) for w in rows])

    async def DrainWorker(self, request: admin_pb2.DrainWorkerRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.WorkerInfo:
        seconds = request.deadline_seconds or DEFAULT_DRAIN_SECONDS
        if not (math.isfinite(seconds) and 0 < seconds <= MAX_DRAIN_SECONDS):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"deadline_seconds must be in (0, {MAX_DRAIN_SECONDS:g}]")
        reason = request.reason[:200] or "drained by an operator"
        if not self.core.drain_worker(request.worker_id, self.core.clock() + seconds, reason):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"worker {request.worker_id[:128]!r} is not connected")
        await self.core.durable()
        row = next((w for w in self._workers() if w.worker_id == request.worker_id), None)
        if row is None:  # gone between the two reads
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"worker {request.worker_id[:128]!r} is not connected")
        assert row is not None
        return worker_to_pb(row)

    async def ListPools(self, request: admin_pb2.ListPoolsRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.ListPoolsResponse:
        if self.pools is None:
            return admin_pb2.ListPoolsResponse(autoscaler=False)
        return admin_pb2.ListPoolsResponse(autoscaler=True, pools=[
            admin_pb2.PoolInfo(pool=r.name, device_type=r.device_type, desired=r.desired,
                               ready=r.ready, booting=r.booting, draining=r.draining,
                               reason=r.reason) for r in self.pools()])
