"""gRPC adapter for tenants: the SessionService. It validates at the edge, calls
the core and maps its typed errors to precise status codes; it holds no state of
its own. The worker-facing stream lives in worker_service.

Every call comes through the gate (scheduler.api.gate), which says who is calling; a
tenant sees and changes only its own rooms, and another tenant's room gets the
same answer as a room that does not exist."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc

from avatarfarm import convert, input_tokens
from avatarfarm.domain import DriveMode, InvalidRequest
from avatarfarm.input_tokens import InputToken
from avatarfarm.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2
from scheduler.api import auth
from scheduler.api.auth import Principal, Unauthenticated
from scheduler.api.gate import caller
from scheduler.api.input_keys import LiveInputKeys
from scheduler.core import Scheduler
from scheduler.errors import AlreadyExists, BudgetExceeded, FailedPrecondition, NotFound, PermissionDenied
from scheduler.policy.ledger import Dimension
from scheduler.state.sessions import EventKind, Session

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rooms one CreateSessions call may admit: a vendor's opening wave, in answers that
# stay well inside the default message size.
MAX_BATCH = 1000

ERROR_STATUS: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    BudgetExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}
_EVENT_KINDS = {
    EventKind.STATE: sessions_pb2.SESSION_EVENT_KIND_STATE,
    EventKind.DEGRADED: sessions_pb2.SESSION_EVENT_KIND_DEGRADED,
    EventKind.RESTORED: sessions_pb2.SESSION_EVENT_KIND_RESTORED,
    EventKind.PREEMPTED: sessions_pb2.SESSION_EVENT_KIND_PREEMPTED,
    EventKind.BUDGET: sessions_pb2.SESSION_EVENT_KIND_BUDGET,
    EventKind.QUEUED: sessions_pb2.SESSION_EVENT_KIND_QUEUED,
    EventKind.LICENCE: sessions_pb2.SESSION_EVENT_KIND_LICENCE,
    EventKind.SYNC: sessions_pb2.SESSION_EVENT_KIND_SYNC,
    EventKind.DRIVER: sessions_pb2.SESSION_EVENT_KIND_DRIVER,
    EventKind.VOICE: sessions_pb2.SESSION_EVENT_KIND_VOICE,
}
_DIMENSIONS = {
    sessions_pb2.USAGE_DIMENSION_TENANT: Dimension.TENANT,
    sessions_pb2.USAGE_DIMENSION_TIER: Dimension.TIER,
    sessions_pb2.USAGE_DIMENSION_AVATAR: Dimension.AVATAR,
    sessions_pb2.USAGE_DIMENSION_DEVICE_TYPE: Dimension.DEVICE_TYPE,
    sessions_pb2.USAGE_DIMENSION_PLATFORM: Dimension.PLATFORM,
    sessions_pb2.USAGE_DIMENSION_VOICE: Dimension.VOICE,
}


def _status(e: Exception) -> grpc.StatusCode:
    return next(ERROR_STATUS[c] for c in type(e).__mro__ if c in ERROR_STATUS)


async def guard(context: grpc.aio.ServicerContext, fn: Callable[[], T],
                statuses: Mapping[type[Exception], grpc.StatusCode] = ERROR_STATUS) -> T:
    """Runs ``fn``, answering its typed errors with their precise status."""
    try:
        return fn()
    except tuple(statuses) as e:
        await context.abort(statuses[type(e)], str(e))
        raise  # unreachable: abort raises


async def guard_async(context: grpc.aio.ServicerContext, aw: Awaitable[T],
                      statuses: Mapping[type[Exception], grpc.StatusCode] = ERROR_STATUS) -> T:
    """`guard` for work that is awaited."""
    try:
        return await aw
    except tuple(statuses) as e:
        await context.abort(statuses[type(e)], str(e))
        raise  # unreachable: abort raises


def session_to_pb(s: Session, queue_position: int = 0,
                  token: InputToken | None = None, driver_urls: tuple[str, str, str] = ("", "", "")
                  ) -> types_pb2.Session:
    """The session as the API shows it, with the live-input token given (None: none)
    and, for a placed camera room, where its driver publishes (RTMP, WHIP) and watches."""
    return types_pb2.Session(
        driver_url=driver_urls[0], driver_whip_url=driver_urls[1], driver_preview_url=driver_urls[2],
        input_token=token.token if token else "",
        input_token_expires_at=convert.timestamp(token.expires_at) if token else None,
        session_id=s.session_id, spec=convert.spec_to_pb(s.spec), state=convert.state_to_pb(s.state),
        reason=s.reason, worker_id=s.worker_id, input_endpoint=s.input_endpoint,
        created_at=convert.timestamp(s.created_at), updated_at=convert.timestamp(s.updated_at),
        progress=convert.progress_to_pb(s.progress), provider=s.provider, device_type=s.device_type,
        rendering=convert.quality_to_pb(s.quality), degradation_step=s.step, compute_units=s.units,
        queue_position=queue_position)


class SessionService(sessions_pb2_grpc.SessionServiceServicer):
    """Every session a caller may see comes with its live-input token (the caller is the
    room's tenant or an operator: see `_visible`)."""

    def __init__(self, core: Scheduler, inputs: LiveInputKeys | None = None) -> None:
        self.core = core
        self.inputs = inputs or LiveInputKeys()

    def _pb(self, s: Session, queue_position: int = 0) -> types_pb2.Session:
        # An ended room takes no input: it gets no token.
        token = None if s.state.terminal else self.inputs.token(s.session_id, s.spec.tenant)
        return session_to_pb(s, queue_position, token, self._driver_urls(s))

    def _driver_urls(self, s: Session) -> tuple[str, str, str]:
        """A placed camera room's ingests, its worker's RTMP and WHIP addresses with the
        room's key, and its driver's preview ("" where there is none)."""
        if s.spec.drive_mode is not DriveMode.CAMERA or s.state.terminal or not s.worker_id:
            return "", "", ""
        conn = self.core.workers.get(s.worker_id)
        if conn is None:
            return "", "", ""
        key = input_tokens.driver_key(self.inputs.key(s.session_id))
        return (f"rtmp://{conn.driver_ingest}/live/{key}" if conn.driver_ingest else "",
                f"http://{conn.driver_whip}/whip/{key}" if conn.driver_whip else "",
                f"http://{conn.driver_whip}/preview/{key}" if conn.driver_whip else "")

    def _visible(self, p: Principal, session_id: str) -> Session:
        convert.session_id_from_pb(session_id)
        s = self.core.get(session_id)
        if not auth.may_see(p, s.spec.tenant):
            # Word for word the core's answer for an unknown id: whether another
            # tenant's session exists is not this caller's to learn.
            raise NotFound(f"session {session_id!r} not found")
        return s

    async def CreateSession(self, request: sessions_pb2.CreateSessionRequest,
                            context: grpc.aio.ServicerContext) -> types_pb2.Session:
        def create() -> Session:
            p = caller()
            spec, request_id = convert.create_from_pb(request)
            # Before the core: a retried request_id would otherwise find the other
            # tenant's session.
            auth.check_create(p, spec.tenant)
            return self.core.create(spec, request_id)

        s = await guard(context, create)
        await self.core.durable()
        return self._pb(s, self.core.queue_position(s.session_id))

    async def CreateSessions(self, request: sessions_pb2.CreateSessionsRequest,
                             context: grpc.aio.ServicerContext) -> sessions_pb2.CreateSessionsResponse:
        """Each room as CreateSession would admit it, in order, in one turn of the loop:
        they share the transaction that makes them durable and the answer."""
        def create_all() -> list[Session | Exception]:
            p = caller()
            n = len(request.requests)
            if not 0 < n <= MAX_BATCH:
                raise InvalidRequest(f"give between 1 and {MAX_BATCH} rooms per call (got {n})")
            out: list[Session | Exception] = []
            with self.core.batch():
                for item in request.requests:
                    try:
                        spec, request_id = convert.create_from_pb(item)
                        auth.check_create(p, spec.tenant)
                        out.append(self.core.create(spec, request_id))
                    except tuple(ERROR_STATUS) as e:
                        out.append(e)
            return out

        done = await guard(context, create_all)
        await self.core.durable()
        return sessions_pb2.CreateSessionsResponse(results=[
            sessions_pb2.CreateSessionResult(code=_status(r).value[0], message=str(r))
            if isinstance(r, Exception) else
            sessions_pb2.CreateSessionResult(session=self._pb(r, self.core.queue_position(r.session_id)))
            for r in done])

    async def GetSession(self, request: sessions_pb2.GetSessionRequest,
                         context: grpc.aio.ServicerContext) -> types_pb2.Session:
        s = await guard(context, lambda: self._visible(caller(), request.session_id))
        return self._pb(s, self.core.queue_position(s.session_id))

    async def ListSessions(self, request: sessions_pb2.ListSessionsRequest,
                           context: grpc.aio.ServicerContext) -> sessions_pb2.ListSessionsResponse:
        def list_() -> tuple[list[Session], int]:
            states = frozenset(convert.STATES[s] for s in request.states if s in convert.STATES)
            if len(states) != len(set(request.states)):
                raise InvalidRequest("unknown session state in filter")
            try:
                after = int(request.page_token) if request.page_token else 0
            except ValueError as e:
                raise InvalidRequest("page_token is not one this server issued") from e
            if request.page_size > 1000:
                raise InvalidRequest("page_size must be at most 1000")
            tenant = auth.tenant_scope(caller(), convert.tenant_from_pb(request.tenant))
            return self.core.list_sessions(tenant, states, request.page_size, after)

        page, next_seq = await guard(context, list_)
        return sessions_pb2.ListSessionsResponse(
            sessions=[self._pb(s) for s in page],
            next_page_token=str(next_seq) if next_seq else "")

    async def EndSession(self, request: sessions_pb2.EndSessionRequest,
                         context: grpc.aio.ServicerContext) -> types_pb2.Session:
        def end() -> Session:
            self._visible(caller(), request.session_id)
            return self.core.end(request.session_id, convert.reason_from_pb(request.reason))

        s = await guard(context, end)
        await self.core.durable()
        return self._pb(s)

    async def WatchSession(self, request: sessions_pb2.WatchSessionRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[sessions_pb2.SessionEvent]:
        await guard(context, lambda: self._visible(caller(), request.session_id))
        async for ev in self.core.watch(request.session_id):
            s = ev.session
            yield sessions_pb2.SessionEvent(
                session=self._pb(s, self.core.queue_position(s.session_id)),
                at=convert.timestamp(s.updated_at), kind=_EVENT_KINDS[ev.kind],
                message=ev.message)

    async def AppendScript(self, request: sessions_pb2.AppendScriptRequest,
                           context: grpc.aio.ServicerContext) -> sessions_pb2.AppendScriptResponse:
        def append() -> int:
            self._visible(caller(), request.session_id)
            return self.core.append_script(request.session_id,
                                           convert.segments_from_pb(request.segments))

        n = await guard(context, append)
        await self.core.durable()
        return sessions_pb2.AppendScriptResponse(queued_segments=n)

    async def GetUsage(self, request: sessions_pb2.GetUsageRequest,
                       context: grpc.aio.ServicerContext) -> sessions_pb2.GetUsageResponse:
        def usage() -> list[Any]:
            dims = []
            for d in request.group_by:
                if d not in _DIMENSIONS:
                    raise InvalidRequest(f"unknown usage dimension {d}")
                if _DIMENSIONS[d] not in dims:
                    dims.append(_DIMENSIONS[d])
            start = convert.optional_time_from_pb(request, "start")
            end = convert.optional_time_from_pb(request, "end")
            return self.core.usage(tenant=auth.tenant_scope(caller(), convert.tenant_from_pb(request.tenant)),
                                   group_by=tuple(dims), start=start, end=end)

        rows = await guard(context, usage)
        return sessions_pb2.GetUsageResponse(
            rows=[sessions_pb2.UsageRow(
                tenant=r.tenant,
                tier=convert.tier_to_pb(r.tier) if r.tier else types_pb2.TIER_UNSPECIFIED,
                avatar_id=r.avatar_id, device_type=r.device_type, sessions=len(r.sessions),
                stream_seconds=r.stream_seconds, device_seconds=r.device_seconds,
                compute_unit_seconds=r.compute_unit_seconds, cost=r.cost,
                cost_per_stream_hour=r.cost_per_stream_hour, platform=r.platform, voice=r.voice)
                for r in rows],
            as_of=convert.timestamp(self.core.clock()))

    async def GetTenant(self, request: sessions_pb2.GetTenantRequest,
                        context: grpc.aio.ServicerContext) -> sessions_pb2.TenantStatus:
        st = await guard(context, lambda: self.core.tenant_status(
            auth.tenant_scope(caller(), convert.tenant_from_pb(request.tenant))))
        t = st.config
        return sessions_pb2.TenantStatus(
            tenant=st.tenant, concurrency_budget_units=t.concurrency_units,
            units_in_use=st.units_in_use, spend_budget=t.spend_budget,
            spend_period_seconds=t.spend_period_seconds, spent_this_period=st.spent,
            reserved_units=st.reserved, reserved_units_in_use=st.reserved_in_use,
            rooms_pending=st.pending, rooms_running=st.running,
            budget_policy=t.on_budget_exhausted.value)
