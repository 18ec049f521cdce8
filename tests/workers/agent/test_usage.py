"""Held usage reports: a room whose end the scheduler has not acknowledged is still
this worker's to register with."""

from __future__ import annotations

from avatarfarm.v1 import types_pb2, workers_pb2
from workers.agent.usage import UsageReports


def update(sid: str, state: int, epoch: int = 1) -> workers_pb2.SessionUpdate:
    return workers_pb2.SessionUpdate(session_id=sid, state=state, epoch=epoch)  # type: ignore[arg-type]


def test_a_room_counts_as_ending_until_the_report_of_its_end_is_acknowledged() -> None:
    usage = UsageReports(epoch=7)
    usage.next([update("a", types_pb2.SESSION_STATE_RUNNING), update("b", types_pb2.SESSION_STATE_RUNNING)])
    usage.next([update("a", types_pb2.SESSION_STATE_ENDED, epoch=3)])
    usage.next([update("b", types_pb2.SESSION_STATE_FAILED, epoch=2)])
    assert usage.ending() == {"a": 3, "b": 2}  # running reports end nothing
    usage.acknowledged(2)
    assert usage.ending() == {"b": 2}
    assert [r.seq for r in usage.unapplied(2)] == [3]
    usage.acknowledged(3)
    assert usage.ending() == {}
