"""The tenant side of the load test: CreateSession / EndSession / ListSessions over a few
channels, each call timed and its outcome kept as a ``Call``, and ``bounded`` to run
many calls with a cap on those in flight.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2
from loadtests.wire import END_REASON, LIVE, channel


@dataclass
class Call:
    latency: float
    state: int = 0  # SessionState of the answer; 0 on error
    code: str = "OK"
    session_id: str = ""
    started: float = 0.0  # perf_counter at the call's start


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


class Tenants:
    """CreateSession/EndSession over a few channels, round robin."""

    def __init__(self, address: str, channels: int, timeout: float) -> None:
        self.channels = [channel(address) for _ in range(channels)]
        self.stubs = [sessions_pb2_grpc.SessionServiceStub(c) for c in self.channels]
        self.timeout = timeout
        self._i = 0

    def stub(self) -> sessions_pb2_grpc.SessionServiceStub:
        self._i = (self._i + 1) % len(self.stubs)
        return self.stubs[self._i]

    async def create(self, spec: types_pb2.SessionSpec, request_id: str) -> Call:
        req = sessions_pb2.CreateSessionRequest(spec=spec, request_id=request_id)
        stub = self.stub()
        return await _timed(lambda: stub.CreateSession(req, timeout=self.timeout))

    async def create_many(self, reqs: list[tuple[types_pb2.SessionSpec, str]]) -> list[Call]:
        """One CreateSessions call; a Call per room, each with the call's latency."""
        req = sessions_pb2.CreateSessionsRequest(requests=[
            sessions_pb2.CreateSessionRequest(spec=spec, request_id=rid) for spec, rid in reqs])
        stub = self.stub()
        t0 = time.perf_counter()
        try:
            done = await stub.CreateSessions(req, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            return [Call(time.perf_counter() - t0, 0, e.code().name, started=t0) for _ in reqs]
        lat = time.perf_counter() - t0
        return [Call(lat, r.session.state, "OK", r.session.session_id, t0) if r.code == 0 else
                Call(lat, 0, _CODE_NAMES.get(r.code, str(r.code)), started=t0) for r in done.results]

    async def end(self, session_id: str) -> Call:
        return await _timed(lambda: self.stub().EndSession(sessions_pb2.EndSessionRequest(
            session_id=session_id, reason=END_REASON), timeout=self.timeout))

    async def list_live(self) -> list[types_pb2.Session]:
        out: list[types_pb2.Session] = []
        token = ""
        while True:
            page = await self.stubs[0].ListSessions(sessions_pb2.ListSessionsRequest(
                states=LIVE, page_size=1000, page_token=token), timeout=60)
            out += page.sessions
            token = page.next_page_token
            if not token:
                return out

    async def close(self) -> None:
        for c in self.channels:
            await c.close(grace=None)


async def _timed(call: Callable[[], Awaitable[types_pb2.Session]]) -> Call:
    """One API call answered with a Session, timed from the moment it is started."""
    t0 = time.perf_counter()
    try:
        s = await call()
    except grpc.aio.AioRpcError as e:
        return Call(time.perf_counter() - t0, 0, e.code().name, started=t0)
    return Call(time.perf_counter() - t0, s.state, "OK", s.session_id, t0)


async def bounded(items: Iterable[Any], concurrency: int, fn: Any,
                  time_limit: float = math.inf) -> list[Any]:
    """fn(item) for every item with at most `concurrency` in flight; results in order (None for
    items not started within `time_limit` seconds)."""
    items = list(items)
    results: list[Any] = [None] * len(items)
    it: Iterator[int] = iter(range(len(items)))
    deadline = time.perf_counter() + time_limit

    async def lane() -> None:
        for i in it:
            if time.perf_counter() > deadline:
                return
            results[i] = await fn(items[i])

    await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, len(items))))))
    return results


async def end_leftovers(tc: Tenants, prefix: str) -> int:
    """Ends live sessions of ours whose CreateSession answer never arrived (timed out)."""
    try:
        live = await tc.list_live()
    except grpc.aio.AioRpcError:
        return 0
    ids = [s.session_id for s in live if s.spec.room_id.startswith(prefix)]
    await bounded(ids, 64, tc.end)
    return len(ids)


def codes(calls: Iterable[Call]) -> str:
    c = collections.Counter(x.code for x in calls if x.code != "OK")
    return ", ".join(f"{k} {v}" for k, v in c.most_common()) or "none"
