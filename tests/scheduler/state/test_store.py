from __future__ import annotations

from pathlib import Path

import pytest

from avatarfarm.domain import Progress, ScriptSegment, SessionState
from scheduler.state.sessions import InvalidTransition, Session
from scheduler.state.store import SqliteStore
from tests.builders import make_spec


def make_session(sid: str = "s1", seq: int = 1, request_id: str = "") -> Session:
    return Session(sid, make_spec(f"room-{sid}"), SessionState.PENDING, seq, 1.0, 1.0, request_id)


def test_sessions_survive_reopening_the_database(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = SqliteStore(db)
    s = make_session(request_id="req-1")
    store.put_session(s)
    placed = s.moved(SessionState.PLACED, 2.0, worker_id="w1", load=0.4,
                     progress=Progress(10, 1, 0.4, 0.1, (("render", 0.08),), 0, 0.025, -0.04, 7))
    store.put_session(placed)
    store.append_script("s1", [ScriptSegment("hello", 0.5)])
    store.append_script("s1", [ScriptSegment("again")])
    store.close()

    reopened = SqliteStore(db)
    [got] = reopened.load_sessions()
    assert got == placed
    assert reopened.find_request("vendor", "req-1") == "s1"
    assert reopened.find_request("other-tenant", "req-1") is None
    assert reopened.script("s1") == [ScriptSegment("hello", 0.5), ScriptSegment("again", 0.0)]


def test_terminal_states_are_final() -> None:
    ended = make_session().moved(SessionState.ENDED, 2.0)
    with pytest.raises(InvalidTransition):
        ended.moved(SessionState.RUNNING, 3.0)
    with pytest.raises(InvalidTransition):
        make_session().moved(SessionState.RUNNING, 2.0)  # pending must be placed first


def test_a_resumed_rooms_progress_adds_counters_and_keeps_the_latest_sync() -> None:
    from scheduler.state.sessions import plus

    before = Progress(100, 2, 4.0, 1.0, (("render", 0.8),), 1, 0.04, -0.04, 5)
    fresh = Progress(25, 0, 1.0, 0.25, (("render", 0.2),))  # the new worker has not checked yet
    assert plus(before, fresh) == Progress(125, 2, 5.0, 1.25, (("render", 1.0),), 1, 0.04, -0.04, 5)
    checked = Progress(50, 0, 2.0, 0.5, (), 0, 0.0, 0.0, 2)
    assert plus(before, checked).sync_checks == 7
    assert plus(before, checked).av_offset_seconds == 0.0
