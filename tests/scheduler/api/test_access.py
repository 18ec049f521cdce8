"""Access control on a real scheduler and port: every SessionService method under
missing, expired, forged and other tenants' credentials, operator and worker
credentials, API keys and tokens; the worker stream's credential; rate limits;
strict decoding of malformed requests; message size; and the refusal to expose
an unauthenticated port. Every refusal leaves the state as it was."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2, workers_pb2, workers_pb2_grpc
from scheduler.api import auth
from scheduler.api.auth import SubjectKind
from scheduler.config import SchedulerConfig
from scheduler.policy.tenants import TenantConfig
from scheduler.server import RunningScheduler, start
from tests.scheduler.api.test_service import ProtocolWorker, create_req, expect_status, run

KEY = b"s" * 32
Metadata = tuple[tuple[str, str], ...]


@dataclass
class Farm:
    running: RunningScheduler
    stub: sessions_pb2_grpc.SessionServiceStub
    channel: grpc.aio.Channel
    key: bytes

    def token(self, kind: SubjectKind, name: str, ttl: float = 300.0, *, now: float | None = None,
              key: bytes | None = None) -> Metadata:
        t = auth.mint_token(key or self.key, kind, name, ttl_seconds=ttl,
                            now=time.time() if now is None else now)
        return (("authorization", f"Bearer {t}"),)

    def tenant(self, name: str) -> Metadata:
        return self.token(SubjectKind.TENANT, name)

    @property
    def admin(self) -> Metadata:
        return self.token(SubjectKind.ADMIN, "ops")

    def snapshot(self) -> list[tuple[str, str, str, int]]:
        core = self.running.core
        return [(s.session_id, s.spec.tenant, s.state.value, len(core.store.script(s.session_id)))
                for s in sorted(core.sessions.values(), key=lambda s: s.seq)]


@contextlib.asynccontextmanager
async def secured(tmp_path: Path, model_dir: Path, **kw: Any) -> AsyncIterator[Farm]:
    secret = tmp_path / "token.key"
    secret.write_bytes(KEY + b"\n")
    kw.setdefault("tenants", {
        "brand": TenantConfig(api_keys_sha256=[auth.hash_api_key("brand-api-key")]),
        "rival": TenantConfig()})
    conf = SchedulerConfig(listen="127.0.0.1:0", metrics_port=0, database=tmp_path / "state.db",
                           avatar_dir=model_dir / "avatars", token_secret_file=secret,
                           admin_api_keys_sha256=[auth.hash_api_key("ops-api-key")], **kw)
    running = await start(conf)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield Farm(running, sessions_pb2_grpc.SessionServiceStub(channel), channel, KEY)
    finally:
        await channel.close()
        await running.stop(grace=0.1)


def req(tenant: str, room_id: str, **kw: Any) -> sessions_pb2.CreateSessionRequest:
    kw.setdefault("file_path", f"{tenant}-{room_id}.mp4")
    return sessions_pb2.CreateSessionRequest(spec=client.spec(tenant, room_id, seconds=2.0, **kw))


async def first_event(call: Any) -> Any:
    async for ev in call:
        call.cancel()
        return ev
    return None


# Each SessionService method, aimed at `sid` (a session of tenant `tenant`).
Call = Callable[[sessions_pb2_grpc.SessionServiceStub, str, str, Metadata], Awaitable[Any]]
METHODS: dict[str, Call] = {
    "CreateSession": lambda stub, sid, tenant, md: stub.CreateSession(req(tenant, "new"), metadata=md),
    "GetSession": lambda stub, sid, tenant, md: stub.GetSession(
        sessions_pb2.GetSessionRequest(session_id=sid), metadata=md),
    "ListSessions": lambda stub, sid, tenant, md: stub.ListSessions(
        sessions_pb2.ListSessionsRequest(tenant=tenant), metadata=md),
    "EndSession": lambda stub, sid, tenant, md: stub.EndSession(
        sessions_pb2.EndSessionRequest(session_id=sid), metadata=md),
    "WatchSession": lambda stub, sid, tenant, md: first_event(stub.WatchSession(
        sessions_pb2.WatchSessionRequest(session_id=sid), metadata=md)),
    "AppendScript": lambda stub, sid, tenant, md: stub.AppendScript(sessions_pb2.AppendScriptRequest(
        session_id=sid, segments=[types_pb2.ScriptSegment(text="hello")]), metadata=md),
    "GetUsage": lambda stub, sid, tenant, md: stub.GetUsage(
        sessions_pb2.GetUsageRequest(tenant=tenant), metadata=md),
    "GetTenant": lambda stub, sid, tenant, md: stub.GetTenant(
        sessions_pb2.GetTenantRequest(tenant=tenant), metadata=md),
}


def test_every_session_method_refuses_bad_credentials_and_changes_nothing(
        tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def body() -> None:
        async with secured(tmp_path, model_dir) as farm:
            sid = (await farm.stub.CreateSession(req("brand", "live"), metadata=farm.tenant("brand"))).session_id
            expired = farm.token(SubjectKind.TENANT, "brand", ttl=60, now=time.time() - 3600)
            forged = farm.token(SubjectKind.ADMIN, "ops", key=b"x" * 32)
            secrets = [expired[0][1], forged[0][1], "guessed-api-key"]
            before = farm.snapshot()
            unauthenticated = {
                "missing": (),
                "expired": expired,
                "forged": forged,
                "not a token": (("authorization", "Bearer not-a-token"),),
                "wrong scheme": (("authorization", "Basic dXNlcjpwYXNz"),),
                "unknown API key": (("x-api-key", "guessed-api-key"),),
            }
            for method, call in METHODS.items():
                for what, md in unauthenticated.items():
                    details = await expect_status(grpc.StatusCode.UNAUTHENTICATED,
                                                  call(farm.stub, sid, "brand", md))
                    assert details, (method, what)
                await expect_status(grpc.StatusCode.PERMISSION_DENIED,
                                    call(farm.stub, sid, "brand", farm.token(SubjectKind.WORKER, "w1")))
            assert farm.snapshot() == before
            log_text = caplog.text + "".join(str(r.args) for r in caplog.records)
            assert "refused" in log_text
            for secret in secrets:
                assert secret.removeprefix("Bearer ") not in log_text

    run(body)


def test_tenants_see_only_their_own_rooms_and_others_look_like_nothing(tmp_path: Path,
                                                                      model_dir: Path) -> None:
    async def body() -> None:
        async with secured(tmp_path, model_dir) as farm:
            stub, brand, rival = farm.stub, farm.tenant("brand"), farm.tenant("rival")
            sid = (await stub.CreateSession(req("brand", "live"), metadata=brand)).session_id
            rival_sid = (await stub.CreateSession(req("rival", "other"), metadata=rival)).session_id
            before = farm.snapshot()

            # Another tenant's session and no session at all: the same answer.
            for method in ("GetSession", "EndSession", "WatchSession", "AppendScript"):
                theirs = await expect_status(grpc.StatusCode.NOT_FOUND,
                                             METHODS[method](stub, sid, "", rival))
                missing = await expect_status(grpc.StatusCode.NOT_FOUND,
                                              METHODS[method](stub, "f" * 32, "", rival))
                assert theirs.replace(sid, "ID") == missing.replace("f" * 32, "ID"), method
            # Acting in another tenant's name, or reading its figures.
            for method in ("CreateSession", "ListSessions", "GetUsage", "GetTenant"):
                details = await expect_status(grpc.StatusCode.PERMISSION_DENIED,
                                              METHODS[method](stub, sid, "brand", rival))
                assert "rival" in details and "brand" in details
            # A retried request_id of another tenant does not find its session.
            await stub.CreateSession(sessions_pb2.CreateSessionRequest(
                spec=req("brand", "keyed").spec, request_id="r-1"), metadata=brand)
            before = farm.snapshot()
            await expect_status(grpc.StatusCode.PERMISSION_DENIED, stub.CreateSession(
                sessions_pb2.CreateSessionRequest(spec=req("brand", "keyed").spec, request_id="r-1"),
                metadata=rival))
            assert farm.snapshot() == before

            # Listings default to the caller's own tenant.
            mine = await stub.ListSessions(sessions_pb2.ListSessionsRequest(), metadata=rival)
            assert [s.session_id for s in mine.sessions] == [rival_sid]
            status = await stub.GetTenant(sessions_pb2.GetTenantRequest(), metadata=rival)
            assert status.tenant == "rival"
            usage = await stub.GetUsage(sessions_pb2.GetUsageRequest(
                group_by=[sessions_pb2.USAGE_DIMENSION_TENANT]), metadata=rival)
            assert {r.tenant for r in usage.rows} <= {"rival"}

            # The operator sees every tenant; an API key acts as its tenant.
            everyone = await stub.ListSessions(sessions_pb2.ListSessionsRequest(), metadata=farm.admin)
            assert {s.spec.tenant for s in everyone.sessions} == {"brand", "rival"}
            assert (await stub.GetTenant(sessions_pb2.GetTenantRequest(tenant="brand"),
                                         metadata=(("x-api-key", "ops-api-key"),))).tenant == "brand"
            key = (("x-api-key", "brand-api-key"),)
            assert (await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=sid),
                                          metadata=key)).spec.tenant == "brand"
            await expect_status(grpc.StatusCode.NOT_FOUND, stub.GetSession(
                sessions_pb2.GetSessionRequest(session_id=rival_sid), metadata=key))

            # The owner may end its room; the operator any room.
            await stub.AppendScript(sessions_pb2.AppendScriptRequest(
                session_id=sid, segments=[types_pb2.ScriptSegment(text="hi")]), metadata=brand)
            ended = await stub.EndSession(sessions_pb2.EndSessionRequest(session_id=sid), metadata=key)
            assert ended.state == types_pb2.SESSION_STATE_ENDED
            ended = await stub.EndSession(sessions_pb2.EndSessionRequest(session_id=rival_sid),
                                          metadata=farm.admin)
            assert ended.state == types_pb2.SESSION_STATE_ENDED

    run(body)


async def connect(channel: grpc.aio.Channel, worker_id: str, md: Metadata) -> grpc.aio.AioRpcError:
    """Opens a worker stream that registers as `worker_id`; the error that ends it."""
    call = workers_pb2_grpc.WorkerServiceStub(channel).Connect(
        iter([workers_pb2.WorkerMessage(register=workers_pb2.Register(
            worker_id=worker_id, input_endpoint="127.0.0.1:1"))]), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    return err.value


def test_workers_connect_only_with_their_own_credential(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with secured(tmp_path, model_dir) as farm:
            ch = farm.channel
            cases = [
                ((), grpc.StatusCode.UNAUTHENTICATED),
                (farm.token(SubjectKind.WORKER, "w1", ttl=1, now=time.time() - 60),
                 grpc.StatusCode.UNAUTHENTICATED),
                (farm.token(SubjectKind.WORKER, "w1", key=b"x" * 32), grpc.StatusCode.UNAUTHENTICATED),
                (farm.token(SubjectKind.WORKER, "w2"), grpc.StatusCode.PERMISSION_DENIED),
                (farm.tenant("brand"), grpc.StatusCode.PERMISSION_DENIED),
            ]
            for md, code in cases:
                err = await connect(ch, "w1", md)
                assert err.code() == code, err.details()
            assert not farm.running.core.workers

            # With its own token, a worker registers and gets rooms.
            sid = (await farm.stub.CreateSession(req("brand", "live"), metadata=farm.tenant("brand"))).session_id
            token_channel = client.channel(f"127.0.0.1:{farm.running.port}",
                                           metadata=lambda: farm.token(SubjectKind.WORKER, "w1"))
            worker = ProtocolWorker(token_channel, "w1")
            try:
                msg = await worker.next("assign")
                assert msg.assign.session_id == sid
                assert "w1" in farm.running.core.workers
            finally:
                await worker.close()
                await token_channel.close()

    run(body)


def test_a_tenant_over_its_rate_limit_is_told_when_to_retry(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        tenants = {"brand": TenantConfig(rate_limit_per_second=0.01, rate_limit_burst=3),
                   "rival": TenantConfig()}
        async with secured(tmp_path, model_dir, tenants=tenants, rate_limit_per_second=1000.0,
                           rate_limit_burst=1000.0) as farm:
            brand = farm.tenant("brand")
            get = sessions_pb2.GetTenantRequest()
            for _ in range(3):
                await farm.stub.GetTenant(get, metadata=brand)
            details = await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                          farm.stub.GetTenant(get, metadata=brand))
            assert "0.01 calls/s (bursts of 3)" in details and "retry in" in details
            before = farm.snapshot()
            await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                farm.stub.CreateSession(req("brand", "x"), metadata=brand))
            assert farm.snapshot() == before
            # Other tenants and the operator are not held back by it.
            for _ in range(10):
                await farm.stub.GetTenant(get, metadata=farm.tenant("rival"))
                await farm.stub.GetTenant(sessions_pb2.GetTenantRequest(tenant="brand"),
                                          metadata=farm.admin)

    run(body)


def test_a_batch_of_rooms_counts_each_room_against_the_rate_limit(tmp_path: Path,
                                                                   model_dir: Path) -> None:
    async def body() -> None:
        tenants = {"brand": TenantConfig(rate_limit_per_second=0.01, rate_limit_burst=3)}
        async with secured(tmp_path, model_dir, tenants=tenants) as farm:
            brand = farm.tenant("brand")

            def batch(*names: str) -> sessions_pb2.CreateSessionsRequest:
                return sessions_pb2.CreateSessionsRequest(requests=[req("brand", n) for n in names])

            # More rooms than the burst can never pass: the answer says how to split them.
            details = await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, farm.stub.CreateSessions(
                batch("a", "b", "c", "d"), metadata=brand))
            assert "batches of at most 3" in details
            # A room of another tenant's is refused alone, as CreateSession refuses it.
            mixed = sessions_pb2.CreateSessionsRequest(requests=[req("brand", "a"), req("rival", "b")])
            done = await farm.stub.CreateSessions(mixed, metadata=brand)
            assert [r.code for r in done.results] == [0, grpc.StatusCode.PERMISSION_DENIED.value[0]]
            assert done.results[0].session.spec.tenant == "brand" and done.results[1].message
            assert not done.results[1].HasField("session")
            # Two of the three calls the burst allows are spent: a batch of two waits.
            details = await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, farm.stub.CreateSessions(
                batch("c", "d"), metadata=brand))
            assert "retry in" in details
            assert [t for _, t, _, _ in farm.snapshot()] == ["brand"]

    run(body)


def _raw(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(f"/avatarfarm.v1.SessionService/{method}",
                               request_serializer=None, response_deserializer=None)


def _bad_utf8(message: Any, text: str) -> bytes:
    """`message` serialized with its string `text` replaced by invalid UTF-8 of the same length."""
    data = message.SerializeToString()
    assert data.count(text.encode()) == 1
    return data.replace(text.encode(), b"\xff\xfe" + b"\x80" * (len(text) - 2))


def test_malformed_requests_are_invalid_arguments_and_change_nothing(tmp_path: Path,
                                                                     model_dir: Path) -> None:
    async def body() -> None:
        async with secured(tmp_path, model_dir) as farm:
            brand = farm.tenant("brand")
            sid = (await farm.stub.CreateSession(req("brand", "live"), metadata=brand)).session_id
            before = farm.snapshot()
            bad_script = _bad_utf8(sessions_pb2.AppendScriptRequest(
                session_id=sid, segments=[types_pb2.ScriptSegment(text="MARKER")]), "MARKER")
            bad_spec = _bad_utf8(req("brand", "room-two", script=[
                types_pb2.ScriptSegment(text="MARKER")]), "MARKER")
            noise = os.urandom(64) + b"\xff" * 16
            for method, data in [("AppendScript", bad_script), ("CreateSession", bad_spec),
                                 ("CreateSession", noise), ("GetSession", noise)]:
                details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                                              _raw(farm.channel, method)(data, metadata=brand))
                assert "is not a valid avatarfarm.v1." in details
            # Refused before decoding matters: a caller without credentials learns nothing.
            await expect_status(grpc.StatusCode.UNAUTHENTICATED, _raw(farm.channel, "GetSession")(noise))
            assert farm.snapshot() == before

            # A worker stream with an undecodable message is ended with INVALID_ARGUMENT.
            stream = farm.channel.stream_stream("/avatarfarm.v1.WorkerService/Connect",
                                                request_serializer=None, response_deserializer=None)
            call = stream(iter([noise]), metadata=farm.token(SubjectKind.WORKER, "w1"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert not farm.running.core.workers
            # The server goes on serving.
            assert (await farm.stub.GetSession(sessions_pb2.GetSessionRequest(session_id=sid),
                                               metadata=brand)).session_id == sid

    run(body)


def test_oversized_messages_are_refused_and_the_server_goes_on(tmp_path: Path,
                                                               model_dir: Path) -> None:
    async def body() -> None:
        async with secured(tmp_path, model_dir, max_message_bytes=256 * 1024) as farm:
            brand = farm.tenant("brand")
            sid = (await farm.stub.CreateSession(req("brand", "live"), metadata=brand)).session_id
            before = farm.snapshot()
            big = [types_pb2.ScriptSegment(text="x" * 1000) for _ in range(300)]
            await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, farm.stub.CreateSession(
                req("brand", "big", script=big), metadata=brand))
            await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, farm.stub.AppendScript(
                sessions_pb2.AppendScriptRequest(session_id=sid, segments=big), metadata=brand))
            assert farm.snapshot() == before
            got = await farm.stub.GetSession(sessions_pb2.GetSessionRequest(session_id=sid),
                                             metadata=brand)
            assert got.session_id == sid

    run(body)


def test_the_default_message_limit_is_four_mebibytes(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with secured(tmp_path, model_dir) as farm:
            big = [types_pb2.ScriptSegment(text="x" * 4096) for _ in range(1100)]
            await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, farm.stub.CreateSession(
                req("brand", "big", script=big), metadata=farm.tenant("brand")))
            assert farm.snapshot() == []

    run(body)


def test_an_exposed_port_needs_authentication_or_an_explicit_opt_out(tmp_path: Path,
                                                                     model_dir: Path) -> None:
    base = dict(metrics_port=0, database=tmp_path / "state.db", avatar_dir=model_dir / "avatars")

    async def body() -> None:
        with pytest.raises(ValueError, match="allow_insecure"):
            await start(SchedulerConfig(listen="0.0.0.0:0", **base))  # type: ignore[arg-type]
        assert not (tmp_path / "state.db").exists()  # refused before opening anything
        running = await start(SchedulerConfig(listen="0.0.0.0:0", allow_insecure=True,
                                              **base))  # type: ignore[arg-type]
        await running.stop(grace=0.1)
        # With API keys configured, no opt-out is needed.
        running = await start(SchedulerConfig(
            listen="0.0.0.0:0", admin_api_keys_sha256=[auth.hash_api_key("k")],
            **base))  # type: ignore[arg-type]
        await running.stop(grace=0.1)

    run(body)


def test_unauthenticated_loopback_farms_work_as_before(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        conf = SchedulerConfig(listen="127.0.0.1:0", metrics_port=0, database=tmp_path / "s.db",
                               avatar_dir=model_dir / "avatars")
        running = await start(conf)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
                stub = sessions_pb2_grpc.SessionServiceStub(ch)
                s = await stub.CreateSession(create_req("r1"))
                listed = await stub.ListSessions(sessions_pb2.ListSessionsRequest())
                assert [x.session_id for x in listed.sessions] == [s.session_id]
                # Malformed bytes are INVALID_ARGUMENT here too.
                await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                                    _raw(ch, "GetSession")(b"\xff" * 8))
        finally:
            await running.stop(grace=0.1)

    run(body)


def test_a_late_register_under_another_id_ends_the_stream(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with secured(tmp_path, model_dir) as farm:
            token = farm.token(SubjectKind.WORKER, "w1")
            ch = client.channel(f"127.0.0.1:{farm.running.port}", metadata=lambda: token)
            worker = ProtocolWorker(ch, "w1")
            try:
                await worker.next("registered")
                worker.outbox.put_nowait(workers_pb2.WorkerMessage(register=workers_pb2.Register(
                    worker_id="w2")))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await worker._reader
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "w2" not in farm.running.core.workers
            finally:
                await worker.close()
                await ch.close()

    run(body)
