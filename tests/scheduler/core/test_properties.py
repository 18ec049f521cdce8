"""The scheduler core under generated traffic (no gRPC: the core is called the way the
servicers call it): reservations are honoured, premium rooms are never degraded or
preempted to make room for others, no worker passes any capacity, and the indexes the
core keeps for speed agree with a recount."""

from __future__ import annotations

import collections
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avatarfarm.domain import DriveMode, Output, OutputKind, Quality, SessionState, Tier
from scheduler.core import Scheduler
from scheduler.policy.tenants import TenantConfig
from scheduler.state.sessions import EventKind, Session
from scheduler.state.worker_conn import WorkerResources
from tests import builders
from tests.builders import Clock, connect, make_profile, make_spec

TENANTS = {"brand": TenantConfig(reserved_units=3.0), "ka": TenantConfig(reserved_units=2.0)}
QUALITIES = [Quality(512, 512, 25), Quality(1280, 720, 30), Quality(720, 1280, 25)]

arrivals = st.lists(st.tuples(st.sampled_from(["brand", "ka", "vendor", "shop"]),
                              st.sampled_from(list(Tier)), st.sampled_from(QUALITIES),
                              st.sampled_from([DriveMode.VOICE, DriveMode.MOCAP]),
                              st.booleans()),  # end an earlier room after this arrival
                    min_size=1, max_size=40)


def make_core(tmp: Path) -> tuple[Scheduler, Clock]:
    core, clock = builders.make_core(tmp, Clock(1000.0), tenants=TENANTS, step_dwell=0.0,
                                     overcommit=0.6)
    prof = make_profile(render_512=0.004, encode_512=0.001, batch_gain=0.6)
    for i in range(3):
        connect(core, f"w{i}", device_type="h200", provider="CUDAExecutionProvider",
                profile=prof, endpoint=f"w{i}:1", resources=WorkerResources(cpu_cores=2))
    return core, clock


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrivals)
def test_reservations_hold_and_premium_is_never_taken_from(tmp_path_factory, rooms) -> None:  # type: ignore[no-untyped-def]
    core, clock = make_core(tmp_path_factory.mktemp("core"))
    events: dict[str, list[EventKind]] = collections.defaultdict(list)
    original_notify = core._notify

    def record(ev):  # type: ignore[no-untyped-def]
        events[ev.session.session_id].append(ev.kind)
        original_notify(ev)

    core._notify = record  # type: ignore[method-assign]
    made: list[str] = []
    for i, (tenant, tier, quality, mode, end_one) in enumerate(rooms):
        clock.now += 1
        spec = make_spec(f"r{i}", tenant=tenant, tier=tier, quality=quality, drive=mode,
                         output=Output(OutputKind.FILE, f"r{i}.mp4"))
        s = core.create(spec)
        made.append(s.session_id)
        if end_one and len(made) > 1:
            core.end(made[(i * 7) % (len(made) - 1)])
        core.tick()
    sessions = core.sessions.values()
    # Guaranteed rooms are placed whenever their reservations fit the fleet (they do here:
    # 5 units reserved on three workers of ~8 units each).
    for s in sessions:
        if s.guaranteed and not s.state.terminal:
            assert s.state in (SessionState.PLACED, SessionState.RUNNING), s.reason
    # Premium rooms were never degraded or preempted, and never run below their quality.
    for s in sessions:
        if s.spec.tier is Tier.PREMIUM:
            assert EventKind.PREEMPTED not in events[s.session_id]
            assert EventKind.DEGRADED not in events[s.session_id]
            assert s.step == 0
    # No worker passes its target on any resource.
    for w in core.fleet.workers.values():
        assert w.compute_load <= w.compute_capacity * core.fleet.target + 1e-9
        assert w.cpu_load <= w.cpu_capacity * core.fleet.target + 1e-9
    # The indexes agree with a recount.
    live = [s for s in sessions if not s.state.terminal]
    units: dict[str, float] = collections.defaultdict(float)
    for s in live:
        units[s.spec.tenant] += s.units
    for tenant, total in units.items():
        assert abs(core.sessions.units[tenant] - total) < 1e-6
    placed = {s.session_id for s in live if s.state in (SessionState.PLACED, SessionState.RUNNING)}
    assert placed == set(core.fleet.where)
    assert {s.session_id for s in live if s.state is SessionState.PENDING} == \
        set(core.queue.ordered())
    for state, in_state in core.sessions.by_state.items():
        assert in_state == {s.session_id: s for s in sessions if s.state is state}
    # The snapshot (copied from those) holds every live session, in the order it entered
    # its state, and every recent one, newest first; each worker's units are its rooms'.
    snap = core.snapshot()
    assert {s.session_id: s for group in snap.by_state.values() for s in group} == \
        {s.session_id: s for s in sessions}
    for state, group in snap.by_state.items():
        entered = list(core.sessions.by_state[state].values())
        assert list(group) == (entered[::-1] if state.terminal else entered)
    for w in snap.workers.values():
        assert set(w.rooms) == {sid for sid, wid in core.fleet.where.items() if wid == w.worker_id}
        assert abs(w.room_units - sum(core.sessions[sid].units for sid in w.rooms)) < 1e-9
    core.store.close()


def test_the_generated_traffic_does_reach_reclaiming(tmp_path: Path) -> None:
    """The property above is only worth its name if capacity runs short in it: a fixed
    sequence of the same shape fills the fleet and a reserved room then reclaims."""
    core, _clock = make_core(tmp_path)
    kinds: collections.Counter[EventKind] = collections.Counter()
    original_notify = core._notify

    def record(ev):  # type: ignore[no-untyped-def]
        kinds[ev.kind] += 1
        original_notify(ev)

    core._notify = record  # type: ignore[method-assign]
    q = Quality(1280, 720, 30)
    for i in range(12):
        tier = Tier.BEST_EFFORT if i % 3 == 0 else Tier.STANDARD
        core.create(make_spec(f"v{i}", tenant="vendor", tier=tier, quality=q,
                              drive=DriveMode.VOICE, output=Output(OutputKind.FILE, f"v{i}.mp4")))
    vip = core.create(make_spec("vip", tenant="brand", tier=Tier.PREMIUM, quality=q,
                                drive=DriveMode.VOICE, output=Output(OutputKind.FILE, "vip.mp4")))
    assert vip.guaranteed and vip.state is SessionState.PLACED
    assert kinds[EventKind.PREEMPTED] + kinds[EventKind.DEGRADED] > 0
    core.store.close()


def test_a_restarted_core_shows_the_rooms_that_ended_recently_whatever_their_order(
        tmp_path: Path) -> None:
    # The snapshot reads ended rooms from the newest back: rooms loaded from the store
    # come in admission order, and a room admitted later may have ended long before.
    core, clock = builders.make_core(tmp_path)
    connect(core)  # a worker holding the avatar
    first = core.create(make_spec("first")).session_id
    second = core.create(make_spec("second")).session_id
    core.end(second)
    clock.now += 2 * 3600
    core.end(first)
    core.store.close()
    again, _ = builders.make_core(tmp_path, clock)
    recent = [s.session_id for s in again.snapshot().sessions(SessionState.ENDED)]
    assert recent == [first]
    again.store.close()


def test_a_reservation_with_hours_reclaims_capacity_only_within_them(tmp_path: Path) -> None:
    core, clock = builders.make_core(
        tmp_path, Clock(3600.0), step_dwell=0.0, overcommit=0.6,  # 01:00 UTC
        tenants={"brand": TenantConfig(reserved_units=3.0, reserved_hours=["20:00-23:00"])})
    prof = make_profile(render_512=0.004, encode_512=0.001, batch_gain=0.6)
    for i in range(3):
        connect(core, f"w{i}", device_type="h200", provider="CUDAExecutionProvider",
                profile=prof, endpoint=f"w{i}:1", resources=WorkerResources(cpu_cores=2))
    reclaimed: list[EventKind] = []
    original_notify = core._notify

    def record(ev):  # type: ignore[no-untyped-def]
        if ev.kind in (EventKind.PREEMPTED, EventKind.DEGRADED):
            reclaimed.append(ev.kind)
        original_notify(ev)

    core._notify = record  # type: ignore[method-assign]
    q = Quality(1280, 720, 30)

    def room(name: str, tenant: str, tier: Tier) -> Session:
        return core.create(make_spec(name, tenant=tenant, tier=tier, quality=q, drive=DriveMode.VOICE,
                                     output=Output(OutputKind.FILE, f"{name}.mp4")))

    for i in range(12):
        room(f"v{i}", "vendor", Tier.BEST_EFFORT if i % 3 == 0 else Tier.STANDARD)
    assert core.tenant_status("brand").reserved == 0
    reclaimed.clear()  # the fleet is full: standard rooms were placed a step down
    early = room("early", "brand", Tier.PREMIUM)  # outside the hours: premium, not guaranteed
    assert not early.guaranteed and early.state is SessionState.PENDING and not reclaimed
    clock.now = 20 * 3600.0
    assert core.tenant_status("brand").reserved == 3.0
    show = room("show", "brand", Tier.PREMIUM)
    assert show.guaranteed and show.state is SessionState.PLACED and reclaimed
    clock.now = 23.5 * 3600.0  # past the hours: the show keeps its guarantee to the end
    assert core.sessions[show.session_id].guaranteed
    assert not room("late", "brand", Tier.PREMIUM).guaranteed
    core.store.close()
