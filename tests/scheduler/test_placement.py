from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avatarfarm.domain import DriveMode, Quality, Stage, Tier
from scheduler.placement import StageCost, WorkerProfile, item_seconds, place
from tests.builders import make_profile, make_room, make_worker


def test_room_load_follows_the_measured_profile() -> None:
    p = make_profile(render_512=0.010, encode_512=0.002, a2m=0.0005, tts=0.005)
    q = Quality(512, 512, 25)
    assert p.room_load(q, DriveMode.TEXT) == pytest.approx(25 * 0.0125 + 0.005)
    assert p.room_load(q, DriveMode.VOICE) == pytest.approx(25 * 0.0125)
    # Mocap skips audio-to-motion and TTS: it is the cheapest room.
    assert p.room_load(q, DriveMode.MOCAP) == pytest.approx(25 * 0.012)


def test_unmeasured_sizes_scale_by_pixels_from_the_nearest_measurement() -> None:
    p = make_profile(render_512=0.010, encode_512=0.002)
    assert p.stage_seconds(Stage.RENDER, 1024, 1024) == pytest.approx(0.040)
    assert p.stage_seconds(Stage.ENCODE, 1280, 720) == pytest.approx(0.002 * 1280 * 720 / 512**2)
    # A 720p frame renders its 720x720 portrait.
    assert Quality(1280, 720, 30).render_side == 720


def test_a_stage_never_measured_means_the_worker_cannot_serve() -> None:
    p = WorkerProfile(tuple(c for c in make_profile().costs if c.stage is not Stage.TTS))
    assert p.room_load(Quality(512, 512, 25), DriveMode.TEXT) is None
    r = place([make_room()], [make_worker(profile=p)])
    assert r.placements == ()
    assert "measured" in r.waiting["s1"]


def test_rooms_spread_over_the_least_utilised_worker() -> None:
    rooms = [make_room(f"s{i}", seq=i) for i in range(4)]
    r = place(rooms, [make_worker("a"), make_worker("b")])
    assert sorted(p.worker_id for p in r.placements) == ["a", "a", "b", "b"]


def test_premium_is_placed_first_when_capacity_is_short() -> None:
    load = make_profile().room_load(Quality(512, 512, 25), DriveMode.TEXT)
    assert load is not None
    worker = make_worker(capacity=load * 1.5)  # room for one at the 0.9 target... barely
    rooms = [make_room("standard", seq=1, tier=Tier.STANDARD),
             make_room("best", seq=2, tier=Tier.BEST_EFFORT),
             make_room("premium", seq=3, tier=Tier.PREMIUM)]
    r = place(rooms, [worker])
    assert [p.session_id for p in r.placements] == ["premium"]
    assert set(r.waiting) == {"standard", "best"}
    assert "needs" in r.waiting["standard"] and "most free" in r.waiting["standard"]


def test_pending_rooms_are_placed_when_capacity_appears() -> None:
    rooms = [make_room("s1")]
    full = make_worker("busy", load=0.9)
    first = place(rooms, [full])
    assert first.placements == () and "s1" in first.waiting
    second = place(rooms, [full, make_worker("new")])
    assert [(p.session_id, p.worker_id) for p in second.placements] == [("s1", "new")]


def test_no_workers_gives_a_reason() -> None:
    r = place([make_room()], [])
    assert r.waiting["s1"] == "no worker is connected and accepting rooms"


qualities = st.builds(Quality, st.sampled_from([256, 360, 512, 720, 1080]),
                      st.sampled_from([256, 512, 720, 1280, 1920]), st.sampled_from([15, 25, 30, 60]))
rooms_st = st.lists(st.tuples(qualities, st.sampled_from(list(DriveMode)), st.sampled_from(list(Tier))),
                    max_size=40)
workers_st = st.lists(st.tuples(st.floats(0.5, 4.0), st.floats(0.0, 1.0),
                                st.floats(0.002, 0.05)), min_size=0, max_size=6)


@settings(max_examples=200, deadline=None)
@given(rooms_st, workers_st, st.floats(0.5, 1.0))
def test_no_worker_is_ever_filled_past_its_target(rooms, workers, target) -> None:  # type: ignore[no-untyped-def]
    pending = [make_room(f"s{i}", seq=i, quality=q, drive=d, tier=t)
               for i, (q, d, t) in enumerate(rooms)]
    views = [make_worker(f"w{i}", capacity=cap, load=cap * target * used,
                         profile=make_profile(render_512=r))
             for i, (cap, used, r) in enumerate(workers)]
    result = place(pending, views, target)
    load = {w.worker_id: w.load for w in views}
    for p in result.placements:
        load[p.worker_id] += p.load
    for w in views:
        assert load[w.worker_id] <= w.capacity * target + 1e-9
    # Every room is either placed once or waiting with a reason.
    placed = [p.session_id for p in result.placements]
    assert len(placed) == len(set(placed))
    assert set(placed) | set(result.waiting) == {r.session_id for r in pending}
    assert not set(placed) & set(result.waiting)


@settings(max_examples=100, deadline=None)
@given(rooms_st)
def test_a_waiting_premium_room_never_loses_to_a_lower_tier_of_the_same_cost(rooms) -> None:  # type: ignore[no-untyped-def]
    q = Quality(512, 512, 25)
    pending = [make_room(f"s{i}", seq=i, quality=q, drive=DriveMode.VOICE, tier=t)
               for i, (_, _, t) in enumerate(rooms)]
    result = place(pending, [make_worker(capacity=1.2)])
    tiers = {r.session_id: r.tier for r in pending}
    placed_tiers = [tiers[p.session_id].priority for p in result.placements]
    waiting_tiers = [tiers[s].priority for s in result.waiting]
    if placed_tiers and waiting_tiers:
        assert max(placed_tiers) <= min(waiting_tiers)


def test_item_cost_is_taken_at_the_best_batch_within_half_the_latency_budget() -> None:
    points = [(1, 0.040), (8, 0.080), (16, 0.120)]
    assert item_seconds(points) == pytest.approx(0.0075)
    assert item_seconds(points, latency_budget=0.2) == pytest.approx(0.010)
    assert item_seconds(points, latency_budget=0.05) == pytest.approx(0.040)
    assert item_seconds(points, latency_budget=0.01) == pytest.approx(0.040)  # nothing fits: batch 1


def test_a_profile_update_replaces_only_the_costs_it_names() -> None:
    p = make_profile(render_512=0.040)
    q = p.merged(WorkerProfile((StageCost(Stage.RENDER, 512, 512, 0.010),
                                StageCost(Stage.RENDER, 256, 256, 0.003))))
    assert q.stage_seconds(Stage.RENDER, 512, 512) == pytest.approx(0.010)
    assert q.stage_seconds(Stage.RENDER, 256, 256) == pytest.approx(0.003)
    assert q.stage_seconds(Stage.ENCODE, 512, 512) == p.stage_seconds(Stage.ENCODE, 512, 512)
