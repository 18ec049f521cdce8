"""Which scheduler leads: a lease row in the shared store, and the epoch it carries.

Schedulers sharing a PostgreSQL store (replicas) take turns: one holds the lease and
leads (places, dispatches, meters); the others follow and take the lease once it runs
out. A new leader raises the epoch, and from then on (`SqlStore.fence`) every commit of
an older leader fails in its own transaction, and workers refuse commands carrying an
older epoch (`SchedulerMessage.leader_epoch`). A scheduler on an SQLite file is the only
one that file has: it takes the lead by force and never has to renew it.

Timing is this process's own monotonic clock, never compared with another machine's: a
leader may act until `acting_until` its last successful renewal, measured from before
the renewal was sent, which ends before the store (on its own clock) lets anyone else
claim the lease.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.state.store import Lease, LeaseStore

log = logging.getLogger(__name__)

# The share of the lease a leader acts on: the rest covers the clocks' rates and a
# renewal's way to the store.
SAFETY = 0.8


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    ttl: float = 5.0  # seconds a lease lasts unless renewed
    renew_every: float = 1.0  # a leader renews this often
    poll_every: float = 1.0  # a follower tries to take the lease this often

    def __post_init__(self) -> None:
        if not (self.ttl > 0 and 0 < self.renew_every < self.ttl * SAFETY / 2 and self.poll_every > 0):
            raise ValueError("the lease must outlast at least two renewals within its safe "
                             f"share ({SAFETY:.0%}): ttl > 2.5 x renew_every > 0")


def acting_until(sent_at: float, config: LeaseConfig) -> float:
    """Until when a leader may act on a renewal (or claim) sent at `sent_at`."""
    return sent_at + config.ttl * SAFETY


class Leadership:
    """This scheduler's claim on the lead of its store."""

    def __init__(self, store: LeaseStore, address: str, config: LeaseConfig = LeaseConfig(), *,
                 exclusive: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.address = address  # where tenants and workers reach this scheduler
        self.config = config
        self.exclusive = exclusive  # an SQLite file: no one else can share it
        self.holder = f"{uuid.uuid4().hex[:12]}"  # this process, never reused
        self.epoch = 0
        self.clock = clock
        self._until = 0.0
        self._keeping: asyncio.Task[str] | None = None
        # Lease calls get a thread of their own: a busy default executor must not make
        # a leader miss its renewals.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lease")

    def valid(self) -> bool:
        """This scheduler leads now, and may act."""
        return self.epoch > 0 and self.clock() < self._until

    async def _call(self, fn: Callable[[], object], timeout: float | None = None) -> object:
        fut = asyncio.get_running_loop().run_in_executor(self._pool, fn)
        return await asyncio.wait_for(fut, timeout)

    async def acquire(self, following: Callable[[Lease | None], None] | None = None) -> int:
        """Waits until this scheduler leads; `following` hears of the leader meanwhile.
        Returns the epoch, which the store then fences its commits with."""
        last: tuple[str, int] | None = None
        while True:
            sent = self.clock()
            try:
                epoch = await self._call(lambda: self.store.claim_lead(
                    self.holder, self.address, self.config.ttl, force=self.exclusive))
                lease = None if epoch is not None else await self._call(self.store.leader)
            except Exception as e:  # noqa: BLE001 - the store is unreachable: keep trying
                log.warning("cannot claim the lead: %s", e)
                epoch = lease = None
            if isinstance(epoch, int):
                self.epoch = epoch
                self._until = math.inf if self.exclusive else acting_until(sent, self.config)
                self.store.fence(epoch)
                log.info("leading under epoch %d (reached at %s)", epoch, self.address or "?")
                return epoch
            assert lease is None or isinstance(lease, Lease)
            if following is not None:
                following(lease)
            if lease is not None and (lease.address, lease.epoch) != last:
                last = (lease.address, lease.epoch)
                log.info("following the leader at %s (epoch %d)", lease.address or "?", lease.epoch)
            await asyncio.sleep(self.config.poll_every)

    def keeping(self) -> asyncio.Task[str]:
        """`keep` as a task, started once: as soon as the lead is taken, so that loading
        the state does not eat into the lease."""
        if self._keeping is None:
            self._keeping = asyncio.get_running_loop().create_task(self.keep(), name="lease")
        return self._keeping

    async def keep(self) -> str:
        """Renews the lease while this scheduler leads; returns why it stopped leading."""
        if self.exclusive:
            await asyncio.Event().wait()  # nobody renews an SQLite file's lead
        while True:
            await asyncio.sleep(self.config.renew_every)
            sent = self.clock()
            left = self._until - sent
            if left <= 0:
                return "the lease ran out before the store confirmed a renewal"
            try:
                ok = await self._call(lambda: self.store.renew_lead(
                    self.holder, self.epoch, self.config.ttl), timeout=left)
            except TimeoutError:
                return f"the store did not confirm a renewal within the lease ({left:.1f} s)"
            except Exception as e:  # noqa: BLE001 - retried until the lease runs out
                log.warning("lease renewal failed (%s); %.1f s of the lease left", e, left)
                continue
            if not ok:
                return "another scheduler holds the lease"
            self._until = acting_until(sent, self.config)

    async def release(self) -> None:
        """Gives the lead up at once (a clean stop), so a follower need not wait."""
        if self.epoch and not self.exclusive:
            try:
                await self._call(lambda: self.store.release_lead(self.holder, self.epoch), timeout=2.0)
            except Exception as e:  # noqa: BLE001 - the lease then runs out by itself
                log.warning("could not release the lease: %s", e)
        self._until = 0.0
        self._pool.shutdown(wait=False)
