"""The worker's link to the scheduler: one bidirectional stream, registered at every
connect and re-established with backoff when it breaks.

The link knows the stream, not the rooms. What the worker says when it registers,
what goes first on a new stream, what it sends each interval and what a command
from the scheduler does are its peer's (`LinkPeer`: the `WorkerAgent`). A message
sent while no stream is registered is dropped: what must arrive is held by the peer
(numbered usage reports, see `workers.agent.usage`) and handed back when the link
registers again.

A refused credential is retried like a broken link, so a renewed token or
certificate takes effect without a restart. `restart` ends the stream on purpose,
and the worker registers again at once (after a stall, see `WorkerAgent`).

Replicated schedulers: the address may list several (`host1:port,host2:port`). A
scheduler that follows refuses the stream naming the leader, and the link goes there
next; otherwise it tries the next address. Every message carries the sending leader's
epoch, and the link refuses anything from an epoch older than the newest it has
registered with: a leader that was paused and wakes up commands nothing. Keepalive
pings find a scheduler that froze with the connection open.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import grpc

from avatarfarm import client
from avatarfarm.serving import KEEPALIVE
from avatarfarm.v1 import workers_pb2, workers_pb2_grpc

log = logging.getLogger(__name__)


class LinkPeer(Protocol):
    """The worker's side of the conversation; the link calls it on the event loop."""

    def register(self) -> workers_pb2.WorkerMessage:
        """The Register message, made afresh at every connect."""
        ...

    def registered(self, reg: workers_pb2.Registered) -> list[workers_pb2.WorkerMessage]:
        """The scheduler accepted the registration; returns what goes first on the new
        stream, before any message sent through the link."""
        ...

    def tick(self) -> list[workers_pb2.WorkerMessage]:
        """Called every interval while registered; returns what to send (at least a
        proof of life)."""
        ...

    def receive(self, msg: workers_pb2.SchedulerMessage) -> None:
        """A command from the scheduler (anything but `registered`)."""
        ...


# Seconds of registrations under an older epoch after which it is taken as the epoch
# itself having gone back: far beyond any lease.
STALE_EPOCH_RESET = 60.0


class StaleLeader(Exception):
    """The scheduler registered this worker under an older epoch than one it has seen."""


class SchedulerLink:
    def __init__(self, address: str, peer: LinkPeer, *, progress_interval: float = math.inf,
                 credentials: grpc.ChannelCredentials | None = None,
                 token_file: Path | None = None) -> None:
        self.addresses = client.addresses(address)
        self.address = self.addresses[0]  # the scheduler tried now
        self.leader_epoch = 0  # the newest leader's epoch this worker registered with
        self._stale_since: float | None = None  # registrations under older epochs, since
        self.peer = peer
        self.progress_interval = progress_interval  # report at least this often
        # TLS to the scheduler (None: plain) and this worker's token, re-read when it changes.
        self.credentials = credentials
        self.token_file = token_file
        self.connected = asyncio.Event()
        self.heartbeat_interval = 1.0  # the scheduler's; it says so when the worker registers
        self._outbox: asyncio.Queue[workers_pb2.WorkerMessage] | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._resync = False  # the link is being restarted on purpose (after a stall)

    def send(self, msg: workers_pb2.WorkerMessage) -> None:
        """Sends on the registered stream; dropped when there is none."""
        if self._outbox is not None:
            self._outbox.put_nowait(msg)

    def pending(self) -> bool:
        """Messages wait to be sent on the registered stream."""
        return self._outbox is not None and not self._outbox.empty()

    def restart(self) -> bool:
        """Ends the stream so that the worker registers again at once; False where there
        is no stream or a restart is already under way."""
        if self._call is None or self._resync:
            return False
        self._resync = True
        self._call.cancel()
        return True

    async def _outgoing(self, outbox: asyncio.Queue[workers_pb2.WorkerMessage]
                        ) -> AsyncIterator[workers_pb2.WorkerMessage]:
        yield self.peer.register()
        while True:
            yield await outbox.get()

    async def _tick(self, outbox: asyncio.Queue[workers_pb2.WorkerMessage]) -> None:
        while True:
            # The scheduler's interval (it lengthens it as its fleet grows), unless this
            # worker was asked to report progress more often.
            await asyncio.sleep(min(self.heartbeat_interval, self.progress_interval))
            for msg in self.peer.tick():
                outbox.put_nowait(msg)

    async def _session(self, channel: grpc.aio.Channel) -> None:
        stub = workers_pb2_grpc.WorkerServiceStub(channel)
        outbox: asyncio.Queue[workers_pb2.WorkerMessage] = asyncio.Queue()
        call = stub.Connect(self._outgoing(outbox))
        self._call = call
        ticker: asyncio.Task[None] | None = None
        try:
            async for msg in call:
                if msg.leader_epoch and msg.leader_epoch < self.leader_epoch:
                    if msg.WhichOneof("kind") != "registered":
                        log.warning("ignored a %s from an older leader (epoch %d < %d)",
                                    msg.WhichOneof("kind"), msg.leader_epoch, self.leader_epoch)
                        continue
                    self._stale_registration(msg.leader_epoch)
                if msg.WhichOneof("kind") == "pace":
                    if msg.pace.heartbeat_interval_seconds > 0 and ticker is not None:
                        # From now, not from the end of the interval under way.
                        self.heartbeat_interval = msg.pace.heartbeat_interval_seconds
                        ticker.cancel()
                        ticker = asyncio.create_task(self._tick(outbox))
                elif msg.WhichOneof("kind") == "registered":
                    self._stale_since = None
                    self.leader_epoch = max(self.leader_epoch, msg.leader_epoch)
                    self.heartbeat_interval = msg.registered.heartbeat_interval_seconds or 1.0
                    for first in self.peer.registered(msg.registered):
                        outbox.put_nowait(first)
                    self._outbox = outbox
                    ticker = asyncio.create_task(self._tick(outbox))
                    self.connected.set()
                else:
                    self.peer.receive(msg)
        finally:
            self._call = None
            self._outbox = None
            self.connected.clear()
            if ticker is not None:
                ticker.cancel()
            call.cancel()

    def _stale_registration(self, epoch: int) -> None:
        """A scheduler registered this worker under an older epoch than one it has seen:
        a leader that was paused and woke up, so the link moves on (`StaleLeader`). An
        old leader leaves within its lease; one that goes on registering workers past
        `STALE_EPOCH_RESET` is not one, but the schedulers' epoch went back (a database
        restored or replaced), and the link follows it from then on."""
        now = time.monotonic()
        if self._stale_since is None:
            self._stale_since = now
        if now - self._stale_since < STALE_EPOCH_RESET:
            raise StaleLeader(f"{self.address} leads under epoch {epoch}, older than "
                              f"{self.leader_epoch}")
        log.warning("the schedulers' epoch went back from %d to %d for %.0f s (a restored or "
                    "new database): following it", self.leader_epoch, epoch, now - self._stale_since)
        self.leader_epoch = 0

    def _next_address(self, error: grpc.aio.AioRpcError | None) -> bool:
        """Moves to the leader a follower named, else to the next listed scheduler;
        True where the next try goes somewhere new."""
        hint = client.leader_hint(error) if error is not None else ""
        if hint and hint != self.address:
            log.info("scheduler %s follows; going to the leader at %s", self.address, hint)
            self.address = hint
            return True
        if len(self.addresses) > 1:
            i = self.addresses.index(self.address) if self.address in self.addresses else -1
            self.address = self.addresses[(i + 1) % len(self.addresses)]
            return True
        return False

    async def run(self) -> None:
        """Keeps the link up until cancelled."""
        backoff = 0.2
        token = client.TokenFile(self.token_file) if self.token_file else None
        channels: dict[str, grpc.aio.Channel] = {}
        try:
            while True:
                channel = channels.get(self.address)
                if channel is None:
                    channel = channels[self.address] = client.channel(
                        self.address, credentials=self.credentials, metadata=token,
                        options=KEEPALIVE)
                try:
                    await self._session(channel)
                    backoff = 0.2
                    log.warning("scheduler closed the stream; reconnecting")
                except grpc.aio.AioRpcError as e:
                    # A refused credential is the operator's to fix; keep trying meanwhile,
                    # so a renewed token or certificate takes effect without a restart.
                    refused = e.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                           grpc.StatusCode.PERMISSION_DENIED)
                    log.log(logging.ERROR if refused else logging.WARNING,
                            "scheduler %s %s (%s: %s); retrying in %.1fs", self.address,
                            "refused this worker" if refused else "link down", e.code().name,
                            e.details(), backoff)
                    if e.code() == grpc.StatusCode.UNAVAILABLE and self._next_address(e):
                        backoff = 0.2
                except StaleLeader as e:
                    log.warning("left a scheduler that no longer leads: %s", e)
                    self._next_address(None)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if not self._resync or (task is not None and task.cancelling()):
                        raise  # the link itself is being cancelled
                    self._resync = False
                    backoff = 0.2
                    continue  # re-register at once
                await asyncio.sleep(backoff * (1 + random.random() / 4))
                backoff = min(backoff * 2, 5.0 if len(self.addresses) == 1 else 1.0)
        finally:
            for ch in channels.values():
                await ch.close()
