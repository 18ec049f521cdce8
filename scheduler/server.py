"""Runs the scheduler process: gRPC API (sessions, avatars, workers, health), the
Prometheus endpoint and the placement loop, with a clean shutdown on SIGTERM.

The session, avatar and worker APIs sit behind the gate (authentication, authorisation,
rate limits) and strict request decoding; health stays open, for probes."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from avatarfarm import tls
from avatarfarm.preparation.faces import load_detector
from avatarfarm.serving import GrpcServer, MetricsEndpoint, Service, server_options
from avatarfarm.v1 import admin_pb2, avatars_pb2, sessions_pb2, workers_pb2
from scheduler.api import auth
from scheduler.api.admin_service import AdminService
from scheduler.api.avatar_service import AvatarService
from scheduler.api.gate import Gate
from scheduler.api.input_keys import LiveInputKeys, secret_path
from scheduler.api.ratelimit import Rate, RateLimiter
from scheduler.api.session_service import SessionService
from scheduler.api.status_access import StatusAccess, served_hosts
from scheduler.api.status_page import StatusBoard
from scheduler.api.worker_service import WorkerService
from scheduler.autoscale.controller import AutoscalingController, make_provisioner
from scheduler.config import SchedulerConfig
from scheduler.core import Scheduler
from scheduler.metrics import SchedulerMetrics
from scheduler.state.store import SqliteStore

log = logging.getLogger(__name__)

@dataclass
class RunningScheduler:
    core: Scheduler
    rpc: GrpcServer
    metrics_port: int
    loop_task: asyncio.Task[None]
    metrics_endpoint: MetricsEndpoint
    status_task: asyncio.Task[None] | None = None  # publishes the status page's snapshots
    autoscaler: AutoscalingController | None = None
    autoscaler_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self.rpc.port

    @property
    def server(self) -> grpc.aio.Server:
        return self.rpc.server

    async def stop(self, grace: float = 2.0) -> None:
        self.core.shutting_down()
        await self.rpc.serving(False)
        await self.rpc.server.stop(grace)
        for task in (self.autoscaler_task, self.loop_task, self.status_task):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self.autoscaler is not None and self.autoscaler.provisioner is not None:
            # Ray actors and Kubernetes pods stay; local worker processes stop with us.
            await asyncio.to_thread(self.autoscaler.provisioner.close)
        self.metrics_endpoint.stop()
        self.core.store.close()


def authenticator(config: SchedulerConfig) -> auth.Authenticator:
    key = auth.read_signing_key(config.token_secret_file) if config.token_secret_file else None
    return auth.Authenticator.build(
        signing_key=key, admin_keys=config.admin_api_keys_sha256,
        tenant_keys={name: t.api_keys_sha256 for name, t in config.tenants.items()},
        certificates=config.tls_client_ca_file is not None)


def rate_of(config: SchedulerConfig) -> Callable[[str], Rate]:
    try:
        default = Rate(config.rate_limit_per_second, config.rate_limit_burst)
    except ValueError as e:
        raise ValueError(f"rate_limit_per_second, rate_limit_burst: {e}") from e
    rates = {}
    for name, t in config.tenants.items():
        if t.rate_limit_per_second is not None or t.rate_limit_burst is not None:
            per_second = default.per_second if t.rate_limit_per_second is None else t.rate_limit_per_second
            burst = default.burst if t.rate_limit_burst is None else t.rate_limit_burst
            try:
                rates[name] = Rate(per_second, burst)
            except ValueError as e:
                raise ValueError(f"tenants.{name}: {e}") from e
    return lambda tenant: rates.get(tenant, default)


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or empty (every interface)


def check_exposure(config: SchedulerConfig, authenticated: bool) -> None:
    """A port others can reach serves only callers that prove who they are, unless the
    operator says otherwise."""
    if authenticated or config.allow_insecure or is_loopback(config.listen):
        return
    raise ValueError(
        f"refusing to listen on {config.listen} without authentication: anyone reaching it "
        "could act as the operator. Configure token_secret_file, API keys "
        "([tenants.NAME] api_keys_sha256, admin_api_keys_sha256) or tls_client_ca_file "
        "(mTLS), listen on 127.0.0.1, or set allow_insecure = true")


async def start(config: SchedulerConfig) -> RunningScheduler:
    # Credentials, TLS files, the exposure check and the face detector first: a mistake
    # there fails before anything is opened.
    authn = authenticator(config)
    check_exposure(config, authn.enabled)
    credentials = tls.server_credentials(config.tls_cert_file, config.tls_key_file,
                                         config.tls_client_ca_file)
    limiter = RateLimiter(rate_of(config), time.monotonic)
    detector = load_detector(config.face_detector)  # prepares video avatars
    if authn.enabled and credentials is None and not is_loopback(config.listen):
        log.warning("credentials cross the network in clear text: configure tls_cert_file and "
                    "tls_key_file unless a proxy in front terminates TLS")
    store = SqliteStore(config.database, config.sync_to_disk)
    metrics = SchedulerMetrics()
    # The metrics port first: a busy port fails before anything is serving. The status
    # pages answer "starting" until the first snapshot is published.
    board = StatusBoard()
    access = StatusAccess(authn, served_hosts(config.metrics_host, config.status_page_hosts),
                          open=config.status_page_open)
    endpoint = MetricsEndpoint.start(config.metrics_port, config.metrics_host, metrics.registry,
                                     pages=board.pages(), guard=access.check)
    metrics_port = endpoint.port
    core = Scheduler(store, config, metrics)
    gate = Gate(authn, limiter)
    inputs = LiveInputKeys.load(secret_path(config.database, config.input_secret_file),
                                config.input_token_ttl)
    admin = AdminService(core)
    services = [
        Service(admin_pb2.DESCRIPTOR.services_by_name["AdminService"], admin, gate),
        Service(sessions_pb2.DESCRIPTOR.services_by_name["SessionService"],
                SessionService(core, inputs), gate),
        Service(workers_pb2.DESCRIPTOR.services_by_name["WorkerService"], WorkerService(core, inputs), gate,
                check=gate.check),
        Service(avatars_pb2.DESCRIPTOR.services_by_name["AvatarService"], AvatarService(core, detector), gate),
    ]
    try:
        grpc_server = await GrpcServer.start(config.listen, credentials, services,
                                             server_options(config.max_message_bytes))
    except OSError:
        endpoint.stop()
        store.close()
        raise
    await grpc_server.serving()
    port = grpc_server.port
    task = asyncio.create_task(core.run(), name="placement")
    host = config.listen.rsplit(":", 1)[0]
    autoscaler = autoscaler_task = None
    if config.autoscaler.enabled:
        reach = config.autoscaler.scheduler_address or \
            f"{'127.0.0.1' if host.strip('[]') in ('', '0.0.0.0', '::') else host}:{port}"
        autoscaler = AutoscalingController(
            core, config.autoscaler,
            make_provisioner(config.autoscaler, reach, config.autoscaler.local_log_dir))
        autoscaler_task = asyncio.create_task(autoscaler.run(), name="autoscaler")
        admin.pools = autoscaler.rows
        log.info("autoscaler on (%s provisioner) for pools %s; workers reach the scheduler at %s",
                 config.autoscaler.provisioner.value, ", ".join(config.autoscaler.pools), reach)
    status_task = asyncio.create_task(
        board.publish(core, autoscaler.rows) if autoscaler else board.publish(core),
        name="status") if metrics_port else None
    log.info("scheduler listening on %s:%d (%s, %s; metrics on %s)", host, port,
             "plain" if credentials is None else ("mTLS" if config.tls_client_ca_file else "TLS"),
             "authenticated" if authn.enabled else "unauthenticated",
             f"{config.metrics_host}:{metrics_port}" if metrics_port else "off")
    return RunningScheduler(core, grpc_server, metrics_port, task, endpoint, status_task,
                            autoscaler, autoscaler_task)


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
