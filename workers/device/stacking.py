"""A batch's inputs, stacked on the device thread: without copying what does not change.

Every room of one portrait avatar feeds the renderer the same portrait tensor (and
every LivePortrait room of one person the same 3-D feature volume), so a batch of
them stacked afresh copies one image per item per call: at 512x512 that is 3 MB an
item, gigabytes a second on a GPU worker, all on the thread that feeds the GPU. An
input passed as a read-only array is taken as constant: the first batch that holds
it in every item stacks it once, and later batches take the first rows of that (a
contiguous view, no copy). Anything else is stacked as before. Kept within a byte
budget, oldest first out; only the device thread uses it, so it takes no lock.
"""

from __future__ import annotations

import numpy as np

HELD_BYTES = 256 << 20


class Stacker:
    def __init__(self, max_bytes: int = HELD_BYTES) -> None:
        self.max_bytes = max_bytes
        # id of the constant -> (the constant, held so its id stays its own; its stack)
        self._held: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._bytes = 0
        self.reused = 0  # batches that copied no constant input (for tests and benchmarks)

    def stack(self, arrays: list[np.ndarray]) -> np.ndarray:
        """The items' arrays along a new first axis (read-only where it was reused)."""
        first = arrays[0]
        n = len(arrays)
        if first.flags.writeable or any(a is not first for a in arrays):
            return np.stack(arrays)
        held = self._held.get(id(first))
        if held is not None and held[0] is first and len(held[1]) >= n:
            self.reused += 1
            return held[1][:n]
        if held is not None:
            self._drop(id(first))
        out = np.repeat(first[np.newaxis], n, axis=0)
        out.flags.writeable = False
        if out.nbytes <= self.max_bytes:
            while self._held and self._bytes + out.nbytes > self.max_bytes:
                self._drop(next(iter(self._held)))
            self._held[id(first)] = (first, out)
            self._bytes += out.nbytes
        return out

    def _drop(self, key: int) -> None:
        _, out = self._held.pop(key)
        self._bytes -= out.nbytes
