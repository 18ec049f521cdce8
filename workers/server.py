"""Runs a worker process: load and measure the models, serve live inputs and
health, connect to the scheduler, render what it assigns.

Live inputs are served with strict request decoding, over TLS (mTLS with a client
CA) when configured; the link to the scheduler uses the configured CA, client
certificate and token."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from dataclasses import dataclass

from avatarfarm import client, tls
from avatarfarm.egress import EgressPolicy
from avatarfarm.serving import GrpcServer, MetricsEndpoint, Service, server_options
from avatarfarm.v1 import live_input_pb2
from workers.agent.agent import WorkerAgent
from workers.config import WorkerConfig
from workers.device.batching import BatchPolicy
from workers.device.pipeline import Pipeline
from workers.device.profile import measure
from workers.ingest.registry import DriverRooms
from workers.ingest.rtmp import RtmpIngest
from workers.ingest.webrtc import WebRtcEndpoint
from workers.metrics import WorkerMetrics
from workers.models.folder import ModelFolder
from workers.output.encode import EncoderSettings
from workers.output.encoder_process import shared_encoder_processes
from workers.rooms.live_input import SERVER_OPTIONS as LIVE_INPUT_OPTIONS
from workers.rooms.live_input import LiveInputService

log = logging.getLogger(__name__)


@dataclass
class RunningWorker:
    agent: WorkerAgent
    rpc: GrpcServer
    metrics_port: int
    agent_task: asyncio.Task[None]
    pipeline: Pipeline
    metrics_endpoint: MetricsEndpoint
    ingest: RtmpIngest | None = None  # camera drivers' RTMP ingest
    whip: WebRtcEndpoint | None = None  # and their WHIP (WebRTC) ingest

    @property
    def port(self) -> int:
        return self.rpc.port

    async def stop(self, grace: float = 2.0) -> None:
        await self.rpc.serving(False, each_service=False)
        await self.agent.shutdown()
        # Let the final room states reach the scheduler before the link goes.
        await _drain(self.agent)
        self.agent_task.cancel()
        try:
            await self.agent_task
        except asyncio.CancelledError:
            pass
        await self.rpc.server.stop(grace)
        if self.ingest is not None:
            await self.ingest.close()
        if self.whip is not None:
            await self.whip.close()
        self.metrics_endpoint.stop()
        self.pipeline.close()


async def _drain(agent: WorkerAgent, timeout: float = 2.0) -> None:
    # Polls with a deadline: the stream consumes the outbox at its own pace.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while agent.link.pending() and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)


def device_memory_bytes(provider: str, configured: int = 0) -> int:
    """Memory of the device that holds models, avatar caches and rooms: the configured
    figure, else the host's on a CPU worker; onnxruntime gives no GPU figure (0: unknown)."""
    if configured > 0:
        return configured
    if provider == "CPUExecutionProvider":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 0


def scheduler_auth(config: WorkerConfig) -> client.ClientAuth:
    """How this worker reaches the scheduler and proves it is `worker_id`."""
    auth = client.ClientAuth(ca_file=config.scheduler_ca_file, cert_file=config.scheduler_cert_file,
                             key_file=config.scheduler_key_file, tls=config.scheduler_tls,
                             token_file=config.token_file)
    if config.token_file is not None:
        client.read_token(config.token_file)  # a missing token fails now, not at each retry
    return auth


async def start(config: WorkerConfig) -> RunningWorker:
    # TLS files and the token first: a mistake there fails before the models load.
    link = scheduler_auth(config)
    link_credentials = link.credentials()
    credentials = tls.server_credentials(config.tls_cert_file, config.tls_key_file,
                                         config.tls_client_ca_file)
    folder = ModelFolder.open(config.model_dir)
    pipeline = Pipeline(folder, config.provider, config.intra_op_threads, config.tts_voice,
                        BatchPolicy(max_batch=config.max_batch, max_wait=config.batch_wait))
    device_type = config.device_type or ("cpu" if pipeline.provider == "CPUExecutionProvider" else "gpu")
    log.info("models loaded from %s; provider in use: %s", folder.root, pipeline.provider)
    encoder = EncoderSettings(codec=config.encoder_codec, preset=config.encoder_preset,
                              processes=config.encoder_processes)
    if encoder.processes:  # ready before the first room, which would otherwise wait for them
        await asyncio.to_thread(shared_encoder_processes(encoder.processes).start)
    profiles = await asyncio.to_thread(measure, pipeline, config.render_sides(),
                                       config.encode_sizes(), config.profile_iterations, encoder,
                                       config.max_batch)
    metrics = WorkerMetrics()
    # The metrics port first: a busy port fails before anything is serving.
    endpoint = MetricsEndpoint.start(config.metrics_port, config.metrics_host, metrics.registry)
    metrics_port = endpoint.port
    worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    agent_ref: list[WorkerAgent] = []
    live_input = Service(live_input_pb2.DESCRIPTOR.services_by_name["LiveInputService"],
                         LiveInputService(lambda sid: agent_ref[0].room(sid)))
    try:
        grpc_server = await GrpcServer.start(
            config.listen, credentials, [live_input],
            [*server_options(config.max_message_bytes), *LIVE_INPUT_OPTIONS])
    except OSError:
        endpoint.stop()
        pipeline.close()
        raise
    port = grpc_server.port
    host = config.advertise_host or config.listen.rsplit(":", 1)[0]
    # Camera rooms' drivers publish to the worker's own RTMP ingest, by each room's key.
    drivers = DriverRooms()
    ingest: RtmpIngest | None = None
    whip: WebRtcEndpoint | None = None
    try:
        if config.driver_port >= 0:
            ingest = RtmpIngest(drivers.authorize, config.listen.rsplit(":", 1)[0], config.driver_port)
            await ingest.start()
        if config.whip_port >= 0:  # and from browsers and OBS's WHIP output, over WebRTC
            whip = WebRtcEndpoint(drivers, config.listen.rsplit(":", 1)[0], config.whip_port)
            await whip.start()
    except OSError:
        if ingest is not None:
            await ingest.close()
        await grpc_server.server.stop(0)
        endpoint.stop()
        pipeline.close()
        raise
    agent = WorkerAgent(worker_id, config.scheduler, pipeline, profiles, f"{host}:{port}", device_type,
                        config.output_dir, pacing=config.pacing,
                        latency_budget=config.latency_budget, output_margin=config.output_margin,
                        sync_interval=config.sync_interval,
                        video_drift_ppm=config.inject_video_drift_ppm, encoder=encoder, metrics=metrics,
                        cpu_cores=os.cpu_count() or 1,
                        memory_bytes=device_memory_bytes(pipeline.provider, config.device_memory),
                        scheduler_credentials=link_credentials,
                        scheduler_token_file=config.token_file,
                        egress=EgressPolicy.from_config(config.rtmp_allowed_hosts,
                                                        config.rtmp_forbidden_hosts,
                                                        config.rtmp_allowed_ports),
                        driver_ingest=f"{host}:{ingest.port}" if ingest is not None else "",
                        driver_whip=f"{host}:{whip.port}" if whip is not None else "",
                        drivers=drivers)
    agent_ref.append(agent)
    await grpc_server.serving()
    task = asyncio.create_task(agent.run(), name="agent")
    log.info("worker %s: live inputs on %s:%d, metrics on %s", worker_id, host, port,
             metrics_port or "off")
    if ingest is not None:
        log.info("worker %s: camera drivers publish to rtmp://%s:%d/live/<room key>", worker_id, host,
                 ingest.port)
    if whip is not None:
        log.info("worker %s: camera drivers publish over WebRTC to http://%s:%d/whip/<room key>",
                 worker_id, host, whip.port)
    return RunningWorker(agent, grpc_server, metrics_port, task, pipeline, endpoint, ingest, whip)


async def serve(config: WorkerConfig) -> None:
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"avatarfarm worker {running.agent.worker_id} ready on port {running.port} "
          f"(metrics port {running.metrics_port})", flush=True)
    await stop.wait()
    if config.drain_timeout > 0 and running.agent.rooms:
        # Leaving (a pod deleted, a node drained): rooms move to other workers first.
        await running.rpc.serving(False, each_service=False)
        stop.clear()
        drain = asyncio.create_task(running.agent.drain(config.drain_timeout))
        again = asyncio.create_task(stop.wait())
        await asyncio.wait({drain, again}, return_when=asyncio.FIRST_COMPLETED)
        drain.cancel()
        again.cancel()
    log.info("worker shutting down")
    await running.stop()
