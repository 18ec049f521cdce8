"""A drain hands over all of a worker's rooms at once: each must find its own place.
A room being handed over holds its place on the worker that will take it, so the next
one does not count on the same spare capacity; it waits on its old worker instead of
being stopped with nowhere to go."""

from __future__ import annotations

from pathlib import Path

from avatarfarm.domain import SessionState, Tier
from scheduler.state.worker_conn import AssignCmd, ReleaseCmd, WorkerConn
from tests.builders import connect, make_core, make_spec, sent


def running(core, conn: WorkerConn) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    for cmd in sent(conn):
        if isinstance(cmd, AssignCmd):
            core.worker_update(conn, cmd.session_id, cmd.epoch, SessionState.RUNNING, "", None)
            out.append(cmd.session_id)
    return out


def test_rooms_handed_over_together_do_not_count_on_the_same_capacity(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path)
    w1 = connect(core, "w1")  # a worker here holds two rooms
    for i in range(2):  # premium: they are not degraded to fit
        core.create(make_spec(f"a{i}", tier=Tier.PREMIUM))
    on_w1 = running(core, w1)
    w2 = connect(core, "w2")
    core.create(make_spec("b0"))
    assert running(core, w2) and len(on_w1) == 2  # w2 has room for one more
    assert core.drain_worker("w1", core.clock() + 60, "maintenance")
    handed = [c.session_id for c in sent(w1) if isinstance(c, ReleaseCmd) and c.handover]
    # One handover: it holds the place on w2; the other room stays on the air on w1.
    assert len(handed) == 1
    assert handed[0] in core.fleet.workers["w2"].rooms
    assert core.fleet.workers["w2"].utilisation() <= core.fleet.target + 1e-9
    assert not core.drained("w1")  # both still count there until they have stopped
    core.worker_update(w1, handed[0], core.get(handed[0]).epoch, SessionState.ENDED,
                       "handed over", None)
    moved = core.get(handed[0])
    assert (moved.worker_id, moved.state) == ("w2", SessionState.RUNNING)
    (stays,) = [sid for sid in on_w1 if sid != handed[0]]
    assert (core.get(stays).worker_id, core.get(stays).state) == ("w1", SessionState.RUNNING)
    assert not [c for c in sent(w1) if isinstance(c, ReleaseCmd)]  # not stopped: nowhere to go
