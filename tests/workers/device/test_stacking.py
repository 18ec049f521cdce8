"""Stacking a batch's inputs: a read-only input that every item shares is copied once
and reused; anything else is stacked afresh, and what is held stays within its budget."""

from __future__ import annotations

import numpy as np
import pytest

from workers.device.stacking import Stacker


def constant(side: int = 8, value: float = 0.5) -> np.ndarray:
    a = np.full((3, side, side), value, np.float32)
    a.flags.writeable = False
    return a


def test_a_shared_read_only_input_is_stacked_once_and_reused_at_any_smaller_batch() -> None:
    s, portrait = Stacker(), constant()
    four = s.stack([portrait] * 4)
    assert four.shape == (4, 3, 8, 8) and np.array_equal(four[3], portrait)
    assert s.reused == 0
    two = s.stack([portrait] * 2)
    assert two.shape == (2, 3, 8, 8) and two.flags.c_contiguous
    assert np.shares_memory(two, four) and s.reused == 1  # no copy
    assert not two.flags.writeable  # a caller cannot spoil what later batches reuse
    eight = s.stack([portrait] * 8)  # a larger batch: stacked again, then reused
    assert eight.shape[0] == 8 and not np.shares_memory(eight, four)
    assert np.shares_memory(s.stack([portrait] * 5), eight)


def test_inputs_that_may_change_or_differ_are_stacked_afresh() -> None:
    s = Stacker()
    buffer = np.zeros((3, 8, 8), np.float32)  # writeable: its owner may change it
    first = s.stack([buffer, buffer])
    buffer += 1.0
    again = s.stack([buffer, buffer])
    assert first.max() == 0.0 and again.min() == 1.0 and s.reused == 0
    a, b = constant(value=0.25), constant(value=0.75)  # two avatars in one batch
    mixed = s.stack([a, b, a])
    assert [float(x.mean()) for x in mixed] == [0.25, 0.75, 0.25] and s.reused == 0


def test_what_is_held_stays_within_its_budget_oldest_out_first() -> None:
    one = constant(side=16).nbytes * 2  # a batch of two of one portrait
    s = Stacker(max_bytes=2 * one)
    a, b, c = constant(16, 0.1), constant(16, 0.2), constant(16, 0.3)
    for x in (a, b, c):
        s.stack([x, x])
    s.stack([c, c])
    s.stack([b, b])
    assert s.reused == 2  # b and c held
    s.stack([a, a])  # a went first: stacked again (and b, the oldest now, goes)
    assert s.reused == 2
    huge = Stacker(max_bytes=one // 2)  # a stack larger than the budget is not held
    out = huge.stack([a, a])
    assert np.array_equal(out[1], a)
    huge.stack([a, a])
    assert huge.reused == 0


@pytest.mark.parametrize("n", [1, 3])
def test_the_stack_is_what_numpy_stacks(n: int) -> None:
    portrait = constant(value=0.6)
    assert np.array_equal(Stacker().stack([portrait] * n), np.stack([portrait] * n))
