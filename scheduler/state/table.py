"""The session table: every session the scheduler knows, and the indexes kept in step
with each change, so a call costs the same at 10 or 10,000 rooms. Only the core's
state machine writes it (`put` for a transition or any other change, `progressed`
for progress alone); everything else reads it."""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping

from avatarfarm.domain import Output, SessionState, Tier, output_scope
from scheduler.state.sessions import Session

LIVE = (SessionState.PLACED, SessionState.RUNNING)


class SessionTable(Mapping[str, Session]):
    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}
        self.live_rooms: dict[tuple[str, str], str] = {}  # (tenant, room_id) -> live session
        self.requests: dict[tuple[str, str], str] = {}  # (tenant, request_id) -> session
        self.outputs: dict[tuple[str, Output], str] = {}  # output_scope of live sessions
        self.units: dict[str, float] = collections.defaultdict(float)  # tenant -> units in use
        self.unit_of: dict[str, float] = {}  # session -> its units (a snapshot sums a worker's)
        self.reserved: dict[str, float] = collections.defaultdict(float)  # guaranteed units
        self.counts: collections.Counter[tuple[SessionState, Tier]] = collections.Counter()
        self.degraded: set[str] = set()  # live sessions below the top of their ladder
        self.preemptible = 0.0  # compute held by placed non-premium rooms
        # Sessions by state, each in the order they entered it: a snapshot copies these
        # instead of walking every session the scheduler ever had.
        self.by_state: dict[SessionState, dict[str, Session]] = {st: {} for st in SessionState}

    def __getitem__(self, session_id: str) -> Session:
        return self._by_id[session_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    # The dict's own lookups, not Mapping's generic ones (they go through __getitem__ and
    # an exception): the core asks these for every room, every tick.
    def __contains__(self, session_id: object) -> bool:
        return session_id in self._by_id

    def get(self, session_id: str, default: Session | None = None) -> Session | None:  # type: ignore[override]
        return self._by_id.get(session_id, default)

    def put(self, s: Session) -> Session | None:
        """Stores `s` and re-indexes it; returns what it replaced."""
        prev = self._by_id.get(s.session_id)
        self._by_id[s.session_id] = s
        if prev is not None:
            self._unindex(prev)
            if prev.state is not s.state:
                del self.by_state[prev.state][s.session_id]
        self.by_state[s.state][s.session_id] = s
        self.unit_of[s.session_id] = s.units
        self._index(prev, s)
        return prev

    def order_ended(self) -> None:
        """Ended sessions by when they ended (loaded from the store they come in
        admission order): a snapshot reads the recent ones from the newest back."""
        for state, in_state in self.by_state.items():
            if state.terminal:
                self.by_state[state] = dict(sorted(in_state.items(), key=lambda kv: kv[1].updated_at))

    def progressed(self, s: Session) -> None:
        """A session whose progress alone changed: nothing indexed moves."""
        self._by_id[s.session_id] = s
        self.by_state[s.state][s.session_id] = s

    def _unindex(self, prev: Session) -> None:
        if prev.state in LIVE and prev.spec.tier is not Tier.PREMIUM:
            self.preemptible -= prev.load
        self.counts[(prev.state, prev.spec.tier)] -= 1
        if not prev.state.terminal:
            self.units[prev.spec.tenant] -= prev.units
            if prev.guaranteed:
                self.reserved[prev.spec.tenant] -= prev.units

    def _index(self, prev: Session | None, s: Session) -> None:
        if s.state in LIVE and s.spec.tier is not Tier.PREMIUM:
            self.preemptible += s.load
        self.counts[(s.state, s.spec.tier)] += 1
        if prev is None and s.request_id:
            self.requests[(s.spec.tenant, s.request_id)] = s.session_id
        key = (s.spec.tenant, s.spec.room_id)
        if s.state.terminal:
            if self.live_rooms.get(key) == s.session_id:
                del self.live_rooms[key]
            if self.outputs.get(output_scope(s.spec.tenant, s.spec.output)) == s.session_id:
                del self.outputs[output_scope(s.spec.tenant, s.spec.output)]
            self.degraded.discard(s.session_id)
            return
        self.live_rooms[key] = s.session_id
        self.outputs[output_scope(s.spec.tenant, s.spec.output)] = s.session_id
        self.units[s.spec.tenant] += s.units
        if s.guaranteed:
            self.reserved[s.spec.tenant] += s.units
        if s.step:
            self.degraded.add(s.session_id)
        else:
            self.degraded.discard(s.session_id)
