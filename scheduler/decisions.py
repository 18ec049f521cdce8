"""What the core decided, as values, and the one place that carries it out.

Every operation of the core (a tenant's call, a worker's report, a tick) changes its
own in-memory state and records what must happen outside it: commands down worker
streams, events for watchers, session and usage rows for the store, usage
acknowledgements owed once the rows holding them are on disk. When the operation
returns, `Dispatcher.apply` carries the `SchedulerOutput` out in a fixed order
(rows, commit, commands, events), as vLLM's scheduler returns a `SchedulerOutput`
and never touches the GPU itself. The core never writes to a worker's outbox, a
watcher's queue or the store's session tables directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from scheduler.policy.ledger import Interval
from scheduler.state.commit import GroupCommit
from scheduler.state.sessions import Session, SessionEvent
from scheduler.state.store import Store
from scheduler.state.worker_conn import UsageAckCmd, WorkerCommand, WorkerConn


@dataclass(frozen=True, slots=True)
class ToWorker:
    worker_id: str
    command: WorkerCommand


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    rows: tuple[Session, ...] = ()  # session rows to write, latest last
    intervals: tuple[Interval, ...] = ()  # usage ledger rows
    cursors: tuple[tuple[str, tuple[int, int]], ...] = ()  # worker -> (usage epoch, seq)
    commands: tuple[ToWorker, ...] = ()
    events: tuple[SessionEvent, ...] = ()
    retired: tuple[WorkerConn, ...] = ()  # streams replaced or dropped: closed
    commit: bool = False  # other rows (avatars, scripts) were written this turn

    def __bool__(self) -> bool:
        return bool(self.rows or self.intervals or self.cursors or self.commands or self.events
                    or self.retired or self.commit)


@dataclass(slots=True)
class Decisions:
    """Collects one operation's output; `take` hands it over and starts afresh."""

    rows: dict[str, Session] = field(default_factory=dict)
    intervals: list[Interval] = field(default_factory=list)
    cursors: dict[str, tuple[int, int]] = field(default_factory=dict)
    commands: list[ToWorker] = field(default_factory=list)
    events: list[SessionEvent] = field(default_factory=list)
    retired: list[WorkerConn] = field(default_factory=list)
    commit: bool = False

    def store(self, s: Session) -> None:
        self.rows.pop(s.session_id, None)  # re-inserted last: written in decision order
        self.rows[s.session_id] = s

    def usage(self, intervals: list[Interval], cursors: dict[str, tuple[int, int]]) -> None:
        self.intervals += intervals
        self.cursors.update(cursors)

    def send(self, worker_id: str, command: WorkerCommand) -> None:
        self.commands.append(ToWorker(worker_id, command))

    def notify(self, event: SessionEvent) -> None:
        self.events.append(event)

    def retire(self, conn: WorkerConn) -> None:
        self.retired.append(conn)

    def take(self) -> SchedulerOutput:
        out = SchedulerOutput(tuple(self.rows.values()), tuple(self.intervals),
                              tuple(self.cursors.items()), tuple(self.commands),
                              tuple(self.events), tuple(self.retired), self.commit)
        self.rows.clear()
        self.intervals.clear()
        self.cursors.clear()
        self.commands.clear()
        self.events.clear()
        self.retired.clear()
        self.commit = False
        return out


class Dispatcher:
    """Carries out a SchedulerOutput: the only writer of worker outboxes, watcher queues
    and session rows."""

    def __init__(self, store: Store, commits: GroupCommit, workers: Mapping[str, WorkerConn],
                 watchers: Mapping[str, set[asyncio.Queue[SessionEvent]]]) -> None:
        self.store = store
        self.commits = commits
        self.workers = workers
        self.watchers = watchers

    def apply(self, out: SchedulerOutput) -> None:
        if out.rows:
            self.store.put_sessions(list(out.rows))
        if out.intervals or out.cursors:
            self.store.put_usage(list(out.intervals), dict(out.cursors))
        if out.rows or out.intervals or out.cursors or out.commit:
            self.commits.schedule()
        for c in out.commands:
            conn = self.workers.get(c.worker_id)
            if conn is not None:
                conn.outbox.put_nowait(c.command)
        for conn in out.retired:
            conn.outbox.put_nowait(None)
        for ev in out.events:
            for q in self.watchers.get(ev.session.session_id, ()):
                q.put_nowait(ev)
        if out.cursors:
            # Workers may forget their reports once the ledger rows holding them are on disk.
            turn = self.commits.pending
            if turn is None:
                self._ack(out.cursors)
            else:
                turn.add_done_callback(
                    lambda f: None if f.cancelled() or f.exception() else self._ack(out.cursors))

    def _ack(self, cursors: tuple[tuple[str, tuple[int, int]], ...]) -> None:
        for worker_id, (epoch, seq) in cursors:
            conn = self.workers.get(worker_id)
            if conn is not None and conn.usage_epoch == epoch:
                conn.outbox.put_nowait(UsageAckCmd(seq))
