from avatarfarm.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_TTS: _ClassVar[Stage]
    STAGE_AUDIO_TO_MOTION: _ClassVar[Stage]
    STAGE_RENDER: _ClassVar[Stage]
    STAGE_ENCODE: _ClassVar[Stage]
    STAGE_ALIGNMENT: _ClassVar[Stage]
    STAGE_FACE: _ClassVar[Stage]
STAGE_UNSPECIFIED: Stage
STAGE_TTS: Stage
STAGE_AUDIO_TO_MOTION: Stage
STAGE_RENDER: Stage
STAGE_ENCODE: Stage
STAGE_ALIGNMENT: Stage
STAGE_FACE: Stage

class BatchLatency(_message.Message):
    __slots__ = ("batch_size", "seconds")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    seconds: float
    def __init__(self, batch_size: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class LatencyProfile(_message.Message):
    __slots__ = ("stage", "model", "width", "height", "latencies")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LATENCIES_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    model: str
    width: int
    height: int
    latencies: _containers.RepeatedCompositeFieldContainer[BatchLatency]
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., model: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., latencies: _Optional[_Iterable[_Union[BatchLatency, _Mapping]]] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("provider", "device_type", "name", "cpu_cores", "latency_budget_seconds", "memory_bytes")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    provider: str
    device_type: str
    name: str
    cpu_cores: int
    latency_budget_seconds: float
    memory_bytes: int
    def __init__(self, provider: _Optional[str] = ..., device_type: _Optional[str] = ..., name: _Optional[str] = ..., cpu_cores: _Optional[int] = ..., latency_budget_seconds: _Optional[float] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class MemoryProfile(_message.Message):
    __slots__ = ("models_bytes", "avatar_bytes_per_pixel", "room_bytes_per_pixel")
    MODELS_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVATAR_BYTES_PER_PIXEL_FIELD_NUMBER: _ClassVar[int]
    ROOM_BYTES_PER_PIXEL_FIELD_NUMBER: _ClassVar[int]
    models_bytes: int
    avatar_bytes_per_pixel: float
    room_bytes_per_pixel: float
    def __init__(self, models_bytes: _Optional[int] = ..., avatar_bytes_per_pixel: _Optional[float] = ..., room_bytes_per_pixel: _Optional[float] = ...) -> None: ...

class ProfileUpdate(_message.Message):
    __slots__ = ("profiles",)
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    profiles: _containers.RepeatedCompositeFieldContainer[LatencyProfile]
    def __init__(self, profiles: _Optional[_Iterable[_Union[LatencyProfile, _Mapping]]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("worker_id", "device", "models", "profiles", "input_endpoint", "avatars", "memory", "warm_avatars", "usage_epoch", "active_rooms", "face_families", "driver_ingest", "driver_whip", "voices")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    INPUT_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    AVATARS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    WARM_AVATARS_FIELD_NUMBER: _ClassVar[int]
    USAGE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ROOMS_FIELD_NUMBER: _ClassVar[int]
    FACE_FAMILIES_FIELD_NUMBER: _ClassVar[int]
    DRIVER_INGEST_FIELD_NUMBER: _ClassVar[int]
    DRIVER_WHIP_FIELD_NUMBER: _ClassVar[int]
    VOICES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    device: Device
    models: _containers.RepeatedScalarFieldContainer[str]
    profiles: _containers.RepeatedCompositeFieldContainer[LatencyProfile]
    input_endpoint: str
    avatars: _containers.RepeatedScalarFieldContainer[str]
    memory: MemoryProfile
    warm_avatars: _containers.RepeatedScalarFieldContainer[str]
    usage_epoch: int
    active_rooms: _containers.RepeatedCompositeFieldContainer[ActiveRoom]
    face_families: _containers.RepeatedScalarFieldContainer[str]
    driver_ingest: str
    driver_whip: str
    voices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., device: _Optional[_Union[Device, _Mapping]] = ..., models: _Optional[_Iterable[str]] = ..., profiles: _Optional[_Iterable[_Union[LatencyProfile, _Mapping]]] = ..., input_endpoint: _Optional[str] = ..., avatars: _Optional[_Iterable[str]] = ..., memory: _Optional[_Union[MemoryProfile, _Mapping]] = ..., warm_avatars: _Optional[_Iterable[str]] = ..., usage_epoch: _Optional[int] = ..., active_rooms: _Optional[_Iterable[_Union[ActiveRoom, _Mapping]]] = ..., face_families: _Optional[_Iterable[str]] = ..., driver_ingest: _Optional[str] = ..., driver_whip: _Optional[str] = ..., voices: _Optional[_Iterable[str]] = ...) -> None: ...

class ActiveRoom(_message.Message):
    __slots__ = ("session_id", "epoch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    epoch: int
    def __init__(self, session_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("active_sessions", "load")
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    active_sessions: int
    load: float
    def __init__(self, active_sessions: _Optional[int] = ..., load: _Optional[float] = ...) -> None: ...

class SessionUpdate(_message.Message):
    __slots__ = ("session_id", "state", "reason", "progress", "epoch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    state: _types_pb2.SessionState
    reason: str
    progress: _types_pb2.SessionProgress
    epoch: int
    def __init__(self, session_id: _Optional[str] = ..., state: _Optional[_Union[_types_pb2.SessionState, str]] = ..., reason: _Optional[str] = ..., progress: _Optional[_Union[_types_pb2.SessionProgress, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class UsageReport(_message.Message):
    __slots__ = ("seq", "updates")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    updates: _containers.RepeatedCompositeFieldContainer[SessionUpdate]
    def __init__(self, seq: _Optional[int] = ..., updates: _Optional[_Iterable[_Union[SessionUpdate, _Mapping]]] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("deadline_seconds", "reason")
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    deadline_seconds: float
    reason: str
    def __init__(self, deadline_seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("register", "heartbeat", "session_update", "profile_update", "usage_report", "drain")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    SESSION_UPDATE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_UPDATE_FIELD_NUMBER: _ClassVar[int]
    USAGE_REPORT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    register: Register
    heartbeat: Heartbeat
    session_update: SessionUpdate
    profile_update: ProfileUpdate
    usage_report: UsageReport
    drain: Drain
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., session_update: _Optional[_Union[SessionUpdate, _Mapping]] = ..., profile_update: _Optional[_Union[ProfileUpdate, _Mapping]] = ..., usage_report: _Optional[_Union[UsageReport, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("heartbeat_interval_seconds", "last_usage_seq", "worker_timeout_seconds", "confirmed_rooms")
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_USAGE_SEQ_FIELD_NUMBER: _ClassVar[int]
    WORKER_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_ROOMS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_seconds: float
    last_usage_seq: int
    worker_timeout_seconds: float
    confirmed_rooms: _containers.RepeatedCompositeFieldContainer[ActiveRoom]
    def __init__(self, heartbeat_interval_seconds: _Optional[float] = ..., last_usage_seq: _Optional[int] = ..., worker_timeout_seconds: _Optional[float] = ..., confirmed_rooms: _Optional[_Iterable[_Union[ActiveRoom, _Mapping]]] = ...) -> None: ...

class UsageAck(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class Pace(_message.Message):
    __slots__ = ("heartbeat_interval_seconds",)
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_seconds: float
    def __init__(self, heartbeat_interval_seconds: _Optional[float] = ...) -> None: ...

class Assign(_message.Message):
    __slots__ = ("session_id", "spec", "epoch", "continuation", "resumed_at_seconds", "label", "input_key", "driver_policy", "voice", "voice_rate")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    RESUMED_AT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_KEY_FIELD_NUMBER: _ClassVar[int]
    DRIVER_POLICY_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    VOICE_RATE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    spec: _types_pb2.SessionSpec
    epoch: int
    continuation: int
    resumed_at_seconds: float
    label: _types_pb2.Label
    input_key: bytes
    driver_policy: DriverPolicy
    voice: str
    voice_rate: float
    def __init__(self, session_id: _Optional[str] = ..., spec: _Optional[_Union[_types_pb2.SessionSpec, _Mapping]] = ..., epoch: _Optional[int] = ..., continuation: _Optional[int] = ..., resumed_at_seconds: _Optional[float] = ..., label: _Optional[_Union[_types_pb2.Label, _Mapping]] = ..., input_key: _Optional[bytes] = ..., driver_policy: _Optional[_Union[DriverPolicy, _Mapping]] = ..., voice: _Optional[str] = ..., voice_rate: _Optional[float] = ...) -> None: ...

class DriverPolicy(_message.Message):
    __slots__ = ("require_live", "end_when_lost", "grace_seconds")
    REQUIRE_LIVE_FIELD_NUMBER: _ClassVar[int]
    END_WHEN_LOST_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    require_live: bool
    end_when_lost: bool
    grace_seconds: float
    def __init__(self, require_live: _Optional[bool] = ..., end_when_lost: _Optional[bool] = ..., grace_seconds: _Optional[float] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("session_id", "reason", "at_script_boundary", "handover")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_SCRIPT_BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    at_script_boundary: bool
    handover: bool
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ..., at_script_boundary: _Optional[bool] = ..., handover: _Optional[bool] = ...) -> None: ...

class Script(_message.Message):
    __slots__ = ("session_id", "segments")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    segments: _containers.RepeatedCompositeFieldContainer[_types_pb2.ScriptSegment]
    def __init__(self, session_id: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[_types_pb2.ScriptSegment, _Mapping]]] = ...) -> None: ...

class Reconfigure(_message.Message):
    __slots__ = ("session_id", "quality", "step", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    quality: _types_pb2.Quality
    step: int
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., quality: _Optional[_Union[_types_pb2.Quality, _Mapping]] = ..., step: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class SchedulerMessage(_message.Message):
    __slots__ = ("registered", "assign", "release", "script", "reconfigure", "usage_ack", "pace", "leader_epoch")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    SCRIPT_FIELD_NUMBER: _ClassVar[int]
    RECONFIGURE_FIELD_NUMBER: _ClassVar[int]
    USAGE_ACK_FIELD_NUMBER: _ClassVar[int]
    PACE_FIELD_NUMBER: _ClassVar[int]
    LEADER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    assign: Assign
    release: Release
    script: Script
    reconfigure: Reconfigure
    usage_ack: UsageAck
    pace: Pace
    leader_epoch: int
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., assign: _Optional[_Union[Assign, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ..., script: _Optional[_Union[Script, _Mapping]] = ..., reconfigure: _Optional[_Union[Reconfigure, _Mapping]] = ..., usage_ack: _Optional[_Union[UsageAck, _Mapping]] = ..., pace: _Optional[_Union[Pace, _Mapping]] = ..., leader_epoch: _Optional[int] = ...) -> None: ...
