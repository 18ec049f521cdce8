"""A scheduler that dies after sending an assignment and before committing it: the
store never saw the assignment, a worker runs it, and the next scheduler must not
issue the same assignment epoch again (to another worker writing the same output, or
to the same worker as a different run it would take for the one it has)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from avatarfarm.domain import SessionState
from scheduler.state.worker_conn import AssignCmd
from tests.builders import connect, make_core, make_spec, sent


def copy_store(src: Path, dst: Path) -> None:
    dst.mkdir()
    with sqlite3.connect(src / "s.db") as a, sqlite3.connect(dst / "s.db") as b:
        a.backup(b)


def assignments(conn) -> list[AssignCmd]:  # type: ignore[no-untyped-def]
    return [c for c in sent(conn) if isinstance(c, AssignCmd)]


def test_a_later_scheduler_never_reissues_an_assignment_an_earlier_one_sent_unstored(
        tmp_path: Path) -> None:
    first, clock = make_core(tmp_path / "a", incarnation=1)
    w0 = connect(first, "w0")
    room = first.create(make_spec("show")).session_id
    first.worker_disconnected(w0, "host lost")  # the room waits for another worker
    # What the store holds when the first scheduler dies: its next turn (placing the
    # room) reached the worker but not the disk.
    copy_store(tmp_path / "a", tmp_path / "b")
    w1 = connect(first, "w1")
    first.place_pending()
    [lost] = assignments(w1)
    first.store.close()

    second, _ = make_core(tmp_path / "b", clock, incarnation=2)
    assert second.sessions[room].state is SessionState.PENDING
    w2 = connect(second, "w2")
    second.place_pending()
    [given] = assignments(w2)
    assert given.session_id == lost.session_id == room
    assert given.epoch > lost.epoch  # the output's fence turns the lost run away
    # The worker still running the lost assignment comes back: it is not confirmed,
    # and its next assignment of the room is a new run, not the one it has.
    back = connect(second, "w1", active={room: lost.epoch})
    assert room not in dict(back.confirmed)
    second.store.close()


def test_epochs_keep_increasing_across_restarts_of_one_scheduler(tmp_path: Path) -> None:
    core, clock = make_core(tmp_path, incarnation=1)
    w = connect(core)
    a = core.create(make_spec("a")).session_id
    [first] = assignments(w)
    core.store.close()
    core, _ = make_core(tmp_path, clock, incarnation=2)
    w = connect(core, active={a: first.epoch})
    b = core.create(make_spec("b")).session_id
    [second] = assignments(w)
    assert second.session_id == b and second.epoch > first.epoch
    core.store.close()
