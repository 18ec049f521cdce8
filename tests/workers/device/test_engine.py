"""The device thread with a real model: what the policy sheds under overload resolves
at once as `Shed` (the lowest tier's items), and the rest runs in time; a chained item
(a spoken frame's motion, then its render) is one future for both."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest

from avatarfarm.latency import LatencyCurve
from workers.device.batching import BatchPolicy
from workers.device.engine import BatchKey, DeadlineMissed, InferenceEngine, Next, Shed
from workers.device.pipeline import AUDIO_TO_MOTION_KEY, Pipeline
from workers.media.audio import MEL_WINDOW, N_MELS
from workers.media.motion import IdleAnimator, compose


def test_overload_sheds_the_lowest_tier_at_once_and_serves_the_rest(pipeline: Pipeline) -> None:
    engine = InferenceEngine(BatchPolicy(max_batch=1, max_wait=0.0, margin=0.0))
    try:
        key = BatchKey("a2m-planned-slow")
        # Planned at 50 ms a call: in 0.45 s the device can serve 9 of the 12 items queued
        # (the model really takes a fraction of a millisecond: time is the plan's).
        engine.serve(key, pipeline.audio_to_motion_model, LatencyCurve(((1, 0.05),)))
        mel = {"mel": np.full((N_MELS, MEL_WINDOW), -2.0, np.float32)}
        due = time.monotonic() + 0.45
        # Premium (0) and best effort (2), interleaved.
        futures = {(i, tier): engine.submit(key, mel, due, tier) for i in range(6) for tier in (0, 2)}
        concurrent.futures.wait(futures.values(), timeout=10)
        shed = {k for k, f in futures.items() if isinstance(f.exception(), Shed)}
        served = {k for k, f in futures.items() if f.exception() is None}
        # Whatever arrived before the first decision, the premium items are never the ones shed.
        assert shed and all(tier == 2 for _, tier in shed)
        assert all((i, 0) in served for i in range(6))
        st = engine.stats()[key]
        assert st.shed == len(shed) and st.items == len(served)
    finally:
        engine.close()


def test_a_profile_is_re_reported_for_a_drift_that_lasts_not_for_an_excursion(
        pipeline: Pipeline) -> None:
    now = [0.0]
    engine = InferenceEngine(BatchPolicy(max_wait=0.0), clock=lambda: now[0], smoothing=1.0)
    try:
        key = BatchKey("a2m-drift")
        mel = {"mel": np.full((N_MELS, MEL_WINDOW), -2.0, np.float32)}
        # Measured at 1 s a call, the model really takes a fraction of a millisecond: the
        # live ratio is far below 1 after one call (smoothing 1: the last call's ratio).
        engine.serve(key, pipeline.audio_to_motion_model, LatencyCurve(((1, 1.0),)))
        engine.submit(key, mel, float("inf")).result(timeout=10)
        assert engine.drifted() == []  # drifting from now on
        now[0] = 59.0
        assert engine.drifted() == []  # not yet a minute: an excursion so far
        now[0] = 60.5
        assert engine.drifted() == [key]  # it lasted: reported once
        now[0] = 200.0
        assert engine.drifted() == []  # at the reported level now
    finally:
        engine.close()



def test_a_model_no_longer_served_fails_its_queued_items_and_keeps_its_counters(
        pipeline: Pipeline) -> None:
    # A frozen clock and a long wait for company: a lone item stays queued; two run at once.
    engine = InferenceEngine(BatchPolicy(max_batch=2, max_wait=1000.0), clock=lambda: 0.0)
    try:
        key = BatchKey("avatar-own")
        mel = {"mel": np.full((N_MELS, MEL_WINDOW), -2.0, np.float32)}
        engine.serve(key, pipeline.audio_to_motion_model, LatencyCurve(((1, 0.001), (2, 0.0015))))
        pair = [engine.submit(key, mel, float("inf")) for _ in range(2)]
        assert all(f.result(timeout=10).batch_size == 2 for f in pair)
        lone = engine.submit(key, mel, float("inf"))
        assert not lone.done()  # waiting for company
        engine.unserve(key)
        assert isinstance(lone.exception(timeout=10), KeyError)
        assert not engine.serves(key) and engine.stats()[key].items == 2  # counted still
        with pytest.raises(KeyError, match="no model is served"):
            engine.submit(key, mel, float("inf"))
        # Served again (the avatar's next room): its counters carry on.
        engine.serve(key, pipeline.audio_to_motion_model, LatencyCurve(((1, 0.001), (2, 0.0015))))
        again = [engine.submit(key, mel, float("inf")) for _ in range(2)]
        concurrent.futures.wait(again, timeout=10)
        assert engine.stats()[key].items == 4 and engine.stats()[key].batch_sizes[2] == 2
    finally:
        engine.close()


def _speech_mel(seed: int) -> np.ndarray:
    """A mel window of loud, varied speech-like bands (the model's mouth opens)."""
    return np.random.default_rng(seed).uniform(-3.0, 1.0, (N_MELS, MEL_WINDOW)).astype(np.float32)


def test_a_spoken_frame_chained_on_the_device_is_the_frame_of_its_two_items_run_apart(
        pipeline: Pipeline) -> None:
    side = 64
    pipeline.ensure_render_side(side)
    avatar = pipeline.avatar_tensor_sync("presenter", side)
    idle = IdleAnimator(25, np.random.default_rng(0)).step()
    for seed in range(3):
        mel = _speech_mel(seed)
        motion, frame = pipeline.speak(avatar, idle, mel, float("inf"), float("inf")).result(timeout=10)
        alone = pipeline.engine.submit(AUDIO_TO_MOTION_KEY, {"mel": mel}, float("inf")).result(timeout=10)
        np.testing.assert_allclose(motion.outputs[0], alone.outputs[0], rtol=1e-5, atol=1e-6)
        composed = compose(idle, alone.outputs[0], mouth_only=True).astype(np.float32)
        rendered = pipeline.engine.submit(pipeline.render_key(side),
                                          {"avatar": avatar, "motion": composed},
                                          float("inf")).result(timeout=10)
        np.testing.assert_allclose(frame.outputs[0], rendered.outputs[0], rtol=1e-4, atol=1e-5)
    # Different speech, different mouths: the render is fed by its own motion item.
    a = pipeline.speak(avatar, idle, _speech_mel(0), float("inf"), float("inf")).result(timeout=10)
    b = pipeline.speak(avatar, idle, np.full((N_MELS, MEL_WINDOW), -5.0, np.float32),
                       float("inf"), float("inf")).result(timeout=10)
    assert np.abs(a[1].outputs[0] - b[1].outputs[0]).max() > 0.01


def test_a_chained_item_fails_whole_when_its_first_stage_is_dropped_or_its_next_step_fails(
        pipeline: Pipeline) -> None:
    engine = InferenceEngine(BatchPolicy(max_wait=0.0))
    try:
        first, second = BatchKey("chain-first"), BatchKey("chain-second")
        engine.serve(first, pipeline.audio_to_motion_model, LatencyCurve(((1, 0.001),)))
        engine.serve(second, pipeline.audio_to_motion_model, LatencyCurve(((1, 0.001),)))
        mel = {"mel": _speech_mel(1)}
        then = lambda r: Next(second, mel, float("inf"))  # noqa: E731

        # Due already: the first stage is dropped, the second never runs.
        late = engine.submit_then(first, mel, time.monotonic() - 1.0, then)
        assert isinstance(late.exception(timeout=10), DeadlineMissed)
        # A step that fails fails the item with its error, and nothing more runs.
        def broken(r: object) -> Next:
            raise ValueError("no render for this motion")
        failed = engine.submit_then(first, mel, float("inf"), broken)
        with pytest.raises(ValueError, match="no render"):
            failed.result(timeout=10)
        # A second stage whose model is gone fails with KeyError.
        gone = engine.submit_then(first, mel, float("inf"), lambda r: Next(BatchKey("none"), mel, 1e18))
        assert isinstance(gone.exception(timeout=10), KeyError)
        ok = engine.submit_then(first, mel, float("inf"), then).result(timeout=10)
        assert ok[0].batch_size == 1 and ok[1].batch_size == 1
        stats = engine.stats()
        assert stats[first].dropped == 1 and stats[first].items == 3
        assert stats[second].items == 1  # only the item whose both stages ran
    finally:
        engine.close()


def test_a_cancelled_item_takes_no_place_in_a_batch(pipeline: Pipeline) -> None:
    # A frozen clock and a long wait for company: a lone item stays queued; two run at once.
    engine = InferenceEngine(BatchPolicy(max_batch=2, max_wait=1000.0), clock=lambda: 0.0)
    try:
        key = BatchKey("a2m-cancelled")
        engine.serve(key, pipeline.audio_to_motion_model, LatencyCurve(((1, 0.001), (2, 0.0015))))
        mel = {"mel": _speech_mel(2)}
        given_up = engine.submit(key, mel, float("inf"))
        assert not given_up.done() and given_up.cancel()  # the room gave the frame up
        pair = [engine.submit(key, mel, float("inf")) for _ in range(2)]
        # Had the cancelled item kept its place, it would have filled the first batch of two.
        assert all(f.result(timeout=10).batch_size == 2 for f in pair)
        assert engine.stats()[key].batch_sizes == {2: 1}
    finally:
        engine.close()
