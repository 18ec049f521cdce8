"""Licences enforced by the core while rooms run, with an injected clock (no gRPC: the
core is called the way the servicers call it): a licence that expires or is
revoked ends its rooms at the next script boundary, a LICENCE event says why, the
room is never placed again, and a worker that does not end it is overruled after
the grace period. Every step is in the audit log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from avatarfarm.domain import SessionSpec, SessionState
from scheduler.core import Scheduler
from scheduler.errors import AlreadyExists, PermissionDenied
from scheduler.policy.licences import Licence
from scheduler.state.avatars import AuditAction, RegisteredAvatar
from scheduler.state.sessions import EventKind, SessionEvent
from scheduler.state.worker_conn import AssignCmd, ReleaseCmd, WorkerConn
from tests import builders
from tests.builders import T0, make_core, make_licence, make_spec, png_image, sent


def register(core: Scheduler, licence: Licence, avatar_id: str = "anna", tenant: str = "vendor") -> None:
    core.register_avatar(RegisteredAvatar(avatar_id, tenant, licence, core.clock()), operator=False)
    (core.config.avatar_dir / f"{avatar_id}.png").write_bytes(png_image(64))
    core.avatar_images_changed()


def connect(core: Scheduler, worker_id: str = "w1") -> WorkerConn:
    return builders.connect(core, worker_id, avatars=frozenset(), endpoint=f"{worker_id}:1")


def spec(room: str = "r1", **kw: str) -> SessionSpec:
    s = make_spec(room)
    return SessionSpec(s.tenant, s.room_id, "anna", s.drive_mode, s.quality, s.tier, s.output,
                       s.max_duration_seconds, s.script, kw.get("platform", "douyin"),
                       kw.get("product_category", ""), kw.get("language", ""))


async def events(core: Scheduler, sid: str) -> AsyncIterator[SessionEvent]:
    async for ev in core.watch(sid):
        yield ev


def running(core: Scheduler, conn: WorkerConn) -> str:
    s = core.create(spec())
    [assign] = [c for c in sent(conn) if isinstance(c, AssignCmd)]
    core.worker_update(conn, s.session_id, assign.epoch, SessionState.RUNNING, "", None)
    return s.session_id


def actions(core: Scheduler, avatar_id: str = "anna") -> list[tuple[str, str]]:
    core.store.commit()
    return [(e.action.value, e.clause) for e in core.avatars.entries(avatar_id, 0, 100)]


def test_an_expiring_licence_ends_its_room_at_a_script_boundary(tmp_path: Path) -> None:
    async def body() -> None:
        core, clock = make_core(tmp_path)
        register(core, make_licence(allowed_platforms=["douyin"], valid_until=T0 + 10))
        conn = connect(core)
        sid = running(core, conn)
        watch = events(core, sid)
        assert (await anext(watch)).session.state is SessionState.RUNNING
        clock.now = T0 + 9.9
        core.tick()
        assert not [c for c in sent(conn) if isinstance(c, ReleaseCmd)]
        clock.now = T0 + 10
        core.tick()
        [release] = [c for c in sent(conn) if isinstance(c, ReleaseCmd)]
        assert release.session_id == sid and release.at_script_boundary
        assert "valid_until" in release.reason and "next script boundary" in release.reason
        ev = await anext(watch)
        assert ev.kind is EventKind.LICENCE and "valid_until" in ev.message
        assert ev.session.state is SessionState.RUNNING  # until the worker reaches the boundary
        core.tick()  # said once
        assert not sent(conn)
        # New rooms are refused from now on.
        with pytest.raises(PermissionDenied, match="licence clause valid_until"):
            core.create(spec("r2"))
        # The worker finishes its segment and ends the room.
        core.worker_update(conn, sid, core.get(sid).epoch, SessionState.ENDED, "licence ended", None)
        assert core.get(sid).state is SessionState.ENDED
        assert actions(core) == [
            ("registered", ""), ("room_started", "valid_until,allowed_platforms"),
            ("licence_ended", "valid_until"), ("refused", "valid_until"),
            ("room_ended", "valid_until")]
        core.store.close()

    asyncio.run(body())


def test_a_room_whose_licence_ended_is_not_placed_again(tmp_path: Path) -> None:
    async def body() -> None:
        core, _ = make_core(tmp_path)
        register(core, make_licence())
        w1 = connect(core, "w1")
        sid = running(core, w1)
        core.revoke_licence("anna", "the talent withdrew consent")  # takes effect at once
        [release] = [c for c in sent(w1) if isinstance(c, ReleaseCmd)]
        assert release.at_script_boundary and "revoked" in release.reason
        w2 = connect(core, "w2")
        core.worker_disconnected(w1, "stream closed")  # lost before reaching the boundary
        s = core.get(sid)
        assert s.state is SessionState.ENDED and "not re-placed" in s.reason
        core.tick()
        assert not [c for c in sent(w2) if isinstance(c, AssignCmd)]
        core.store.commit()
        entries = core.avatars.entries("anna", 0, 100)
        assert [e.action for e in entries] == [
            AuditAction.REGISTERED, AuditAction.ROOM_STARTED, AuditAction.REVOKED,
            AuditAction.LICENCE_ENDED, AuditAction.ROOM_ENDED]
        assert entries[2].detail == "the talent withdrew consent"
        assert entries[1].worker_id == "w1" and entries[1].platform == "douyin"
        core.store.close()

    asyncio.run(body())


def test_a_worker_that_does_not_end_the_room_is_overruled(tmp_path: Path) -> None:
    async def body() -> None:
        core, clock = make_core(tmp_path, licence_end_grace=60.0)
        register(core, make_licence(valid_until=T0 + 5))
        conn = connect(core)
        sid = running(core, conn)
        pending = core.create(spec("waiting", platform="taobao-live"))  # placed too: one worker fits both
        clock.now = T0 + 5
        core.tick()
        assert {c.session_id for c in sent(conn) if isinstance(c, ReleaseCmd)} == {
            sid, pending.session_id}
        clock.now = T0 + 64
        core.tick()
        assert core.get(sid).state is SessionState.RUNNING
        clock.now = T0 + 65
        core.tick()
        s = core.get(sid)
        assert s.state is SessionState.ENDED and "did not end it within 60 s" in s.reason
        # Ended by the scheduler: the worker is told to stop now, not at a boundary.
        assert any(isinstance(c, ReleaseCmd) and c.session_id == sid and not c.at_script_boundary
                   for c in sent(conn))
        core.store.close()

    asyncio.run(body())


def test_waiting_rooms_end_at_once_and_a_new_licence_is_checked_against_running_rooms(
        tmp_path: Path) -> None:
    async def body() -> None:
        core, _ = make_core(tmp_path)
        register(core, make_licence(allowed_platforms=["douyin", "tiktok"]))
        waiting = core.create(spec("w", platform="tiktok"))  # no worker yet
        assert waiting.state is SessionState.PENDING
        # The owner narrows the licence: the waiting tiktok room may no longer run.
        register(core, make_licence(allowed_platforms=["douyin"]))
        s = core.get(waiting.session_id)
        assert s.state is SessionState.ENDED and "platform 'tiktok'" in s.reason
        assert actions(core)[-2:] == [("registered", ""), ("licence_ended", "allowed_platforms")]
        core.store.close()

    asyncio.run(body())


def test_ownership_and_unlicensed_local_avatars(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path)
    register(core, make_licence(), tenant="brand")
    (core.config.avatar_dir / "presenter.png").write_bytes(png_image(64))
    core.avatar_images_changed()
    with pytest.raises(PermissionDenied, match="licensed to another tenant"):
        core.create(spec())  # tenant vendor
    with pytest.raises(AlreadyExists, match="taken"):
        core.claim_avatar("anna", "vendor", operator=False)
    with pytest.raises(AlreadyExists, match="taken"):
        core.claim_avatar("presenter", "vendor", operator=False)  # a local file
    core.claim_avatar("presenter", "vendor", operator=True)  # an operator may license it
    core.claim_avatar("anna", "brand", operator=False)  # its owner may replace it
    local = make_spec("local")
    assert core.create(local).state is SessionState.PENDING  # unlicensed, allowed by default
    strict, _ = make_core(tmp_path / "strict", require_licence=True)
    (strict.config.avatar_dir / "presenter.png").write_bytes(png_image(64))
    with pytest.raises(PermissionDenied, match="require_licence"):
        strict.create(local)
    core.store.close()
    strict.store.close()
