"""The worker's frame-rate governor, on plain values."""

from __future__ import annotations

from avatarfarm.domain import Tier
from workers.rooms.governor import Governor, GovernorPolicy, RoomTick, Step

P, S, B = Tier.PREMIUM, Tier.STANDARD, Tier.BEST_EFFORT


def rooms(late_share: float, fps: dict[str, int] | None = None) -> list[RoomTick]:
    """Two premium, three standard, three best-effort rooms, each at its rate for half a
    second with `late_share` of its frames late."""
    tiers = {"p0": P, "p1": P, "s0": S, "s1": S, "s2": S, "b0": B, "b1": B, "b2": B}
    out = []
    for seq, (sid, tier) in enumerate(tiers.items()):
        rate = (fps or {}).get(sid, 25)
        frames = round(rate / 2)
        out.append(RoomTick(sid, tier, seq, rate, 25, frames, round(frames * late_share)))
    return out


def test_a_quiet_worker_and_a_single_bad_tick_change_nothing() -> None:
    g = Governor()
    assert g.tick(rooms(0.0), 0.0) == []
    assert g.tick(rooms(0.3), 0.5) == []  # one tick is noise


def test_losses_go_to_the_lowest_tier_first_and_never_to_premium() -> None:
    g = Governor(GovernorPolicy(ticks=2))
    g.tick(rooms(0.1), 0.0)
    steps = g.tick(rooms(0.1), 0.5)
    # 10% of 200 frames/s late: 20 frames/s to save, two best-effort rooms halved (13 each).
    assert steps == [Step("b1", 12), Step("b2", 12)]
    g = Governor(GovernorPolicy(ticks=2))
    g.tick(rooms(0.5), 0.0)
    steps = {s.session_id: s.fps for s in g.tick(rooms(0.5), 0.5)}
    # 100 frames/s to save: every best-effort room down to the floor before a standard
    # room loses a frame; premium rooms never.
    assert steps["b0"] == steps["b1"] == steps["b2"] == 5
    assert {"s0", "s1", "s2"} & set(steps) and not {"p0", "p1"} & set(steps)


def test_rooms_starting_are_not_taken_for_overload() -> None:
    from dataclasses import replace

    # Every room half a second old and late (a burst of starts): nothing; the same lateness
    # once they have settled: the lowest tier slows.
    g = Governor(GovernorPolicy(ticks=2, settle=1.0))
    young = [replace(r, age=0.5) for r in rooms(0.5)]
    assert g.tick(young, 0.0) == [] and g.tick(young, 0.5) == []
    settled = [replace(r, age=2.0) for r in rooms(0.5)]
    assert g.tick(settled, 1.0) == []  # the first tick over
    steps = {s.session_id: s.fps for s in g.tick(settled, 1.5)}
    assert steps["b0"] == steps["b1"] == steps["b2"] == 5
    # A room starting beside settled ones that keep up: its own lateness is not counted,
    # and it can still be slowed when the settled rooms are late.
    g = Governor(GovernorPolicy(ticks=1, settle=1.0))
    mixed = [replace(r, age=0.5 if r.session_id == "b2" else 5.0) for r in rooms(0.0)]
    mixed[-1] = replace(mixed[-1], late=mixed[-1].frames)
    assert g.tick(mixed, 0.0) == []
    late = [replace(r, late=r.frames // 2) for r in mixed]
    assert "b2" in {s.session_id for s in g.tick(late, 0.5)}


def test_it_waits_for_a_step_to_show_before_the_next() -> None:
    g = Governor(GovernorPolicy(ticks=2, cooldown=2.5))
    g.tick(rooms(0.2), 0.0)
    first = g.tick(rooms(0.2), 0.5)
    assert first
    slowed = {s.session_id: s.fps for s in first}
    assert g.tick(rooms(0.2, slowed), 1.0) == []
    assert g.tick(rooms(0.2, slowed), 2.0) == []
    assert g.tick(rooms(0.2, slowed), 3.0)  # past the cooldown, still losing frames


def test_rates_come_back_one_room_at_a_time_highest_tier_first() -> None:
    g = Governor(GovernorPolicy(recover_after=3))
    slowed = {"s1": 12, "b0": 5, "b1": 5}
    assert g.tick(rooms(0.0, slowed), 0.0) == []
    assert g.tick(rooms(0.0, slowed), 0.5) == []
    assert g.tick(rooms(0.0, slowed), 1.0) == [Step("s1", 24)]
    slowed["s1"] = 24
    assert g.tick(rooms(0.0, slowed), 1.5) == []
    assert g.tick(rooms(0.0, slowed), 2.0) == []
    assert g.tick(rooms(0.0, slowed), 2.5) == [Step("s1", 25)]


class FakeRoom:
    """What the governor reads of a room and the one call it makes."""

    def __init__(self, sid: str, tier: Tier, spec_fps: int, fps: int) -> None:
        from types import SimpleNamespace

        from avatarfarm.domain import Quality

        self.session_id = sid
        self.spec = SimpleNamespace(tier=tier, quality=Quality(256, 256, spec_fps))
        self.rendering = Quality(256, 256, fps)
        self.degradation_step = 0
        self.stats = SimpleNamespace(frames_rendered=0, late_frames=0)

    def run(self, late_share: float) -> None:
        frames = self.rendering.fps // 2
        self.stats.frames_rendered += frames
        self.stats.late_frames += round(frames * late_share)

    def reconfigure(self, quality: object, step: int = 0, reason: str = "") -> None:
        self.rendering = quality  # type: ignore[assignment]


def test_the_governor_returns_rooms_to_where_it_found_them_not_to_their_spec() -> None:
    from workers.rooms.governor import RoomGovernor

    # The scheduler's ladder had the standard room at 25 of its 30 fps.
    rooms = [FakeRoom("p", P, 25, 25), FakeRoom("s", S, 30, 25), FakeRoom("b", B, 25, 25)]
    gov = RoomGovernor(GovernorPolicy(ticks=1, cooldown=0.0, recover_after=1, settle=0.0))
    t = 0.0
    for _ in range(2):  # the first tick only reads the counters
        for r in rooms:
            r.run(0.5)
        gov.tick(rooms, t)
        t += 0.5
    assert rooms[2].rendering.fps < 25 and rooms[0].rendering.fps == 25
    for _ in range(40):  # quiet from here on: everything comes back
        for r in rooms:
            r.run(0.0)
        gov.tick(rooms, t)
        t += 0.5
    assert [r.rendering.fps for r in rooms] == [25, 25, 25]  # the standard room: 25, not 30


def test_a_rate_the_scheduler_sets_is_the_rooms_own_again() -> None:
    from avatarfarm.domain import Quality
    from workers.rooms.governor import RoomGovernor

    room = FakeRoom("b", B, 25, 25)
    gov = RoomGovernor(GovernorPolicy(ticks=1, cooldown=0.0, recover_after=1, settle=0.0))
    room.run(0.5)
    gov.tick([room], 0.0)
    room.run(0.5)
    gov.tick([room], 0.5)
    assert room.rendering.fps == 12
    room.reconfigure(Quality(192, 192, 10))  # the scheduler steps it down its ladder
    for t in range(10):
        room.run(0.0)
        gov.tick([room], 1.0 + t)
    assert room.rendering.fps == 10  # not taken back up to 25 by the governor
