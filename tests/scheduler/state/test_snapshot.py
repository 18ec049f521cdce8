"""The session table's indexes and the cluster snapshot, read without gRPC."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from avatarfarm.domain import Progress, SessionState, Tier
from scheduler.state.snapshot import ClusterSnapshot
from scheduler.state.table import SessionTable
from tests.builders import connect, make_core, make_spec, sent


def test_the_table_keeps_its_indexes_through_a_rooms_life(tmp_path: Path) -> None:
    core, clock = make_core(tmp_path)
    connect(core, "w1")
    spec = make_spec("r1", tier=Tier.STANDARD)
    table = SessionTable()
    s = core.create(spec)  # placed on w1
    pending = dataclasses.replace(s, state=SessionState.PENDING, load=0.0)
    assert table.put(pending) is None
    assert table.live_rooms == {(spec.tenant, "r1"): s.session_id}
    assert table.outputs == {(spec.tenant, spec.output): s.session_id}
    assert table.units[spec.tenant] == pytest.approx(s.units)
    assert table.unit_of == {s.session_id: s.units}
    assert table.preemptible == 0.0  # nothing placed yet
    assert table.put(s) == pending
    assert table.preemptible == pytest.approx(s.load) and s.load > 0
    table.progressed(s.with_progress(Progress(stream_seconds=5.0), clock()))
    assert table[s.session_id].progress.stream_seconds == 5.0
    assert table.counts[(SessionState.PLACED, Tier.STANDARD)] == 1
    ended = s.moved(SessionState.ENDED, clock())
    table.put(ended)
    assert not table.live_rooms and not table.outputs and not table.units[spec.tenant]
    assert table.preemptible == pytest.approx(0.0)
    assert table.counts[(SessionState.PLACED, Tier.STANDARD)] == 0
    assert table.counts[(SessionState.ENDED, Tier.STANDARD)] == 1
    assert len(table) == 1 and list(table) == [s.session_id]


def test_a_snapshot_does_not_change_after_it_was_taken(tmp_path: Path) -> None:
    core, clock = make_core(tmp_path)
    conn = connect(core, "w1")
    a = core.create(make_spec("a"))
    b = core.create(make_spec("b"))
    before = core.snapshot()
    assert {s.session_id for s in before.sessions(SessionState.PLACED)} == {a.session_id, b.session_id}
    (w,) = before.workers.values()
    assert (w.worker_id, w.accepting, w.draining) == ("w1", True, False)
    assert set(w.rooms) == {a.session_id, b.session_id} and w.room_units == pytest.approx(a.units + b.units)
    assert 0 < w.utilisation < 1 and w.unit_capacity > 0
    assert not before.drained("w1") and before.drained("gone")

    core.end(a.session_id)
    assert core.drain_worker("w1", clock() + 60, "scale down")
    sent(conn)
    after = core.snapshot()
    # The earlier snapshot still shows the cluster as it was.
    assert {s.session_id for s in before.sessions(SessionState.PLACED)} == {a.session_id, b.session_id}
    assert before.workers["w1"].draining is False
    assert [s.session_id for s in after.sessions(SessionState.ENDED)] == [a.session_id]
    assert after.workers["w1"].draining and not after.workers["w1"].accepting
    assert after.workers["w1"].rooms == (b.session_id,)


def test_a_tick_takes_the_snapshot_readers_use(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path)
    assert core.latest is None
    connect(core, "w1")
    core.create(make_spec("a"))
    core.tick()
    assert core.latest is not None and list(core.latest.workers) == ["w1"]
    assert core.latest.waiting.count == 0 and core.latest.queue_length == 0


def test_each_snapshot_shows_the_workers_as_they_are_though_it_reuses_what_it_can(
        tmp_path: Path) -> None:
    # A snapshot keeps each worker's derived figures for the next one while its rooms do
    # not change: every change below must show in the very next snapshot.
    core, clock = make_core(tmp_path)
    w1 = connect(core, "w1")

    def check() -> ClusterSnapshot:
        snap = core.snapshot()
        for wid, w in snap.workers.items():
            ws = core.fleet.workers[wid]
            handed = {sid for sid, (old, _) in core._handovers.items() if old == wid}
            assert set(w.rooms) == set(ws.rooms) | handed
            assert w.room_units == pytest.approx(sum(core.sessions[sid].units for sid in w.rooms))
            assert (w.compute_load, w.compute_capacity, w.utilisation) == (
                ws.compute_load, ws.compute_capacity, ws.utilisation())
            assert w.unit_capacity == ws.unit_capacity(core.fleet.target)
        return snap

    assert check().workers["w1"].rooms == ()
    a = core.create(make_spec("a", tier=Tier.PREMIUM))
    assert check().workers["w1"].rooms == (a.session_id,)
    b = core.create(make_spec("b", tier=Tier.PREMIUM))
    for s in (a, b):
        s = core.sessions[s.session_id]
        core.worker_update(w1, s.session_id, s.epoch, SessionState.RUNNING, "", None)
    assert check().workers["w1"].room_units == pytest.approx(a.units + b.units)
    core.fleet.set_capacity("w1", 0.5)  # an overloaded worker's capacity taken down
    assert check().workers["w1"].compute_capacity == 0.5
    core.fleet.set_capacity("w1", 1.0)
    connect(core, "w2")
    assert core.drain_worker("w1", clock() + 60, "maintenance")
    snap = check()  # a room handed over shows on both until its old side has stopped
    handed = [sid for sid in snap.workers["w2"].rooms if sid in snap.workers["w1"].rooms]
    assert handed
    core.worker_update(w1, handed[0], core.sessions[handed[0]].epoch, SessionState.ENDED,
                       "handed over", None)
    snap = check()
    assert handed[0] not in snap.workers["w1"].rooms and handed[0] in snap.workers["w2"].rooms
    core.end(handed[0])
    assert handed[0] not in check().workers["w2"].rooms
