"""The AvatarService and licences on a real scheduler and port, with real SQLite and
the worker protocol: every licence clause refusing and allowing CreateSession,
hostile uploads refused with nothing stored, rooms ended at a script boundary when
a licence is revoked or runs out, the audit log of every room (across a restart),
usage per avatar matching the usage ledger and its CSV export, and who may see
and change which avatar."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from avatarfarm import client, convert, images
from avatarfarm.v1 import avatars_pb2, avatars_pb2_grpc, sessions_pb2, sessions_pb2_grpc, types_pb2
from farm.cli import main
from scheduler.api import auth
from scheduler.api.auth import SubjectKind
from scheduler.config import SchedulerConfig
from scheduler.policy.tenants import TenantConfig
from scheduler.server import RunningScheduler, start
from tests.builders import jpeg_image, png_bomb, png_image
from tests.scheduler.api.test_service import ProtocolWorker, expect_status, run

KEY = b"k" * 32
Metadata = tuple[tuple[str, str], ...]
RUNNING = types_pb2.SESSION_STATE_RUNNING
ENDED = types_pb2.SESSION_STATE_ENDED


@dataclass
class Farm:
    running: RunningScheduler
    sessions: sessions_pb2_grpc.SessionServiceStub
    avatars: avatars_pb2_grpc.AvatarServiceStub
    channel: grpc.aio.Channel
    avatar_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def token(self, kind: SubjectKind, name: str) -> Metadata:
        t = auth.mint_token(KEY, kind, name, ttl_seconds=300, now=time.time())
        return (("authorization", f"Bearer {t}"),)

    def files(self) -> list[str]:
        return sorted(os.listdir(self.avatar_dir))


@contextlib.asynccontextmanager
async def farm(tmp_path: Path, model_dir: Path, *, secured: bool = False, **kw: Any) -> AsyncIterator[Farm]:
    """A scheduler with its own avatar folder (holding the built-in presenter)."""
    avatar_dir = tmp_path / "avatars"
    if not avatar_dir.exists():
        avatar_dir.mkdir()
        shutil.copy(model_dir / "avatars" / "presenter.png", avatar_dir)
    if secured:
        (tmp_path / "token.key").write_bytes(KEY)
        kw.update(token_secret_file=tmp_path / "token.key",
                  tenants={"brand": TenantConfig(), "rival": TenantConfig()})
    conf = SchedulerConfig(**{"listen": "127.0.0.1:0", "metrics_port": 0,
                              "database": tmp_path / "state.db", "avatar_dir": avatar_dir, **kw})
    running = await start(conf)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield Farm(running, sessions_pb2_grpc.SessionServiceStub(channel),
                   avatars_pb2_grpc.AvatarServiceStub(channel), channel, avatar_dir)
    finally:
        await channel.close()
        await running.stop(grace=0.1)


def licence(**kw: Any) -> avatars_pb2.Licence:
    """A Licence message; valid_from / valid_until as seconds from now."""
    for key in ("valid_from", "valid_until"):
        if key in kw:
            kw[key] = convert.timestamp(time.time() + kw[key])
    return avatars_pb2.Licence(**kw)


def registration(avatar_id: str = "anna", tenant: str = "brand", image: bytes | None = None,
                 **lic: Any) -> avatars_pb2.RegisterAvatarRequest:
    return avatars_pb2.RegisterAvatarRequest(
        avatar_id=avatar_id, tenant=tenant, reference_image=png_image() if image is None else image,
        licence=licence(**lic), voice=avatars_pb2.VoiceSettings(voice="en-us", rate=160))


def room(room_id: str, tenant: str = "brand", avatar: str = "anna", platform: str = "douyin",
         product_category: str = "", language: str = "", **kw: Any) -> sessions_pb2.CreateSessionRequest:
    spec = client.spec(tenant, room_id, avatar=avatar, file_path=f"{tenant}-{room_id}.mp4", **kw)
    spec.platform, spec.product_category, spec.language = platform, product_category, language
    return sessions_pb2.CreateSessionRequest(spec=spec)


async def audit(f: Farm, avatar_id: str = "anna", md: Metadata = ()) -> list[avatars_pb2.AuditEntry]:
    r = await f.avatars.ListAuditEntries(avatars_pb2.ListAuditEntriesRequest(avatar_id=avatar_id),
                                         metadata=md)
    return list(r.entries)


# clause, licence refusing, room refused, licence allowing, room allowed
CLAUSES = [
    ("allowed_platforms", {"allowed_platforms": ["douyin", "taobao-live"]}, {"platform": "tiktok"},
     None, {"platform": "taobao-live"}),
    ("allowed_platforms", {"allowed_platforms": ["douyin"]}, {"platform": ""}, None, {}),
    ("forbidden_categories", {"forbidden_categories": ["alcohol"]}, {"product_category": "alcohol"},
     None, {"product_category": "cosmetics"}),
    ("allowed_categories", {"allowed_categories": ["cosmetics"]}, {"product_category": "toys"},
     None, {"product_category": "cosmetics"}),
    ("allowed_languages", {"allowed_languages": ["zh-CN"]}, {"language": "zh-TW"}, None,
     {"language": "zh-CN"}),
    ("allowed_languages", {"allowed_languages": ["zh"]}, {"language": "en"}, None, {"language": "zh-TW"}),
    ("valid_from", {"valid_from": 3600}, {}, {"valid_from": -3600}, {}),
    ("valid_until", {"valid_until": -60, "valid_from": -3600}, {}, {"valid_until": 3600}, {}),
    ("revoked", {}, {}, {}, {}),
]


@pytest.mark.parametrize(("clause", "refusing", "refused", "allowing", "allowed"), CLAUSES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CLAUSES)])
def test_each_licence_clause_refuses_and_allows_rooms(
        tmp_path: Path, model_dir: Path, clause: str, refusing: dict[str, Any],
        refused: dict[str, Any], allowing: dict[str, Any] | None, allowed: dict[str, Any]) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as f:
            await f.avatars.RegisterAvatar(registration(**refusing))
            if clause == "revoked":
                await f.avatars.RevokeLicence(avatars_pb2.RevokeLicenceRequest(avatar_id="anna"))
            details = await expect_status(grpc.StatusCode.PERMISSION_DENIED,
                                          f.sessions.CreateSession(room("no", **refused)))
            assert details.startswith("avatar 'anna' ") and clause in details, details
            if allowing is not None:  # the owner registers again with a licence that allows it
                await f.avatars.RegisterAvatar(registration(**allowing))
            s = await f.sessions.CreateSession(room("yes", **allowed))
            assert s.state == types_pb2.SESSION_STATE_PENDING
            registry = f.running.core.metrics.registry
            assert registry.get_sample_value("avatarfarm_licence_refusals_total",
                                             {"clause": clause}) == 1
            refusals = [e for e in await audit(f) if e.action == "refused"]
            assert [(e.clause, e.tenant, e.room_id) for e in refusals] == [(clause, "brand", "no")]
            assert clause in refusals[0].detail

    run(body)


HOSTILE = [
    ("over the image limit", png_image() + bytes(100_000), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "at most 65536"),
    ("over the message limit", bytes(300_000), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ("truncated png", png_image()[:800], grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
    ("truncated jpeg", jpeg_image()[:700], grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
    ("gif", b"GIF89a\x60\x00\x60\x00" + bytes(400), grpc.StatusCode.INVALID_ARGUMENT, "PNG or JPEG"),
    ("text named .png", b"<html>avatar.png</html>", grpc.StatusCode.INVALID_ARGUMENT, "PNG or JPEG"),
    ("decompression bomb", png_bomb(), grpc.StatusCode.INVALID_ARGUMENT, "50000x50000"),
    ("empty", b"", grpc.StatusCode.INVALID_ARGUMENT, "exactly one of reference_image"),
]


@pytest.mark.parametrize(("data", "code", "says"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_uploads_are_refused_and_nothing_is_stored(
        tmp_path: Path, model_dir: Path, data: bytes, code: grpc.StatusCode, says: str) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir, avatar_image_max_bytes=64 * 1024,
                        max_message_bytes=256 * 1024) as f:
            before = f.files()
            details = await expect_status(code, f.avatars.RegisterAvatar(registration(image=data)))
            assert says in details
            assert f.files() == before == ["presenter.png"]  # no image, no temporary file
            assert not (await f.avatars.ListAvatars(avatars_pb2.ListAvatarsRequest())).avatars
            assert not await audit(f)
            await expect_status(grpc.StatusCode.NOT_FOUND, f.sessions.CreateSession(room("r")))
        with sqlite3.connect(tmp_path / "state.db") as db:
            assert db.execute("SELECT COUNT(*) FROM avatars").fetchone() == (0,)

    run(body)


def test_an_unwritable_avatar_folder_registers_nothing(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as f:
            shutil.rmtree(f.avatar_dir)
            f.avatar_dir.write_text("not a folder")
            await expect_status(grpc.StatusCode.UNAVAILABLE, f.avatars.RegisterAvatar(registration()))
            assert not (await f.avatars.ListAvatars(avatars_pb2.ListAvatarsRequest())).avatars
            assert not await audit(f)

    run(body)


def test_an_upload_is_normalised_and_stored_atomically(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as f:
            jpeg = jpeg_image(128) + b"PK\x03\x04trailing-payload" * 50
            a = await f.avatars.RegisterAvatar(registration(image=jpeg, allowed_platforms=["douyin"]))
            stored = (f.avatar_dir / "anna.png").read_bytes()
            assert stored == images.normalise(jpeg).png and b"trailing-payload" not in stored
            assert a.image_sha256 == hashlib.sha256(stored).hexdigest()
            assert (a.width, a.height, a.tenant, a.voice.voice) == (128, 128, "brand", "en-us")
            assert list(a.licence.allowed_platforms) == ["douyin"]
            assert f.files() == ["anna.png", "presenter.png"]
            # Usable at once (the folder is looked at afresh after a write).
            s = await f.sessions.CreateSession(room("r1"))
            assert s.spec.avatar_id == "anna"
            # Its owner replaces it; the local presenter cannot be taken by registering.
            b = await f.avatars.RegisterAvatar(registration(image=png_image(80)))
            assert b.width == 80 and (f.avatar_dir / "anna.png").read_bytes() != stored
            details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, f.avatars.RegisterAvatar(
                registration(allowed_languages=["english"])))
            assert "BCP 47" in details

    run(body)


def test_a_room_is_assigned_with_its_avatars_voice(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as f:
            await f.avatars.RegisterAvatar(registration())  # voice en-us at 160 words a minute
            worker = ProtocolWorker(f.channel, "w1")
            await f.sessions.CreateSession(room("live"))
            a = (await worker.next("assign")).assign
            assert (a.voice, a.voice_rate) == ("en-us", 160.0)
            # A local avatar (not registered) speaks with the worker's default voice.
            await f.sessions.CreateSession(room("local", avatar="presenter"))
            b = (await worker.next("assign")).assign
            assert (b.voice, b.voice_rate) == ("", 0.0)

    run(body)


def test_revocation_ends_a_running_room_at_its_script_boundary(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as f:
            await f.avatars.RegisterAvatar(registration())
            worker = ProtocolWorker(f.channel, "w1")
            s = await f.sessions.CreateSession(room("live"))
            await worker.next("assign")
            worker.report(s.session_id, RUNNING, frames=25, device=0.1)
            await client.wait_for(f.sessions, s.session_id, lambda x: x.state == RUNNING, 10)
            kinds: list[tuple[int, str]] = []
            watching = asyncio.Event()
            call = f.sessions.WatchSession(sessions_pb2.WatchSessionRequest(session_id=s.session_id))

            async def follow() -> None:
                async for ev in call:
                    kinds.append((ev.kind, ev.message))
                    watching.set()

            watcher = asyncio.create_task(follow())
            await asyncio.wait_for(watching.wait(), 10)
            revoked = await f.avatars.RevokeLicence(avatars_pb2.RevokeLicenceRequest(
                avatar_id="anna", reason="consent withdrawn"))
            assert revoked.revoked and revoked.revoked_reason == "consent withdrawn"
            release = (await worker.next("release")).release
            assert release.session_id == s.session_id and release.at_script_boundary
            assert "revoked" in release.reason
            assert "revoked" in await expect_status(grpc.StatusCode.PERMISSION_DENIED,
                                                    f.sessions.CreateSession(room("again")))
            # The worker reaches the boundary and ends the room.
            worker.report(s.session_id, ENDED, frames=50, device=0.2, reason="licence revoked")
            await asyncio.wait_for(watcher, 10)
            assert (sessions_pb2.SESSION_EVENT_KIND_LICENCE, release.reason) in kinds
            entries = await audit(f)
            assert [(e.action, e.clause) for e in entries] == [
                ("registered", ""), ("room_started", "unrestricted"), ("revoked", "revoked"),
                ("licence_ended", "revoked"), ("refused", "revoked"), ("room_ended", "revoked")]
            await worker.close()

    run(body)


def test_an_expiring_licence_ends_the_room_and_it_is_not_placed_again(tmp_path: Path,
                                                                      model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as f:
            await f.avatars.RegisterAvatar(registration(valid_until=1.5))
            worker = ProtocolWorker(f.channel, "w1")
            s = await f.sessions.CreateSession(room("live"))
            await worker.next("assign")
            worker.report(s.session_id, RUNNING, frames=25, device=0.1)
            release = (await worker.next("release")).release  # within a tick of the expiry
            assert release.at_script_boundary and "valid_until" in release.reason
            now = await f.sessions.GetSession(sessions_pb2.GetSessionRequest(session_id=s.session_id))
            assert now.state == RUNNING and now.reason == release.reason
            # The worker is lost before the boundary: the room ends rather than move.
            await worker.close()
            ended = await client.wait_for(f.sessions, s.session_id, lambda x: x.state == ENDED, 10)
            assert "not re-placed" in ended.reason
            w2 = ProtocolWorker(f.channel, "w2")
            await f.sessions.CreateSession(room("local", avatar="presenter"))  # unlicensed: runs
            assert (await w2.next("assign")).assign.spec.room_id == "local"
            await w2.close()

    run(body)


def test_every_room_is_audited_and_the_registry_survives_a_restart(
        tmp_path: Path, model_dir: Path, store_config: dict[str, Any]) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir, **store_config) as f:
            await f.avatars.RegisterAvatar(registration(allowed_platforms=["douyin", "taobao-live"]))
            worker = ProtocolWorker(f.channel, "w1")
            ids = []
            for i, platform in enumerate(("douyin", "taobao-live")):
                s = await f.sessions.CreateSession(room(f"r{i}", platform=platform))
                await worker.next("assign")
                ids.append(s.session_id)
            await expect_status(grpc.StatusCode.PERMISSION_DENIED,
                                f.sessions.CreateSession(room("r9", platform="tiktok")))
            worker.report(ids[0], ENDED, frames=25, reason="script done")
            await client.wait_for(f.sessions, ids[0], lambda x: x.state == ENDED, 10)
            await f.sessions.EndSession(sessions_pb2.EndSessionRequest(session_id=ids[1]))
            before = await audit(f)
            await worker.close()
        async with farm(tmp_path, model_dir, **store_config) as f:
            [a] = (await f.avatars.ListAvatars(avatars_pb2.ListAvatarsRequest())).avatars
            assert a.avatar_id == "anna" and list(a.licence.allowed_platforms) == ["douyin", "taobao-live"]
            pages: list[avatars_pb2.AuditEntry] = []
            after = 0
            while True:
                page = await f.avatars.ListAuditEntries(avatars_pb2.ListAuditEntriesRequest(
                    avatar_id="anna", after_seq=after, page_size=2))
                pages += page.entries
                after = page.next_after_seq
                if not after:
                    break
            assert pages == before
            rows = [(e.action, e.session_id, e.platform, e.worker_id, e.clause) for e in pages]
            assert rows == [
                ("registered", "", "", "", ""),
                ("room_started", ids[0], "douyin", "w1", "allowed_platforms"),
                ("room_started", ids[1], "taobao-live", "w1", "allowed_platforms"),
                ("refused", "", "tiktok", "", "allowed_platforms"),
                ("room_ended", ids[0], "douyin", "w1", "allowed_platforms"),
                ("room_ended", ids[1], "taobao-live", "w1", "allowed_platforms")]
            assert [e.seq for e in pages] == sorted({e.seq for e in pages})
            assert pages[4].detail == "script done"
            await f.avatars.RevokeLicence(avatars_pb2.RevokeLicenceRequest(avatar_id="anna"))
            assert (await audit(f))[-1].seq > pages[-1].seq  # numbering goes on
        url = store_config.get("database_url")
        with (psycopg.connect(url) if url else sqlite3.connect(tmp_path / "state.db")) as db, \
                pytest.raises((sqlite3.DatabaseError, psycopg.DatabaseError), match="append-only"):
            db.execute("DELETE FROM audit_log")

    run(body)


def test_usage_per_avatar_matches_the_ledger_and_exports_as_csv(
        tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir, device_prices={"cpu": 3.6}) as f:
            await f.avatars.RegisterAvatar(registration())
            worker = ProtocolWorker(f.channel, "w1")
            rooms = [("a1", "anna", "douyin", 100, 1.0), ("a2", "anna", "douyin", 50, 0.5),
                     ("a3", "anna", "taobao-live", 75, 0.25), ("p1", "presenter", "douyin", 25, 0.1)]
            ids = {}
            for name, avatar, platform, _, _ in rooms:
                s = await f.sessions.CreateSession(room(name, avatar=avatar, platform=platform))
                await worker.next("assign")
                ids[name] = s.session_id
                worker.report(s.session_id, RUNNING)
            worker.usage(1, [(ids[name], frames, device) for name, _, _, frames, device in rooms])
            for name, _, _, frames, _ in rooms:
                await client.wait_for(f.sessions, ids[name],
                                      lambda x, n=frames: x.progress.frames_rendered == n, 10)
            got = await f.avatars.GetAvatarUsage(avatars_pb2.GetAvatarUsageRequest(avatar_id="anna"))
            ledger = await f.sessions.GetUsage(sessions_pb2.GetUsageRequest(group_by=[
                sessions_pb2.USAGE_DIMENSION_AVATAR, sessions_pb2.USAGE_DIMENSION_PLATFORM,
                sessions_pb2.USAGE_DIMENSION_TENANT]))
            expected = [(r.avatar_id, r.platform, r.tenant, r.sessions, r.stream_seconds, r.cost)
                        for r in ledger.rows if r.avatar_id == "anna"]
            assert [(r.avatar_id, r.platform, r.tenant, r.sessions, r.stream_seconds, r.cost)
                    for r in got.rows] == expected
            assert [(r.platform, r.sessions, r.stream_seconds) for r in got.rows] == [
                ("douyin", 2, 6.0), ("taobao-live", 1, 3.0)]
            assert got.rows[0].stream_hours == pytest.approx(6.0 / 3600)
            assert got.rows[0].cost == pytest.approx(1.5 * 3.6 / 3600)
            every = await f.avatars.GetAvatarUsage(avatars_pb2.GetAvatarUsageRequest())
            assert {r.avatar_id for r in every.rows} == {"anna", "presenter"}  # the operator's view
            capsys.readouterr()
            code = await asyncio.to_thread(main, [
                "avatar-usage", "--scheduler", f.address, "--avatar", "anna",
                "--start", "2020-01-01T00:00:00Z"])
            assert code == 0
            table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
            assert table[0] == ["avatar_id", "voice", "platform", "tenant", "sessions", "stream_hours",
                                "cost"]
            assert [(a, p, t, int(n), float(h), float(c)) for a, v, p, t, n, h, c in table[1:]] == [
                (r.avatar_id, r.platform, r.tenant, r.sessions,
                 pytest.approx(r.stream_hours, abs=1e-6), pytest.approx(r.cost, abs=1e-6))
                for r in got.rows]
            await worker.close()

    run(body)


def test_register_avatar_from_the_command_line(tmp_path: Path, model_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "anna.jpg"
    image.write_bytes(jpeg_image(96))
    lic = tmp_path / "licence.toml"
    lic.write_text('person_ref = "talent-0042"\nallowed_platforms = ["douyin"]\n'
                   'allowed_languages = ["zh"]\nvalid_until = 2099-01-01T00:00:00Z\n')

    async def body() -> None:
        async with farm(tmp_path, model_dir) as f:
            args = ["register-avatar", "--scheduler", f.address, "--avatar-id", "anna",
                    "--image", str(image), "--licence", str(lic)]
            assert await asyncio.to_thread(main, args) == 1  # an operator must name the tenant
            assert "tenant is required" in capsys.readouterr().err
            assert await asyncio.to_thread(main, [*args, "--tenant", "brand"]) == 0
            assert "avatar anna registered for tenant brand: 96x96" in capsys.readouterr().out
            a = await f.avatars.GetAvatar(avatars_pb2.GetAvatarRequest(avatar_id="anna"))
            assert a.licence.person_ref == "talent-0042"
            assert a.licence.valid_until.ToDatetime().year == 2099
            lic.write_text("allowed_platform = ['douyin']\n")
            assert await asyncio.to_thread(main, [*args, "--tenant", "brand"]) == 2
            assert "unknown key" in capsys.readouterr().err

    run(body)


def test_tenants_see_and_change_only_their_own_avatars(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir, secured=True) as f:
            brand, rival = f.token(SubjectKind.TENANT, "brand"), f.token(SubjectKind.TENANT, "rival")
            ops = f.token(SubjectKind.ADMIN, "ops")
            a = await f.avatars.RegisterAvatar(registration(tenant=""), metadata=brand)  # its own
            assert a.tenant == "brand"
            s = await f.sessions.CreateSession(room("mine"), metadata=brand)
            assert s.spec.avatar_id == "anna"
            # The rival may not use it, and learns nothing about it from the avatar API.
            assert "licensed to another tenant" in await expect_status(
                grpc.StatusCode.PERMISSION_DENIED,
                f.sessions.CreateSession(room("theirs", tenant="rival"), metadata=rival))
            calls = {
                "GetAvatar": lambda i: f.avatars.GetAvatar(
                    avatars_pb2.GetAvatarRequest(avatar_id=i), metadata=rival),
                "RevokeLicence": lambda i: f.avatars.RevokeLicence(
                    avatars_pb2.RevokeLicenceRequest(avatar_id=i), metadata=rival),
                "ListAuditEntries": lambda i: f.avatars.ListAuditEntries(
                    avatars_pb2.ListAuditEntriesRequest(avatar_id=i), metadata=rival),
                "GetAvatarUsage": lambda i: f.avatars.GetAvatarUsage(
                    avatars_pb2.GetAvatarUsageRequest(avatar_id=i), metadata=rival),
            }
            for name, call in calls.items():
                theirs = await expect_status(grpc.StatusCode.NOT_FOUND, call("anna"))
                unknown = await expect_status(grpc.StatusCode.NOT_FOUND, call("nobody"))
                assert theirs == unknown.replace("nobody", "anna"), name
            assert not (await f.avatars.ListAvatars(avatars_pb2.ListAvatarsRequest(),
                                                    metadata=rival)).avatars
            await expect_status(grpc.StatusCode.PERMISSION_DENIED, f.avatars.ListAvatars(
                avatars_pb2.ListAvatarsRequest(tenant="brand"), metadata=rival))
            await expect_status(grpc.StatusCode.PERMISSION_DENIED, f.avatars.RegisterAvatar(
                registration("other", tenant="brand"), metadata=rival))
            await expect_status(grpc.StatusCode.ALREADY_EXISTS, f.avatars.RegisterAvatar(
                registration(tenant="rival", image=png_image(80)), metadata=rival))
            await expect_status(grpc.StatusCode.ALREADY_EXISTS, f.avatars.RegisterAvatar(
                registration("presenter", tenant="rival"), metadata=rival))  # a local avatar
            assert (await f.avatars.GetAvatar(avatars_pb2.GetAvatarRequest(avatar_id="anna"),
                                              metadata=brand)).image_sha256 == a.image_sha256
            await expect_status(grpc.StatusCode.PERMISSION_DENIED, f.avatars.ListAvatars(
                avatars_pb2.ListAvatarsRequest(), metadata=f.token(SubjectKind.WORKER, "w1")))
            await expect_status(grpc.StatusCode.UNAUTHENTICATED, f.avatars.ListAvatars(
                avatars_pb2.ListAvatarsRequest()))
            # The owner sees the rival's attempt without the rival's name; the operator sees all.
            refused = [e for e in await audit(f, md=brand) if e.action == "refused"]
            assert [(e.tenant, e.room_id, e.clause, e.detail) for e in refused] == [
                ("", "", "tenant", "a room of another tenant")]
            refused = [e for e in await audit(f, md=ops) if e.action == "refused"]
            assert [(e.tenant, e.room_id) for e in refused] == [("rival", "theirs")]
            assert [x.avatar_id for x in (await f.avatars.ListAvatars(
                avatars_pb2.ListAvatarsRequest(), metadata=ops)).avatars] == ["anna"]
            await f.avatars.RevokeLicence(avatars_pb2.RevokeLicenceRequest(avatar_id="anna"),
                                          metadata=brand)

    run(body)
