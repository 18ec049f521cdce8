"""TLS and mTLS on real ports with certificates made in the test: the scheduler's
port (server certificate; client certificates that name a tenant or worker), the
worker's live-input port, and the worker's link to a secured scheduler with a token
file that is renewed while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from avatarfarm import client, tls
from avatarfarm.serving import add_service, bind, server_options
from avatarfarm.v1 import live_input_pb2, sessions_pb2, sessions_pb2_grpc, types_pb2
from scheduler.api import auth
from scheduler.api.auth import SubjectKind
from scheduler.config import SchedulerConfig
from scheduler.server import RunningScheduler
from scheduler.server import start as start_scheduler
from tests.certs import TestCA
from tests.scheduler.api.test_service import ProtocolWorker
from workers.agent.agent import WorkerAgent
from workers.config import WorkerConfig
from workers.device.onnx import ProviderChoice
from workers.device.pipeline import Pipeline
from workers.rooms.live_input import LiveInputService
from workers.rooms.room import Pacing
from workers.server import start as start_worker

KEY = b"t" * 32


def run(coro: Any, timeout: float = 120) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


async def until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def secured_scheduler(tmp_path: Path, model_dir: Path, ca: TestCA, *, mtls: bool,
                            **kw: Any) -> AsyncIterator[RunningScheduler]:
    server = ca.server("scheduler")
    secret = tmp_path / "token.key"
    secret.write_bytes(KEY)
    running = await start_scheduler(SchedulerConfig(
        listen="127.0.0.1:0", metrics_port=0, database=tmp_path / "state.db",
        avatar_dir=model_dir / "avatars", tls_cert_file=server.cert, tls_key_file=server.key,
        tls_client_ca_file=ca.cert if mtls else None, token_secret_file=secret, **kw))
    try:
        yield running
    finally:
        await running.stop(grace=0.1)


def token(kind: SubjectKind, name: str, ttl: float = 300.0) -> str:
    return auth.mint_token(KEY, kind, name, ttl_seconds=ttl, now=time.time())


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def spec_req(tenant: str, room: str, **kw: Any) -> sessions_pb2.CreateSessionRequest:
    kw.setdefault("file_path", f"{room}.mp4")
    return sessions_pb2.CreateSessionRequest(spec=client.spec(tenant, room, seconds=2.0, **kw))


def test_tls_on_the_scheduler_port(tmp_path: Path, model_dir: Path) -> None:
    ca, stranger = TestCA(tmp_path / "pki"), TestCA(tmp_path / "other", "other CA")

    async def body() -> None:
        async with secured_scheduler(tmp_path, model_dir, ca, mtls=False) as running:
            address = f"127.0.0.1:{running.port}"
            good = client.ClientAuth(ca_file=ca.cert, token=token(SubjectKind.TENANT, "brand"))
            async with good.channel(address) as ch:
                s = await sessions_pb2_grpc.SessionServiceStub(ch).CreateSession(spec_req("brand", "r1"))
                assert s.spec.tenant == "brand"
            # A plain client, or one that trusts another CA, never gets to speak.
            for auth_ in (client.ClientAuth(token=good.token),
                          client.ClientAuth(ca_file=stranger.cert, token=good.token)):
                async with auth_.channel(address) as ch:
                    err = await refused(sessions_pb2_grpc.SessionServiceStub(ch).GetTenant(
                        sessions_pb2.GetTenantRequest(), timeout=5))
                    assert err.code() == grpc.StatusCode.UNAVAILABLE
            # TLS without a credential is still unauthenticated.
            async with client.ClientAuth(ca_file=ca.cert).channel(address) as ch:
                err = await refused(sessions_pb2_grpc.SessionServiceStub(ch).GetTenant(
                    sessions_pb2.GetTenantRequest()))
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED

    run(body())


def test_mtls_client_certificates_identify_tenants_and_workers(tmp_path: Path, model_dir: Path) -> None:
    ca, stranger = TestCA(tmp_path / "pki"), TestCA(tmp_path / "other", "other CA")
    brand = ca.issue("brand", cn="brand", uris=("avatarfarm://tenant/brand",))
    worker = ca.issue("w1", cn="w1", uris=("avatarfarm://worker/w1",))
    anonymous = ca.issue("anon", cn="someone", dns=("someone.example",))
    forged = stranger.issue("forged", cn="ops", uris=("avatarfarm://admin/ops",))

    def as_(pair: Any, **kw: Any) -> client.ClientAuth:
        return client.ClientAuth(ca_file=ca.cert, cert_file=pair.cert, key_file=pair.key, **kw)

    async def body() -> None:
        async with secured_scheduler(tmp_path, model_dir, ca, mtls=True) as running:
            address = f"127.0.0.1:{running.port}"
            async with as_(brand).channel(address) as ch:
                stub = sessions_pb2_grpc.SessionServiceStub(ch)
                s = await stub.CreateSession(spec_req("brand", "r1"))
                err = await refused(stub.CreateSession(spec_req("rival", "r2")))
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED
                listed = await stub.ListSessions(sessions_pb2.ListSessionsRequest())
                assert [x.session_id for x in listed.sessions] == [s.session_id]
            # A token sent over mTLS is the identity, whatever the certificate names.
            async with as_(brand, token=token(SubjectKind.TENANT, "rival")).channel(address) as ch:
                err = await refused(sessions_pb2_grpc.SessionServiceStub(ch).GetSession(
                    sessions_pb2.GetSessionRequest(session_id=s.session_id)))
                assert err.code() == grpc.StatusCode.NOT_FOUND
            # A certificate of this CA that names nobody proves nothing.
            async with as_(anonymous).channel(address) as ch:
                err = await refused(sessions_pb2_grpc.SessionServiceStub(ch).GetTenant(
                    sessions_pb2.GetTenantRequest()))
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "avatarfarm://" in (err.details() or "")
            # No certificate, or one another CA signed: the handshake fails.
            for auth_ in (client.ClientAuth(ca_file=ca.cert, token=token(SubjectKind.ADMIN, "ops")),
                          as_(forged)):
                async with auth_.channel(address) as ch:
                    err = await refused(sessions_pb2_grpc.SessionServiceStub(ch).GetTenant(
                        sessions_pb2.GetTenantRequest(tenant="brand"), timeout=5))
                    assert err.code() == grpc.StatusCode.UNAVAILABLE

            # The worker certificate registers as w1 and gets the room; not as anyone else.
            async with as_(worker).channel(address) as ch:
                w = ProtocolWorker(ch, "w1")
                try:
                    assert (await w.next("assign")).assign.session_id == s.session_id
                finally:
                    await w.close()
                impostor = ProtocolWorker(ch, "w2")
                with pytest.raises(grpc.aio.AioRpcError) as err_:
                    await impostor._reader
                assert err_.value.code() == grpc.StatusCode.PERMISSION_DENIED
                await impostor.close()
            assert "w2" not in running.core.workers

    run(body())


def test_live_inputs_over_tls_and_mtls_with_strict_decoding(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "pki")
    server_pair = ca.server("worker")
    performer = ca.issue("performer", cn="performer")

    async def body() -> None:
        for mtls in (False, True):
            server = grpc.aio.server(options=server_options())
            add_service(server, live_input_pb2.DESCRIPTOR.services_by_name["LiveInputService"],
                        LiveInputService(lambda sid: None))
            creds = tls.server_credentials(server_pair.cert, server_pair.key,
                                           ca.cert if mtls else None)
            port = bind(server, "127.0.0.1:0", creds)
            await server.start()
            endpoint = f"127.0.0.1:{port}"
            try:
                auth_ = client.ClientAuth(ca_file=ca.cert, cert_file=performer.cert if mtls else None,
                                          key_file=performer.key if mtls else None)
                audio = np.zeros(1600, np.float32)
                # Through TLS to the service, which does not render this session.
                err = await refused(client.push_audio(endpoint, "s1", audio, 16000, auth=auth_,
                                                      input_token="afi1.x.y"))
                assert err.code() == grpc.StatusCode.NOT_FOUND
                err = await refused(client.push_audio(endpoint, "s1", audio, 16000,
                                                      auth=client.ClientAuth(ca_file=ca.cert)
                                                      if mtls else None, input_token="afi1.x.y"))
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                # An undecodable chunk ends the stream with INVALID_ARGUMENT.
                async with auth_.channel(endpoint) as ch:
                    push = ch.stream_unary("/avatarfarm.v1.LiveInputService/PushAudio",
                                           request_serializer=None, response_deserializer=None)
                    err = await refused(push(iter([b"\xff" * 32])))
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            finally:
                await server.stop(0)

    run(body())


def test_a_worker_agent_links_with_tls_and_a_renewed_token(pipeline: Pipeline, tmp_path: Path,
                                                          model_dir: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    ca = TestCA(tmp_path / "pki")
    token_file = tmp_path / "worker.token"
    stale = token(SubjectKind.WORKER, "w1", ttl=1.0)
    token_file.write_text(token(SubjectKind.WORKER, "w9") + "\n")  # another worker's token

    async def body() -> None:
        async with secured_scheduler(tmp_path, model_dir, ca, mtls=False) as running:
            agent = WorkerAgent("w1", f"127.0.0.1:{running.port}", pipeline, [], "127.0.0.1:1",
                                "cpu", tmp_path, pacing=Pacing.FAST,
                                scheduler_credentials=tls.channel_credentials(ca.cert),
                                scheduler_token_file=token_file)
            link = asyncio.create_task(agent.run())
            try:
                def refusals() -> list[logging.LogRecord]:
                    return [r for r in caplog.records if "refused this worker" in r.getMessage()]

                await until(lambda: bool(refusals()))
                assert refusals()[0].levelno == logging.ERROR
                assert "PERMISSION_DENIED" in refusals()[0].getMessage()
                assert not agent.connected.is_set()
                # Renewed in place: the next attempt uses it, no restart.
                token_file.write_text(token(SubjectKind.WORKER, "w1"))
                await asyncio.wait_for(agent.connected.wait(), 30)
                assert "w1" in running.core.workers
                assert stale not in caplog.text
            finally:
                link.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await link

    caplog.set_level(logging.INFO)
    run(body())


@pytest.mark.slow
def test_a_secured_farm_end_to_end(tmp_path: Path, model_dir: Path) -> None:
    """Scheduler with mTLS and tokens, a worker with a client certificate and a TLS
    live-input port, a tenant that creates a voice room and pushes its audio."""
    ca = TestCA(tmp_path / "pki")
    worker_cert = ca.issue("w1", cn="w1", uris=("avatarfarm://worker/w1",))
    worker_server = ca.server("worker-port")
    tenant_cert = ca.issue("brand", cn="brand", uris=("avatarfarm://tenant/brand",))

    async def body() -> None:
        async with secured_scheduler(tmp_path, model_dir, ca, mtls=True, overcommit=20.0) as sched:
            conf = WorkerConfig(
                scheduler=f"127.0.0.1:{sched.port}", listen="127.0.0.1:0", worker_id="w1",
                model_dir=model_dir, output_dir=tmp_path / "out", provider=ProviderChoice.CPU,
                profile_encode_sizes="256x256", profile_iterations=1, metrics_port=0,
                pacing=Pacing.FAST, profile_render_sides="256",
                scheduler_ca_file=ca.cert, scheduler_cert_file=worker_cert.cert,
                scheduler_key_file=worker_cert.key, tls_cert_file=worker_server.cert,
                tls_key_file=worker_server.key)
            worker = await start_worker(conf)
            try:
                await asyncio.wait_for(worker.agent.connected.wait(), 60)
                tenant = client.ClientAuth(ca_file=ca.cert, cert_file=tenant_cert.cert,
                                           key_file=tenant_cert.key)
                async with tenant.channel(f"127.0.0.1:{sched.port}") as ch:
                    stub = sessions_pb2_grpc.SessionServiceStub(ch)
                    s = await stub.CreateSession(spec_req(
                        "brand", "voice", drive=types_pb2.DRIVE_MODE_VOICE, width=256, height=256))
                    assert s.worker_id == "w1", s.reason
                    audio = np.sin(np.linspace(0, 600, 16000)).astype(np.float32) * 0.3
                    summary = await client.push_audio(s.input_endpoint, s.session_id, audio, 16000,
                                                      auth=client.ClientAuth(ca_file=ca.cert),
                                                      input_token=s.input_token)
                    assert summary.accepted > 0
                    # A plain client cannot push to the TLS port.
                    with pytest.raises(grpc.aio.AioRpcError):
                        await client.push_audio(s.input_endpoint, s.session_id, audio, 16000,
                                                input_token=s.input_token)
                    ended = await stub.EndSession(sessions_pb2.EndSessionRequest(session_id=s.session_id))
                    assert ended.state == types_pb2.SESSION_STATE_ENDED
            finally:
                await worker.stop(grace=0.1)

    run(body(), 240)


def test_tls_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "pki")
    pair = ca.server()
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file go together"):
        tls.server_credentials(pair.cert, None)
    with pytest.raises(ValueError, match="tls_client_ca_file needs TLS"):
        tls.server_credentials(None, None, ca.cert)
    with pytest.raises(ValueError, match="tls_key_file: cannot read"):
        tls.server_credentials(pair.cert, tmp_path / "missing.key")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="not a PEM file"):
        tls.channel_credentials(tmp_path / "junk.pem")
    assert tls.server_credentials(None, None) is None


def test_streams_end_with_their_token_and_the_worker_comes_back_with_a_renewed_one(
        pipeline: Pipeline, tmp_path: Path, model_dir: Path) -> None:
    ca = TestCA(tmp_path / "pki")
    token_file = tmp_path / "worker.token"
    token_file.write_text(token(SubjectKind.WORKER, "w1", ttl=3.0) + "\n")

    async def body() -> None:
        async with secured_scheduler(tmp_path, model_dir, ca, mtls=False,
                                     heartbeat_interval=0.2) as running:
            address = f"127.0.0.1:{running.port}"
            agent = WorkerAgent("w1", address, pipeline, [], "127.0.0.1:1", "cpu", tmp_path,
                                pacing=Pacing.FAST,
                                scheduler_credentials=tls.channel_credentials(ca.cert),
                                scheduler_token_file=token_file)
            link = asyncio.create_task(agent.run())
            try:
                await asyncio.wait_for(agent.connected.wait(), 30)
                first = running.core.workers["w1"]
                # A tenant's watch, opened with a token that lasts 2 s, ends then, though the
                # room is quiet (no event would have ended it).
                brand = client.ClientAuth(ca_file=ca.cert, token=token(SubjectKind.TENANT, "brand", ttl=2.0))
                async with brand.channel(address) as ch:
                    stub = sessions_pb2_grpc.SessionServiceStub(ch)
                    s = await stub.CreateSession(sessions_pb2.CreateSessionRequest(
                        spec=client.spec("brand", "r1", file_path="r1.mp4")))  # no end of its own
                    t0 = time.monotonic()
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        async for _ in stub.WatchSession(sessions_pb2.WatchSessionRequest(
                                session_id=s.session_id)):
                            pass
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "expired" in (err.value.details() or "")
                    assert time.monotonic() - t0 < 10
                # The worker's stream ends with its token too; renewed in the file, the
                # worker opens a new one (its rooms carry over as on any reconnect).
                token_file.write_text(token(SubjectKind.WORKER, "w1", ttl=600.0) + "\n")
                deadline = time.monotonic() + 30
                while running.core.workers.get("w1") is first:
                    assert time.monotonic() < deadline, "the worker did not come back"
                    await asyncio.sleep(0.05)
                    # Never dropped in between: a dropped worker's rooms would all move.
                    assert running.core.workers.get("w1") is not None
                lost = running.core.metrics.workers_lost.labels("cpu")._value.get()
                assert lost == 0
                await asyncio.wait_for(agent.connected.wait(), 30)
            finally:
                link.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await link

    run(body())
