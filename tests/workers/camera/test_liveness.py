"""Telling a live driver from a feed that is not: frozen, looped, faceless or gone; pure
signatures in, verdicts out, then the same through a real H.264 encode and decode of the
test driver's patterns (the real photograph, as a webcam would send it)."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest

from avatarfarm.live_driver import DriverAction, DriverPolicy, DriverState
from tests.driver_publisher import driver_frame
from workers.camera.liveness import THUMB, LivenessMonitor, Signature, Signer

FPS = 25


def live_signatures(n: int, seed: int = 0, noise: float = 0.004) -> list[Signature]:
    """A person holding still in front of a camera: each frame the same scene with fresh
    sensor noise (a little, as after compression)."""
    rng = np.random.default_rng(seed)
    scene = rng.random(THUMB * THUMB).astype(np.float32)
    return [Signature(float(rng.uniform(0.002, 0.02)),
                      scene + rng.normal(0, noise, scene.size).astype(np.float32))
            for _ in range(n)]


def states(monitor: LivenessMonitor, sigs: list[Signature], start: int = 0,
           face: bool = True) -> list[DriverState]:
    out = []
    for i, sig in enumerate(sigs, start):
        monitor.frame(i / FPS, sig)
        monitor.face(i / FPS, face)
        out.append(monitor.state)
    return out


def first(seen: list[DriverState], state: DriverState) -> float:
    """Seconds into the frames when ``state`` was first given (inf: never)."""
    return next((i / FPS for i, s in enumerate(seen) if s is state), np.inf)


def connected() -> LivenessMonitor:
    m = LivenessMonitor()
    m.connected()
    return m


def test_a_still_person_with_a_noisy_camera_stays_live() -> None:
    seen = states(connected(), live_signatures(10 * FPS))
    assert set(seen) == {DriverState.LIVE}


def test_a_camera_that_sends_each_frame_twice_is_not_frozen() -> None:
    sigs = live_signatures(6 * FPS)
    doubled = [s if i % 2 == 0 else Signature(0.0, sigs[i - 1].thumb) for i, s in enumerate(sigs)]
    assert set(states(connected(), doubled)) == {DriverState.LIVE}


def test_the_same_picture_over_and_over_is_frozen_within_two_seconds_and_live_again_after() -> None:
    m = connected()
    live = states(m, live_signatures(2 * FPS))
    still = live_signatures(1)[0]
    frozen = states(m, [Signature(0.0, still.thumb)] * (3 * FPS), start=2 * FPS)
    again = states(m, live_signatures(FPS, seed=1), start=5 * FPS)
    assert set(live) == {DriverState.LIVE}
    # 2 s of frames, 90% of them the same picture (a key frame may re-encode it).
    assert 0.9 * 2.0 - 0.1 <= first(frozen, DriverState.FROZEN) <= 2.1
    assert frozen[-1] is DriverState.FROZEN
    assert again[-1] is DriverState.LIVE


def test_a_recording_played_in_a_loop_is_seen_once_it_has_played_a_block_twice() -> None:
    period = round(1.6 * FPS)
    clip = live_signatures(period, seed=2, noise=0.02)  # a lively recording
    rng = np.random.default_rng(3)
    # Replayed with fresh compression noise (a tenth of the clip's own change).
    replay = [Signature(c.changed, c.thumb + rng.normal(0, 0.002, c.thumb.size).astype(np.float32))
              for c in clip * 5]
    m = connected()
    seen = states(m, replay)
    looped = first(seen, DriverState.LOOPED)
    # One period to replay and a 2 s block to compare (checks every 0.5 s).
    assert 1.6 + 2.0 - 1e-9 <= looped <= 1.6 + 2.0 + 0.6
    assert seen[-1] is DriverState.LOOPED
    after = states(m, live_signatures(3 * FPS, seed=4, noise=0.02), start=len(replay))
    assert after[-1] is DriverState.LIVE


def test_a_lively_performance_that_never_repeats_is_not_a_loop() -> None:
    seen = states(connected(), live_signatures(12 * FPS, seed=5, noise=0.02))
    assert DriverState.LOOPED not in seen


def test_no_face_for_three_seconds_and_back() -> None:
    m = connected()
    gone = states(m, live_signatures(4 * FPS), face=False)
    assert 2.9 <= first(gone, DriverState.NO_FACE) <= 3.1
    back = states(m, live_signatures(1, seed=6), start=4 * FPS)
    assert back == [DriverState.LIVE]


def test_waiting_absent_and_a_driver_who_comes_back() -> None:
    m = LivenessMonitor()
    assert m.state is DriverState.WAITING
    m.connected()
    states(m, live_signatures(FPS))
    m.disconnected()
    assert m.state is DriverState.ABSENT
    m.connected()  # a new stream, with times of its own: no history of the last one
    assert states(m, live_signatures(3, seed=7)) == [DriverState.LIVE] * 3


@pytest.mark.parametrize(("policy", "state", "lost_for", "action"), [
    (DriverPolicy(), DriverState.LIVE, 0.0, DriverAction.DRIVE),
    (DriverPolicy(), DriverState.WAITING, 99.0, DriverAction.HOLD),
    (DriverPolicy(end_when_lost=True), DriverState.WAITING, 99.0, DriverAction.HOLD),
    # Not required live: a frozen feed still drives (the platform does not ask).
    (DriverPolicy(), DriverState.FROZEN, 99.0, DriverAction.DRIVE),
    (DriverPolicy(), DriverState.ABSENT, 99.0, DriverAction.HOLD),
    (DriverPolicy(end_when_lost=True, grace_seconds=5), DriverState.ABSENT, 4.9, DriverAction.HOLD),
    (DriverPolicy(end_when_lost=True, grace_seconds=5), DriverState.ABSENT, 5.0, DriverAction.END),
    (DriverPolicy(require_live=True), DriverState.LOOPED, 99.0, DriverAction.HOLD),
    (DriverPolicy(require_live=True), DriverState.NO_FACE, 0.0, DriverAction.HOLD),
    (DriverPolicy(require_live=True, end_when_lost=True, grace_seconds=5), DriverState.FROZEN, 5.0,
     DriverAction.END),
    (DriverPolicy(require_live=True, end_when_lost=True), DriverState.LIVE, 99.0, DriverAction.DRIVE),
])
def test_policy(policy: DriverPolicy, state: DriverState, lost_for: float,
                action: DriverAction) -> None:
    assert policy.action(state, lost_for) is action


def encoded(pattern: str, seconds: float) -> list[tuple[float, np.ndarray]]:
    """The test driver's ``pattern`` through the publisher's H.264 encoder and back."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="flv") as out:
        video = out.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "tune": "zerolatency"})
        video.width = video.height = 256
        video.pix_fmt = "yuv420p"
        for i in range(round(seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(driver_frame(i, pattern), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            for p in video.encode(frame):
                out.mux(p)
        for p in video.encode(None):
            out.mux(p)
    buf.seek(0)
    with av.open(buf, format="flv") as c:
        return [(float(f.time or 0.0), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]


@pytest.mark.parametrize(("pattern", "verdict", "within"), [
    ("live", DriverState.LIVE, 0.0),
    ("still", DriverState.FROZEN, 2.5),
    ("loop", DriverState.LOOPED, 5.0),  # a 2 s recording
])
def test_the_driver_patterns_through_a_real_codec(pattern: str, verdict: DriverState,
                                                  within: float) -> None:
    m, sign = connected(), Signer()
    seen = []
    for t, rgb in encoded(pattern, 8.0):
        m.frame(t, sign(rgb))
        m.face(t, True)
        seen.append(m.state)
    if verdict is DriverState.LIVE:
        assert set(seen) == {DriverState.LIVE}
    else:
        assert first(seen, verdict) <= within
        assert seen[-1] is verdict
