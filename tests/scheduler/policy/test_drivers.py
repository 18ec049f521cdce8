"""What a tenant is told, and the audit log records, of a camera room's driver: each
change between live and not live once, who it was; nothing for a driver who never came;
and a driver's progress across a room that moved to another worker."""

from __future__ import annotations

import dataclasses

import pytest

from avatarfarm import convert
from avatarfarm.domain import InvalidRequest, Progress
from avatarfarm.live_driver import DriverPolicy, DriverState
from scheduler.policy.drivers import driver_change
from scheduler.policy.platforms import PlatformPolicy
from scheduler.state.sessions import plus

WHO = "10.0.0.5:50312 (FMLE/3.0 (compatible; obs-output module))"


def at(state: DriverState | None, driven: float = 0.0) -> Progress:
    return Progress(driver_state=state, driven_seconds=driven, driver=WHO if state else "")


@pytest.mark.parametrize(("before", "after", "live", "says"), [
    (None, DriverState.LIVE, True, "the driver is live (10.0.0.5:50312"),
    (DriverState.WAITING, DriverState.LIVE, True, "the driver is live"),
    (DriverState.LIVE, DriverState.FROZEN, False, "frozen"),
    (DriverState.FROZEN, DriverState.LOOPED, False, "loop"),  # a different way of not being live
    (DriverState.LOOPED, DriverState.LIVE, True, "live"),
    (DriverState.LIVE, DriverState.ABSENT, False, "the driver left"),
    (DriverState.ABSENT, DriverState.LIVE, True, "live"),  # they came back
])
def test_a_change_of_driver_is_told_once(before: DriverState | None, after: DriverState,
                                         live: bool, says: str) -> None:
    change = driver_change(at(before), at(after, 12.5))
    assert change is not None and change.live is live and says in change.message
    assert WHO[:14] in change.message
    if not live:
        assert "12.5 s" in change.message  # how long they drove live, so far
    assert driver_change(at(after), at(after, 13.0)) is None  # the same state again: nothing


@pytest.mark.parametrize(("before", "after"), [
    (None, None),  # not a camera room
    (None, DriverState.WAITING),
    (DriverState.WAITING, DriverState.NO_FACE),  # never live: nothing stopped
    (None, DriverState.ABSENT),
])
def test_nothing_is_told_of_a_driver_who_never_went_live(before: DriverState | None,
                                                          after: DriverState | None) -> None:
    assert driver_change(at(before), at(after)) is None


def test_a_moved_rooms_driver_is_the_latest_and_its_live_seconds_add_up() -> None:
    first = at(DriverState.LIVE, 30.0)
    fresh = Progress(frames_rendered=10)  # the new worker has not reported a driver yet
    assert plus(first, fresh).driver_state is DriverState.LIVE
    later = dataclasses.replace(at(DriverState.FROZEN, 5.0), driver="10.0.0.6:1 (x)")
    both = plus(first, later)
    assert (both.driver_state, both.driven_seconds, both.driver) == \
        (DriverState.FROZEN, 35.0, "10.0.0.6:1 (x)")


def test_the_drivers_progress_travels_and_is_checked() -> None:
    p = at(DriverState.LOOPED, 7.5)
    assert convert.progress_from_pb(convert.progress_to_pb(p)) == p
    assert convert.progress_from_pb(convert.progress_to_pb(Progress())).driver_state is None
    bad = convert.progress_to_pb(dataclasses.replace(p, driven_seconds=float("nan")))
    with pytest.raises(InvalidRequest, match="driven_seconds"):
        convert.checked_progress_from_pb(bad)


def test_a_platforms_rules_for_drivers() -> None:
    assert PlatformPolicy().driver_policy() == DriverPolicy()
    strict = PlatformPolicy(require_live_driver=True, end_when_driver_lost=True,
                            driver_grace_seconds=3.0)
    assert strict.driver_policy() == DriverPolicy(True, True, 3.0)
    assert convert.driver_policy_from_pb(convert.driver_policy_to_pb(strict.driver_policy())) == \
        strict.driver_policy()
    with pytest.raises(ValueError, match="driver_grace_seconds"):
        PlatformPolicy(driver_grace_seconds=-1.0)
    with pytest.raises(ValueError, match="grace"):
        DriverPolicy(grace_seconds=float("inf"))
