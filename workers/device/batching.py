"""Cross-room dynamic batching: which queued frames run together, and when.

Pure policy with injected time. Every queued item (a video frame's render, an
audio window's motion, a room's lip-sync check) has a deadline. Given the
queue, the time and each model's measured latency curve, `decide` returns the
next batch to run, the items that can no longer make their deadline (they are
dropped and the room shows a replacement frame), or how long to wait for more
items:

* earliest deadline first; the batch is one model at one input shape and grows
  while the curve says it still finishes before the earliest deadline in it,
  up to the size where throughput stops improving (`LatencyCurve.useful_batch`);
* when a forecast of the whole queue (run as EDF batches back to back) shows a
  miss, the device is overloaded: rather than let earliest-deadline-first run
  frames that end up late anyway and cascade misses into the frames behind them,
  the policy sheds, now, the fewest items that make the rest fit: lowest tier
  first (best effort before any standard frame; premium never on a forecast),
  within a tier the earliest due (the frames already in trouble, which rotate
  across rooms), and serves what is left tier first;
* a batch that is not full may wait for more items, but never past the slack:
  the forecast must still make every deadline after the wait, with room for the
  batch to grow to its maximum, and never longer than `max_wait`; and never with
  other items queued: another model's batch that ends within the wait runs
  meanwhile, else the batch runs as it is (a device that idles with work queued
  falls behind for good under load).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from avatarfarm.latency import LatencyCurve


@dataclass(frozen=True, slots=True)
class Queued:
    """One item waiting for the device."""

    item_id: int  # unique, increasing with arrival
    key: Hashable  # model and input shape: only items with equal keys batch together
    deadline: float  # the result must be ready by then (math.inf: no deadline)
    priority: int  # 0 first (premium), as Tier.priority
    enqueued: float


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch: int = 8
    # How long a batch that is not full may wait for company (seconds), within its slack.
    max_wait: float = 0.02
    # Safety factor on the curve: a batch is planned as if it took this much longer.
    margin: float = 0.1
    # Under overload, give up the lowest tier's items at once (True), or serve tier first
    # and let what cannot make it miss (False).
    shed: bool = True
    # The device decides on the earliest-due items of its queue, at most this many (the
    # overload forecast too): a worker that fell behind queues hundreds of items, and
    # planning over all of them at every batch would cost more than the batches.
    window: int = 128


@dataclass(frozen=True, slots=True)
class Decision:
    run: tuple[Queued, ...] = ()  # one key, in the order the batch is built
    drop: tuple[Queued, ...] = ()  # can no longer make their deadlines
    wake_at: float | None = None  # nothing to run now: decide again then (None: on arrival)
    overloaded: bool = False
    shed: tuple[Queued, ...] = ()  # could run, but not all that is queued fits: given up now


@dataclass(frozen=True, slots=True)
class Forecast:
    misses: int
    slack: float  # how long the whole plan could start later and still make every deadline


def forecast(items: Sequence[Queued], now: float, curves: Mapping[Any, LatencyCurve],
             policy: BatchPolicy) -> Forecast:
    """Runs the queue as EDF batches back to back, on paper. O(n log n): within one key,
    EDF batches are prefixes of its deadline order, so each key is a sorted queue and
    each step takes the key whose head is due first."""
    per_key: dict[Any, list[Queued]] = {}
    for q in sorted(items, key=lambda q: (q.deadline, q.item_id), reverse=True):
        per_key.setdefault(q.key, []).append(q)  # each list: latest first, pop() = earliest
    # Each key's planned seconds by batch size, up to its useful batch (index 0 unused):
    # the queue can be hundreds of items long, and the curve is read for every batch.
    planned = {k: [0.0] + [_planned(curves[k], b, policy)
                           for b in range(1, curves[k].useful_batch(policy.max_batch) + 1)]
               for k in per_key}
    heads = [(qs[-1].deadline, qs[-1].item_id, k) for k, qs in per_key.items()]
    heapq.heapify(heads)
    t, misses, slack = now, 0, math.inf
    while heads:
        earliest, _, key = heapq.heappop(heads)
        qs, cost = per_key[key], planned[key]
        k, most = 1, min(len(cost) - 1, len(qs))
        while k < most and t + cost[k + 1] <= earliest:
            k += 1
        t += cost[k]
        slack = min(slack, earliest - t)
        for _ in range(k):
            if qs.pop().deadline < t:
                misses += 1
        if qs:
            heapq.heappush(heads, (qs[-1].deadline, qs[-1].item_id, key))
    return Forecast(misses, slack)


def decide(queue: Sequence[Queued], now: float, curves: Mapping[Any, LatencyCurve],
           policy: BatchPolicy = BatchPolicy()) -> Decision:
    alone = {k: _planned(curves[k], 1, policy) for k in {q.key for q in queue}}
    drop = tuple(q for q in queue if now + alone[q.key] > q.deadline)
    dropped = {q.item_id for q in drop}
    live = [q for q in queue if q.item_id not in dropped]
    if not live:
        return Decision(drop=drop)
    plan = forecast(live, now, curves, policy)
    overloaded = plan.misses > 0
    shed: tuple[Queued, ...] = ()
    if overloaded and policy.shed:
        shed, plan = shed_for(live, now, curves, policy, plan.misses)
        gone = {q.item_id for q in shed}
        live = [q for q in live if q.item_id not in gone]
        if not live:
            return Decision(drop=drop, overloaded=True, shed=shed)
    if overloaded:
        # What is left fits on paper; the paper can be optimistic (a busy host makes calls
        # slower than measured), so the higher tiers still go first.
        order = sorted(live, key=lambda q: (q.priority, q.deadline, q.item_id))
    else:
        order = sorted(live, key=lambda q: (q.deadline, q.item_id))
    key = order[0].key
    curve = curves[key]
    same = [q for q in order if q.key == key]
    cap = curve.useful_batch(policy.max_batch)
    batch = _grow(same, now, curve, policy, cap) or [order[0]]
    if not overloaded and len(batch) < cap and len(batch) == len(same):
        # Room to grow and nothing else of this shape waiting: wait for company, within slack.
        growth = _planned(curve, cap, policy) - _planned(curve, len(batch), policy)
        oldest = min(q.enqueued for q in batch)
        until = min(oldest + policy.max_wait, now + plan.slack - growth)
        if until > now:
            other = [q for q in order if q.key != key]
            if not other:
                return Decision(drop=drop, wake_at=until, overloaded=overloaded, shed=shed)
            # The device does not idle while other items wait: their batch runs meanwhile
            # when it ends within the wait (a chained item's first stages, whose results
            # are the company this batch waits for), else this batch runs as it is.
            okey, ocurve = other[0].key, curves[other[0].key]
            obatch = _grow([q for q in other if q.key == okey], now, ocurve, policy,
                           ocurve.useful_batch(policy.max_batch))
            if obatch and now + _planned(ocurve, len(obatch), policy) <= until:
                batch = obatch
    return Decision(run=tuple(batch), drop=drop, overloaded=overloaded, shed=shed)


def shed_for(items: Sequence[Queued], now: float, curves: Mapping[Any, LatencyCurve],
             policy: BatchPolicy, misses: int) -> tuple[tuple[Queued, ...], Forecast]:
    """The items to give up so that the rest makes every deadline, and the forecast of
    the rest: lowest tier first, earliest deadline first within a tier. Premium items
    are never given up on a forecast (only dropped once even a batch of one would be
    late): the forecast is a plan, and a busy host makes it pessimistic as often as
    not. Starts from as many as the forecast misses and sheds each further miss found,
    so it costs a few forecasts, not a search."""
    kept = [q for q in items if q.priority <= 0]
    order = sorted((q for q in items if q.priority > 0), key=lambda q: (-q.priority, q.deadline, q.item_id))
    k = min(misses, len(order))
    while True:
        plan = forecast([*kept, *order[k:]], now, curves, policy)
        if plan.misses == 0 or k >= len(order):
            return tuple(order[:k]), plan
        k = min(k + plan.misses, len(order))


def _planned(curve: LatencyCurve, batch: int, policy: BatchPolicy) -> float:
    return curve.seconds(batch) * (1.0 + policy.margin)


def _grow(candidates: Sequence[Queued], start: float, curve: LatencyCurve,
          policy: BatchPolicy, cap: int) -> list[Queued]:
    """The longest selection, in order, of at most `cap` items that finishes before its
    earliest deadline."""
    batch: list[Queued] = []
    earliest = math.inf
    for q in candidates:
        if len(batch) >= cap:
            break
        e = min(earliest, q.deadline)
        if start + _planned(curve, len(batch) + 1, policy) <= e:
            batch.append(q)
            earliest = e
    return batch
