"""The device: one thread that runs batches of inference for every room.

Rooms submit single items (one frame's render, one audio window's motion, one
lip-sync check) with a deadline and their tier's priority; the device thread
asks the batching policy (`workers.device.batching.decide`) what to run, stacks the
items of one model and input shape into one onnxruntime call, splits the
outputs back and resolves each item's future. Items the policy drops resolve
with `DeadlineMissed`, and the room shows a replacement frame instead.

A room on the event loop gets an asyncio future (`infer`, `infer_then`), and the
items of a batch that belong to one loop are delivered in one wake-up of that loop,
not one per item: each cross-thread wake-up is a write to the loop's self-pipe, a
hand-over of the interpreter lock and callbacks on both threads (about 30 us of CPU
an item on a small CPU, `loadtests/handoff_bench.py`). Threads get
`concurrent.futures` futures (`submit`, `submit_then`).

A chained item (`infer_then`: a spoken frame's motion, then its render) is one
future to the room: its second stage is made and queued on the device thread as
the first comes back. The queue is kept in deadline order, and each decision reads
only its earliest-due items (`BatchPolicy.window`), so a worker that fell behind
spends no more per decision than one that keeps up.

Each key's latency curve starts from the worker's start-up measurement (or an
estimate scaled by pixels for a shape never measured) and is corrected from
live timings: an exponentially weighted ratio of observed to measured call
time scales the whole curve, each batch size actually run keeps its own
smoothed timing, and `drifted()` tells the agent when the correction has moved
far enough, for long enough, to re-report the profile.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from avatarfarm.latency import LatencyCurve
from workers.device.batching import BatchPolicy, Queued, decide
from workers.device.stacking import Stacker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, order=True)
class BatchKey:
    """One model at one per-item input shape: the unit that batches together."""

    model: str
    side: int = 0  # square image side for renderers; 0 where the shape is fixed

    def __str__(self) -> str:
        return f"{self.model}@{self.side}" if self.side else self.model


class DeadlineMissed(Exception):
    """The item could not be run before its deadline and was dropped."""


class Shed(DeadlineMissed):
    """The device was overloaded and gave the item up early (lowest tier first), so the
    rest make their deadlines."""


@dataclass(frozen=True, slots=True)
class ItemResult:
    outputs: tuple[np.ndarray, ...]  # this item's slice of each output, batch axis removed
    seconds: float  # its share of the batch's device time
    batch_size: int


@dataclass(slots=True)
class KeyStats:
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    items: int = 0
    dropped: int = 0
    shed: int = 0
    device_seconds: float = 0.0

    @property
    def mean_batch(self) -> float:
        calls = sum(self.batch_sizes.values())
        return self.items / calls if calls else 0.0


class DeviceModel(typing.Protocol):
    """What the device thread runs: a model call on stacked feeds, returning its outputs
    (batch axis first) and the call's seconds (`workers.device.onnx.OrtModel`, or a
    model bound by role such as `workers.device.binding.LipSyncDeviceModel`)."""

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[typing.Any], float]: ...


_Future: typing.TypeAlias = "concurrent.futures.Future[typing.Any] | asyncio.Future[typing.Any]"


@dataclass(slots=True)
class _Request:
    queued: Queued
    feeds: dict[str, np.ndarray]
    future: _Future
    then: Callable[[ItemResult], Next] | None = None  # a chained item: what its result makes
    first: ItemResult | None = None  # a chained item's second stage: the first one's result
    loop: asyncio.AbstractEventLoop | None = None  # whose future it is (None: a thread's)


class _Replies:
    """The outcomes of one decision or one batch, delivered together: a thread's future
    at once, a loop's futures in one call to that loop (`_settle`) however many items
    it has in the batch."""

    __slots__ = ("_by_loop",)

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop,
                            list[tuple[asyncio.Future[typing.Any], typing.Any, BaseException | None]]] = {}

    def resolve(self, r: _Request, value: typing.Any) -> None:
        self._put(r, value, None)

    def fail(self, r: _Request, exc: BaseException) -> None:
        self._put(r, None, exc)

    def cancel(self, r: _Request) -> None:
        self._put(r, None, _CANCEL)

    def _put(self, r: _Request, value: typing.Any, exc: BaseException | None) -> None:
        if r.loop is None:
            fut = typing.cast("concurrent.futures.Future[typing.Any]", r.future)
            if exc is _CANCEL:
                fut.cancel()
            elif not fut.set_running_or_notify_cancel():  # cancelled by the caller meanwhile
                pass
            elif exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)
            return
        self._by_loop.setdefault(r.loop, []).append(
            (typing.cast("asyncio.Future[typing.Any]", r.future), value, exc))

    def send(self) -> None:
        by_loop, self._by_loop = self._by_loop, {}
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # the loop is closed: nobody is waiting for these
                pass


class _Cancel(BaseException):
    """Marks an outcome that cancels its future (the engine closed)."""


_CANCEL = _Cancel()


def _settle(items: list[tuple[asyncio.Future[typing.Any], typing.Any, BaseException | None]]) -> None:
    """On the loop: one batch's outcomes for its futures (those the room gave up meanwhile
    are left as they are)."""
    for fut, value, exc in items:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(value)
        elif exc is _CANCEL:
            fut.cancel()
        else:
            fut.set_exception(exc)


@dataclass(slots=True)
class _Served:
    model: DeviceModel
    base: LatencyCurve
    ratio: float = 1.0  # observed / measured call time over all sizes, smoothed
    reported_ratio: float = 1.0
    drifting_since: float | None = None  # when the ratio last left the band around the report
    live: dict[int, float] = field(default_factory=dict)  # seconds per batch size run, smoothed
    stats: KeyStats = field(default_factory=KeyStats)
    _curve: LatencyCurve | None = None  # `curve`, until the next live timing

    @property
    def curve(self) -> LatencyCurve:
        """The measured curve scaled by the overall drift, with every batch size actually
        run replaced by its own live timing: the shape of the curve (where batching stops
        paying) is learnt from live calls too, not only its level."""
        if self._curve is None:
            points = {b: s * self.ratio for b, s in self.base.points}
            points.update(self.live)
            self._curve = LatencyCurve(tuple(sorted(points.items())))
        return self._curve

    def timed(self, n: int, seconds: float, smoothing: float) -> None:
        """A live call of `n` items took `seconds`."""
        self.ratio += smoothing * (seconds / self.base.seconds(n) - self.ratio)
        self.live[n] = seconds if n not in self.live else \
            self.live[n] + smoothing * (seconds - self.live[n])
        self._curve = None


class InferenceEngine:
    """Owns the device thread. Thread-safe `submit`; `infer` for asyncio callers."""

    def __init__(self, policy: BatchPolicy = BatchPolicy(), *,
                 clock: Callable[[], float] = time.monotonic, smoothing: float = 0.1) -> None:
        self.policy = policy
        self.clock = clock
        self.smoothing = smoothing
        self._served: dict[BatchKey, _Served] = {}
        self._retired: dict[BatchKey, KeyStats] = {}  # counters of models no longer served
        # Queued items in deadline order: decisions read only its head (`BatchPolicy.window`).
        self._queue: list[_Entry] = []
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        # CPU time of the device thread outside model calls: deciding batches, stacking
        # feeds, resolving futures (the engine's own per-item cost; waiting is free).
        self.host_seconds = 0.0
        self._run_cpu = 0.0
        self._stacker = Stacker()  # read-only inputs (an avatar's portrait) stacked once
        self._thread = threading.Thread(target=self._loop, name="device", daemon=True)
        self._thread.start()

    # -- models

    def serve(self, key: BatchKey, model: DeviceModel, curve: LatencyCurve) -> None:
        with self._cond:
            old = self._served.get(key)
            stats = old.stats if old else self._retired.pop(key, KeyStats())
            self._served[key] = _Served(model, curve, stats=stats)

    def unserve(self, key: BatchKey) -> None:
        """Stops serving a model (an avatar's own, once no room uses it): its queued
        items fail, its counters are kept (reported, and carried on if it is served
        again)."""
        with self._cond:
            served = self._served.pop(key, None)
            if served is None:
                return
            self._retired[key] = served.stats
            gone = [e.request for e in self._queue if e.request.queued.key == key]
            self._queue = [e for e in self._queue if e.request.queued.key != key]
        replies = _Replies()
        for r in gone:
            replies.fail(r, KeyError(f"{key} is no longer served"))
        replies.send()

    def serves(self, key: BatchKey) -> bool:
        with self._cond:
            return key in self._served

    def keys(self) -> list[BatchKey]:
        with self._cond:
            return sorted(self._served)

    def curve(self, key: BatchKey) -> LatencyCurve:
        """The curve the policy plans with now: measured, corrected by live timings."""
        with self._cond:
            return self._served[key].curve

    def stats(self) -> dict[BatchKey, KeyStats]:
        """Counters per model, of those served now and those no longer served."""
        with self._cond:
            every = {**self._retired, **{k: s.stats for k, s in self._served.items()}}
            return {k: KeyStats(collections.Counter(st.batch_sizes), st.items, st.dropped,
                                st.shed, st.device_seconds)
                    for k, st in every.items()}

    def drifted(self, threshold: float = 0.25, persist: float = 60.0) -> list[BatchKey]:
        """Keys whose live timings have stayed more than `threshold` away from the last
        report for `persist` seconds (a drift that lasts and matters to placement, not an
        excursion of a busy minute); marks them reported."""
        out = []
        now = self.clock()
        with self._cond:
            for key, s in self._served.items():
                if abs(s.ratio / s.reported_ratio - 1.0) <= threshold:
                    s.drifting_since = None
                elif s.drifting_since is None:
                    s.drifting_since = now
                elif now - s.drifting_since >= persist:
                    s.reported_ratio, s.drifting_since = s.ratio, None
                    out.append(key)
        return out

    # -- items

    def submit(self, key: BatchKey, feeds: dict[str, np.ndarray], deadline: float,
               priority: int = 1) -> concurrent.futures.Future[ItemResult]:
        """An item, from a thread: its future resolves on the device thread."""
        fut: concurrent.futures.Future[ItemResult] = concurrent.futures.Future()
        self._enqueue(key, feeds, deadline, priority, fut)
        return fut

    def infer(self, key: BatchKey, feeds: dict[str, np.ndarray], deadline: float,
              priority: int = 1) -> asyncio.Future[ItemResult]:
        """An item, from the running event loop: its future resolves on that loop, with
        the other items of its batch from that loop in one wake-up."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ItemResult] = loop.create_future()
        self._enqueue(key, feeds, deadline, priority, fut, loop=loop)
        return fut

    def submit_then(self, key: BatchKey, feeds: dict[str, np.ndarray], deadline: float,
                    then: Callable[[ItemResult], Next], priority: int = 1
                    ) -> concurrent.futures.Future[tuple[ItemResult, ItemResult]]:
        """`infer_then`, from a thread."""
        fut: concurrent.futures.Future[tuple[ItemResult, ItemResult]] = concurrent.futures.Future()
        self._enqueue(key, feeds, deadline, priority, fut, then)
        return fut

    def infer_then(self, key: BatchKey, feeds: dict[str, np.ndarray], deadline: float,
                   then: Callable[[ItemResult], Next], priority: int = 1
                   ) -> asyncio.Future[tuple[ItemResult, ItemResult]]:
        """An item whose result makes a second item (`then`, run on the device thread as
        soon as the first is back: a frame's motion, then its render), as one future of
        both results. The caller's loop is not woken between the two: one hand-off
        each way per frame, not two. Either item's failure (a drop, a shed, an error in
        `then`) fails the whole; cancelling it gives up whichever item is queued."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[ItemResult, ItemResult]] = loop.create_future()
        self._enqueue(key, feeds, deadline, priority, fut, then, loop)
        return fut

    def _enqueue(self, key: BatchKey, feeds: dict[str, np.ndarray], deadline: float, priority: int,
                 fut: _Future, then: Callable[[ItemResult], Next] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("inference engine is closed")
            if key not in self._served:
                raise KeyError(f"no model is served for {key}")
            q = Queued(next(self._ids), key, deadline, priority, self.clock())
            self._put(_Request(q, feeds, fut, then, loop=loop))
            self._cond.notify()

    def _put(self, r: _Request) -> None:
        bisect.insort(self._queue, _Entry(r.queued.deadline, r.queued.item_id, r))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._queue = [e.request for e in self._queue], []
            self._cond.notify()
        replies = _Replies()
        for r in pending:
            replies.cancel(r)
        replies.send()
        self._thread.join(timeout=10)

    # -- the device thread

    def _loop(self) -> None:
        while True:
            t0, self._run_cpu = time.thread_time(), 0.0
            batch, served = self._next()
            if batch is None or served is None:
                return
            self._run(batch, served)
            self.host_seconds += time.thread_time() - t0 - self._run_cpu

    def _next(self) -> tuple[list[_Request] | None, _Served | None]:
        with self._cond:
            while not self._closed:
                window = self._window()
                if not window:
                    self._cond.wait()
                    continue
                now = self.clock()
                curves = {k: s.curve for k, s in self._served.items()}
                d = decide([r.queued for r in window], now, curves, self.policy)
                if d.drop or d.run or d.shed:
                    by_id = {r.queued.item_id: r for r in window}
                    head = len(window)  # the window is the queue's head
                    # Items their callers gave up (a frame past its deadline) are taken out
                    # when chosen to run, and the choice is made again without them.
                    given_up = {q.item_id for q in d.run if by_id[q.item_id].future.cancelled()}
                    if given_up:
                        self._queue[:head] = [e for e in self._queue[:head] if e.item_id not in given_up]
                        continue
                    taken = {q.item_id for q in (*d.drop, *d.run, *d.shed)}
                    self._queue[:head] = [e for e in self._queue[:head] if e.item_id not in taken]
                    replies = _Replies()
                    for q in d.drop:
                        self._served[typing.cast(BatchKey, q.key)].stats.dropped += 1
                        replies.fail(by_id[q.item_id], DeadlineMissed(
                            f"{q.key} item due in {q.deadline - now:+.3f}s could not be run in time"))
                    for q in d.shed:
                        self._served[typing.cast(BatchKey, q.key)].stats.shed += 1
                        replies.fail(by_id[q.item_id], Shed(
                            f"{q.key} item (priority {q.priority}) shed: the device is overloaded"))
                    replies.send()
                    if d.run:
                        return ([by_id[q.item_id] for q in d.run],
                                self._served[typing.cast(BatchKey, d.run[0].key)])
                    continue
                timeout = None if d.wake_at is None else max(d.wake_at - now, 0.0)
                self._cond.wait(timeout)
        return None, None

    def _window(self) -> list[_Request]:
        """The earliest-due items the policy decides on (`BatchPolicy.window`): a long
        queue costs each decision no more than a short one."""
        return [e.request for e in self._queue[:self.policy.window]]

    def _run(self, batch: list[_Request], served: _Served) -> None:
        # Futures stay pending (cancellable) while they run: a chained item's future is
        # resolved only once its last stage is back.
        live = [r for r in batch if not r.future.cancelled()]
        if not live:
            return
        replies = _Replies()
        try:
            feeds = {name: self._stacker.stack([r.feeds[name] for r in live])
                     for name in live[0].feeds}
            c0 = time.thread_time()
            outputs, seconds = served.model.run(feeds)
            self._run_cpu = time.thread_time() - c0
        except BaseException as e:  # a failed call fails its items, not the device thread
            log.exception("inference failed for a batch of %d", len(live))
            for r in live:
                replies.fail(r, e)
            replies.send()
            return
        n = len(live)
        follow: list[tuple[_Request, Next, ItemResult]] = []
        for i, r in enumerate(live):
            result = ItemResult(tuple(o[i] for o in outputs), seconds / n, n)
            if r.then is None:
                replies.resolve(r, result if r.first is None else (r.first, result))
                continue
            try:
                nxt = r.then(result)
            except Exception as e:  # noqa: BLE001 - a failed `then` fails its item, as a failed call
                replies.fail(r, e)
                continue
            follow.append((r, nxt, result))
        with self._cond:
            served.timed(n, seconds, self.smoothing)
            st = served.stats
            st.batch_sizes[n] += 1
            st.items += n
            st.device_seconds += seconds
            now = self.clock()
            for r, nxt, result in follow:  # the second stages, queued as they come back
                if self._closed:
                    replies.cancel(r)
                    continue
                if nxt.key not in self._served:
                    replies.fail(r, KeyError(f"no model is served for {nxt.key}"))
                    continue
                q = Queued(next(self._ids), nxt.key, nxt.deadline, r.queued.priority, now)
                self._put(_Request(q, nxt.feeds, r.future, first=result, loop=r.loop))
        replies.send()


@dataclass(frozen=True, slots=True, order=True)
class _Entry:
    """A queued item by its deadline (then arrival)."""

    deadline: float
    item_id: int
    request: _Request = field(compare=False)


@dataclass(frozen=True, slots=True)
class Next:
    """The item a chained item's result makes (`InferenceEngine.submit_then`)."""

    key: BatchKey
    feeds: dict[str, np.ndarray]
    deadline: float
