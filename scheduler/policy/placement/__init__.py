"""Placement: which worker renders which room. Pure policy, no I/O.

Capacity is measured, not a slot count. Each worker reports latency profiles:
seconds per call of each stage at the sizes and batch sizes it measured. Workers
batch frames across rooms, so a room's cost depends on its company: rooms that
render at the same side on one worker share batches and each frame costs
``call_seconds(n) / n`` for a batch of n (up to the best batch whose call fits
half the worker's latency budget). Packing therefore prefers workers that
already render the room's shape (Nexus's "squishy" bin packing: the bins'
sizes depend on what goes in them).

Three resources are checked on every worker:
- compute: device-seconds per second of the inference stages (render and
  audio-to-motion batched per group; TTS and, on CPU workers, encoding too);
- CPU encode: host core-seconds per second; GPUs like H100/H200 have no NVENC
  so every stream is encoded on the host's cores;
- device memory: the models once, each warm avatar's cache, each room's buffers.

`Fleet` keeps these per worker, with indexes (workers by render group, by warm
avatar, idle workers) so one placement looks at a bounded number of candidates
whatever the fleet size. The default strategy packs: workers that already
render the room's shape come first (the batch grows), the fullest of them
first; then an idle worker, the cheapest to open; workers of other shapes
last (mixed shapes keep every batch small). Idle workers can be released, so
a spread-out fleet costs every device. A tenant's premium rooms are spread:
at most `premium_spread` of them on one worker while others can take them.
Round-robin and least-loaded are kept as baselines for the load test.

Reclaiming capacity for a room that must run is `Fleet.reclaim` (`reclaim.py`).

Modules: `costs` (what a worker measured), `worker` (one worker's state and a
room's demand on it), `fleet` (all workers, indexed, and the strategies),
`reclaim` (making room for a guaranteed room), `consolidate` (emptying under-filled
workers after the peak). Everything is importable from here.
"""

from scheduler.policy.placement.consolidate import (
    ConsolidationConfig,
    Move,
    MoveBudget,
    consolidation_moves,
    drainable,
)
from scheduler.policy.placement.costs import (
    MAX_BATCH,
    UNIT_MODE,
    UNIT_QUALITY,
    MemoryProfile,
    StageCost,
    WorkerProfile,
    item_seconds,
    nominal_units,
    per_item_table,
)
from scheduler.policy.placement.fleet import Choice, Fleet, Rungs, Strategy
from scheduler.policy.placement.reclaim import Action, ActionKind, Reclaim
from scheduler.policy.placement.worker import Demand, GroupKey, RoomReq, WorkerState

__all__ = [
    "MAX_BATCH", "UNIT_MODE", "UNIT_QUALITY", "Action", "ActionKind", "Choice", "ConsolidationConfig",
    "Demand", "Fleet", "GroupKey", "MemoryProfile", "Move", "MoveBudget", "Reclaim", "RoomReq", "Rungs",
    "StageCost", "Strategy",
    "WorkerProfile", "WorkerState", "consolidation_moves", "drainable", "item_seconds", "nominal_units", "per_item_table",
]
