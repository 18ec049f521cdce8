"""Consolidation with plain values: an under-filled worker is emptied whole into a fuller
one where its rooms join batches, and only then; never while rooms wait or the fleet is
still filling up; premium rooms stay unless their tenant consents; each room and the
fleet move within their budgets; seamless rooms go before those that would reconnect.
And the autoscaler drains only workers whose rooms the others can take."""

from __future__ import annotations

import dataclasses

from avatarfarm.domain import Quality, Tier
from scheduler.policy.placement import (
    ConsolidationConfig,
    Fleet,
    MoveBudget,
    RoomReq,
    WorkerState,
    consolidation_moves,
    drainable,
)
from tests.builders import make_profile, make_room, make_worker

PROFILE = make_profile(batch_gain=0.6)  # GPU-like: batches pay


def fleet_with(rooms: dict[str, list[RoomReq]], capacity: float = 2.0) -> Fleet:
    f = Fleet(0.9)
    for wid in rooms:
        f.add_worker(make_worker(wid, profile=PROFILE, capacity=capacity))
    for wid, rs in rooms.items():
        for r in rs:
            f.assign(r, wid)
    return f


def rooms(prefix: str, n: int, **kw: object) -> list[RoomReq]:
    return [make_room(f"{prefix}{i}", **kw) for i in range(n)]  # type: ignore[arg-type]


def moves(f: Fleet, budget: MoveBudget | None = None, **kw: object) -> list[tuple[str, str, str]]:
    got = consolidation_moves(f, 0.0, budget or MoveBudget(), kw.pop("config", ConsolidationConfig()),  # type: ignore[arg-type]
                              recent_peak=kw.pop("recent_peak", 10.0), **kw)  # type: ignore[arg-type]
    return [(m.session_id, m.source, m.target) for m in got]


def test_an_under_filled_worker_is_emptied_whole_into_the_fuller_one() -> None:
    f = fleet_with({"full": rooms("a", 8), "thin": rooms("b", 2)})
    assert f.workers["thin"].utilisation() < 0.5 < f.workers["full"].utilisation()
    before = f.load_total
    planned = moves(f)
    assert sorted(planned) == [("b0", "thin", "full"), ("b1", "thin", "full")]
    for sid, _, target in planned:
        req = f.room(sid)
        assert req is not None
        f.assign(req, target)
    # The rooms joined the full worker's batches: less device time in all, a worker freed.
    assert not f.workers["thin"].rooms and f.load_total < before
    assert f.workers["full"].utilisation() <= 0.9


def test_nothing_moves_while_rooms_wait_or_the_fleet_fills_up() -> None:
    f = fleet_with({"full": rooms("a", 8), "thin": rooms("b", 2)})
    assert moves(f, waiting=1) == []
    assert moves(f, recent_peak=f.load_total) == []  # the load is at its recent peak
    assert moves(f, recent_peak=f.load_total / 0.85) != []  # fallen to 85% of it


def test_a_worker_is_left_alone_when_its_rooms_do_not_all_fit_or_would_cost_too_much_elsewhere() -> None:
    f = fleet_with({"full": rooms("a", 9), "thin": rooms("b", 3)})
    assert moves(f) == []  # only one of them fits: moving it frees nothing
    # Rooms of another shape start their own batch where they go: they cost there what
    # they cost here, so the move frees a worker for nothing more...
    other = rooms("c", 2, quality=Quality(256, 256, 25))
    f = fleet_with({"full": rooms("a", 8), "thin": other})
    assert len(moves(f)) == 2
    # ...and a move that must save device time (here: half the worker's) is not made.
    assert moves(f, config=ConsolidationConfig(max_cost_increase=-0.5)) == []


def test_premium_rooms_stay_unless_their_tenant_consents() -> None:
    premium = rooms("p", 2, tier=Tier.PREMIUM, tenant="brand")
    f = fleet_with({"full": rooms("a", 8), "thin": premium})
    assert moves(f) == []
    assert len(moves(f, config=ConsolidationConfig(movable_premium=frozenset({"brand"})))) == 2


def test_budgets_bound_moves_per_room_and_per_hour() -> None:
    f = fleet_with({"full": rooms("a", 8), "thin": rooms("b", 2)})
    budget = MoveBudget()
    budget.per_room["b0"] = 2  # b0 has moved twice already
    assert moves(f, budget) == []
    budget = MoveBudget()
    first = consolidation_moves(f, 0.0, budget, recent_peak=10.0)
    budget.spend(first, 0.0)
    assert budget.left_this_hour(0.0, 3) == 1
    assert consolidation_moves(f, 10.0, budget, ConsolidationConfig(max_moves_per_hour=3),
                               recent_peak=10.0) == []  # two rooms, one move left
    assert budget.left_this_hour(3600.0, 3) == 3  # an hour later


def test_seamless_rooms_are_moved_before_rooms_that_would_reconnect() -> None:
    f = fleet_with({"full": rooms("a", 6), "rtmp": rooms("r", 2), "hls": rooms("h", 2)})
    config = ConsolidationConfig(pass_share=0.1)  # one worker a pass, of three
    planned = moves(f, config=config, reconnects=lambda r: r.session_id.startswith("r"))
    assert {source for _, source, _ in planned} == {"hls"}
    assert moves(f, config=dataclasses.replace(config, max_reconnects=1),
                 reconnects=lambda r: True) == []  # each would have two viewers' reconnects
    assert isinstance(f.workers["full"], WorkerState)


def test_only_workers_whose_rooms_the_others_can_take_are_drained() -> None:
    f = fleet_with({"full": rooms("a", 8), "thin": rooms("b", 2), "thinner": rooms("c", 1),
                    "idle": []})
    # The idle worker and one of the thin ones: the full worker has room for two more
    # rooms only, so the second thin worker's would be stranded at its drain's deadline.
    assert drainable(f, ["idle", "thin", "thinner"], 3) == ["idle", "thin"]
    assert drainable(f, ["thinner", "thin"], 1) == ["thinner"]
    big = fleet_with({"full": rooms("a", 10), "other": rooms("b", 9)})
    assert drainable(big, ["other"], 1) == []


def test_a_pass_empties_a_share_of_the_busy_workers_so_a_large_fleet_keeps_pace() -> None:
    # Forty thin workers and ten fuller ones with room for all their rooms: a pass takes
    # a tenth of the fifty busy workers, whatever the fleet's size.
    layout = {f"full{i}": rooms(f"a{i}-", 6) for i in range(10)}
    layout |= {f"thin{i}": rooms(f"b{i}-", 1) for i in range(40)}
    f = fleet_with(layout)
    planned = moves(f, recent_peak=2 * f.load_total)
    assert len({source for _, source, _ in planned}) == 5
    assert {source for _, source, _ in planned} <= {f"thin{i}" for i in range(40)}
    more = moves(f, recent_peak=2 * f.load_total, config=ConsolidationConfig(pass_share=0.5))
    assert len({source for _, source, _ in more}) == 25
