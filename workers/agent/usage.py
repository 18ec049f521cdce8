"""Usage reports the scheduler can bill from: numbered, held until acknowledged, resent.

Progress goes as one numbered `UsageReport` per interval for all running rooms,
each room's progress cumulative over its assignment; a room's final state goes in
a numbered report of its own. Reports are held until the scheduler acknowledges
them as durable (`UsageAck`), and on reconnect those after its `last_usage_seq`
are sent again first, so a report lost with a broken link is neither lost nor
counted twice. The numbering counts within a usage epoch, one per process, so a
restarted worker is told apart from a resumed one.

At most `history` reports are held (the newest): memory stays bounded however long
the scheduler is away.
"""

from __future__ import annotations

import collections

from avatarfarm.v1 import types_pb2, workers_pb2

_FINAL = (types_pb2.SESSION_STATE_ENDED, types_pb2.SESSION_STATE_FAILED)


class UsageReports:
    """The numbering of one usage epoch, and the reports not yet acknowledged."""

    def __init__(self, epoch: int, history: int = 600) -> None:
        self.epoch = epoch
        self.seq = 0  # the number of the last report made
        self._held: collections.deque[workers_pb2.UsageReport] = collections.deque(maxlen=history)

    def next(self, updates: list[workers_pb2.SessionUpdate]) -> workers_pb2.UsageReport:
        """The next report in this epoch's numbering, held until acknowledged."""
        self.seq += 1
        report = workers_pb2.UsageReport(seq=self.seq, updates=updates)
        self._held.append(report)
        return report

    def acknowledged(self, seq: int) -> None:
        """The scheduler has every report up to ``seq`` durably: they are forgotten."""
        while self._held and self._held[0].seq <= seq:
            self._held.popleft()

    def ending(self) -> dict[str, int]:
        """Rooms whose final state is in a report not yet acknowledged, by session: their
        assignment. A worker registers with them as its own, so that a scheduler that
        did not hear the end (it restarted, or another one leads now) keeps them here
        until the report, sent again, ends them; else it would take them for rooms this
        worker lost and place them again."""
        return {u.session_id: u.epoch for r in self._held for u in r.updates if u.state in _FINAL}

    def unapplied(self, last_applied: int) -> list[workers_pb2.UsageReport]:
        """Held reports the scheduler has not applied, oldest first."""
        return [r for r in self._held if r.seq > last_applied]
