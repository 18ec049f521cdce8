"""Runs the scheduler process: gRPC API (sessions, avatars, workers, health), the
Prometheus endpoint and the placement loop, with a clean shutdown on SIGTERM.

The session, avatar and worker APIs sit behind the gate (authentication, authorisation,
rate limits) and strict request decoding; health stays open, for probes."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2

from avatarfarm import tls
from avatarfarm.domain import Unavailable
from avatarfarm.preparation.faces import FaceDetector, load_detector
from avatarfarm.serving import GrpcServer, MetricsEndpoint, Service, server_options
from avatarfarm.v1 import admin_pb2, avatars_pb2, sessions_pb2, workers_pb2
from scheduler.api import auth
from scheduler.api.admin_service import AdminService
from scheduler.api.avatar_service import AvatarService
from scheduler.api.follower import REPLICA_HEALTH, FollowerServer
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
from scheduler.state.leadership import Leadership, LeaseConfig
from scheduler.state.store import Store, open_store

if TYPE_CHECKING:
    from scheduler.api.leader_pod import LeaderPodLabel

log = logging.getLogger(__name__)

@dataclass
class RunningScheduler:
    core: Scheduler
    rpc: GrpcServer
    metrics_port: int
    loop_task: asyncio.Task[None]
    metrics_endpoint: MetricsEndpoint
    leadership: Leadership
    lease_task: asyncio.Task[str]  # ends, saying why, when this scheduler no longer leads
    status_task: asyncio.Task[None] | None = None  # publishes the status page's snapshots
    autoscaler: AutoscalingController | None = None
    autoscaler_task: asyncio.Task[None] | None = None
    route: LeaderPodLabel | None = None  # Kubernetes: the label that routes to the leader
    route_task: asyncio.Task[None] | None = None  # keeps the label on this pod while it leads

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
        for task in (self.autoscaler_task, self.loop_task, self.status_task, self.lease_task,
                     self.route_task):
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
        # The last commit under this scheduler's epoch, then the lead is handed back at
        # once: a follower takes over without waiting the lease out.
        try:
            await asyncio.to_thread(self.core.store.commit)
        except Unavailable as e:  # fenced out, or the database is gone
            log.warning("the last commit was refused: %s", e)
        if self.route is not None:
            try:
                await asyncio.to_thread(self.route.release)
            except Exception as e:  # noqa: BLE001 - the next leader takes the label anyway
                log.warning("could not take the leader label off this pod: %s", e)
        await self.leadership.release()
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


def lease_config(config: SchedulerConfig) -> LeaseConfig:
    return LeaseConfig(ttl=config.lease_seconds, renew_every=config.lease_seconds / 5,
                       poll_every=config.lease_seconds / 5)


def advertised(config: SchedulerConfig, port: int) -> str:
    """Where others reach this scheduler: as configured, else its listen address (this
    host's name where that is a wildcard)."""
    if config.advertise_address:
        return config.advertise_address
    host = config.listen.rsplit(":", 1)[0]
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    return f"{host}:{port}"


def check_store(config: SchedulerConfig) -> None:
    if config.database_url and config.input_secret_file is None:
        raise ValueError(
            "with a database_url, set input_secret_file too: every scheduler sharing the "
            "database must derive the same live-input keys (mount one secret in each)")


async def start(config: SchedulerConfig, leadership: Leadership | None = None,
                store: Store | None = None, detector: FaceDetector | None = None
                ) -> RunningScheduler:
    """The scheduler, serving once it leads its store: at once on an SQLite file (the only
    scheduler it has), once the lease is free on a shared PostgreSQL store. `serve`
    passes the store and the lead it took while following."""
    # Credentials, TLS files, the exposure check and the face detector first: a mistake
    # there fails before anything is opened.
    authn = authenticator(config)
    check_exposure(config, authn.enabled)
    credentials = tls.server_credentials(config.tls_cert_file, config.tls_key_file,
                                         config.tls_client_ca_file)
    limiter = RateLimiter(rate_of(config), time.monotonic)
    if detector is None:
        detector = load_detector(config.face_detector)  # prepares video avatars
    if authn.enabled and credentials is None and not is_loopback(config.listen):
        log.warning("credentials cross the network in clear text: configure tls_cert_file and "
                    "tls_key_file unless a proxy in front terminates TLS")
    check_store(config)
    if store is None:
        store = open_store(config.database, config.database_url, config.sync_to_disk)
    if leadership is None:
        port = int(config.listen.rsplit(":", 1)[1] or 0)
        leadership = Leadership(store, advertised(config, port), lease_config(config),
                                exclusive=not config.database_url)
        await leadership.acquire()
    lease_task = leadership.keeping()
    metrics = SchedulerMetrics()
    # The metrics port first: a busy port fails before anything is serving. The status
    # pages answer "starting" until the first snapshot is published.
    board = StatusBoard()
    access = StatusAccess(authn, served_hosts(config.metrics_host, config.status_page_hosts),
                          open=config.status_page_open)
    endpoint = MetricsEndpoint.start(config.metrics_port, config.metrics_host, metrics.registry,
                                     pages=board.pages(), guard=access.check)
    metrics_port = endpoint.port
    metrics.leader_epoch.set(leadership.epoch)
    # The state is read off the event loop: the lease is renewed meanwhile (a new leader
    # over a long history reads for seconds).
    core = await asyncio.to_thread(Scheduler, store, config, metrics,
                                incarnation=leadership.epoch)
    gate = Gate(authn, limiter)
    inputs = LiveInputKeys.load(secret_path(config.database, config.input_secret_file),
                                config.input_token_ttl)
    admin = AdminService(core)
    services = [
        Service(admin_pb2.DESCRIPTOR.services_by_name["AdminService"], admin, gate),
        Service(sessions_pb2.DESCRIPTOR.services_by_name["SessionService"],
                SessionService(core, inputs), gate),
        Service(workers_pb2.DESCRIPTOR.services_by_name["WorkerService"],
                WorkerService(core, inputs, leadership), gate, check=gate.check),
        Service(avatars_pb2.DESCRIPTOR.services_by_name["AvatarService"], AvatarService(core, detector), gate),
    ]
    try:
        grpc_server = await GrpcServer.start(config.listen, credentials, services,
                                             server_options(config.max_message_bytes))
    except OSError:
        endpoint.stop()
        lease_task.cancel()
        await leadership.release()
        store.close()
        raise
    await grpc_server.serving()
    await grpc_server.health.set(REPLICA_HEALTH, health_pb2.HealthCheckResponse.SERVING)
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
    route = route_task = None
    if config.leader_pod:
        from scheduler.api.leader_pod import LeaderPodLabel

        route = LeaderPodLabel(config.leader_pod)
        route_task = asyncio.create_task(_route_to_leader(route, leadership), name="leader-route")
    return RunningScheduler(core, grpc_server, metrics_port, task, endpoint, leadership,
                            lease_task, status_task, autoscaler, autoscaler_task, route, route_task)


async def _route_to_leader(route: LeaderPodLabel, leadership: Leadership) -> None:
    """Labels this pod as the leader's while it leads, again every 30 s (a label taken off
    by hand or put back on another pod is corrected), retrying while the API server
    cannot be reached; never once the lead is gone."""
    while leadership.valid():
        try:
            await asyncio.to_thread(route.claim)
            delay = 30.0
        except Exception as e:  # noqa: BLE001 - the API server's errors: retried
            log.warning("cannot route to this leader yet (pod label): %s; retrying", e)
            delay = 2.0
        await asyncio.sleep(delay)


# The exit status of a scheduler that stopped leading, or whose store refused a commit
# (EX_TEMPFAIL): its supervisor starts it again, and it follows or reads its state anew.
LOST_LEAD_EXIT = 75


async def follow(config: SchedulerConfig, stop: asyncio.Event
                 ) -> tuple[Leadership, Store, int, FaceDetector] | None:
    """A scheduler sharing a PostgreSQL store: refuses calls, naming the leader, until
    it takes the lead (then returns it, the store, the port it listened on and the face
    detector it loaded meanwhile), or until `stop` (None)."""
    # What start() would refuse, refused before the lead is taken: a replica that could
    # not serve must never hold the lease. The detector loads here too, not on the loop
    # of a leader that must renew.
    check_exposure(config, authenticator(config).enabled)
    check_store(config)
    detector = await asyncio.to_thread(load_detector, config.face_detector)
    credentials = tls.server_credentials(config.tls_cert_file, config.tls_key_file,
                                         config.tls_client_ca_file)
    store = open_store(config.database, config.database_url, config.sync_to_disk)
    follower = await FollowerServer.start(config.listen, credentials,
                                          server_options(config.max_message_bytes),
                                          await asyncio.to_thread(store.leader))
    leadership = Leadership(store, advertised(config, follower.port), lease_config(config))
    print(f"avatarfarm scheduler following on port {follower.port}", flush=True)
    claim = asyncio.create_task(leadership.acquire(following=follower.follow))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((claim, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        await follower.stop()
    if not claim.done():
        claim.cancel()
        store.close()
        return None
    claim.result()
    leadership.keeping()  # renewing from now, while the state loads
    return leadership, store, follower.port, detector


async def serve(config: SchedulerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if config.database_url:
        # Replicas: follow until this one leads, then serve on the port it followed on.
        taken = await follow(config, stop)
        if taken is None:
            return
        leadership, store, port, detector = taken
        listen = f"{config.listen.rsplit(':', 1)[0]}:{port}"  # the port a ":0" listen got
        try:
            running = await start(dataclasses.replace(config, listen=listen), leadership, store,
                                  detector)
        except BaseException:
            await leadership.release()  # a follower takes over at once
            raise
    else:
        running = await start(config)
    # The state loaded at start-up lives as long as the process: keep the collector off
    # it. The middle generation is kept small: rooms' state is replaced at every report,
    # and a collection of 200,000 such objects (thresholds 10,000 x 20) held the loop for
    # 90-135 ms; with 2,000 x 5 the load test's CreateSession p99 at 250/s was 46-126 ms
    # (median 63) against 106-168 ms (median 136), at the same burst throughput.
    gc.collect()
    gc.freeze()
    gc.set_threshold(2_000, 5, 50)
    print(f"avatarfarm scheduler ready on port {running.port} (metrics port {running.metrics_port}); "
          f"leading under epoch {running.leadership.epoch}", flush=True)
    stopping = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(running.core.commits.failed.wait())
    await asyncio.wait((stopping, running.lease_task, failed), return_when=asyncio.FIRST_COMPLETED)
    if not stopping.done():
        # Whatever it acknowledged is committed. It no longer leads (a newer leader does
        # what it would do now), or a commit failed and its memory is ahead of the store:
        # stop at once, without another write, and start again from the store.
        why = running.lease_task.result() if running.lease_task.done() else \
            "a commit failed, so this scheduler's memory is ahead of its store"
        log.critical("%s: exiting for its supervisor to start it again (a replica follows)",
                     why)
        logging.shutdown()
        os._exit(LOST_LEAD_EXIT)
    stopping.cancel()
    failed.cancel()
    log.info("scheduler shutting down")
    await running.stop()
