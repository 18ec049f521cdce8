import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DriveMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DRIVE_MODE_UNSPECIFIED: _ClassVar[DriveMode]
    DRIVE_MODE_TEXT: _ClassVar[DriveMode]
    DRIVE_MODE_VOICE: _ClassVar[DriveMode]
    DRIVE_MODE_MOCAP: _ClassVar[DriveMode]
    DRIVE_MODE_CAMERA: _ClassVar[DriveMode]

class DriverState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DRIVER_STATE_UNSPECIFIED: _ClassVar[DriverState]
    DRIVER_STATE_WAITING: _ClassVar[DriverState]
    DRIVER_STATE_LIVE: _ClassVar[DriverState]
    DRIVER_STATE_FROZEN: _ClassVar[DriverState]
    DRIVER_STATE_LOOPED: _ClassVar[DriverState]
    DRIVER_STATE_NO_FACE: _ClassVar[DriverState]
    DRIVER_STATE_ABSENT: _ClassVar[DriverState]

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_PREMIUM: _ClassVar[Tier]
    TIER_STANDARD: _ClassVar[Tier]
    TIER_BEST_EFFORT: _ClassVar[Tier]

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_PENDING: _ClassVar[SessionState]
    SESSION_STATE_PLACED: _ClassVar[SessionState]
    SESSION_STATE_RUNNING: _ClassVar[SessionState]
    SESSION_STATE_ENDED: _ClassVar[SessionState]
    SESSION_STATE_FAILED: _ClassVar[SessionState]
DRIVE_MODE_UNSPECIFIED: DriveMode
DRIVE_MODE_TEXT: DriveMode
DRIVE_MODE_VOICE: DriveMode
DRIVE_MODE_MOCAP: DriveMode
DRIVE_MODE_CAMERA: DriveMode
DRIVER_STATE_UNSPECIFIED: DriverState
DRIVER_STATE_WAITING: DriverState
DRIVER_STATE_LIVE: DriverState
DRIVER_STATE_FROZEN: DriverState
DRIVER_STATE_LOOPED: DriverState
DRIVER_STATE_NO_FACE: DriverState
DRIVER_STATE_ABSENT: DriverState
TIER_UNSPECIFIED: Tier
TIER_PREMIUM: Tier
TIER_STANDARD: Tier
TIER_BEST_EFFORT: Tier
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_PENDING: SessionState
SESSION_STATE_PLACED: SessionState
SESSION_STATE_RUNNING: SessionState
SESSION_STATE_ENDED: SessionState
SESSION_STATE_FAILED: SessionState

class Quality(_message.Message):
    __slots__ = ("width", "height", "fps")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    fps: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., fps: _Optional[int] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("file_path", "hls_dir", "rtmp_url")
    FILE_PATH_FIELD_NUMBER: _ClassVar[int]
    HLS_DIR_FIELD_NUMBER: _ClassVar[int]
    RTMP_URL_FIELD_NUMBER: _ClassVar[int]
    file_path: str
    hls_dir: str
    rtmp_url: str
    def __init__(self, file_path: _Optional[str] = ..., hls_dir: _Optional[str] = ..., rtmp_url: _Optional[str] = ...) -> None: ...

class ScriptSegment(_message.Message):
    __slots__ = ("text", "pause_after_seconds")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PAUSE_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    pause_after_seconds: float
    def __init__(self, text: _Optional[str] = ..., pause_after_seconds: _Optional[float] = ...) -> None: ...

class SessionSpec(_message.Message):
    __slots__ = ("tenant", "room_id", "avatar_id", "drive_mode", "quality", "tier", "output", "max_duration_seconds", "script", "platform", "product_category", "language", "voice_conversion")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    DRIVE_MODE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCRIPT_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    VOICE_CONVERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    room_id: str
    avatar_id: str
    drive_mode: DriveMode
    quality: Quality
    tier: Tier
    output: Output
    max_duration_seconds: float
    script: _containers.RepeatedCompositeFieldContainer[ScriptSegment]
    platform: str
    product_category: str
    language: str
    voice_conversion: bool
    def __init__(self, tenant: _Optional[str] = ..., room_id: _Optional[str] = ..., avatar_id: _Optional[str] = ..., drive_mode: _Optional[_Union[DriveMode, str]] = ..., quality: _Optional[_Union[Quality, _Mapping]] = ..., tier: _Optional[_Union[Tier, str]] = ..., output: _Optional[_Union[Output, _Mapping]] = ..., max_duration_seconds: _Optional[float] = ..., script: _Optional[_Iterable[_Union[ScriptSegment, _Mapping]]] = ..., platform: _Optional[str] = ..., product_category: _Optional[str] = ..., language: _Optional[str] = ..., voice_conversion: _Optional[bool] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("text", "position", "size")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    text: str
    position: str
    size: float
    def __init__(self, text: _Optional[str] = ..., position: _Optional[str] = ..., size: _Optional[float] = ...) -> None: ...

class SessionProgress(_message.Message):
    __slots__ = ("frames_rendered", "late_frames", "stream_seconds", "device_seconds", "stage_seconds", "av_offset_seconds", "av_correction_seconds", "sync_checks", "script_segments_done", "driver_state", "driven_seconds", "driver", "voice_unavailable")
    class StageSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    FRAMES_RENDERED_FIELD_NUMBER: _ClassVar[int]
    LATE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    STREAM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AV_OFFSET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AV_CORRECTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SYNC_CHECKS_FIELD_NUMBER: _ClassVar[int]
    SCRIPT_SEGMENTS_DONE_FIELD_NUMBER: _ClassVar[int]
    DRIVER_STATE_FIELD_NUMBER: _ClassVar[int]
    DRIVEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    VOICE_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    frames_rendered: int
    late_frames: int
    stream_seconds: float
    device_seconds: float
    stage_seconds: _containers.ScalarMap[str, float]
    av_offset_seconds: float
    av_correction_seconds: float
    sync_checks: int
    script_segments_done: int
    driver_state: DriverState
    driven_seconds: float
    driver: str
    voice_unavailable: str
    def __init__(self, frames_rendered: _Optional[int] = ..., late_frames: _Optional[int] = ..., stream_seconds: _Optional[float] = ..., device_seconds: _Optional[float] = ..., stage_seconds: _Optional[_Mapping[str, float]] = ..., av_offset_seconds: _Optional[float] = ..., av_correction_seconds: _Optional[float] = ..., sync_checks: _Optional[int] = ..., script_segments_done: _Optional[int] = ..., driver_state: _Optional[_Union[DriverState, str]] = ..., driven_seconds: _Optional[float] = ..., driver: _Optional[str] = ..., voice_unavailable: _Optional[str] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "spec", "state", "reason", "worker_id", "input_endpoint", "created_at", "updated_at", "progress", "provider", "device_type", "rendering", "degradation_step", "compute_units", "queue_position", "input_token", "input_token_expires_at", "driver_url", "driver_whip_url", "driver_preview_url")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RENDERING_FIELD_NUMBER: _ClassVar[int]
    DEGRADATION_STEP_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_UNITS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKEN_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DRIVER_URL_FIELD_NUMBER: _ClassVar[int]
    DRIVER_WHIP_URL_FIELD_NUMBER: _ClassVar[int]
    DRIVER_PREVIEW_URL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    spec: SessionSpec
    state: SessionState
    reason: str
    worker_id: str
    input_endpoint: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    progress: SessionProgress
    provider: str
    device_type: str
    rendering: Quality
    degradation_step: int
    compute_units: float
    queue_position: int
    input_token: str
    input_token_expires_at: _timestamp_pb2.Timestamp
    driver_url: str
    driver_whip_url: str
    driver_preview_url: str
    def __init__(self, session_id: _Optional[str] = ..., spec: _Optional[_Union[SessionSpec, _Mapping]] = ..., state: _Optional[_Union[SessionState, str]] = ..., reason: _Optional[str] = ..., worker_id: _Optional[str] = ..., input_endpoint: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., progress: _Optional[_Union[SessionProgress, _Mapping]] = ..., provider: _Optional[str] = ..., device_type: _Optional[str] = ..., rendering: _Optional[_Union[Quality, _Mapping]] = ..., degradation_step: _Optional[int] = ..., compute_units: _Optional[float] = ..., queue_position: _Optional[int] = ..., input_token: _Optional[str] = ..., input_token_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., driver_url: _Optional[str] = ..., driver_whip_url: _Optional[str] = ..., driver_preview_url: _Optional[str] = ...) -> None: ...
