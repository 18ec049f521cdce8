"""The admission queue: rooms that cannot be placed now wait here, fairly
across tenants. Pure data structure, no I/O.

Start-time fair queuing over flows (tenant, tier): a room's tag is its flow's
virtual start time, advanced by units / weight per room, where weight = the
tenant's weight x its tier's weight (premium 4, standard 2, best-effort 1).
A tenant that floods the queue advances only its own flow, so a tenant with
one room waiting is served next to it, not after it. Rooms guaranteed by a
reservation go before everything else.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from avatarfarm.domain import Tier

TIER_WEIGHT = {Tier.PREMIUM: 4.0, Tier.STANDARD: 2.0, Tier.BEST_EFFORT: 1.0}


@dataclass(order=True, slots=True)
class _Entry:
    key: tuple[int, float, int]
    session_id: str = field(compare=False)


class FairQueue:
    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._live: dict[str, _Entry] = {}
        self._flow_tag: dict[tuple[str, Tier], float] = {}
        self._vtime = 0.0
        self._n = 0

    def __len__(self) -> int:
        return len(self._live)

    def waiting(self) -> list[str]:
        """The waiting rooms, in no particular order (O(n), no sort)."""
        return list(self._live)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._live

    def push(self, session_id: str, tenant: str, tier: Tier, units: float, weight: float = 1.0,
             guaranteed: bool = False) -> None:
        if session_id in self._live:
            return
        flow = (tenant, tier)
        start = max(self._vtime, self._flow_tag.get(flow, 0.0))
        self._flow_tag[flow] = start + max(units, 1e-6) / (weight * TIER_WEIGHT[tier])
        self._n += 1
        e = _Entry((0 if guaranteed else 1, start, self._n), session_id)
        self._live[session_id] = e
        heapq.heappush(self._heap, e)

    def remove(self, session_id: str) -> None:
        self._live.pop(session_id, None)  # the heap entry is skipped when it surfaces

    def ordered(self, limit: int | None = None) -> list[str]:
        """Waiting rooms in service order (the first `limit`: O(limit log n))."""
        self._compact()
        if limit is None:
            live = sorted(e for e in self._heap if self._live.get(e.session_id) is e)
            return [e.session_id for e in live]
        taken: list[_Entry] = []
        while self._heap and len(taken) < limit:
            e = heapq.heappop(self._heap)
            if self._live.get(e.session_id) is e:
                taken.append(e)
        for e in taken:
            heapq.heappush(self._heap, e)
        return [e.session_id for e in taken]

    def served(self, session_id: str) -> None:
        """`session_id` left the queue by being placed: virtual time moves to its tag."""
        e = self._live.pop(session_id, None)
        if e is not None:
            self._vtime = max(self._vtime, e.key[1])

    def position(self, session_id: str) -> int:
        """1-based place in service order; 0 if not waiting."""
        e = self._live.get(session_id)
        if e is None:
            return 0
        return 1 + sum(1 for x in self._live.values() if x.key < e.key)

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [e for e in self._heap if self._live.get(e.session_id) is e]
            heapq.heapify(self._heap)
