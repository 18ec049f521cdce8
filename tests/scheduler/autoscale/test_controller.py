"""The autoscaling controller on a real core with an injected clock: what it asks
of a provisioner (the load test's simulated one, which boots workers after a
delay) and when — workers removed only once drained, stuck boots replaced,
removals before additions."""

from __future__ import annotations

from pathlib import Path

import pytest

from avatarfarm.domain import Quality, SessionState
from loadtests.autoscale_sim import Clock, SimProvisioner
from scheduler.autoscale.controller import AutoscalingController
from scheduler.autoscale.provisioners import PoolConfig, ProvisionerKind
from scheduler.config import SchedulerConfig
from scheduler.core import Scheduler
from scheduler.policy.autoscaler import AutoscalerConfig
from scheduler.policy.tenants import TenantConfig
from scheduler.state.store import SqliteStore
from scheduler.state.worker_conn import AssignCmd, ReleaseCmd, WorkerConn
from tests.builders import make_profile, make_spec, png_image, sent


def make(tmp: Path, tenants: dict[str, TenantConfig] | None = None, **auto: object
         ) -> tuple[Scheduler, AutoscalingController, SimProvisioner, Clock]:
    clock = Clock(1000.0)
    (tmp / "avatars").mkdir()
    (tmp / "avatars" / "presenter.png").write_bytes(png_image(64))
    pool = PoolConfig(device_type="cpu", min_workers=0, max_workers=4, units_per_worker=1.0)
    config = SchedulerConfig(
        database=tmp / "s.db", avatar_dir=tmp / "avatars", worker_timeout=1e9, tenants=tenants or {},
        autoscaler=AutoscalerConfig(**{  # type: ignore[arg-type]
            "provisioner": ProvisionerKind.LOCAL, "headroom": 0.0, "scale_down_tolerance": 0.0,
            "ramp_seconds": 0.0, "scale_down_window_seconds": 0.0, "pools": {"cpu": pool}, **auto}))
    core = Scheduler(SqliteStore(config.database), config, clock=clock)
    prov = SimProvisioner(clock, boot_seconds=30.0)
    return core, AutoscalingController(core, config.autoscaler, prov, clock=clock), prov, clock


def step(ctl: AutoscalingController, prov: SimProvisioner) -> list[tuple[int, tuple[str, ...], str]]:
    ctl.clock.t += 5.0  # type: ignore[attr-defined]
    ctl.set_instances("cpu", prov.instances("cpu"))
    calls = ctl.step()
    for c in calls:
        c.apply(prov)
    return [(c.replicas, c.remove, c.direction) for c in calls]


def boot(core: Scheduler, prov: SimProvisioner) -> list[WorkerConn]:
    return [core.register_worker(w, device_type="cpu", provider="CPUExecutionProvider",
                                 profile=make_profile(), input_endpoint=f"{w}:1",
                                 avatars=frozenset(), active={}) for w in prov.due()]


def test_rooms_start_workers_and_a_worker_leaves_only_once_drained(tmp_path: Path) -> None:
    core, ctl, prov, clock = make(tmp_path)
    assert step(ctl, prov) == []  # nothing waits, min 0
    s1 = core.create(make_spec("r1", seconds=0.0))
    s2 = core.create(make_spec("r2", seconds=0.0))
    assert step(ctl, prov) == [(2, (), "up")]  # 2 units at 1 unit per worker
    assert step(ctl, prov) == []  # booting workers count: not asked twice
    clock.t += 30.0
    a, b = boot(core, prov)
    core.place_pending()
    for conn in (a, b):
        for cmd in sent(conn):
            assert isinstance(cmd, AssignCmd)
            core.worker_update(conn, cmd.session_id, cmd.epoch, SessionState.RUNNING, "", None)
    assert step(ctl, prov) == []
    core.end(s1.session_id, "over")
    # Down by one: the worker with no room is drained, and removed at the next step.
    assert step(ctl, prov) == []
    drained = [c.worker_id for c in (a, b) if c.draining_until is not None]
    assert len(drained) == 1 and core.drained(drained[0])
    assert step(ctl, prov) == [(1, (drained[0],), "down")]
    assert prov.removed == drained
    # The last room ends: its worker is drained too; while a room is on it, it stays.
    keep = core.sessions[s2.session_id].worker_id
    core.end(s2.session_id, "over")
    step(ctl, prov)
    assert step(ctl, prov) == [(0, (keep,), "down")]


def test_a_worker_with_a_room_is_removed_after_the_handover(tmp_path: Path) -> None:
    core, ctl, prov, clock = make(tmp_path)
    ctl.config.pools["cpu"] = PoolConfig(device_type="cpu", max_workers=2, units_per_worker=1.0)
    rooms = [core.create(make_spec(f"r{i}", seconds=0.0)) for i in range(3)]
    step(ctl, prov)
    clock.t += 30.0
    conns = boot(core, prov)
    core.place_pending()
    for conn in conns:
        for cmd in sent(conn):
            assert isinstance(cmd, AssignCmd)
            core.worker_update(conn, cmd.session_id, cmd.epoch, SessionState.RUNNING, "", None)
    # One room ends so that each worker holds one, and a worker turns out to carry two
    # units: the pool needs one worker, and the one that goes still holds a room.
    by_worker = {c.worker_id: [r.session_id for r in rooms
                               if core.sessions[r.session_id].worker_id == c.worker_id]
                 for c in conns}
    fuller = max(by_worker, key=lambda w: len(by_worker[w]))
    core.end(by_worker[fuller][0], "over")
    ctl.config.pools["cpu"] = PoolConfig(device_type="cpu", max_workers=4, units_per_worker=2.0)
    assert step(ctl, prov) == []
    [leaving] = [c for c in conns if c.draining_until is not None]
    [other] = [c for c in conns if c is not leaving]
    [cmd] = [c for c in sent(leaving) if isinstance(c, ReleaseCmd) and c.handover]
    assert step(ctl, prov) == []  # still rendering its room: not removed yet
    core.worker_update(leaving, cmd.session_id, core.sessions[cmd.session_id].epoch,
                       SessionState.ENDED, "handed over", None)
    [moved] = [c for c in sent(other) if isinstance(c, AssignCmd)]
    assert moved.session_id == cmd.session_id
    assert core.sessions[cmd.session_id].state is SessionState.RUNNING
    assert step(ctl, prov) == [(1, (leaving.worker_id,), "down")]


def test_a_worker_that_never_registers_is_replaced_removal_first(tmp_path: Path) -> None:
    core, ctl, prov, clock = make(tmp_path, boot_timeout_seconds=60.0)
    core.create(make_spec("r1", seconds=0.0))
    assert step(ctl, prov) == [(1, (), "up")]
    (stuck,) = prov.booting
    prov.booting[stuck] = float("inf")  # never comes up
    clock.t += 56.0
    assert step(ctl, prov) == [(0, (stuck,), "replace"), (1, (), "up")]
    assert stuck not in prov.booting and len(prov.booting) == 1


def test_a_scale_down_no_worker_can_take_is_neither_started_nor_counted(tmp_path: Path) -> None:
    core, ctl, prov, clock = make(tmp_path)
    rooms = [core.create(make_spec(f"r{i}", seconds=0.0)) for i in range(2)]
    step(ctl, prov)
    clock.t += 30.0
    # Each worker is measured to hold one room (0.66 of it), while the pool is said to
    # carry two units a worker: the policy wants one worker, and neither room fits beside
    # the other.
    conns = [core.register_worker(w, device_type="cpu", provider="CPUExecutionProvider",
                                  profile=make_profile(render_512=0.026), input_endpoint=f"{w}:1",
                                  avatars=frozenset(), active={}) for w in prov.due()]
    core.place_pending()
    assert all(core.sessions[r.session_id].state is SessionState.PLACED for r in rooms)
    ctl.config.pools["cpu"] = PoolConfig(device_type="cpu", max_workers=4, units_per_worker=2.0)
    assert step(ctl, prov) == []
    assert [d.delta for d in ctl.decisions] == [-1]
    assert all(c.draining_until is None for c in conns)  # it would take a room off the air
    assert [e.direction for e in ctl.events] == ["up"]
    assert not core.metrics.registry.get_sample_value(
        "avatarfarm_autoscaler_scale_events_total", {"pool": "cpu", "direction": "down"})


def test_a_pool_is_sized_on_what_its_filled_workers_really_carry(tmp_path: Path) -> None:
    core, ctl, _prov, _clock = make(tmp_path)
    ctl.config.pools["cpu"] = PoolConfig(device_type="cpu", max_workers=8)  # measured units
    core.register_worker("w1", device_type="cpu", provider="CPUExecutionProvider",
                         profile=make_profile(render_512=0.010, batch_gain=0.8),
                         input_endpoint="w1:1", avatars=frozenset(), active={})
    # A 720p room alone on the worker: its batches hold one item, so it fills far more
    # of the worker than its units say (units assume full batches of 512x512 rooms).
    rooms = [core.create(make_spec(f"r{i}", seconds=0.0, quality=Quality(1280, 720, 25)))
             for i in range(2)]
    assert [r.state for r in rooms] == [SessionState.PLACED, SessionState.PENDING]
    w = core.snapshot().workers["w1"]
    assert w.utilisation >= 0.5 and w.room_units < 0.5 * w.unit_capacity
    (sig,) = ctl.signals().pools.values()
    assert sig.units_per_worker == pytest.approx(w.room_units / w.utilisation * core.fleet.target)
    # Sized on the measured capacity, one worker would look like room for both rooms and
    # a spare; sized on what it carries, the waiting room gets a worker.
    (d,) = ctl.policy.decide(ctl.signals(), ctl.clock())
    assert d.desired >= 2


def test_workers_for_a_reservation_with_hours_start_a_boot_before_it_opens_and_go_after(
        tmp_path: Path) -> None:
    # 20:00-22:00 UTC; the clock starts at 00:16 UTC on day 0.
    core, ctl, prov, clock = make(tmp_path, ramp_seconds=120.0, tenants={
        "brand": TenantConfig(reserved_units=2.0, reserved_hours=["20:00-22:00"])})
    assert step(ctl, prov) == []  # nothing held overnight
    clock.t = 20 * 3600.0 - 130.0
    assert step(ctl, prov) == []  # 125 s before: more than a boot and a decision ahead
    clock.t = 20 * 3600.0 - 125.0  # the step moves it 5 s on: a boot and a decision ahead
    assert step(ctl, prov) == [(2, (), "up")]
    (sig,) = ctl.signals().pools.values()
    assert sig.reserved_units == 2.0 and sig.reserved_free == 2.0
    clock.t += 30.0
    assert len(boot(core, prov)) == 2
    assert step(ctl, prov) == []  # within the hours: held, though no room uses them
    clock.t = 22 * 3600.0
    # The hours are over and no room uses them: a worker is drained, and removed next step.
    assert step(ctl, prov) == []
    assert [d.desired for d in ctl.decisions] == [1]  # one worker a decision
    assert step(ctl, prov)[0][2] == "down"
