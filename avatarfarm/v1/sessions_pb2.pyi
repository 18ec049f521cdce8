import datetime

from avatarfarm.v1 import types_pb2 as _types_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_EVENT_KIND_UNSPECIFIED: _ClassVar[SessionEventKind]
    SESSION_EVENT_KIND_STATE: _ClassVar[SessionEventKind]
    SESSION_EVENT_KIND_DEGRADED: _ClassVar[SessionEventKind]
    SESSION_EVENT_KIND_RESTORED: _ClassVar[SessionEventKind]
    SESSION_EVENT_KIND_PREEMPTED: _ClassVar[SessionEventKind]
    SESSION_EVENT_KIND_BUDGET: _ClassVar[SessionEventKind]
    SESSION_EVENT_KIND_QUEUED: _ClassVar[SessionEventKind]
    SESSION_EVENT_KIND_LICENCE: _ClassVar[SessionEventKind]
    SESSION_EVENT_KIND_SYNC: _ClassVar[SessionEventKind]
    SESSION_EVENT_KIND_DRIVER: _ClassVar[SessionEventKind]
    SESSION_EVENT_KIND_VOICE: _ClassVar[SessionEventKind]

class UsageDimension(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_DIMENSION_UNSPECIFIED: _ClassVar[UsageDimension]
    USAGE_DIMENSION_TENANT: _ClassVar[UsageDimension]
    USAGE_DIMENSION_TIER: _ClassVar[UsageDimension]
    USAGE_DIMENSION_AVATAR: _ClassVar[UsageDimension]
    USAGE_DIMENSION_DEVICE_TYPE: _ClassVar[UsageDimension]
    USAGE_DIMENSION_PLATFORM: _ClassVar[UsageDimension]
    USAGE_DIMENSION_VOICE: _ClassVar[UsageDimension]
SESSION_EVENT_KIND_UNSPECIFIED: SessionEventKind
SESSION_EVENT_KIND_STATE: SessionEventKind
SESSION_EVENT_KIND_DEGRADED: SessionEventKind
SESSION_EVENT_KIND_RESTORED: SessionEventKind
SESSION_EVENT_KIND_PREEMPTED: SessionEventKind
SESSION_EVENT_KIND_BUDGET: SessionEventKind
SESSION_EVENT_KIND_QUEUED: SessionEventKind
SESSION_EVENT_KIND_LICENCE: SessionEventKind
SESSION_EVENT_KIND_SYNC: SessionEventKind
SESSION_EVENT_KIND_DRIVER: SessionEventKind
SESSION_EVENT_KIND_VOICE: SessionEventKind
USAGE_DIMENSION_UNSPECIFIED: UsageDimension
USAGE_DIMENSION_TENANT: UsageDimension
USAGE_DIMENSION_TIER: UsageDimension
USAGE_DIMENSION_AVATAR: UsageDimension
USAGE_DIMENSION_DEVICE_TYPE: UsageDimension
USAGE_DIMENSION_PLATFORM: UsageDimension
USAGE_DIMENSION_VOICE: UsageDimension

class CreateSessionRequest(_message.Message):
    __slots__ = ("spec", "request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: _types_pb2.SessionSpec
    request_id: str
    def __init__(self, spec: _Optional[_Union[_types_pb2.SessionSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateSessionsRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[CreateSessionRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[CreateSessionRequest, _Mapping]]] = ...) -> None: ...

class CreateSessionResult(_message.Message):
    __slots__ = ("session", "code", "message")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session: _types_pb2.Session
    code: int
    message: str
    def __init__(self, session: _Optional[_Union[_types_pb2.Session, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CreateSessionsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CreateSessionResult]
    def __init__(self, results: _Optional[_Iterable[_Union[CreateSessionResult, _Mapping]]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("tenant", "states", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    states: _containers.RepeatedScalarFieldContainer[_types_pb2.SessionState]
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., states: _Optional[_Iterable[_Union[_types_pb2.SessionState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[_types_pb2.Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("session_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class WatchSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("session", "at", "kind", "message")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session: _types_pb2.Session
    at: _timestamp_pb2.Timestamp
    kind: SessionEventKind
    message: str
    def __init__(self, session: _Optional[_Union[_types_pb2.Session, _Mapping]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[_Union[SessionEventKind, str]] = ..., message: _Optional[str] = ...) -> None: ...

class AppendScriptRequest(_message.Message):
    __slots__ = ("session_id", "segments")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    segments: _containers.RepeatedCompositeFieldContainer[_types_pb2.ScriptSegment]
    def __init__(self, session_id: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[_types_pb2.ScriptSegment, _Mapping]]] = ...) -> None: ...

class AppendScriptResponse(_message.Message):
    __slots__ = ("queued_segments",)
    QUEUED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    queued_segments: int
    def __init__(self, queued_segments: _Optional[int] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant", "group_by", "start", "end")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    group_by: _containers.RepeatedScalarFieldContainer[UsageDimension]
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    def __init__(self, tenant: _Optional[str] = ..., group_by: _Optional[_Iterable[_Union[UsageDimension, str]]] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("tenant", "tier", "avatar_id", "device_type", "sessions", "stream_seconds", "device_seconds", "compute_unit_seconds", "cost", "cost_per_stream_hour", "platform", "voice")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STREAM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_UNIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    COST_PER_STREAM_HOUR_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    tier: _types_pb2.Tier
    avatar_id: str
    device_type: str
    sessions: int
    stream_seconds: float
    device_seconds: float
    compute_unit_seconds: float
    cost: float
    cost_per_stream_hour: float
    platform: str
    voice: str
    def __init__(self, tenant: _Optional[str] = ..., tier: _Optional[_Union[_types_pb2.Tier, str]] = ..., avatar_id: _Optional[str] = ..., device_type: _Optional[str] = ..., sessions: _Optional[int] = ..., stream_seconds: _Optional[float] = ..., device_seconds: _Optional[float] = ..., compute_unit_seconds: _Optional[float] = ..., cost: _Optional[float] = ..., cost_per_stream_hour: _Optional[float] = ..., platform: _Optional[str] = ..., voice: _Optional[str] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows", "as_of")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class TenantStatus(_message.Message):
    __slots__ = ("tenant", "concurrency_budget_units", "units_in_use", "spend_budget", "spend_period_seconds", "spent_this_period", "reserved_units", "reserved_units_in_use", "rooms_pending", "rooms_running", "budget_policy")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_BUDGET_UNITS_FIELD_NUMBER: _ClassVar[int]
    UNITS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    SPEND_BUDGET_FIELD_NUMBER: _ClassVar[int]
    SPEND_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SPENT_THIS_PERIOD_FIELD_NUMBER: _ClassVar[int]
    RESERVED_UNITS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_UNITS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    ROOMS_PENDING_FIELD_NUMBER: _ClassVar[int]
    ROOMS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    BUDGET_POLICY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    concurrency_budget_units: float
    units_in_use: float
    spend_budget: float
    spend_period_seconds: float
    spent_this_period: float
    reserved_units: float
    reserved_units_in_use: float
    rooms_pending: int
    rooms_running: int
    budget_policy: str
    def __init__(self, tenant: _Optional[str] = ..., concurrency_budget_units: _Optional[float] = ..., units_in_use: _Optional[float] = ..., spend_budget: _Optional[float] = ..., spend_period_seconds: _Optional[float] = ..., spent_this_period: _Optional[float] = ..., reserved_units: _Optional[float] = ..., reserved_units_in_use: _Optional[float] = ..., rooms_pending: _Optional[int] = ..., rooms_running: _Optional[int] = ..., budget_policy: _Optional[str] = ...) -> None: ...
