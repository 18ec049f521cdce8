"""Group commit: every change made in one event-loop turn goes to the store in that
turn's transaction, committed on the store's writer thread once the turn ends; the
turn's callers are answered when it is on disk. While one commit is on its way to
disk the turns after it wait and go together in the next one, so concurrent calls
share one sync and the loop never waits on the disk."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

from scheduler.state.store import Store

log = logging.getLogger(__name__)


class GroupCommit:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._handle: asyncio.Handle | None = None
        self._turn: asyncio.Future[None] | None = None  # this turn's commit, once scheduled
        self._committing: asyncio.Future[None] | None = None
        self._riders: list[asyncio.Future[None]] = []  # turns waiting for the next commit
        # Set once a commit fails: what the core holds in memory is then ahead of the store
        # (and may have reached workers), so the process must not go on as if it were not.
        self.failed = asyncio.Event()

    @property
    def pending(self) -> asyncio.Future[None] | None:
        """This turn's commit, while the turn has writes not handed to the store yet."""
        return self._turn

    def schedule(self) -> None:
        """This turn wrote to the store: commit it when the turn ends (at once with no
        event loop, as in a restart's recovery or a test)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.store.commit()
            return
        if self._handle is None:
            self._turn = loop.create_future()
            self._handle = loop.call_soon(self._end_of_turn)

    async def durable(self) -> None:
        """Returns once everything written so far is committed to the store."""
        fut = self._turn or (self._riders[-1] if self._riders else self._committing)
        if fut is not None and not fut.done():
            await asyncio.shield(fut)
        elif fut is not None and fut.exception() is not None:
            raise fut.exception()  # type: ignore[misc]

    def _end_of_turn(self) -> None:
        fut, self._turn, self._handle = self._turn, None, None
        if fut is None:
            return
        self._riders.append(fut)
        if self._committing is None or self._committing.done():
            self._commit_riders()

    def _commit_riders(self) -> None:
        riders, self._riders = self._riders, []
        if not riders:
            return
        loop = riders[-1].get_loop()
        self._committing = riders[-1]

        def settle(done: concurrent.futures.Future[None]) -> None:
            err = done.exception()
            if err is not None:
                log.error("store commit failed: %s", err)
                self.failed.set()
            for f in riders:
                if not f.done():
                    if err is not None:
                        f.set_exception(err)
                    else:
                        f.set_result(None)
            self._commit_riders()

        self.store.commit_async().add_done_callback(
            lambda done: loop.call_soon_threadsafe(settle, done))
