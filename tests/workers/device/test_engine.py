"""The device thread with a real model: what the policy sheds under overload resolves
at once as `Shed` (the lowest tier's items), and the rest runs in time; a chained item
(a spoken frame's motion, then its render) is one future for both; an event loop's
items of one batch come back in one wake-up of that loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import typing

import numpy as np
import pytest

from avatarfarm.latency import LatencyCurve
from workers.device.batching import BatchPolicy
from workers.device.engine import BatchKey, DeadlineMissed, InferenceEngine, ItemResult, Next, Shed
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
    def spoken(mel: np.ndarray) -> tuple[ItemResult, ItemResult]:
        async def speak() -> tuple[ItemResult, ItemResult]:
            return await pipeline.speak(avatar, idle, mel, float("inf"), float("inf"))
        return asyncio.run(speak())

    for seed in range(3):
        mel = _speech_mel(seed)
        motion, frame = spoken(mel)
        alone = pipeline.engine.submit(AUDIO_TO_MOTION_KEY, {"mel": mel}, float("inf")).result(timeout=10)
        np.testing.assert_allclose(motion.outputs[0], alone.outputs[0], rtol=1e-5, atol=1e-6)
        composed = compose(idle, alone.outputs[0], mouth_only=True).astype(np.float32)
        rendered = pipeline.engine.submit(pipeline.render_key(side),
                                          {"avatar": avatar, "motion": composed},
                                          float("inf")).result(timeout=10)
        np.testing.assert_allclose(frame.outputs[0], rendered.outputs[0], rtol=1e-4, atol=1e-5)
    # Different speech, different mouths: the render is fed by its own motion item.
    a = spoken(_speech_mel(0))
    b = spoken(np.full((N_MELS, MEL_WINDOW), -5.0, np.float32))
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


def _wake_ups_from_the_device(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Counts the calls the device thread makes into `loop` (each one a wake-up)."""
    calls = [0]
    call = loop.call_soon_threadsafe

    def counted(*args: typing.Any, **kwargs: typing.Any) -> asyncio.Handle:
        if threading.current_thread().name == "device":
            calls[0] += 1
        return call(*args, **kwargs)
    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    return calls


def test_a_loops_items_of_one_batch_come_back_in_one_wake_up_of_that_loop(pipeline: Pipeline) -> None:
    # A frozen clock and a long wait for company: a batch runs once it is full (8 items).
    engine = InferenceEngine(BatchPolicy(max_batch=8, max_wait=1000.0), clock=lambda: 0.0)
    key, second = BatchKey("a2m-loop"), BatchKey("a2m-loop-second")
    engine.serve(key, pipeline.audio_to_motion_model, LatencyCurve(((1, 0.001), (8, 0.002))))
    engine.serve(second, pipeline.audio_to_motion_model, LatencyCurve(((1, 0.001), (8, 0.002))))
    mels = [_speech_mel(seed) for seed in range(8)]

    async def scenario() -> None:
        wake_ups = _wake_ups_from_the_device(asyncio.get_running_loop())
        results = await asyncio.gather(*(engine.infer(key, {"mel": m}, float("inf")) for m in mels))
        assert [r.batch_size for r in results] == [8] * 8 and wake_ups[0] == 1
        # Each item has its own result, not a neighbour's.
        expected, _ = pipeline.audio_to_motion_model.run({"mel": np.stack(mels)})
        for i, r in enumerate(results):
            np.testing.assert_allclose(r.outputs[0], expected[0][i], rtol=1e-5, atol=1e-6)
        # Chained items: one wake-up for the batch of second stages, none between the two.
        wake_ups[0] = 0
        pairs = await asyncio.gather(*(engine.infer_then(key, {"mel": m}, float("inf"),
                                                         lambda r, m=m: Next(second, {"mel": m}, float("inf")))
                                       for m in mels))
        assert all(a.batch_size == 8 and b.batch_size == 8 for a, b in pairs) and wake_ups[0] == 1
        # Dropped items (due already) fail in one wake-up too.
        wake_ups[0] = 0
        late = [engine.infer(key, {"mel": m}, -1.0) for m in mels[:5]]
        outcomes = await asyncio.gather(*late, return_exceptions=True)
        assert all(isinstance(o, DeadlineMissed) for o in outcomes) and wake_ups[0] == 1

    try:
        asyncio.run(scenario())
        assert engine.stats()[key].dropped == 5
    finally:
        engine.close()


def test_a_loops_item_given_up_takes_no_place_and_closing_cancels_what_is_queued(
        pipeline: Pipeline) -> None:
    engine = InferenceEngine(BatchPolicy(max_batch=2, max_wait=1000.0), clock=lambda: 0.0)
    key = BatchKey("a2m-loop-cancelled")
    engine.serve(key, pipeline.audio_to_motion_model, LatencyCurve(((1, 0.001), (2, 0.0015))))
    mel = {"mel": _speech_mel(3)}

    async def scenario() -> None:
        given_up = engine.infer(key, mel, float("inf"))
        assert given_up.cancel()  # the room gave the frame up
        pair = await asyncio.gather(engine.infer(key, mel, float("inf")), engine.infer(key, mel, float("inf")))
        # Had the cancelled item kept its place, it would have filled the first batch of two.
        assert [r.batch_size for r in pair] == [2, 2] and engine.stats()[key].batch_sizes == {2: 1}
        lone = engine.infer(key, mel, float("inf"))  # waits for company that never comes
        engine.close()
        with pytest.raises(asyncio.CancelledError):
            await lone

    try:
        asyncio.run(scenario())
    finally:
        engine.close()
