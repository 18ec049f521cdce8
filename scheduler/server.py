"""Runs the scheduler process: gRPC API (sessions, workers, health), the
Prometheus endpoint and the placement loop, with a clean shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from avatarfarm.serving import MetricsEndpoint, bind
from avatarfarm.v1 import sessions_pb2_grpc, workers_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.core import Scheduler
from scheduler.metrics import SchedulerMetrics
from scheduler.service import SessionService
from scheduler.store import SqliteStore
from scheduler.worker_service import WorkerService

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVICES = ("avatarfarm.v1.SessionService", "avatarfarm.v1.WorkerService")


@dataclass
class RunningScheduler:
    core: Scheduler
    server: grpc.aio.Server
    port: int
    metrics_port: int
    loop_task: asyncio.Task[None]
    health: health.aio.HealthServicer
    metrics_endpoint: MetricsEndpoint

    async def stop(self, grace: float = 2.0) -> None:
        self.core.shutting_down()
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        self.loop_task.cancel()
        try:
            await self.loop_task
        except asyncio.CancelledError:
            pass
        self.metrics_endpoint.stop()
        self.core.store.close()


async def start(config: SchedulerConfig) -> RunningScheduler:
    store = SqliteStore(config.database, config.sync_to_disk)
    metrics = SchedulerMetrics()
    # The metrics port first: a busy port fails before anything is serving.
    endpoint = MetricsEndpoint.start(config.metrics_port, config.metrics_host, metrics.registry)
    metrics_port = endpoint.port
    core = Scheduler(store, config, metrics)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(SessionService(core), server)
    workers_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerService(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = bind(server, config.listen)
    except OSError:
        endpoint.stop()
        store.close()
        raise
    await server.start()
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    task = asyncio.create_task(core.run(), name="placement")
    host = config.listen.rsplit(":", 1)[0]
    log.info("scheduler listening on %s:%d (metrics on %s)", host, port,
             f"{config.metrics_host}:{metrics_port}" if metrics_port else "off")
    return RunningScheduler(core, server, port, metrics_port, task, health_servicer, endpoint)


async def serve(config: SchedulerConfig) -> None:
    running = await start(config)
    # The state loaded at start-up lives as long as the process: keep the collector off
    # it, and collect young objects less often (each call allocates many small ones).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"avatarfarm scheduler ready on port {running.port} (metrics port {running.metrics_port})",
          flush=True)
    await stop.wait()
    log.info("scheduler shutting down")
    await running.stop()
